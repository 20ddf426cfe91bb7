"""Students: backbone -> TDE -> per-keypoint regression head (docs/method.md#students).

Official layout: ``backbone.*`` and ``keypoint_head.tokenhead.*``; here the head is split
into ``tde.*`` and ``reg_head.*`` (the official ``mlp_head``: LayerNorm -> Linear(D -> 5)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import build_backbone
from .config import ModelConfig
from .tde import build_encoder, init_transformer_weights

# Per-joint head outputs: x, y (sigmoid), score (raw), sigma_x, sigma_y (softplus).
REG_OUTPUTS = 5


@dataclass
class StudentOutput:
    coords: Tensor  # (N, K, 2) (x, y) in [0, 1] of the input crop
    sigma: Tensor  # (N, K, 2) (sigma_x, sigma_y) in heatmap pixels, > 0
    score: Tensor  # (N, K) raw confidence (trained by L_CS only)
    kpt_tokens: Tensor  # (N, K, D)
    vis_tokens: Tensor  # (N, P, D)


torch.export.register_dataclass(StudentOutput)


class DistilPose(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.kind != "student":
            raise ValueError(f"DistilPose needs a student config, got kind={config.kind!r} ({config.name})")
        self.config = config
        self.backbone = build_backbone(config)
        self.tde = build_encoder(config)
        # The official 2-layer variant only appears for D <= 32 (hidden_dim 64 rule), never here.
        self.reg_head = nn.Sequential(nn.LayerNorm(config.dim), nn.Linear(config.dim, REG_OUTPUTS))
        init_transformer_weights(self.reg_head)

    def forward(self, x: Tensor) -> StudentOutput:
        kpt_tokens, vis_tokens = self.tde(self.backbone(x))
        out = self.reg_head(kpt_tokens)
        return StudentOutput(
            coords=out[..., 0:2].sigmoid(),
            sigma=F.softplus(out[..., 3:5]),
            score=out[..., 2],
            kpt_tokens=kpt_tokens,
            vis_tokens=vis_tokens,
        )
