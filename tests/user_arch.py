"""A user architecture outside qconvert, rebuilt from checkpoints as ``tests.user_arch:build``."""

from __future__ import annotations

from torch import nn

NOT_CALLABLE = 42


class TinyUserNet(nn.Module):
    """Stem conv, depthwise conv with bias and dilation, pointwise conv, linear head."""

    def __init__(self, in_channels: int = 1, classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=2, dilation=2, groups=width)
        self.pw = nn.Conv2d(width, 2 * width, 1, stride=2)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.relu(self.dw(x))
        x = self.relu(self.pw(x))
        return self.head(self.pool(x).flatten(1))


def build(in_channels: int = 1, classes: int = 3, width: int = 8) -> TinyUserNet:
    return TinyUserNet(in_channels, classes, width)
