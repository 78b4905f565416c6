"""The float64 referee: exact where float32 is not, every quantizer in double, quantizer
call counting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from qconvert.errors import QConvertError
from qconvert.quant import (
    ASQQuantizer,
    LCQQuantizer,
    LSQQuantizer,
    PowerQuantizer,
    QLinear,
    quantize_model,
)
from qconvert.quant.pot import magnitude_levels
from qconvert.referee import float64_twin, quantizers_not_run, reset_calls, run_checked
from qconvert.validate import level_flips


def _lsq(bits: int, signed: bool, step: float, is_weight: bool = False) -> LSQQuantizer:
    q = LSQQuantizer(bits, signed=signed, is_weight=is_weight)
    with torch.no_grad():
        q.step.fill_(step)
    q.initialized.fill_(True)
    return q


def _linear(weight: float, bias: float, act: LSQQuantizer, weight_step: float) -> QLinear:
    layer = QLinear(1, 1, bias=True, act_quant=act,
                    weight_quant=_lsq(4, True, weight_step, is_weight=True))
    with torch.no_grad():
        layer.weight.fill_(weight)
        layer.bias.fill_(bias)
    return layer


def test_referee_of_a_float_model_agrees_with_float32_to_float32_precision():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    with torch.no_grad():  # BN statistics off their defaults
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(16, 3, 6, 6)
    with torch.no_grad():
        want = model(x).double()
        got = float64_twin(model)(x.double())
    assert got.dtype == torch.float64
    scale = float(want.abs().max())
    # a float32 evaluation of ~300-term sums: within a few hundred float32 ulps of the output
    assert float((got - want).abs().max()) <= 256 * np.finfo(np.float32).eps * scale
    assert model[0].weight.dtype == torch.float32  # the original is left alone


def test_hand_computed_two_layer_case():
    """Layer 1 outputs 0.75 - 2^-30 exactly: float32 rounds it to 0.75, a rounding tie
    of layer 2's step-0.5 quantizer (1.5 -> 2 half-to-even), while the exact value rounds
    to 1. By hand: float32 gives 1.0, the exact model 0.5."""
    first = _linear(-2 * 2.0**-31, 0.75, _lsq(4, False, 1.0), weight_step=2.0**-31)
    second = _linear(1.0, 0.0, _lsq(4, False, 0.5), weight_step=1.0)
    model = nn.Sequential(first, second).eval()
    x = torch.ones(1, 1)
    with torch.no_grad():
        fp32 = float(model(x))
        referee = float64_twin(model)(x.double())
        hidden = float(float64_twin(model)[0](x.double()))
    assert hidden == 0.75 - 2.0**-30
    assert fp32 == 1.0
    assert float(referee) == 0.5
    assert level_flips(np.array([fp32]), referee.numpy()) == 1
    assert level_flips(np.array([0.5]), referee.numpy()) == 0


@pytest.mark.parametrize("make", [
    lambda: LSQQuantizer(4, signed=True),
    lambda: LSQQuantizer(3, is_weight=True, channels=4),
    lambda: LCQQuantizer(4, signed=False),
    lambda: LCQQuantizer(4, is_weight=True, intervals=10),
    lambda: ASQQuantizer(4, channels=4),
    lambda: PowerQuantizer(4, root=1),
    lambda: PowerQuantizer(5, root=2, channels=4, normalize=True),
], ids=["lsq-act", "lsq-weight", "lcq-act", "lcq-weight-10-intervals", "asq", "pot", "post"])
def test_every_quantizer_runs_in_double_on_the_same_levels(make):
    torch.manual_seed(1)
    q = make()
    x = torch.randn(4, 4, 3, 3)
    q.train()
    q(x)
    q.eval()
    with torch.no_grad():
        want = q(x).double()
        twin = float64_twin(q)
        got = twin(x.double())
    assert got.dtype == torch.float64
    # Same level everywhere, up to the float32 rounding of the level values themselves.
    assert level_flips(want.numpy(), got.numpy()) == 0
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


def test_post_levels_in_double_are_powers_of_sqrt2():
    mags = magnitude_levels(5, 2, np.float64).numpy()
    top = 2 ** 4 - 1
    expected = [0.0] + [math.sqrt(0.5) ** (top - m) for m in range(1, top + 1)]
    assert mags.dtype == np.float64
    np.testing.assert_allclose(mags, expected, rtol=1e-15, atol=0)
    twin = float64_twin(nn.Sequential(PowerQuantizer(5, root=2)))
    assert twin[0].magnitudes.dtype == torch.float64
    assert float(twin[0].magnitudes[-2]) == math.sqrt(0.5)


def test_lcq_interval_starts_are_exact_in_double():
    from qconvert.quant.lcq import interval_starts

    starts = interval_starts(10, torch.float64)
    assert starts.dtype == torch.float64
    assert float(starts[3]) == 3 / 10  # float32 would give 0.30000001192...
    assert interval_starts(10).dtype == torch.float32


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class _Bypass(nn.Module):
    """Reads a quantized layer's float weight directly (as nn.MultiheadAttention's fused
    path reads out_proj): that layer's quantizers never run."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(nn.functional.linear(x, self.inner.weight)))


def test_a_model_that_skips_quantizers_is_refused_naming_them():
    torch.manual_seed(0)
    model = quantize_model(_Bypass(), "lsq", 4, 4)
    model.train()
    model(torch.randn(4, 16))
    with pytest.raises(QConvertError, match=r"did not run 2 of its quantizers \(inner\.") as err:
        run_checked(model.eval(), torch.randn(2, 16), "the PyTorch model")
    assert "\n" not in str(err.value) and "head" not in str(err.value)


def test_transformer_fast_paths_no_longer_skip_quantizers():
    """quantize_model splits attention into its projections and turns the fused paths
    off: in eval mode without autograd every quantizer runs, with the fast path on."""
    torch.manual_seed(0)
    model = quantize_model(_Encoder(), "lsq", 4, 4)
    model.train()
    model(torch.randn(4, 8, 16))
    assert torch.backends.mha.get_fastpath_enabled()
    run_checked(model.eval(), torch.randn(2, 8, 16), "the PyTorch model")


def test_call_counter_counts_each_quantizer():
    model = nn.Sequential(_linear(0.5, 0.0, _lsq(4, False, 0.25), 0.125)).eval()
    reset_calls(model)
    assert quantizers_not_run(model) == ["0.act_quant", "0.weight_quant"]
    with torch.no_grad():
        model(torch.ones(2, 1))
    assert quantizers_not_run(model) == []
