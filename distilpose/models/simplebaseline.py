"""Heatmap teachers without tokens: SimpleBaseline (ResNet + deconvolutions) and HRNet top-down.

Both are mmpose 0.x's ``TopDown`` with a ``TopdownHeatmapSimpleHead``: the backbone, then
``deconv_layers`` stride-2 4x4 transposed convs (each + BN + ReLU; 3 x 256 for SimpleBaseline,
none for HRNet, already at 1/4), then a 1x1 conv to one heatmap per joint. An mmpose checkpoint
holds ``backbone.*`` and ``keypoint_head.deconv_layers.{0,1,3,4,6,7}.*`` /
``keypoint_head.final_layer.*``; here the head is ``head.*`` with the same inner names
(`distilpose.models.checkpoints` maps the prefix), so the files load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backbones import build_backbone
from .config import ModelConfig
from .hrnet import init_cnn_weights


@dataclass
class HeatmapOutput:
    heatmaps: Tensor  # (N, K, Hh, Wh), raw (no activation); no tokens


torch.export.register_dataclass(HeatmapOutput)


class HeatmapHead(nn.Module):
    """mmpose TopdownHeatmapSimpleHead with kernel-4 deconvolutions and a 1x1 final conv."""

    def __init__(self, in_channels: int, num_joints: int, num_deconv: int, deconv_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_deconv):
            # Kernel 4, padding 1, no output padding: exactly doubles H and W (mmpose _get_deconv_cfg).
            layers += [
                nn.ConvTranspose2d(in_channels, deconv_channels, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(deconv_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = deconv_channels
        # An empty Sequential is the identity (mmpose: nn.Identity for num_deconv_layers=0).
        self.deconv_layers = nn.Sequential(*layers)
        self.final_layer = nn.Conv2d(in_channels, num_joints, 1)
        init_cnn_weights(self)  # mmpose init_weights: deconvs and the final conv N(0, 0.001), BN 1 / 0, bias 0

    def forward(self, x: Tensor) -> Tensor:
        return self.final_layer(self.deconv_layers(x))


class HeatmapTeacher(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.kind != "teacher" or config.head != "heatmap":
            raise ValueError(f"HeatmapTeacher needs a heatmap teacher config, got {config.kind}/{config.head}")
        self.config = config
        self.backbone = build_backbone(config)
        self.head = HeatmapHead(
            config.feature_channels, config.num_joints, config.deconv_layers, config.deconv_channels
        )

    def forward(self, x: Tensor) -> HeatmapOutput:
        return HeatmapOutput(heatmaps=self.head(self.backbone(x)))
