"""CIFAR-style ResNet-20 (He et al. 2016, option A shortcuts replaced by 1x1 convs)."""

from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def residual_stages(width: int, stages: int, blocks_per_stage: int) -> tuple[nn.Sequential, int]:
    """Stages of basic blocks, doubling channels and halving resolution after the first;
    returns them and the output channel count."""
    blocks, cin = [], width
    for i in range(stages):
        cout = width * 2**i
        for j in range(blocks_per_stage):
            blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
            cin = cout
    return nn.Sequential(*blocks), cin


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, in_channels: int = 3, num_classes: int = 10,
                 width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layers, cin = residual_stages(width, 3, blocks_per_stage)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet20(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> ResNet:
    """ResNet-20: 3 stages of 3 basic blocks (19 convs + 1 linear, ~0.27 M params)."""
    return ResNet(3, in_channels, num_classes, width)


class ImageNetResNet(nn.Module):
    """ResNet-18 layout for 224x224 inputs: 7x7/2 stem, max pool, 4 stages of basic blocks."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layers, cin = residual_stages(width, 4, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(self.layers(x)).flatten(1))


def resnet18(in_channels: int = 3, num_classes: int = 1000, width: int = 64) -> ImageNetResNet:
    """ImageNet-shaped ResNet-18 (11.7 M params at width 64), for size and speed figures."""
    return ImageNetResNet(in_channels, num_classes, width)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as torchvision's v1.5), 1x1 expand by 4; projected
    shortcut when the shape changes."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class BottleneckResNet(nn.Module):
    """ImageNet ResNet with bottleneck blocks: 7x7/2 stem, max pool, 4 stages."""

    def __init__(self, blocks: tuple[int, ...], in_channels: int = 3, num_classes: int = 1000,
                 width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i, count in enumerate(blocks):
            for j in range(count):
                stages.append(Bottleneck(cin, width * 2**i, 2 if (i > 0 and j == 0) else 1))
                cin = 4 * width * 2**i
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(self.layers(x)).flatten(1))


def resnet50(in_channels: int = 3, num_classes: int = 1000, width: int = 64) -> BottleneckResNet:
    """ImageNet-shaped ResNet-50 (25.6 M params at width 64), for export-cost figures."""
    return BottleneckResNet((3, 4, 6, 3), in_channels, num_classes, width)
