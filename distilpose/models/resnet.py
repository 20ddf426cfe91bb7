"""ResNet as built by mmpose 0.x (`mmpose/models/backbones/resnet.py`, ResNetV1b), re-written.

Module names follow mmpose exactly (conv1, bn1, layer{1..4}.{i}.conv{1,2,3} / bn{1,2,3},
layer{i}.0.downsample.{0,1}) so that an mmpose checkpoint's ``backbone.*`` tensors map onto
this module by name. The 7x7 stem, the max pool and the "pytorch" style (stride on the 3x3
conv of a Bottleneck) are mmpose's defaults, which its SimpleBaseline and DeepPose configs use.
Only the last stage's output is returned, (N, 8 * width * expansion, H/32, W/32).
"""

from __future__ import annotations

from torch import Tensor, nn

from .hrnet import Bottleneck, batch_norm, conv1x1, conv3x3

# depth -> blocks per stage, as mmpose's ResNet.arch_settings (BasicBlock below 50, else Bottleneck)
STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs, a projection shortcut when the shape changes."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = batch_norm(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = batch_norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != planes:
            self.downsample = nn.Sequential(conv1x1(in_channels, planes, stride), batch_norm(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def block_type(depth: int) -> type[nn.Module]:
    return BasicBlock if depth < 50 else Bottleneck


class ResNet(nn.Module):
    def __init__(self, depth: int = 50, stem_channels: int = 64, width: int = 64) -> None:
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        block = block_type(depth)
        self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = batch_norm(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = stem_channels
        for i, blocks in enumerate(STAGE_BLOCKS[depth]):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            layers = [block(in_channels, planes, stride)]
            in_channels = planes * block.expansion
            layers += [block(in_channels, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.out_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


def init_resnet_weights(resnet: ResNet) -> None:
    """mmpose ResNet.init_weights without pretrained weights: He-normal (fan_out) convs, BN
    weight 1 / bias 0, and the last BN of every residual block at 0 (zero_init_residual), so
    each block starts as the identity."""
    for m in resnet.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in resnet.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
