"""Architectures with outputs other than class logits (imported by checkpoints in
test_validate_outputs.py)."""

from torch import nn


def _body() -> list[nn.Module]:
    return [nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]


def dense_map() -> nn.Module:
    """Per-pixel class scores [N, 5, H, W], as a segmentation head gives."""
    return nn.Sequential(*_body(), nn.Conv2d(8, 5, 1))


def autoencoder() -> nn.Module:
    """A reconstruction [N, 1, H, W]: regression, nothing class-based."""
    return nn.Sequential(*_body(), nn.Conv2d(8, 1, 3, padding=1))


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*_body())
        self.logits = nn.Linear(8, 10)
        self.boxes = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        features = self.body(x)
        return self.logits(features.mean((2, 3))), self.boxes(features)


def two_heads() -> nn.Module:
    """Class logits [N, 10] and a box map [N, 4, H, W], as a tuple."""
    return TwoHeads()
