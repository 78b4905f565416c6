"""The pytorchcv layouts of PreResNet (CIFAR and ImageNet) and MobileNetV2, rebuilt.

Checkpoints trained with the public LCQ re-implementation (``qconvert import --from
nulsq``) use the module names of the ``pytorchcv`` package: ``features.init_block``,
``features.stage{i}.unit{j}.body.conv{k}.{bn,conv}``, ``identity_conv``,
``features.post_activ``, ``output``. These builders reproduce those names, the module
order and the forward computation (the same torch modules in the same order), so the
package is not a dependency. Widths are arguments so that small models of the same
layout can be built; the defaults are pytorchcv's.
"""

from __future__ import annotations

from torch import nn

CIFAR_BLOCKS = {20: 3, 56: 9}  # units per stage, 3 stages
IMAGENET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
# MobileNetV2: (channels, units, first unit downsamples) per group of units; pytorchcv
# merges a group that does not downsample into the previous stage.
MOBILENET_GROUPS = ((16, 1, False), (24, 2, True), (32, 3, True), (64, 4, True),
                    (96, 3, False), (160, 3, True), (320, 1, False))


class PreConvBlock(nn.Module):
    """BatchNorm -> ReLU -> conv; with ``return_preact`` also the activation it convolved."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int, return_preact: bool = False) -> None:
        super().__init__()
        self.return_preact = return_preact
        self.bn = nn.BatchNorm2d(in_channels)
        self.activ = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              bias=False)

    def forward(self, x):
        x = self.activ(self.bn(x))
        pre = x
        x = self.conv(x)
        return (x, pre) if self.return_preact else x


class PreResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = PreConvBlock(in_channels, out_channels, 3, stride, 1, return_preact=True)
        self.conv2 = PreConvBlock(out_channels, out_channels, 3, 1, 1)

    def forward(self, x):
        x, pre = self.conv1(x)
        return self.conv2(x), pre


class PreResUnit(nn.Module):
    """Residual unit; a 1x1 ``identity_conv`` on the block's first activation when the
    shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.resize_identity = in_channels != out_channels or stride != 1
        self.body = PreResBlock(in_channels, out_channels, stride)
        if self.resize_identity:
            self.identity_conv = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        identity = x
        x, pre = self.body(x)
        if self.resize_identity:
            identity = self.identity_conv(pre)
        return x + identity


class PreResInitBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 7, 2, 3, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activ = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        return self.pool(self.activ(self.bn(self.conv(x))))


class PreResActivation(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.activ = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activ(self.bn(x))


class _Classifier(nn.Module):
    """``features`` then ``output`` (a Linear on the flattened features)."""

    def forward(self, x):
        x = self.features(x)
        return self.output(x.view(x.size(0), -1))


def _stages(features: nn.Sequential, in_channels: int, widths, units, first_stride) -> int:
    for i, (width, count) in enumerate(zip(widths, units, strict=True)):
        stage = nn.Sequential()
        for j in range(count):
            stride = first_stride(i) if j == 0 else 1
            stage.add_module(f"unit{j + 1}", PreResUnit(in_channels, width, stride))
            in_channels = width
        features.add_module(f"stage{i + 1}", stage)
    return in_channels


class CIFARPreResNet(_Classifier):
    """pytorchcv's ``CIFARPreResNet`` (basic blocks): 32x32 inputs."""

    def __init__(self, units: int, width: int = 16, in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("init_block", nn.Conv2d(in_channels, width, 3, 1, 1,
                                                         bias=False))
        channels = _stages(self.features, width, [width, 2 * width, 4 * width], [units] * 3,
                           lambda i: 1 if i == 0 else 2)
        self.features.add_module("post_activ", PreResActivation(channels))
        self.features.add_module("final_pool", nn.AvgPool2d(8, stride=1))
        self.output = nn.Linear(channels, num_classes)


class PreResNet(_Classifier):
    """pytorchcv's ImageNet ``PreResNet`` (basic blocks): 224x224 inputs."""

    def __init__(self, units, width: int = 64, in_channels: int = 3,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("init_block", PreResInitBlock(in_channels, width))
        channels = _stages(self.features, width, [width * 2**i for i in range(4)], units,
                           lambda i: 1 if i == 0 else 2)
        self.features.add_module("post_activ", PreResActivation(channels))
        self.features.add_module("final_pool", nn.AvgPool2d(7, stride=1))
        self.output = nn.Linear(channels, num_classes)


def preresnet20_cifar(**kwargs) -> CIFARPreResNet:
    return CIFARPreResNet(CIFAR_BLOCKS[20], **kwargs)


def preresnet56_cifar(**kwargs) -> CIFARPreResNet:
    return CIFARPreResNet(CIFAR_BLOCKS[56], **kwargs)


def preresnet18(**kwargs) -> PreResNet:
    return PreResNet(IMAGENET_BLOCKS[18], **kwargs)


def preresnet34(**kwargs) -> PreResNet:
    return PreResNet(IMAGENET_BLOCKS[34], **kwargs)


class ConvBlock(nn.Module):
    """conv -> BatchNorm -> activation (ReLU6, or none)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int, groups: int = 1, relu6: bool = True) -> None:
        super().__init__()
        self.activate = relu6
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        if relu6:
            self.activ = nn.ReLU6(inplace=True)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.activ(x) if self.activate else x


class LinearBottleneck(nn.Module):
    """1x1 expansion (x6, or x1 in the very first unit) -> 3x3 depthwise -> 1x1 linear
    projection; every unit has all three (pytorchcv's ``mobilenetv2``, not ``mobilenetv2b``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int,
                 expansion: bool) -> None:
        super().__init__()
        self.residual = in_channels == out_channels and stride == 1
        mid = in_channels * 6 if expansion else in_channels
        self.conv1 = ConvBlock(in_channels, mid, 1, 1, 0)
        self.conv2 = ConvBlock(mid, mid, 3, stride, 1, groups=mid)
        self.conv3 = ConvBlock(mid, out_channels, 1, 1, 0, relu6=False)

    def forward(self, x):
        identity = x
        x = self.conv3(self.conv2(self.conv1(x)))
        return x + identity if self.residual else x


class MobileNetV2(nn.Module):
    """pytorchcv's ``MobileNetV2`` (``mobilenetv2_w1`` at ``width_scale=1``): 224x224
    inputs, a 1x1 convolution as classifier."""

    def __init__(self, width_scale: float = 1.0, in_channels: int = 3,
                 num_classes: int = 1000) -> None:
        super().__init__()
        stages: list[list[int]] = []
        for channels, count, downsample in MOBILENET_GROUPS:
            if downsample or not stages:
                stages.append([])
            stages[-1] += [channels] * count
        init, final = 32, 1280
        if width_scale != 1.0:
            stages = [[int(c * width_scale) for c in stage] for stage in stages]
            init = int(init * width_scale)
            if width_scale > 1.0:
                final = int(final * width_scale)
        self.features = nn.Sequential()
        self.features.add_module("init_block", ConvBlock(in_channels, init, 3, 2, 1))
        channels = init
        for i, stage_channels in enumerate(stages):
            stage = nn.Sequential()
            for j, out_channels in enumerate(stage_channels):
                stride = 2 if j == 0 and i != 0 else 1
                stage.add_module(f"unit{j + 1}", LinearBottleneck(
                    channels, out_channels, stride, expansion=i != 0 or j != 0))
                channels = out_channels
            self.features.add_module(f"stage{i + 1}", stage)
        self.features.add_module("final_block", ConvBlock(channels, final, 1, 1, 0))
        self.features.add_module("final_pool", nn.AvgPool2d(7, stride=1))
        self.output = nn.Conv2d(final, num_classes, 1, bias=False)

    def forward(self, x):
        x = self.output(self.features(x))
        return x.view(x.size(0), -1)


def mobilenetv2(**kwargs) -> MobileNetV2:
    return MobileNetV2(**kwargs)
