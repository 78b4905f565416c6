"""Quantized Conv2d and Linear: ``y = op(Q_a(x), Q_w(W)) + b``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Quantizer


class _Quantized:
    """Holds a layer's two quantizers; mixed in before the float layer class."""

    def __init__(self, *args, act_quant: Quantizer, weight_quant: Quantizer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.act_quant = act_quant
        self.weight_quant = weight_quant


class QConv2d(_Quantized, nn.Conv2d):
    """A Conv2d that quantizes its input activation and its weight."""

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, act_quant: Quantizer, weight_quant: Quantizer
    ) -> QConv2d:
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported (only 'zeros')")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, act_quant=act_quant, weight_quant=weight_quant,
        )
        layer.load_state_dict(conv.state_dict(), strict=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_quant(x), self.weight_quant(self.weight), self.bias)


class QLinear(_Quantized, nn.Linear):
    """A Linear layer that quantizes its input activation and its weight."""

    @classmethod
    def from_float(
        cls, linear: nn.Linear, act_quant: Quantizer, weight_quant: Quantizer
    ) -> QLinear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    act_quant=act_quant, weight_quant=weight_quant)
        layer.load_state_dict(linear.state_dict(), strict=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_quant(x), self.weight_quant(self.weight), self.bias)


QUANTIZED_LAYERS = (QConv2d, QLinear)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every quantized layer of ``model`` with its module path, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]
