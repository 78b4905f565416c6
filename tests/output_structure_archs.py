"""Tiny models that differ only in what their forward returns (imported by the
checkpoints of test_output_structures.py): one small conv body, then a structure."""

import collections

import torch
from torch import nn

Pair = collections.namedtuple("Pair", "maps logits")


class Body(nn.Module):
    def __init__(self, structure) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        self.structure = structure

    def forward(self, x):
        return self.structure(self.head(torch.relu(self.conv(x))), x)


class SharedHead(nn.Module):
    """One head applied to two levels: a module that runs twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        return [self.head(f), self.head(f[:, :, ::2, ::2])]


STRUCTURES = {
    "tensor": lambda f, x: f,
    "logits": lambda f, x: f.mean((2, 3)),
    "tuple": lambda f, x: (f.mean((2, 3)), f),
    "dict": lambda f, x: {"logits": f.mean((2, 3)), "map": f},
    "levels": lambda f, x: [f, f[:, :, ::2, ::2], f[:, :, ::4, ::4]],
    "nested": lambda f, x: {"cls": [f, f[:, :, ::2, ::2]], "box": (f * 2, [f[:, :2]])},
    "namedtuple": lambda f, x: Pair(f, f.mean((2, 3))),
    "with_scalar": lambda f, x: (f, f.mean()),
    "scalar": lambda f, x: f.mean(),
    "integer": lambda f, x: (f > 0).sum((1, 2, 3)),
    "bool": lambda f, x: f > 0,
    "half": lambda f, x: f.half(),
    "none_inside": lambda f, x: (f, None),
    "same_twice": lambda f, x: (f, f),
    "input_through": lambda f, x: (f, x),
    "python_float": lambda f, x: (f, 1.5),
    "string": lambda f, x: (f, "boxes"),
    "no_tensor": lambda f, x: (),
    "complex": lambda f, x: torch.complex(f, f),
    "constant": lambda f, x: torch.ones(3),
    "masked": lambda f, x: f[f > 0],  # data-dependent size, as NMS gives
}


def build(structure: str) -> nn.Module:
    return SharedHead() if structure == "shared_head" else Body(STRUCTURES[structure])
