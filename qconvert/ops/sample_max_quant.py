"""SampleMaxQuant: uniform quantization scaled by each sample's own maximum
(docs/ops.md#samplemaxquant). The MinMax 8-bit quantizer of the public LCQ code at batch
size 1: no parameters, no clamp."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from ._builder import DOMAIN, QCONVERT, FunctionBuilder, float_param, int_attr, shaped_like_x

NAME = "SampleMaxQuant"
SINCE_VERSION = 3  # added in version 3 of the op set
INPUTS = ["X"]
ATTRIBUTES = ["bits", "signed"]


def schema() -> onnx.defs.OpSchema:
    return shaped_like_x(onnx.defs.OpSchema(
        NAME, DOMAIN, SINCE_VERSION,
        "Per sample n: m = max(X[n]); y = ((round(x / m * Q) / Q * m) - x) + x, Q from bits.",
        inputs=[float_param("X", "activation, [N, ...] (rank >= 1)")],
        outputs=[float_param("Y", "quantized activation, shape of X")],
        attributes=[int_attr("bits", "2..8"), int_attr("signed", "0 or 1")],
    ))


def top_code(bits: int, signed: int) -> int:
    """Q: 2^(bits-1) - 1 signed, 2^bits - 1 unsigned."""
    if not 2 <= bits <= 8 or signed not in (0, 1):
        raise ValueError(f"SampleMaxQuant: bad attributes bits={bits} signed={signed}")
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


def reference(x, *, bits: int, signed: int) -> np.ndarray:
    """Numpy transcription of the spec, float32 throughout."""
    q = np.float32(top_code(bits, signed))
    x = np.asarray(x, np.float32)
    if x.ndim < 1:
        raise ValueError("SampleMaxQuant: X needs a batch axis (rank >= 1)")
    if x.size == 0:
        return x.copy()
    flat = x.reshape(x.shape[0], -1)
    m = flat.max(axis=1, keepdims=True)  # NaN anywhere in the sample gives NaN
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        codes = np.round((flat / m) * q)
        y = ((codes / q) * m - flat) + flat
        y = np.where(m == 0, np.float32(0), y)
    return y.astype(np.float32).reshape(x.shape)


def function(opset: int) -> onnx.FunctionProto:
    fb = FunctionBuilder(NAME, INPUTS, ATTRIBUTES)
    zero = fb.const(0.0)
    bits, signed = fb.attr("bits"), fb.attr("signed")
    _, top = fb.code_range(bits, signed)
    top = fb.require(top, fb.bits_in(bits, 2, 8), fb.bits_in(signed, 0, 1))
    flat = fb.node("Flatten", "X", axis=1)
    has_nan = fb.node("ReduceMax", fb.node("Cast", fb.node("IsNaN", flat),
                                           to=onnx.TensorProto.FLOAT),
                      fb.const([1], np.int64), keepdims=1)
    m = fb.node("ReduceMax", flat, fb.const([1], np.int64), keepdims=1)
    m = fb.node("Where", fb.node("Greater", has_nan, zero), fb.const(np.nan), m)
    codes = fb.node("Round", fb.node("Mul", fb.node("Div", flat, m), top))
    y = fb.node("Add", fb.node("Sub", fb.node("Mul", fb.node("Div", codes, top), m), flat),
                flat)
    y = fb.node("Where", fb.node("Equal", m, zero), zero, y)
    fb.nodes.append(onnx.helper.make_node("Reshape", [y, fb.node("Shape", "X")], ["Y"]))
    return fb.build(["Y"], opset)


@torch.library.custom_op("qconvert::sample_max_quant", mutates_args=())
def sample_max_quant(x: torch.Tensor, bits: int, signed: int) -> torch.Tensor:
    q = float(top_code(bits, signed))
    if x.dim() < 1:
        raise ValueError("SampleMaxQuant: X needs a batch axis (rank >= 1)")
    if x.numel() == 0:
        return x.clone()
    flat = x.reshape(x.shape[0], -1)
    m = flat.amax(dim=1, keepdim=True)  # NaN anywhere in the sample gives NaN
    y = ((torch.round((flat / m) * q) / q) * m - flat) + flat
    return torch.where(m == 0, torch.zeros_like(y), y).reshape(x.shape)


@sample_max_quant.register_fake
def _(x, bits, signed):
    return torch.empty_like(x)


def translate(x, bits: int, signed: int):
    return QCONVERT.SampleMaxQuant(x, bits=bits, signed=signed)


TORCH_OP = torch.ops.qconvert.sample_max_quant.default
