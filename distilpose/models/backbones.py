"""Backbone factory: ModelConfig -> HRNet, StemNet or ResNet, with the official from-scratch init."""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .hrnet import HRNet, init_cnn_weights
from .resnet import ResNet, init_resnet_weights
from .stemnet import StemNet


def build_backbone(config: ModelConfig) -> nn.Module:
    if config.backbone == "hrnet":
        backbone = HRNet(
            width=config.hrnet_width,
            stage_modules=config.hrnet_modules,
            num_blocks=config.hrnet_blocks,
            stem_channels=config.stem_channels,
            stage1_planes=config.stage1_planes,
            stage1_blocks=config.stage1_blocks,
        )
        init_cnn_weights(backbone)
    elif config.backbone == "resnet":
        backbone = ResNet(config.resnet_depth, config.stem_channels, config.resnet_width)
        init_resnet_weights(backbone)  # mmpose's ResNet init (its SimpleBaseline / DeepPose configs)
    else:
        backbone = StemNet(config.stem_channels, config.stage1_planes, config.stage1_blocks)
        init_cnn_weights(backbone)
    assert backbone.out_channels == config.feature_channels
    return backbone
