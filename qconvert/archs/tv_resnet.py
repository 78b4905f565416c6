"""ResNet-18 / -34 in torchvision's module layout, for checkpoints trained around it.

Module names follow torchvision (``conv1``, ``bn1``, ``layer{1..4}.{j}.conv1`` ...,
``downsample.0/1``, ``fc``), so imported checkpoints map onto it key by key. The
global pool is ``AvgPool2d(7, stride=1)`` as in the public ASQ/POST ResNets: it is
the global average only on a 7x7 final map, i.e. for 224x224 inputs.
"""

from __future__ import annotations

import torch
from torch import nn

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TorchvisionResNet(nn.Module):
    """7x7/2 stem, 3x3/2 max pool, four stages of basic blocks, 7x7 average pool, linear."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 1000,
                 width: int = 64) -> None:
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"depth {depth!r} is not one of {sorted(STAGE_BLOCKS)}")
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, blocks in enumerate(STAGE_BLOCKS[depth]):
            cout = width * 2**i
            stage = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1)
                     for j in range(blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            cin = cout
        self.avgpool = nn.AvgPool2d(7, stride=1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def tv_resnet18(in_channels: int = 3, num_classes: int = 1000,
                width: int = 64) -> TorchvisionResNet:
    return TorchvisionResNet(18, in_channels, num_classes, width)


def tv_resnet34(in_channels: int = 3, num_classes: int = 1000,
                width: int = 64) -> TorchvisionResNet:
    return TorchvisionResNet(34, in_channels, num_classes, width)
