"""The network part of a torchvision-style RetinaNet: what a detector deploys as a model.

ResNet-18 backbone (torchvision layout, ``tv_resnet.py``), a feature pyramid P3-P7 as
torchvision's ``retinanet_resnet50_fpn`` builds it (1x1 lateral and 3x3 output convs on
C3-C5, nearest top-down upsampling, P6 and P7 by stride-2 3x3 convs from P5), and the
classification and box-regression heads. The forward returns the raw per-level outputs,
``{"cls_logits": [N, A*K, H, W] per level, "bbox_regression": [N, A*4, H, W] per level}``
with A = 9 anchors per location (3 sizes x 3 aspect ratios): anchors, box decoding and
NMS are not part of the network, the deployment runs them after (``qconvert.detection``
has the standard decoding that ``validate --task detection`` uses).

One difference from torchvision: its heads are one module applied to every level; here
each level has its own copy (``head_per_level``), because the export records one call
per quantized layer. Copying a trained shared head's weights into every level gives the
same float network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .tv_resnet import TorchvisionResNet

ANCHORS_PER_LOCATION = 9  # torchvision's default: sizes x (1, 2^(1/3), 2^(2/3)), 3 ratios
LEVELS = 5  # P3..P7


class FeaturePyramid(nn.Module):
    def __init__(self, in_channels: tuple[int, ...], channels: int) -> None:
        super().__init__()
        self.inner = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.layer = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1)
                                   for _ in in_channels)
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        last = self.inner[-1](features[-1])
        results = [self.layer[-1](last)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.inner[i](features[i])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer[i](last))
        p6 = self.p6(results[-1])
        return [*results, p6, self.p7(F.relu(p6))]


def _head(channels: int, convs: int, outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(channels, outputs, 3, padding=1))


def _he_init(*modules: nn.Module) -> None:
    """He-normal weights, zero biases: an untrained network's outputs keep their spread
    through the unnormalised FPN and heads (torchvision's N(0, 0.01) head init is meant
    for training and leaves every random-parameter score at the prior)."""
    for module in modules:
        for conv in module.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)


class RetinaNetNetwork(nn.Module):
    """Backbone + FPN + heads of a RetinaNet; raw class logits and box regressions."""

    qconvert_task = "detection"

    def __init__(self, in_channels: int = 3, num_classes: int = 91, width: int = 64,
                 fpn_channels: int = 256, head_convs: int = 4, prior: float = 0.01) -> None:
        super().__init__()
        self.backbone = TorchvisionResNet(18, in_channels, 1, width)
        del self.backbone.avgpool, self.backbone.fc  # the network part ends at C5
        self.fpn = FeaturePyramid((2 * width, 4 * width, 8 * width), fpn_channels)
        anchors = ANCHORS_PER_LOCATION
        self.cls_heads = nn.ModuleList(_head(fpn_channels, head_convs, anchors * num_classes)
                                       for _ in range(LEVELS))
        self.box_heads = nn.ModuleList(_head(fpn_channels, head_convs, anchors * 4)
                                       for _ in range(LEVELS))
        _he_init(self.fpn, self.cls_heads, self.box_heads)
        for head in self.box_heads:  # torchvision's: small deltas, boxes near their anchors
            nn.init.normal_(head[-1].weight, std=0.01)
        for head in self.cls_heads:  # torchvision's prior: sigmoid(bias) = prior at init
            nn.init.constant_(head[-1].bias, -math.log((1 - prior) / prior))

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        c2 = b.layer1(x)
        c3 = b.layer2(c2)
        c4 = b.layer3(c3)
        levels = self.fpn([c3, c4, b.layer4(c4)])
        return {"cls_logits": [h(p) for h, p in zip(self.cls_heads, levels, strict=True)],
                "bbox_regression": [h(p) for h, p in zip(self.box_heads, levels, strict=True)]}


def retinanet_resnet18_fpn(in_channels: int = 3, num_classes: int = 91, width: int = 64,
                           fpn_channels: int = 256, head_convs: int = 4,
                           prior: float = 0.01) -> RetinaNetNetwork:
    return RetinaNetNetwork(in_channels, num_classes, width, fpn_channels, head_convs, prior)
