"""Teacher: TokenPose (backbone + token encoder + heatmap MLP head), docs/method.md#teacher.

Official layout: ``backbone.*`` and ``keypoint_head.tokenpose.*``; here the head is split
into ``encoder.*`` (shared TDE code) and ``heatmap_head.*`` (the official ``mlp_head``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backbones import build_backbone
from .config import ModelConfig
from .tde import build_encoder, init_transformer_weights


@dataclass
class TeacherOutput:
    heatmaps: Tensor  # (N, K, Hh, Wh), raw (no activation)
    kpt_tokens: Tensor  # (N, K, D), last transformer layer, no final norm
    vis_tokens: Tensor  # (N, P, D)


# Lets torch.export / ONNX export flatten the output like a tuple.
torch.export.register_dataclass(TeacherOutput)


def build_heatmap_head(dim: int, hidden: int, heatmap_size: tuple[int, int]) -> nn.Sequential:
    out = heatmap_size[0] * heatmap_size[1]
    if hidden:
        return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, out))
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, out))


class TokenPose(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.kind != "teacher":
            raise ValueError(f"TokenPose needs a teacher config, got kind={config.kind!r} ({config.name})")
        self.config = config
        self.backbone = build_backbone(config)
        self.encoder = build_encoder(config)
        self.heatmap_head = build_heatmap_head(config.dim, config.heatmap_head_hidden, config.heatmap_size)
        init_transformer_weights(self.heatmap_head)

    def forward(self, x: Tensor) -> TeacherOutput:
        kpt_tokens, vis_tokens = self.encoder(self.backbone(x))
        heatmaps = self.heatmap_head(kpt_tokens).unflatten(-1, self.config.heatmap_size)
        return TeacherOutput(heatmaps=heatmaps, kpt_tokens=kpt_tokens, vis_tokens=vis_tokens)
