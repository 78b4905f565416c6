"""AdaptiveStep: ASQ activation quantization with a per-sample step (docs/ops.md#adaptivestep)."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from ._builder import DOMAIN, QCONVERT, FunctionBuilder, float_param, int_attr, shaped_like_x

NAME = "AdaptiveStep"
SINCE_VERSION = 1  # in the op set since its first version
INPUTS = ["X", "step", "beta"]
ATTRIBUTES = ["bits", "signed"]


def schema() -> onnx.defs.OpSchema:
    return shaped_like_x(onnx.defs.OpSchema(
        NAME, DOMAIN, SINCE_VERSION,
        "ASQ: y = clamp(round(x / (step * beta_n)), lo, hi) * (step * beta_n) per sample n.",
        inputs=[float_param("X", "activation, [N, ...]"), float_param("step", "base step, [1]"),
                float_param("beta", "per-sample factor, [N]")],
        outputs=[float_param("Y", "quantized activation, shape of X")],
        attributes=[int_attr("bits", "2..8"), int_attr("signed", "0 or 1")],
    ))


def code_range(bits: int, signed: int) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def width_of_range(lo: float, hi: float) -> tuple[int, bool] | None:
    """(bits, signed) whose code range is exactly [lo, hi], bits 2..8; else None."""
    for bits in range(2, 9):
        for signed in (False, True):
            if code_range(bits, signed) == (lo, hi):
                return bits, signed
    return None


def reference(x, step, beta, *, bits: int, signed: int) -> np.ndarray:
    x = np.asarray(x, np.float32)
    lo, hi = code_range(bits, signed)
    s_a = (np.float32(np.asarray(step).reshape(-1)[0]) * np.asarray(beta, np.float32)).reshape(
        (-1,) + (1,) * (x.ndim - 1))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        q = np.clip(np.round(x / s_a), np.float32(lo), np.float32(hi))
        return np.where(np.isnan(x), x, q * s_a).astype(np.float32)


def function(opset: int) -> onnx.FunctionProto:
    fb = FunctionBuilder(NAME, INPUTS, ATTRIBUTES)
    bits, signed = fb.attr("bits"), fb.attr("signed")
    lo, hi = fb.code_range(bits, signed)
    rank = fb.node("Size", fb.node("Shape", "X"))
    trailing = fb.node("Reshape", fb.node("Sub", rank, fb.const(1, np.int64)),
                       fb.const([1], np.int64))
    ones = fb.node("ConstantOfShape", trailing,
                   value=onnx.helper.make_tensor("one", onnx.TensorProto.INT64, [1], [1]))
    per_sample = fb.node("Concat", fb.node("Shape", "beta"), ones, axis=0)
    batch = fb.node("Gather", fb.node("Shape", "X"), fb.const(0, np.int64), axis=0)
    step = fb.require("step", fb.bits_in(bits, 2, 8), fb.bits_in(signed, 0, 1),
                      fb.equal(fb.node("Size", "step"), fb.const(1, np.int64)),
                      fb.equal(fb.node("Size", "beta"), batch))
    s_a = fb.node("Reshape", fb.node("Mul", step, "beta"), per_sample)
    q = fb.node("Clip", fb.node("Round", fb.node("Div", "X", s_a)), lo, hi)
    y = fb.node("Mul", q, s_a)
    fb.nodes.append(onnx.helper.make_node("Where", [fb.node("IsNaN", "X"), "X", y], ["Y"]))
    return fb.build(["Y"], opset)


@torch.library.custom_op("qconvert::adaptive_step", mutates_args=())
def adaptive_step(x: torch.Tensor, step: torch.Tensor, beta: torch.Tensor, bits: int,
                  signed: int) -> torch.Tensor:
    lo, hi = code_range(bits, signed)
    s_a = (step * beta).view(-1, *([1] * (x.dim() - 1)))
    return torch.clamp(torch.round(x / s_a), lo, hi) * s_a


@adaptive_step.register_fake
def _(x, step, beta, bits, signed):
    return torch.empty_like(x)


def translate(x, step, beta, bits: int, signed: int):
    return QCONVERT.AdaptiveStep(x, step, beta, bits=bits, signed=signed)


TORCH_OP = torch.ops.qconvert.adaptive_step.default
