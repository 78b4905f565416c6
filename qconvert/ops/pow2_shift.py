"""Pow2Shift: decode POT / POST weights from packed sign + magnitude codes
(docs/ops.md#pow2shift)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch

from ..quant.pot import magnitude_table
from ._builder import DOMAIN, QCONVERT, FunctionBuilder, float_param, int_attr, shaped_by_attribute
from .packing import unpack_codes, unpack_codes_np, unpack_codes_torch

NAME = "Pow2Shift"
SINCE_VERSION = 1  # in the op set since its first version
INPUTS = ["codes", "alpha"]
ATTRIBUTES = ["bits", "root", "shape"]
MAX_BITS = 8


def schema() -> onnx.defs.OpSchema:
    return shaped_by_attribute(onnx.defs.OpSchema(
        NAME, DOMAIN, SINCE_VERSION,
        "Y = +-alpha_c * base^-(M - m) from packed sign + magnitude codes; base 2 or sqrt 2.",
        inputs=[onnx.defs.OpSchema.FormalParameter("codes", "tensor(uint8)", "packed codes"),
                float_param("alpha", "scale, [1] or [C]")],
        outputs=[float_param("Y", "decoded tensor of the given shape")],
        attributes=[int_attr("bits", "2..8"), int_attr("root", "1: base 2, 2: base sqrt 2"),
                    int_attr("shape", "output shape", kind="ints")],
    ))


def _decode(codes, alpha, bits: int, root: int, count: int, xp):
    """Shared by the numpy and torch versions (``xp`` is numpy or torch)."""
    half = 1 << (bits - 1)
    negative, m = codes // half, codes % half
    exponent = (half - 1) - m
    mags = magnitude_table(MAX_BITS, root)
    mags = mags.numpy() if xp is np else mags
    channel = xp.arange(count) // max(1, count // alpha.shape[0])
    y = alpha[channel] * mags[xp.clip(exponent, 0, mags.shape[0] - 1)]
    y = xp.where(m == 0, xp.zeros_like(y), y)
    return y * (1 - 2 * negative).astype(np.float32) if xp is np else y * (1 - 2 * negative).float()


def reference(codes, alpha, *, bits: int, shape, root: int) -> np.ndarray:
    count = math.prod(shape)
    alpha = np.asarray(alpha, np.float32).reshape(-1)
    if count == 0:
        return np.zeros(shape, np.float32)
    return _decode(unpack_codes_np(codes, bits, count), alpha, bits, root, count, np).reshape(shape)


def function(opset: int) -> onnx.FunctionProto:
    fb = FunctionBuilder(NAME, INPUTS, ATTRIBUTES)
    shape, bits = fb.attr("shape", "ints"), fb.attr("bits")
    count = fb.node("ReduceProd", shape, keepdims=0)
    codes = unpack_codes(fb, "codes", bits, count)
    half = fb.node("Pow", fb.const(2, np.int64), fb.node("Sub", bits, fb.const(1, np.int64)))
    negative, m = fb.node("Div", codes, half), fb.node("Mod", codes, half)
    exponent = fb.node("Sub", fb.node("Sub", half, fb.const(1, np.int64)), m)
    # The shifts as exact float32 constants: row 0 base 2, row 1 base sqrt 2.
    tables = np.stack([magnitude_table(MAX_BITS, 1).numpy(), magnitude_table(MAX_BITS, 2).numpy()])
    root_row = fb.node("Sub", fb.attr("root"), fb.const(1, np.int64))
    mags = fb.node("Gather", fb.const(tables), root_row, axis=0)
    safe_exponent = fb.node("Min", exponent, fb.const(tables.shape[1] - 1, np.int64))
    channels = fb.node("Gather", shape, fb.const(0, np.int64), axis=0)
    alpha_size = fb.node("Size", "alpha")
    checked = fb.require(
        "alpha", fb.bits_in(bits, 2, 8), fb.bits_in(fb.attr("root"), 1, 2),
        fb.node("Or", fb.equal(alpha_size, fb.const(1, np.int64)),
                fb.equal(alpha_size, channels)))
    alpha = fb.node("Reshape", checked, fb.const([-1], np.int64))
    channel = fb.node("Div", fb.node("Range", fb.const(0, np.int64), count, fb.const(1, np.int64)),
                      fb.node("Div", count, fb.node("Size", alpha)))
    y = fb.node("Mul", fb.node("Gather", alpha, channel, axis=0),
                fb.node("Gather", mags, safe_exponent, axis=0))
    y = fb.node("Where", fb.node("Equal", m, fb.const(0, np.int64)), fb.const(0.0), y)
    sign = fb.node("Cast", fb.node("Sub", fb.const(1, np.int64),
                                   fb.node("Mul", negative, fb.const(2, np.int64))), to=1)
    fb.nodes.append(onnx.helper.make_node("Reshape", [fb.node("Mul", y, sign), shape], ["Y"]))
    return fb.build(["Y"], opset)


@torch.library.custom_op("qconvert::pow2_shift", mutates_args=())
def pow2_shift(codes: torch.Tensor, alpha: torch.Tensor, bits: int, root: int,
               shape: list[int]) -> torch.Tensor:
    count = math.prod(shape)
    values = unpack_codes_torch(codes, bits, count)
    return _decode(values, alpha.reshape(-1), bits, root, count, torch).reshape(shape)


@pow2_shift.register_fake
def _(codes, alpha, bits, root, shape):
    return alpha.new_empty(shape)


def translate(codes, alpha, bits: int, root: int, shape: list[int]):
    return QCONVERT.Pow2Shift(codes, alpha, bits=bits, root=root, shape=shape)


TORCH_OP = torch.ops.qconvert.pow2_shift.default
