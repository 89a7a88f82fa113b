"""CIFAR-style ResNets (He et al. 2016, section 4.2): depth 6n+2, three stages of 16/32/64 channels.

Shortcuts that change shape use a 1x1 convolution + BatchNorm projection ("option B") instead of the
paper's zero-padding "option A". Zero-padding bakes the channel counts of both stages into the forward
code (``F.pad`` by a fixed amount), so the channels of a stage could not be removed without rewriting
that code; with a projection every channel lives in a prunable layer. Option B costs a few thousand
extra parameters and is what most pruning papers' CIFAR ResNets use in practice.

Strides are (1, 2, 2), which also works on 8x8 inputs (8 -> 4 -> 2). The forward pass has no
data-dependent control flow, so torch.fx can trace it.
"""

from __future__ import annotations

import torch
from torch import nn

from prune_env.errors import InvalidSettingError


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        # Decided at construction time, so the traced graph is static.
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    layer1: nn.Sequential  # set by name in the loop below
    layer2: nn.Sequential
    layer3: nn.Sequential

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        if (depth - 2) % 6 != 0 or depth < 8:
            raise InvalidSettingError(
                f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}"
            )
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, (planes, stride) in enumerate(zip(widths, (1, 2, 2), strict=True)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
            setattr(self, f"layer{stage + 1}", layers[-1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # a construction-time constant: fx records one branch
            # Channels-last activations: convolutions run 1.3x (ResNet) to 1.7x (MobileNetV2's depthwise
            # convolutions) faster on CPU for training and inference (benchmarks/memory_format.py), and it is
            # the layout GPU tensor cores prefer under AMP. Outputs equal the NCHW ones up to rounding.
            x = x.to(memory_format=torch.channels_last)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels)
