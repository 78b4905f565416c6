"""Sanity of a quantized model's parameters: what must hold before it can be exported."""

from __future__ import annotations

import torch
from torch import nn

from .asq import ASQQuantizer
from .base import Quantizer
from .layers import QUANTIZED_LAYERS
from .lcq import LCQQuantizer
from .lsq import LSQQuantizer
from .pot import PowerQuantizer


def _positive_finite(name: str, value: torch.Tensor) -> str | None:
    if not torch.isfinite(value).all():
        return f"{name} holds NaN or Inf"
    if (value <= 0).any():
        return f"{name} is not positive ({float(value.min()):.3g})"
    return None


def quantizer_problem(q: Quantizer) -> str | None:
    """Why ``q`` cannot be exported faithfully, or None."""
    if not bool(q.initialized):
        return "quantizer was never initialised (no training-mode forward pass)"
    if isinstance(q, LSQQuantizer | ASQQuantizer):
        return _positive_finite("step", q.step.detach())
    if isinstance(q, PowerQuantizer):
        return _positive_finite("alpha", q.alpha.detach())
    if isinstance(q, LCQQuantizer):
        if not torch.isfinite(q.theta).all():
            return "LCQ theta holds NaN or Inf"
        slopes, _ = q.compressor_tables()
        if not (slopes > 0).all():
            return ("LCQ compressor is not strictly monotone (a slope underflowed to 0); "
                    "its expander is undefined")
        return _positive_finite("alpha", q.alpha.detach())
    return None


def first_parameter_problem(model: nn.Module) -> str | None:
    """The first problem found, naming the layer: non-finite weights, bad quantizer params."""
    for name, layer in model.named_modules():
        if not isinstance(layer, QUANTIZED_LAYERS):
            continue
        for param_name, param in layer.named_parameters(recurse=False):
            if not torch.isfinite(param).all():
                return f"layer {name}: {param_name} holds NaN or Inf"
        for role, q in (("weight quantizer", layer.weight_quant),
                        ("activation quantizer", layer.act_quant)):
            problem = quantizer_problem(q)
            if problem:
                return f"layer {name}: {role}: {problem}"
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{name} holds NaN or Inf"
    return None
