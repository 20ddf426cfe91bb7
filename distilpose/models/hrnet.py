"""HRNet as built by mmpose v0.22 (`mmpose/models/backbones/hrnet.py`), re-written.

Module and attribute names follow mmpose exactly (conv1, bn1, conv2, bn2, layer1,
transition{i}, stage{i}, branches, fuse_layers, downsample.{0,1}) so that the state dict of
an official checkpoint maps onto this one by name. Only the ``backbone.`` prefix differs.

The same class serves the teacher (all four stages) and DistilPose-L (cut after stage 3):
`stage_modules` lists the number of HR modules of stages 2, 3, ...; the last module of the
last stage fuses into the highest-resolution branch only (mmpose `multiscale_output=False`),
which is also why DistilPose-L's last stage-3 module has no ``fuse_layers.1/2``.
"""

from __future__ import annotations

from torch import Tensor, nn

BN_MOMENTUM = 0.1


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes)
        self.bn1 = batch_norm(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = batch_norm(planes)
        self.relu = nn.ReLU(inplace=True)
        # HRNet branches keep their width, so a projection shortcut is never needed here.
        assert in_channels == planes, "HRNet BasicBlocks keep the channel count"

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class Bottleneck(nn.Module):
    """ResNet v1 bottleneck (stride on the 3x3 conv), as in mmpose and the official StemNet."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = batch_norm(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = batch_norm(planes)
        self.conv3 = conv1x1(planes, out_channels)
        self.bn3 = batch_norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride), batch_norm(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def make_bottleneck_layer(in_channels: int, planes: int, blocks: int) -> nn.Sequential:
    """Stage 1 of HRNet and StemNet's `layer1`: `blocks` Bottlenecks, the first one projecting."""
    layers = [Bottleneck(in_channels, planes)]
    layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class HRModule(nn.Module):
    """Parallel BasicBlock branches followed by all-to-all fusion (mmpose HRModule)."""

    def __init__(self, channels: list[int], num_blocks: int, multiscale_output: bool) -> None:
        super().__init__()
        self.channels = list(channels)
        self.branches = nn.ModuleList(nn.Sequential(*[BasicBlock(c, c) for _ in range(num_blocks)]) for c in channels)
        num_outputs = len(channels) if multiscale_output else 1
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(self._fuse_path(src, dst) for src in range(len(channels))) for dst in range(num_outputs)
        )
        self.relu = nn.ReLU(inplace=True)

    def _fuse_path(self, src: int, dst: int) -> nn.Module | None:
        c = self.channels
        if src == dst:
            return None  # identity; kept as a None slot so indices match mmpose's keys
        if src > dst:  # lower resolution -> higher: 1x1 projection then nearest upsampling
            return nn.Sequential(
                conv1x1(c[src], c[dst]), batch_norm(c[dst]), nn.Upsample(scale_factor=2 ** (src - dst))
            )
        # Higher resolution -> lower: stride-2 3x3 convs; ReLU between them, none after the last.
        steps = []
        for k in range(dst - src):
            if k == dst - src - 1:
                steps.append(nn.Sequential(conv3x3(c[src], c[dst], 2), batch_norm(c[dst])))
            else:
                steps.append(nn.Sequential(conv3x3(c[src], c[src], 2), batch_norm(c[src]), nn.ReLU(True)))
        return nn.Sequential(*steps)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        outputs = []
        for paths in self.fuse_layers:
            # Summed in source order, like mmpose, so results match it bit for bit.
            terms = [x if path is None else path(x) for path, x in zip(paths, xs)]
            fused = terms[0]
            for term in terms[1:]:
                fused = fused + term
            outputs.append(self.relu(fused))
        return outputs


def make_transition(in_channels: list[int], out_channels: list[int]) -> nn.ModuleList:
    """Adapt the previous stage's branches to the next stage (mmpose `_make_transition_layer`).

    Existing branches get a 3x3 conv only if their width changes (None otherwise); each new
    branch is derived from the lowest-resolution previous branch by stride-2 convs.
    """
    layers: list[nn.Module | None] = []
    for i, out_c in enumerate(out_channels):
        if i < len(in_channels):
            in_c = in_channels[i]
            layers.append(
                None if in_c == out_c else nn.Sequential(conv3x3(in_c, out_c), batch_norm(out_c), nn.ReLU(True))
            )
            continue
        steps = []
        for j in range(i + 1 - len(in_channels)):
            in_c = in_channels[-1]
            c = out_c if j == i - len(in_channels) else in_c
            steps.append(nn.Sequential(conv3x3(in_c, c, 2), batch_norm(c), nn.ReLU(True)))
        layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


class HRNet(nn.Module):
    """mmpose HRNet returning the highest-resolution branch, (N, width, H/4, W/4)."""

    def __init__(
        self,
        width: int = 48,
        stage_modules: tuple[int, ...] = (1, 4, 3),
        num_blocks: int = 4,
        stem_channels: int = 64,
        stage1_planes: int = 64,
        stage1_blocks: int = 4,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, stem_channels, 2)
        self.bn1 = batch_norm(stem_channels)
        self.conv2 = conv3x3(stem_channels, stem_channels, 2)
        self.bn2 = batch_norm(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_bottleneck_layer(stem_channels, stage1_planes, stage1_blocks)

        self.num_stages = 1 + len(stage_modules)
        channels = [stage1_planes * Bottleneck.expansion]
        for s, num_modules in enumerate(stage_modules, start=2):
            new_channels = [width * 2**i for i in range(s)]
            setattr(self, f"transition{s - 1}", make_transition(channels, new_channels))
            last_stage = s == self.num_stages
            modules = [
                HRModule(new_channels, num_blocks, multiscale_output=not (last_stage and m == num_modules - 1))
                for m in range(num_modules)
            ]
            setattr(self, f"stage{s}", nn.Sequential(*modules))
            channels = new_channels
        self.out_channels = width

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]
        for s in range(2, self.num_stages + 1):
            transition = getattr(self, f"transition{s - 1}")
            # New branches grow out of the lowest-resolution branch of the previous stage.
            inputs = [xs[min(i, len(xs) - 1)] for i in range(len(transition))]
            xs = [x if t is None else t(x) for t, x in zip(transition, inputs)]
            xs = getattr(self, f"stage{s}")(xs)
        return xs[0]


def init_cnn_weights(module: nn.Module) -> None:
    """mmpose backbone init without pretrained weights: conv N(0, 0.001), BN weight 1 bias 0
    (also mmpose's heatmap head init, whose transposed convs get the same)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
