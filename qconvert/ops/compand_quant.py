"""CompandQuant: LCQ activation quantization at inference (docs/ops.md#compandquant)."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from ._builder import DOMAIN, QCONVERT, FunctionBuilder, float_param, int_attr, shaped_like_x

NAME = "CompandQuant"
SINCE_VERSION = 1  # in the op set since its first version
INPUTS = ["X", "alpha", "slopes", "offsets", "levels"]
ATTRIBUTES = ["bits", "signed", "mirror", "clip"]
# Optional attributes (op set version 3): absent in older files, which then mean 0.
DEFAULTS = {"mirror": 0, "clip": 0}


def schema() -> onnx.defs.OpSchema:
    return shaped_like_x(onnx.defs.OpSchema(
        NAME, DOMAIN, SINCE_VERSION,
        "LCQ: compress by a piecewise-linear f, round uniformly, expand through a level table.",
        inputs=[float_param("X", "activation"), float_param("alpha", "clip, [1]"),
                float_param("slopes", "compressor slopes, [K]"),
                float_param("offsets", "compressor offsets, [K]"),
                float_param("levels", "expander table, [S + 1]")],
        outputs=[float_param("Y", "quantized activation, shape of X")],
        attributes=[int_attr("bits", "2..8"), int_attr("signed", "0 or 1"),
                    int_attr("mirror", "0 or 1: unsigned levels on |x|, sign restored",
                             default=0),
                    int_attr("clip", "0 or 1: |x| >= alpha gives exactly alpha", default=0)],
    ))


def check_attributes(bits: int, signed: int, mirror: int, clip: int) -> None:
    if not 2 <= bits <= 8 or signed not in (0, 1) or mirror not in (0, 1) or clip not in (0, 1):
        raise ValueError(f"CompandQuant: bad attributes bits={bits} signed={signed} "
                         f"mirror={mirror} clip={clip}")
    if signed and mirror:
        raise ValueError("CompandQuant: mirror=1 needs signed=0")


def reference(x, alpha, slopes, offsets, levels, *, bits: int, signed: int, mirror: int = 0,
              clip: int = 0) -> np.ndarray:
    """Numpy transcription of the spec, float32 throughout."""
    check_attributes(bits, signed, mirror, clip)
    x = np.asarray(x, np.float32)
    alpha = np.float32(np.asarray(alpha).reshape(-1)[0])
    K, S = np.float32(len(slopes)), np.float32(len(levels) - 1)
    symmetric = signed or mirror
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.abs(x) if symmetric else x
        v = np.minimum(np.maximum(m / alpha, np.float32(0)), np.float32(1))
        v_safe = np.where(np.isnan(v), np.float32(0), v)
        k = np.minimum(np.floor(v_safe * K), K - 1).astype(np.int64)
        d = k.astype(np.float32) / K
        f = np.asarray(slopes, np.float32)[k] * (v_safe - d) + np.asarray(offsets, np.float32)[k]
        j = np.clip(np.round(np.nan_to_num(f * S)), 0, S).astype(np.int64)
        y = np.asarray(levels, np.float32)[j]
        if clip:
            y = np.where(m >= alpha, alpha, y)
        if symmetric:
            y = y * np.sign(x)
    return np.where(np.isnan(x), x, y).astype(np.float32)


def function(opset: int) -> onnx.FunctionProto:
    fb = FunctionBuilder(NAME, INPUTS, ATTRIBUTES, DEFAULTS)
    one, zero = fb.const(1.0), fb.const(0.0)
    bits, signed = fb.attr("bits"), fb.attr("signed")
    mirror, clip = fb.attr("mirror"), fb.attr("clip")
    table_size = fb.node("Pow", fb.const(2, np.int64), fb.node("Sub", bits, signed))
    alpha = fb.require(
        "alpha", fb.bits_in(bits, 2, 8), fb.bits_in(signed, 0, 1), fb.bits_in(mirror, 0, 1),
        fb.bits_in(clip, 0, 1),
        fb.bits_in(fb.node("Add", signed, mirror), 0, 1),
        fb.equal(fb.node("Size", "levels"), table_size),
        fb.equal(fb.node("Size", "slopes"), fb.node("Size", "offsets")),
        fb.node("Greater", fb.node("Size", "slopes"), fb.const(0, np.int64)),
        fb.equal(fb.node("Size", "alpha"), fb.const(1, np.int64)))
    symmetric = fb.node("Cast", fb.node("Add", signed, mirror), to=onnx.TensorProto.BOOL)
    magnitude = fb.node("Where", symmetric, fb.node("Abs", "X"), "X")
    v = fb.node("Min", fb.node("Max", fb.node("Div", magnitude, alpha), zero), one)
    v = fb.node("Where", fb.node("IsNaN", v), zero, v)  # keep table indices valid
    k_count = fb.node("Cast", fb.node("Size", "slopes"), to=onnx.TensorProto.FLOAT)
    s_top = fb.node("Sub", fb.node("Cast", fb.node("Size", "levels"), to=1), one)
    k = fb.node("Min", fb.node("Floor", fb.node("Mul", v, k_count)), fb.node("Sub", k_count, one))
    k_index = fb.node("Cast", k, to=onnx.TensorProto.INT64)
    d = fb.node("Div", k, k_count)
    slope = fb.node("Gather", "slopes", k_index, axis=0)
    offset = fb.node("Gather", "offsets", k_index, axis=0)
    f = fb.node("Add", fb.node("Mul", slope, fb.node("Sub", v, d)), offset)
    j = fb.node("Clip", fb.node("Round", fb.node("Mul", f, s_top)), zero, s_top)
    y = fb.node("Gather", "levels", fb.node("Cast", j, to=onnx.TensorProto.INT64), axis=0)
    clipped = fb.node("And", fb.node("Cast", clip, to=onnx.TensorProto.BOOL),
                      fb.node("GreaterOrEqual", magnitude, alpha))
    y = fb.node("Where", clipped, alpha, y)
    y = fb.node("Mul", y, fb.node("Where", symmetric, fb.node("Sign", "X"), one))
    fb.nodes.append(onnx.helper.make_node("Where", [fb.node("IsNaN", "X"), "X", y], ["Y"]))
    return fb.build(["Y"], opset)


@torch.library.custom_op("qconvert::compand_quant", mutates_args=())
def compand_quant(x: torch.Tensor, alpha: torch.Tensor, slopes: torch.Tensor,
                  offsets: torch.Tensor, levels: torch.Tensor, bits: int,
                  signed: int, mirror: int = 0, clip: int = 0) -> torch.Tensor:
    check_attributes(bits, signed, mirror, clip)
    K, S = slopes.numel(), levels.numel() - 1
    magnitude = x.abs() if signed or mirror else x
    v = torch.clamp(magnitude / alpha, 0, 1).nan_to_num(0.0)
    k = torch.clamp(torch.floor(v * K), max=K - 1).long()
    d = k.float() / K
    f = slopes[k] * (v - d) + offsets[k]
    j = torch.clamp(torch.round(f * S).nan_to_num(0.0), 0, S).long()
    y = levels[j]
    if clip:
        y = torch.where(magnitude >= alpha, alpha, y)
    if signed or mirror:
        y = y * torch.sign(x)
    return torch.where(torch.isnan(x), x, y)


@compand_quant.register_fake
def _(x, alpha, slopes, offsets, levels, bits, signed, mirror=0, clip=0):
    return torch.empty_like(x)


def translate(x, alpha, slopes, offsets, levels, bits: int, signed: int, mirror: int = 0,
              clip: int = 0):
    # Written out even when 0: not every ONNX evaluator applies a function's defaults.
    return QCONVERT.CompandQuant(x, alpha, slopes, offsets, levels, bits=bits, signed=signed,
                                 mirror=mirror, clip=clip)


TORCH_OP = torch.ops.qconvert.compand_quant.default
