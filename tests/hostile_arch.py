"""Architectures qconvert must refuse to export (imported by checkpoints in test_hostile.py)."""

from torch import nn


class DataDependentBranch(nn.Module):
    """Takes a different path depending on the input's values: no static graph exists."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 2
        return self.fc(y.flatten(1))


class ReflectPadded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def data_dependent() -> nn.Module:
    return DataDependentBranch()


def reflect_padded() -> nn.Module:
    return ReflectPadded()
