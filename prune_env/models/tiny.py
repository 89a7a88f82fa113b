"""A tiny, fast CNN for tests and smoke runs (a few thousand parameters, milliseconds per batch)."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyCNN(nn.Module):
    """Three conv-BN-ReLU layers with one residual add, global average pooling and a linear head.

    The residual add makes two convolutions share a channel group, so the smallest model in the
    library still exercises the coupled-channel path of the pruning engine.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, width)
        self.conv1 = _conv_bn_relu(width, 2 * width, stride=2)
        self.conv2 = nn.Sequential(
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width)
        )
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.conv1(x)
        x = self.relu(x + self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))
