"""Quantized Conv1d, Conv2d, ConvTranspose2d and Linear: ``y = op(Q_a(x), Q_w(W)) + b``."""

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


def _check_zero_padding(conv: nn.Module) -> None:
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported (only 'zeros')")


class _QConv(_Quantized):
    """Conv1d / Conv2d: the float class's own convolution on the quantized input and weight."""

    @classmethod
    def from_float(cls, conv: nn.Module, act_quant: Quantizer, weight_quant: Quantizer):
        _check_zero_padding(conv)
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, act_quant=act_quant, weight_quant=weight_quant,
        )
        layer.load_state_dict(conv.state_dict(), strict=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_quant(x), self.weight_quant(self.weight), self.bias)


class QConv1d(_QConv, nn.Conv1d):
    """A Conv1d that quantizes its input activation and its weight."""


class QConv2d(_QConv, nn.Conv2d):
    """A Conv2d that quantizes its input activation and its weight."""


class QConvTranspose2d(_Quantized, nn.ConvTranspose2d):
    """A ConvTranspose2d that quantizes its input activation and its weight.

    The weight is [in, out / groups, kH, kW]: a per-channel weight quantizer is per
    input channel (dim 0), as everywhere in qconvert.
    """

    @classmethod
    def from_float(cls, conv: nn.ConvTranspose2d, act_quant: Quantizer,
                   weight_quant: Quantizer) -> QConvTranspose2d:
        _check_zero_padding(conv)
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, output_padding=conv.output_padding, groups=conv.groups,
            bias=conv.bias is not None, dilation=conv.dilation, act_quant=act_quant,
            weight_quant=weight_quant,
        )
        layer.load_state_dict(conv.state_dict(), strict=False)
        return layer

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(x, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        return F.conv_transpose2d(self.act_quant(x), self.weight_quant(self.weight), self.bias,
                                  self.stride, self.padding, output_padding, self.groups,
                                  self.dilation)


class QLinear(_Quantized, nn.Linear):
    """A Linear layer that quantizes its input activation and its weight; any input rank."""

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


QUANTIZED_LAYERS = (QConv1d, QConv2d, QConvTranspose2d, QLinear)
# float class -> its quantized twin
QUANTIZED_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QConv1d, nn.Conv2d: QConv2d, nn.ConvTranspose2d: QConvTranspose2d,
    nn.Linear: QLinear,
}


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every quantized layer of ``model`` with its module path, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]
