"""UniformQuant: LSQ activation quantization at inference (docs/ops.md#uniformquant)."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from ._builder import DOMAIN, QCONVERT, FunctionBuilder, float_param, int_attr, shaped_like_x
from .adaptive_step import code_range

NAME = "UniformQuant"
SINCE_VERSION = 2  # added in version 2 of the op set
INPUTS = ["X", "step"]
ATTRIBUTES = ["bits", "signed"]


def schema() -> onnx.defs.OpSchema:
    return shaped_like_x(onnx.defs.OpSchema(
        NAME, DOMAIN, SINCE_VERSION,
        "LSQ: y = clamp(round(x / step), lo, hi) * step with one per-tensor step.",
        inputs=[float_param("X", "activation"), float_param("step", "step, [1]")],
        outputs=[float_param("Y", "quantized activation, shape of X")],
        attributes=[int_attr("bits", "2..8"), int_attr("signed", "0 or 1")],
    ))


def reference(x, step, *, bits: int, signed: int) -> np.ndarray:
    if np.asarray(step).size != 1:
        raise ValueError(f"UniformQuant: step must hold one element, got {np.asarray(step).size}")
    x = np.asarray(x, np.float32)
    s = np.float32(np.asarray(step).reshape(-1)[0])
    lo, hi = code_range(bits, signed)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        q = np.clip(np.round(x / s), np.float32(lo), np.float32(hi))
        return np.where(np.isnan(x), x, q * s).astype(np.float32)


def function(opset: int) -> onnx.FunctionProto:
    """The standard-op chain PyTorch's LSQ computes: Div, Round, Clip, Mul."""
    fb = FunctionBuilder(NAME, INPUTS, ATTRIBUTES)
    bits, signed = fb.attr("bits"), fb.attr("signed")
    lo, hi = fb.code_range(bits, signed)
    step = fb.require("step", fb.bits_in(bits, 2, 8), fb.bits_in(signed, 0, 1),
                      fb.equal(fb.node("Size", "step"), fb.const(1, np.int64)))
    q = fb.node("Clip", fb.node("Round", fb.node("Div", "X", step)), lo, hi)
    fb.nodes.append(onnx.helper.make_node("Mul", [q, step], ["Y"]))
    return fb.build(["Y"], opset)


@torch.library.custom_op("qconvert::uniform_quant", mutates_args=())
def uniform_quant(x: torch.Tensor, step: torch.Tensor, bits: int, signed: int) -> torch.Tensor:
    if step.numel() != 1:
        raise ValueError(f"UniformQuant: step must hold one element, got {step.numel()}")
    lo, hi = code_range(bits, signed)
    return torch.clamp(torch.round(x / step), lo, hi) * step


@uniform_quant.register_fake
def _(x, step, bits, signed):
    return torch.empty_like(x)


def translate(x, step, bits: int, signed: int):
    return QCONVERT.UniformQuant(x, step, bits=bits, signed=signed)


TORCH_OP = torch.ops.qconvert.uniform_quant.default
