"""ModelConfig: one frozen dataclass that fully describes every model in this package.

It lives apart from `presets.py` so that the model files can import it without a cycle.
`dataclasses.asdict(cfg)` is JSON-serialisable and `ModelConfig(**d)` rebuilds it (JSON lists
are turned back into tuples in `__post_init__`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

KINDS = ("teacher", "student")
BACKBONES = ("hrnet", "stemnet", "resnet")
BACKBONE_STRIDE = 4  # heatmaps (and HRNet / StemNet features) are at 1/4 of the input resolution
RESNET_STRIDE = 32  # ResNet ends at 1/32; SimpleBaseline's deconvolutions bring it back to 1/4
RESNET_DEPTHS = (18, 34, 50, 101, 152)
# What sits on the backbone. "token": a token encoder (TokenPose teacher / DistilPose student);
# "heatmap": deconvolutions (maybe none) + a 1x1 conv to heatmaps (SimpleBaseline, HRNet top-down
# teachers, no tokens); "regression": global pooling + a linear layer to coordinates (DeepPose
# student, no tokens).
HEADS = {"teacher": ("token", "heatmap"), "student": ("token", "regression")}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    kind: str  # "teacher" (heatmaps) | "student" (regression)
    backbone: str  # "hrnet" | "stemnet" | "resnet"
    input_size: tuple[int, int] = (256, 192)  # (H, W)
    heatmap_size: tuple[int, int] = (64, 48)  # (H, W) = backbone feature grid
    num_joints: int = 17

    # Stem + stage 1, shared by StemNet and HRNet (mmpose hard-codes 64 / 64 / 4).
    stem_channels: int = 64
    stage1_planes: int = 64  # Bottleneck width; stage-1 output has 4 * planes channels
    stage1_blocks: int = 4

    # HRNet only. Branch i has hrnet_width * 2**i channels. hrnet_modules[s] is the number of
    # HR modules of stage s + 2, so its length picks the depth: 3 -> full 4-stage HRNet
    # (teacher), 2 -> cut after stage 3 (DistilPose-L).
    hrnet_width: int = 48
    hrnet_modules: tuple[int, ...] = (1, 4, 3)
    hrnet_blocks: int = 4  # BasicBlocks per branch in every HR module

    # ResNet only (mmpose `ResNet`): depth picks the blocks, stem_channels the 7x7 stem,
    # resnet_width the first stage's width (doubling per stage; Bottlenecks expand it 4x).
    resnet_depth: int = 50
    resnet_width: int = 64

    head: str = "token"  # see HEADS
    # Heatmap head only (mmpose TopdownHeatmapSimpleHead): stride-2 4x4 deconvolutions + BN + ReLU
    # before the 1x1 conv; 3 x 256 for SimpleBaseline, 0 for HRNet (already at 1/4).
    deconv_layers: int = 3
    deconv_channels: int = 256

    # Token encoder (docs/method.md#token-encoder), identical for teacher and student so tokens align.
    # Ignored by the heatmap and regression heads (no tokens).
    patch_size: tuple[int, int] = (4, 3)  # (rows, cols) of backbone cells per visual token
    dim: int = 192
    depth: int = 12
    heads: int = 8
    mlp_ratio: int = 3
    dropout: float = 0.0

    # Teacher heatmap head: LN -> Linear(D, hidden) -> LN -> Linear(hidden, Hh*Wh), or
    # LN -> Linear(D, Hh*Wh) when 0. Ignored by students.
    heatmap_head_hidden: int = 384

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # coming back from JSON
                object.__setattr__(self, f.name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"ModelConfig {self.name!r}: {msg}")

        if self.kind not in KINDS:
            fail(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.backbone not in BACKBONES:
            fail(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.head not in HEADS[self.kind]:
            fail(f"a {self.kind} head must be one of {HEADS[self.kind]}, got {self.head!r}")
        h, w = self.input_size
        if (h, w) != (self.heatmap_size[0] * BACKBONE_STRIDE, self.heatmap_size[1] * BACKBONE_STRIDE):
            fail(f"input_size {self.input_size} must be {BACKBONE_STRIDE}x heatmap_size {self.heatmap_size}")
        if self.has_tokens:
            if self.backbone == "resnet":
                fail("the token encoder needs a stride-4 backbone (hrnet or stemnet), not resnet")
            if self.heatmap_size[0] % self.patch_size[0] or self.heatmap_size[1] % self.patch_size[1]:
                fail(f"heatmap_size {self.heatmap_size} is not divisible by patch_size {self.patch_size}")
            if self.dim % self.heads:
                fail(f"dim {self.dim} is not divisible by heads {self.heads}")
            if self.dim % 2:
                fail(f"dim {self.dim} must be even (half of the sine table encodes rows, half columns)")
        if self.head == "heatmap":
            # The deconvolutions must bring the backbone's output back to the heatmap grid.
            needed = (self.backbone_stride // BACKBONE_STRIDE).bit_length() - 1  # each deconv doubles H, W
            if self.deconv_layers != needed:
                fail(
                    f"a {self.backbone} backbone ends at 1/{self.backbone_stride}: the heatmap head needs "
                    f"{needed} deconv_layers, got {self.deconv_layers}"
                )
        if self.backbone == "resnet":
            if self.resnet_depth not in RESNET_DEPTHS:
                fail(f"resnet_depth must be one of {RESNET_DEPTHS}, got {self.resnet_depth}")
            if h % RESNET_STRIDE or w % RESNET_STRIDE:
                fail(f"input_size {self.input_size} must be divisible by {RESNET_STRIDE} for a resnet backbone")
        if self.backbone == "hrnet":
            if not 1 <= len(self.hrnet_modules) <= 3:
                fail(f"hrnet_modules needs 1 to 3 entries (stages 2..4), got {self.hrnet_modules}")
            # Each HRNet stage halves the resolution of its new branch.
            lowest = 2 ** len(self.hrnet_modules)
            if self.heatmap_size[0] % lowest or self.heatmap_size[1] % lowest:
                fail(f"heatmap_size {self.heatmap_size} must be divisible by {lowest} for this HRNet")

    @property
    def has_tokens(self) -> bool:
        """True for the token models (TokenPose, DistilPose): they have kpt/vis tokens to distill."""
        return self.head == "token"

    @property
    def backbone_stride(self) -> int:
        return RESNET_STRIDE if self.backbone == "resnet" else BACKBONE_STRIDE

    @property
    def patch_grid(self) -> tuple[int, int]:
        return (self.heatmap_size[0] // self.patch_size[0], self.heatmap_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        """Visual tokens; 0 for a model without tokens."""
        if not self.has_tokens:
            return 0
        rows, cols = self.patch_grid
        return rows * cols

    @property
    def token_dim(self) -> int:
        """D of the tokens; 0 for a model without tokens."""
        return self.dim if self.has_tokens else 0

    @property
    def feature_channels(self) -> int:
        """Channels of the backbone output (what the token encoder patchifies or the head reads)."""
        if self.backbone == "resnet":
            expansion = 1 if self.resnet_depth < 50 else 4  # BasicBlock / Bottleneck
            return self.resnet_width * 8 * expansion
        return self.hrnet_width if self.backbone == "hrnet" else 4 * self.stage1_planes

    def replace(self, **overrides) -> ModelConfig:
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            valid = ", ".join(f.name for f in fields(self))
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid fields: {valid}")
        return dataclasses.replace(self, **overrides)
