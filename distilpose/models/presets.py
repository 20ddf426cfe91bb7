"""Named model configs and the model factory.

Paper presets reproduce the official architectures (params / GFLOPs checked by
`python -m distilpose.models.summary`). The `*-tiny` presets run the same code at 128x96
input with narrow, shallow backbones and a small transformer so tests and the demo take
seconds on a laptop CPU; a tiny student and the tiny teacher share K, D and P.
"""

from __future__ import annotations

from torch import nn

from distilpose.errors import UserError

from .config import ModelConfig
from .distilpose import DistilPose
from .tokenpose import TokenPose


def official_heatmap_hidden(dim: int, heatmap_size: tuple[int, int]) -> int:
    """Official TokenPose rule: a hidden layer of Hh*Wh/8 only if D <= half of it, else none."""
    hidden = heatmap_size[0] * heatmap_size[1] // 8
    return hidden if dim <= hidden // 2 else 0


_PAPER = dict(input_size=(256, 192), heatmap_size=(64, 48), dim=192, depth=12, heads=8, mlp_ratio=3)
_PAPER_HIDDEN = official_heatmap_hidden(192, (64, 48))  # 384

# Tiny: stride-4 grid 32x24 -> 8x8 = 64 patches of 4x3; narrow stem / stage 1 / branches.
# dim 96: measured to learn the synthetic set clearly faster than 64 in a minutes-long CPU run.
_TINY = dict(input_size=(128, 96), heatmap_size=(32, 24), dim=96, depth=2, heads=4, mlp_ratio=3)
_TINY_CNN = dict(stem_channels=16, stage1_planes=8, stage1_blocks=1)
_TINY_HRNET = dict(_TINY_CNN, hrnet_width=16, hrnet_blocks=1)
_TINY_HIDDEN = official_heatmap_hidden(96, (32, 24))  # 0: LN -> Linear(96 -> 768)

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
    ]
}

# Figures published in the paper / official README (params in millions, GFLOPs at 1x3x256x192).
PAPER_FIGURES: dict[str, tuple[float, float]] = {
    "distilpose-s": (5.36, 2.38),
    "distilpose-l": (21.27, 10.33),
    "tokenpose-w48": (69.41, 17.03),
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
    """Teacher (TokenPose) or student (DistilPose) for a preset name or config; `.config` set."""
    config = get_config(name, **overrides)
    return TokenPose(config) if config.kind == "teacher" else DistilPose(config)
