"""On a real digits batch, every parameter of every scheme's quantized model learns.

A parameter whose gradient is exactly zero (or not finite) would silently stay
at its init during QAT: a broken straight-through path, a dead adapter, a step
that never sees the clip range.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qconvert.archs import build_architecture
from qconvert.preprocess import prepare_inputs
from qconvert.quant import SCHEMES, quantize_model

pytest.importorskip("sklearn")

from models.data import load_split  # noqa: E402

SHAPES = {"digits_cnn": (1, 8, 8), "resnet20": (1, 16, 16)}
BITS = {"asq-lsq": 2, "pot": 3}  # the shipped bit widths; 4 for the others


@pytest.fixture(scope="module")
def batch():
    split = load_split()
    return split.x_train[:32], torch.from_numpy(split.y_train[:32]), split.mean, split.std



@pytest.mark.parametrize("arch", sorted(SHAPES))
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_parameter_gets_a_gradient(arch: str, scheme: str, batch):
    images, labels, mean, std = batch
    torch.manual_seed(0)
    model = build_architecture(arch, {"in_channels": 1, "num_classes": 10})
    bits = BITS.get(scheme, 4)
    quantize_model(model, scheme, bits, bits)
    model.train()
    x = prepare_inputs(images, SHAPES[arch], mean, std)
    model(x)  # first training-mode batch: quantizers initialise
    model.zero_grad()
    F.cross_entropy(model(x), labels).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    bad = [n for n, p in model.named_parameters()
           if p.grad is not None and not torch.isfinite(p.grad).all()]
    zero = [n for n, p in model.named_parameters()
            if p.grad is not None and not bool(p.grad.abs().sum() > 0)]
    assert not no_grad, f"no gradient: {no_grad}"
    assert not bad, f"non-finite gradient: {bad}"
    assert not zero, f"all-zero gradient: {zero}"
