"""Quantized PyTorch model -> deploy form: the same network, with every quantizer replaced
by what the ONNX model will run.

Activation quantizers become one qconvert op each;
weights become packed integer codes plus a decode op. The deploy form is still a
PyTorch module, so it can be checked bit for bit against the QAT model before any
ONNX is written, and it is what torch.onnx exports.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QConvertError
from ..ops import (  # noqa: F401 (registers the torch ops)
    adaptive_step,
    compand_quant,
    lut_gather,
    pow2_shift,
    sample_max_quant,
    uniform_quant,
)
from ..ops.packing import pack_codes
from ..quant import (
    ASQQuantizer,
    LCQQuantizer,
    LSQQuantizer,
    MaxScaledWeightQuantizer,
    PowerQuantizer,
    QConv1d,
    QConv2d,
    QConvTranspose2d,
    QLinear,
    Quantizer,
    SampleMaxQuantizer,
    quantized_layers,
)

QuantizedLayer = QConv1d | QConv2d | QConvTranspose2d | QLinear


class UniformAct(nn.Module):
    """LSQ activation: one UniformQuant op, ``clamp(round(x / s), lo, hi) * s``."""

    def __init__(self, q: LSQQuantizer) -> None:
        super().__init__()
        self.register_buffer("step", q.step.detach().clone())
        self.bits, self.signed = q.bits, int(q.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qconvert.uniform_quant(x, self.step, self.bits, self.signed)


class CompandAct(nn.Module):
    """LCQ activation: one CompandQuant op."""

    def __init__(self, q: LCQQuantizer) -> None:
        super().__init__()
        slopes, offsets = q.compressor_tables()
        self.register_buffer("alpha", q.alpha.detach().clone())
        self.register_buffer("slopes", slopes.clone())
        self.register_buffer("offsets", offsets.clone())
        self.register_buffer("levels", q.magnitude_levels().clone())
        self.bits, self.signed = q.bits, int(q.signed)
        self.mirror, self.clip = int(q.mirror), int(q.clip_exact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qconvert.compand_quant(
            x, self.alpha, self.slopes, self.offsets, self.levels, self.bits, self.signed,
            self.mirror, self.clip)


class SampleMaxAct(nn.Module):
    """Max-scaled activation (each sample's own maximum): one SampleMaxQuant op."""

    def __init__(self, q: SampleMaxQuantizer) -> None:
        super().__init__()
        self.bits, self.signed = q.bits, int(q.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qconvert.sample_max_quant(x, self.bits, self.signed)


class AdaptiveAct(nn.Module):
    """ASQ activation: the adapter in standard ops, then one AdaptiveStep op."""

    def __init__(self, q: ASQQuantizer) -> None:
        super().__init__()
        self.register_buffer("step", q.step.detach().clone())
        self.adapter = copy.deepcopy(q.adapter)
        self.bits, self.signed = q.bits, int(q.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.adapter(x)
        return torch.ops.qconvert.adaptive_step(x, self.step, beta, self.bits, self.signed)


class TableWeight(nn.Module):
    """LSQ / LCQ weight: packed level indices decoded by LutGather."""

    def __init__(self, codes: torch.Tensor, table: torch.Tensor, bits: int, shape) -> None:
        super().__init__()
        self.register_buffer("codes", torch.from_numpy(pack_codes(codes, bits)))
        self.register_buffer("table", table.contiguous())
        self.bits, self.shape = bits, list(shape)

    def forward(self) -> torch.Tensor:
        return torch.ops.qconvert.lut_gather(self.codes, self.table, self.bits, self.shape)


class PowerWeight(nn.Module):
    """POT / POST weight: packed sign + magnitude codes decoded by Pow2Shift."""

    def __init__(self, codes: torch.Tensor, alpha: torch.Tensor, bits: int, root: int,
                 shape) -> None:
        super().__init__()
        self.register_buffer("codes", torch.from_numpy(pack_codes(codes, bits)))
        self.register_buffer("alpha", alpha.contiguous())
        self.bits, self.root, self.shape = bits, root, list(shape)

    def forward(self) -> torch.Tensor:
        return torch.ops.qconvert.pow2_shift(self.codes, self.alpha, self.bits, self.root,
                                             self.shape)


def deploy_activation(q: Quantizer) -> nn.Module:
    if isinstance(q, LSQQuantizer):
        return UniformAct(q)
    if isinstance(q, LCQQuantizer):
        return CompandAct(q)
    if isinstance(q, ASQQuantizer):
        return AdaptiveAct(q)
    if isinstance(q, SampleMaxQuantizer):
        return SampleMaxAct(q)
    raise QConvertError(f"no deploy form for activation quantizer {type(q).__name__}")


def deploy_weight(q: Quantizer, weight: torch.Tensor) -> nn.Module:
    """Fold a weight quantizer: codes at the quantizer's bit width, plus tables / scales."""
    w = weight.detach()
    index = q.encode(w).reshape(-1)
    if isinstance(q, PowerQuantizer):
        codes, code_bits = q.shift_codes(index)  # wider than q.bits for 2^b + 1 levels
        return PowerWeight(codes, q.alpha.detach().clone(), code_bits, q.root, w.shape)
    if isinstance(q, LCQQuantizer | LSQQuantizer | MaxScaledWeightQuantizer):
        table = q.levels(w)
        # LCQ's exact clip can add two levels: codes one bit wider then.
        bits = max(q.bits, (table.shape[-1] - 1).bit_length())
        return TableWeight(index, table, bits, w.shape)
    raise QConvertError(f"no deploy form for weight quantizer {type(q).__name__}")


class _DeployLayer(nn.Module):
    """A quantized layer's deploy parts: activation op, decoded weight, float bias."""

    def __init__(self, layer: QuantizedLayer) -> None:
        super().__init__()
        self.act = deploy_activation(layer.act_quant)
        self.weight = deploy_weight(layer.weight_quant, layer.weight)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())


class _DeployConv(_DeployLayer):
    def __init__(self, layer: QConv1d | QConv2d | QConvTranspose2d) -> None:
        super().__init__(layer)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups


class DeployConv1d(_DeployConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(self.act(x), self.weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class DeployConv2d(_DeployConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.act(x), self.weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class DeployConvTranspose2d(_DeployConv):
    """The output padding is fixed at the layer's own (no ``output_size`` argument)."""

    def __init__(self, layer: QConvTranspose2d) -> None:
        super().__init__(layer)
        self.output_padding = layer.output_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(self.act(x), self.weight(), self.bias, self.stride,
                                  self.padding, self.output_padding, self.groups, self.dilation)


class DeployLinear(_DeployLayer):
    """Any input rank: [N, C] exports as Gemm, [N, T, C] as MatMul + Add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(x), self.weight(), self.bias)


DEPLOY_FORMS: dict[type[nn.Module], type[_DeployLayer]] = {
    QConv1d: DeployConv1d, QConv2d: DeployConv2d, QConvTranspose2d: DeployConvTranspose2d,
    QLinear: DeployLinear,
}


@dataclass
class DeployedLayer:
    """What the exporter and inspector need to know about one quantized layer."""

    name: str
    module: _DeployLayer
    weight_kind: str
    weight_bits: int
    act_kind: str
    act_bits: int
    params: int
    macs_per_sample: int = 0


def _check_folded_weight(name: str, layer: QuantizedLayer, deployed: nn.Module) -> None:
    with torch.no_grad():
        expected = layer.weight_quant(layer.weight)
        decoded = deployed.weight()
    if not torch.equal(decoded, expected):
        bad = int((decoded != expected).sum())
        raise QConvertError(
            f"layer {name}: folded weight differs from the QAT weight in {bad} elements; "
            "this quantizer configuration cannot be exported faithfully"
        )


def _spec_kinds(layer: QuantizedLayer) -> tuple[str, str]:
    spec = getattr(layer, "layer_spec", None)
    if spec is not None:
        return spec.weight.kind, spec.act.kind
    return type(layer.weight_quant).__name__, type(layer.act_quant).__name__


def to_deploy(model: nn.Module, progress=None) -> tuple[nn.Module, list[DeployedLayer]]:
    """A deploy-form copy of ``model`` (eval mode) and a description of each layer.

    Every folded weight is decoded again and compared with the QAT weight; a
    mismatch refuses the export rather than producing a model that differs.
    """
    model = model.eval()
    deploy = copy.deepcopy(model)
    layers: list[DeployedLayer] = []
    for name, layer in quantized_layers(model):
        deployed = DEPLOY_FORMS[type(layer)](layer)
        _check_folded_weight(name, layer, deployed)
        weight_kind, act_kind = _spec_kinds(layer)
        layers.append(DeployedLayer(name, deployed, weight_kind, layer.weight_quant.bits,
                                    act_kind, layer.act_quant.bits, layer.weight.numel()))
        parent_name, _, child = name.rpartition(".")
        setattr(deploy.get_submodule(parent_name) if parent_name else deploy, child, deployed)
        if progress is not None:
            progress(name)
    return deploy.eval(), layers
