"""DeepPose student: backbone -> global average pooling -> linear regression of the joints.

mmpose 0.x's DeepPose (ResNet-50, ``GlobalAveragePooling`` neck, ``DeepposeRegressionHead``
``fc``: Linear(C, 2K)) predicts coordinates only. For Simulated Heatmaps (the paper's
"DeepPose + SH" row) a second linear layer ``sh`` adds, per joint, a confidence and the
Gaussian's (sigma_x, sigma_y), so L_SH can render the student's heatmap and L_CS train its
score, with the same output as the DistilPose students (``coords``, ``sigma``, ``score``) and
the same activations (sigmoid coords, softplus sigma, raw score). Without SH (alpha_sh =
alpha_cs = 0) ``sh`` receives no gradient and the model is mmpose's DeepPose. No tokens: the
token losses L_KT / L_VT do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import build_backbone
from .config import ModelConfig


@dataclass
class RegressionOutput:
    coords: Tensor  # (N, K, 2) (x, y) in [0, 1] of the input crop
    sigma: Tensor  # (N, K, 2) (sigma_x, sigma_y) in heatmap pixels, > 0
    score: Tensor  # (N, K) raw confidence (trained by L_CS only)


torch.export.register_dataclass(RegressionOutput)


class RegressionHead(nn.Module):
    def __init__(self, in_channels: int, num_joints: int) -> None:
        super().__init__()
        self.num_joints = num_joints
        self.fc = nn.Linear(in_channels, num_joints * 2)  # mmpose DeepposeRegressionHead.fc
        self.sh = nn.Linear(in_channels, num_joints * 3)  # score, sigma_x, sigma_y (Simulated Heatmaps)
        # mmpose's DeepPose head init: normal(0, 0.01), bias 0.
        for layer in (self.fc, self.sh):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, pooled: Tensor) -> RegressionOutput:
        coords = self.fc(pooled).unflatten(-1, (self.num_joints, 2))
        extra = self.sh(pooled).unflatten(-1, (self.num_joints, 3))
        return RegressionOutput(coords=coords.sigmoid(), sigma=F.softplus(extra[..., 1:3]), score=extra[..., 0])


class DeepPose(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.kind != "student" or config.head != "regression":
            raise ValueError(f"DeepPose needs a regression student config, got {config.kind}/{config.head}")
        self.config = config
        self.backbone = build_backbone(config)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = RegressionHead(config.feature_channels, config.num_joints)

    def forward(self, x: Tensor) -> RegressionOutput:
        return self.head(self.pool(self.backbone(x)).flatten(1))
