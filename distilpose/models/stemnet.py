"""StemNet, DistilPose-S's backbone (official `distilpose/models/backbones/stemnet.py`).

It is exactly HRNet's stem plus stage 1: two stride-2 3x3 convs and a stack of Bottlenecks,
ending at 1/4 resolution with 4 * planes channels. Key names match the official checkpoint
(conv1, bn1, conv2, bn2, layer1.{i}.*, layer1.0.downsample.{0,1}).
"""

from __future__ import annotations

from torch import Tensor, nn

from .hrnet import Bottleneck, batch_norm, conv3x3, make_bottleneck_layer


class StemNet(nn.Module):
    def __init__(self, stem_channels: int = 64, planes: int = 64, blocks: int = 4) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, stem_channels, 2)
        self.bn1 = batch_norm(stem_channels)
        self.conv2 = conv3x3(stem_channels, stem_channels, 2)
        self.bn2 = batch_norm(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_bottleneck_layer(stem_channels, planes, blocks)
        self.out_channels = planes * Bottleneck.expansion

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.layer1(x)
