"""The float64 referee: the QAT model itself, evaluated in double precision.

A low-bit network turns a 1-ulp float32 difference at a rounding tie into a whole
quantization level, so PyTorch's own float32 evaluation is not the truth an exported
model can be held to. The referee is: same parameters (float32 values are exact in
double), quantizer tables and ASQ adapters recomputed in double, inputs identical.
Validation then asks whether the ONNX model is as close to it as PyTorch float32 is.

Also here: counting quantizer calls, so a comparison against a PyTorch model whose
quantizers silently did not run (a fused fast path) is refused.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .errors import QConvertError
from .quant.base import Quantizer
from .quant.pot import PowerQuantizer, magnitude_levels


def float64_twin(model: nn.Module) -> nn.Module:
    """A double-precision copy of ``model`` (eval mode); ``model`` is left as it is."""
    twin = copy.deepcopy(model).double().eval()
    for module in twin.modules():
        if isinstance(module, PowerQuantizer):  # the table is a constant, not a parameter
            module.magnitudes = magnitude_levels(module.bits, module.root, np.float64)
    return twin


def quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Quantizer)]


def reset_calls(model: nn.Module) -> None:
    for _, q in quantizers(model):
        q.calls = 0


def quantizers_not_run(model: nn.Module) -> list[str]:
    """Quantizers whose forward was not called since :func:`reset_calls`."""
    return [name for name, q in quantizers(model) if q.calls == 0]


def check_all_ran(model: nn.Module, which: str) -> None:
    skipped = quantizers_not_run(model)
    if skipped:
        shown = ", ".join(skipped[:4]) + (f" and {len(skipped) - 4} more" if len(skipped) > 4
                                         else "")
        raise QConvertError(
            f"{which} did not run {len(skipped)} of its quantizers ({shown}) on the data, so "
            "it is not the QAT model and the comparison would be meaningless; a fused fast "
            "path (e.g. nn.TransformerEncoderLayer in eval mode) reads the float weights "
            "directly: disable it (torch.backends.mha.set_fastpath_enabled(False)) in the "
            "architecture, or drop the modules no input reaches")


def run_checked(model: nn.Module, x: torch.Tensor, which: str):
    """``model(x)`` without autograd, refusing a run that skipped a quantizer."""
    reset_calls(model)
    with torch.no_grad():
        out = model(x)
    check_all_ran(model, which)
    return out


def as_referee_input(x: torch.Tensor) -> torch.Tensor:
    """The referee's input: float inputs in double, token ids as they are."""
    return x.double() if x.is_floating_point() else x


def run_referee(twin: nn.Module, x: torch.Tensor):
    try:
        return run_checked(twin, as_referee_input(x), "the float64 referee")
    except QConvertError:
        raise
    except Exception as exc:  # a user module that cannot run in double
        detail = " ".join(str(exc).split())[:200]
        raise QConvertError(
            f"the model does not run in float64 for the referee ({type(exc).__name__}: "
            f"{detail}); make its forward dtype-agnostic (no hard-coded float32 tensors)"
        ) from exc
