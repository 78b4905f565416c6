"""Dense-output networks: an LR-ASPP segmentation net on a small MobileNetV3-like backbone
(class scores per pixel, ``[N, classes, H, W]``) and a convolutional autoencoder (a
reconstruction ``[N, C, H, W]``).

The LR-ASPP head follows torchvision's ``lraspp_mobilenet_v3_large`` (Howard et al.,
"Searching for MobileNetV3"): a 1x1 conv branch on the 1/16 features gated by a global
pooled sigmoid branch, upsampled to the 1/8 features, one classifier on each, summed and
upsampled to the input. The backbone is a narrow MobileNetV3-Small-like stack sized for
CPU tests. The models carry ``qconvert_task``, which ``validate`` reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _divisible(channels: float, by: int = 8) -> int:
    return max(by, int(channels + by / 2) // by * by)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = _divisible(channels / 4)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * scale


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise kxk, optional squeeze-excite, project 1x1."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool,
                 hardswish: bool, stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers += [nn.Conv2d(cin, expanded, 1, bias=False), nn.BatchNorm2d(expanded), act()]
        layers += [nn.Conv2d(expanded, expanded, kernel, stride, kernel // 2, groups=expanded,
                             bias=False), nn.BatchNorm2d(expanded), act()]
        if se:
            layers.append(SqueezeExcite(expanded))
        layers += [nn.Conv2d(expanded, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


# (in, kernel, expanded, out, squeeze-excite, hardswish, stride); output stride 8 after
# the second block (the "low" features), 16 at the end (the "high" features).
SMALL_BLOCKS = ((16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2),
                (24, 3, 88, 24, False, False, 1), (24, 5, 96, 40, True, True, 2),
                (40, 5, 120, 40, True, True, 1), (40, 5, 144, 48, True, True, 1))
LOW_BLOCKS = 3  # blocks up to the 1/8 features


class LRASPP(nn.Module):
    """MobileNetV3-like backbone + LR-ASPP head -> ``[N, num_classes, H, W]``."""

    qconvert_task = "segmentation"

    def __init__(self, in_channels: int = 3, num_classes: int = 5, inter_channels: int = 32,
                 high_channels: int = 96) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(16), nn.Hardswish())
        blocks = [InvertedResidual(*cfg) for cfg in SMALL_BLOCKS]
        self.low = nn.Sequential(*blocks[:LOW_BLOCKS])
        last = SMALL_BLOCKS[-1][3]
        self.high = nn.Sequential(*blocks[LOW_BLOCKS:],
                                  nn.Conv2d(last, high_channels, 1, bias=False),
                                  nn.BatchNorm2d(high_channels), nn.Hardswish())
        self.cbr = nn.Sequential(nn.Conv2d(high_channels, inter_channels, 1, bias=False),
                                 nn.BatchNorm2d(inter_channels), nn.ReLU())
        self.scale = nn.Conv2d(high_channels, inter_channels, 1, bias=False)
        self.low_classifier = nn.Conv2d(SMALL_BLOCKS[LOW_BLOCKS - 1][3], num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        low = self.low(self.stem(x))
        high = self.high(low)
        gated = self.cbr(high) * torch.sigmoid(self.scale(high.mean((2, 3), keepdim=True)))
        gated = F.interpolate(gated, size=low.shape[-2:], mode="bilinear", align_corners=False)
        out = self.low_classifier(low) + self.high_classifier(gated)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


def lraspp_mobilenetv3_small(in_channels: int = 3, num_classes: int = 5,
                             inter_channels: int = 32, high_channels: int = 96) -> LRASPP:
    return LRASPP(in_channels, num_classes, inter_channels, high_channels)


class ConvAutoencoder(nn.Module):
    """Two stride-2 conv stages down, two stride-2 ConvTranspose2d stages up, sigmoid:
    a reconstruction of the input, ``[N, in_channels, H, W]`` (H, W divisible by 4)."""

    qconvert_task = "regression"

    def __init__(self, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(), nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(), nn.ConvTranspose2d(width, in_channels, 4, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.encoder(x)))


def conv_autoencoder(in_channels: int = 3, width: int = 16) -> ConvAutoencoder:
    return ConvAutoencoder(in_channels, width)
