"""VGG-11/16/19 with BatchNorm, CIFAR variant: 3x3 conv stacks, one linear classifier on 512 features
(or fewer, for a narrower ``width``).

Max-pooling uses ``ceil_mode=True`` so that the five 2x2 pools do not shrink small inputs to nothing:
32x32 goes 16-8-4-2-1 as usual, and an 8x8 digit goes 4-2-1-1-1 instead of failing. A global average
pool before the classifier makes the model accept any input size.
"""

from __future__ import annotations

import torch
from torch import nn

# Numbers are conv output channels, "M" a 2x2 max-pool (Simonyan & Zisserman 2015, table 1).
# fmt: off
CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
# fmt: on


class VGG(nn.Module):
    def __init__(
        self,
        config: list[int | str],
        num_classes: int = 10,
        in_channels: int = 3,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        layers: list[nn.Module] = []
        cin = in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                assert isinstance(v, int)
                layers += [
                    nn.Conv2d(cin, v, 3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # as CifarResNet: faster convolutions on CPU and GPU
            x = x.to(memory_format=torch.channels_last)
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG:
    """VGG ``name`` with every layer's channels scaled by ``width`` (``vgg11_quarter``: 0.25, a VGG
    shape that trains on a CPU in minutes rather than hours)."""
    config = [v if v == "M" else max(1, round(int(v) * width)) for v in CONFIGS[name]]
    return VGG(config, num_classes=num_classes, in_channels=in_channels)
