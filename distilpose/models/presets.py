"""Named model configs and the model factory.

Paper presets reproduce the official architectures (params / GFLOPs checked by
`python -m distilpose.models.summary`). The `*-tiny` presets run the same code at 128x96
input with narrow, shallow backbones and a small transformer so tests and the demo take
seconds on a laptop CPU; a tiny student and the tiny teacher share K, D and P.

Besides TokenPose / DistilPose, the heatmap teachers without tokens (SimpleBaseline,
HRNet top-down; mmpose 0.x checkpoints load unchanged) and the DeepPose regression student
(docs/method.md#other-teachers-and-students).
"""

from __future__ import annotations

from torch import nn

from distilpose.errors import UserError

from .config import ModelConfig
from .deeppose import DeepPose
from .distilpose import DistilPose
from .simplebaseline import HeatmapTeacher
from .tokenpose import TokenPose


def official_heatmap_hidden(dim: int, heatmap_size: tuple[int, int]) -> int:
    """Official TokenPose rule: a hidden layer of Hh*Wh/8 only if D <= half of it, else none."""
    hidden = heatmap_size[0] * heatmap_size[1] // 8
    return hidden if dim <= hidden // 2 else 0


_PAPER = dict(input_size=(256, 192), heatmap_size=(64, 48), dim=192, depth=12, heads=8, mlp_ratio=3)
_PAPER_HIDDEN = official_heatmap_hidden(192, (64, 48))  # 384

# Tiny: stride-4 grid 32x24 -> 8x8 = 64 patches of 4x3; narrow stem / stage 1 / branches.
# dim 96: measured to learn the synthetic set clearly faster than 64 in a minutes-long CPU run.
_TINY_SIZES = dict(input_size=(128, 96), heatmap_size=(32, 24))
_TINY = dict(_TINY_SIZES, dim=96, depth=2, heads=4, mlp_ratio=3)
_TINY_CNN = dict(stem_channels=16, stage1_planes=8, stage1_blocks=1)
_TINY_HRNET = dict(_TINY_CNN, hrnet_width=16, hrnet_blocks=1)
_TINY_HIDDEN = official_heatmap_hidden(96, (32, 24))  # 0: LN -> Linear(96 -> 768)
# Tiny ResNet-18 at width 16 (16-channel 7x7 stem; stages of 16/32/64/128 channels) for the
# tiny SimpleBaseline teacher and DeepPose student; 3 deconvolutions of 64 channels.
_TINY_RESNET = dict(_TINY_SIZES, stem_channels=16, resnet_width=16)


def _simplebaseline(name: str, depth: int, **sizes) -> ModelConfig:
    return ModelConfig(name, "teacher", "resnet", head="heatmap", resnet_depth=depth, **sizes)


def _hrnet_heatmap(name: str, width: int, **sizes) -> ModelConfig:
    # mmpose hrnet_w{32,48}_coco_256x192: the full 4-stage HRNet, no deconvolution, 1x1 final conv.
    return ModelConfig(name, "teacher", "hrnet", head="heatmap", hrnet_width=width, deconv_layers=0, **sizes)


def _deeppose(name: str, depth: int, **sizes) -> ModelConfig:
    return ModelConfig(name, "student", "resnet", head="regression", resnet_depth=depth, **sizes)


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        # Teacher "TokenPose*": full 4-stage HRNet-W48 + depth-12 / 8-head encoder.
        ModelConfig(
            "tokenpose-w48", "teacher", "hrnet", hrnet_modules=(1, 4, 3), heatmap_head_hidden=_PAPER_HIDDEN, **_PAPER
        ),
        ModelConfig("distilpose-s", "student", "stemnet", **_PAPER),
        # HRNet-W48 cut after stage 3, last module fusing to the high-res branch only.
        ModelConfig("distilpose-l", "student", "hrnet", hrnet_modules=(1, 4), **_PAPER),
        # The weak teacher of the paper's teacher-choice ablation.
        ModelConfig("tokenpose-stemnet", "teacher", "stemnet", heatmap_head_hidden=_PAPER_HIDDEN, **_PAPER),
        ModelConfig(
            "tokenpose-tiny",
            "teacher",
            "hrnet",
            hrnet_modules=(1, 1, 1),
            heatmap_head_hidden=_TINY_HIDDEN,
            **_TINY_HRNET,
            **_TINY,
        ),
        ModelConfig("distilpose-tiny", "student", "stemnet", **_TINY_CNN, **_TINY),
        # Stages 1-3 of tokenpose-tiny's HRNet: can be initialized from the tiny teacher.
        ModelConfig("distilpose-l-tiny", "student", "hrnet", hrnet_modules=(1, 1), **_TINY_HRNET, **_TINY),
        # Heatmap teachers without tokens (mmpose 0.x TopDown, 256x192) and the DeepPose student.
        _simplebaseline("simplebaseline-r50", 50),
        _simplebaseline("simplebaseline-r101", 101),
        _simplebaseline("simplebaseline-r152", 152),
        _hrnet_heatmap("hrnet-w32", 32),
        _hrnet_heatmap("hrnet-w48", 48),
        _deeppose("deeppose-r50", 50),
        _deeppose("deeppose-r101", 101),
        _deeppose("deeppose-r152", 152),
        _simplebaseline("simplebaseline-tiny", 18, **_TINY_RESNET, deconv_channels=64),
        _hrnet_heatmap("hrnet-tiny", 16, hrnet_modules=(1, 1, 1), **_TINY_CNN, hrnet_blocks=1, **_TINY_SIZES),
        # Same ResNet as simplebaseline-tiny: its backbone can start from the tiny teacher's.
        _deeppose("deeppose-tiny", 18, **_TINY_RESNET),
    ]
}

# Figures published in the paper / official README (params in millions, GFLOPs at 1x3x256x192).
PAPER_FIGURES: dict[str, tuple[float, float]] = {
    "distilpose-s": (5.36, 2.38),
    "distilpose-l": (21.27, 10.33),
    "tokenpose-w48": (69.41, 17.03),
}
# mmpose's own figures for its 0.x configs (docs/en/inference_speed_summary.md: mmcv's
# get_model_complexity_info, the convention `summary` follows), at 1x3x256x192.
MMPOSE_FIGURES: dict[str, tuple[float, float]] = {
    "simplebaseline-r50": (34.0, 5.46),
    "simplebaseline-r101": (52.99, 9.11),
    "simplebaseline-r152": (68.64, 12.77),
    "hrnet-w32": (28.54, 7.7),
    "hrnet-w48": (63.6, 15.77),
    # mmpose's DeepPose predicts coordinates only; the Simulated Heatmaps layer (K x 3 outputs:
    # score, sigma_x, sigma_y) adds 0.10M params to deeppose-r50 (0.4%).
    "deeppose-r50": (23.58, 4.04),
    "deeppose-r101": (42.57, 7.69),
    "deeppose-r152": (58.21, 11.34),
}
# The SimpleBaseline / HRNet papers' figures (repeated in DistilPose's generalisation table),
# counted by the HRNet repository's own tool, which counts transposed convolutions per output
# pixel (4x mmcv's per input pixel) and leaves out BN / ReLU: not comparable to the above.
ORIGINAL_PAPER_FIGURES: dict[str, tuple[float, float]] = {
    "simplebaseline-r50": (34.0, 8.9),
    "simplebaseline-r101": (53.0, 12.4),
    "simplebaseline-r152": (68.6, 15.7),
    "hrnet-w32": (28.5, 7.1),
    "hrnet-w48": (63.6, 14.6),
}


def get_config(name: str | ModelConfig, **overrides) -> ModelConfig:
    if isinstance(name, ModelConfig):
        config = name
    else:
        try:
            config = PRESETS[name]
        except KeyError:
            raise UserError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None
    return config.replace(**overrides) if overrides else config


def build_model(name: str | ModelConfig, **overrides) -> nn.Module:
    """The model of a preset name or config, `.config` set: a teacher (TokenPose, or a heatmap
    teacher without tokens) or a student (DistilPose, or DeepPose without tokens)."""
    config = get_config(name, **overrides)
    if config.head == "heatmap":
        return HeatmapTeacher(config)
    if config.head == "regression":
        return DeepPose(config)
    return TokenPose(config) if config.kind == "teacher" else DistilPose(config)
