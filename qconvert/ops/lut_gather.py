"""LutGather: decode packed low-bit codes through a per-tensor or per-channel table
(docs/ops.md#lutgather). Used for LCQ and LSQ weights."""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch

from ._builder import DOMAIN, QCONVERT, FunctionBuilder, float_param, int_attr, shaped_by_attribute
from .packing import unpack_codes, unpack_codes_np, unpack_codes_torch

NAME = "LutGather"
SINCE_VERSION = 1  # in the op set since its first version
INPUTS = ["codes", "table"]
ATTRIBUTES = ["bits", "shape"]


def schema() -> onnx.defs.OpSchema:
    return shaped_by_attribute(onnx.defs.OpSchema(
        NAME, DOMAIN, SINCE_VERSION,
        "Y[i] = table[(channel of i,) code_i] for packed bits-bit codes; Y has the given shape.",
        inputs=[onnx.defs.OpSchema.FormalParameter("codes", "tensor(uint8)", "packed codes"),
                float_param("table", "levels, [L] or [C, L]")],
        outputs=[float_param("Y", "decoded tensor of the given shape")],
        attributes=[int_attr("bits", "1..8"), int_attr("shape", "output shape", kind="ints")],
    ))


def _flat_index(codes, count: int, table_shape: tuple[int, ...]):
    rows, width = (1, table_shape[0]) if len(table_shape) == 1 else table_shape
    if codes.max(initial=0) >= width:
        raise ValueError(f"LutGather: code {int(codes.max())} is outside a table of {width} levels")
    return (np.arange(count) // (count // rows)) * width + codes


def reference(codes, table, *, bits: int, shape) -> np.ndarray:
    count = math.prod(shape)
    table = np.asarray(table, np.float32)
    if count == 0:
        return np.zeros(shape, np.float32)
    values = unpack_codes_np(codes, bits, count)
    return table.reshape(-1)[_flat_index(values, count, table.shape)].reshape(shape)


def function(opset: int) -> onnx.FunctionProto:
    fb = FunctionBuilder(NAME, INPUTS, ATTRIBUTES)
    shape, bits = fb.attr("shape", "ints"), fb.attr("bits")
    count = fb.node("ReduceProd", shape, keepdims=0)
    codes = unpack_codes(fb, "codes", bits, count)
    width = fb.node("Gather", fb.node("Shape", "table"), fb.const(-1, np.int64), axis=0)
    rank = fb.node("Size", fb.node("Shape", "table"))
    first_dim = fb.node("Gather", fb.node("Shape", "table"), fb.const(0, np.int64), axis=0)
    channels = fb.node("Gather", shape, fb.const(0, np.int64), axis=0)
    table = fb.require(
        "table", fb.bits_in(bits, 1, 8),
        fb.node("LessOrEqual", width, fb.node("Pow", fb.const(2, np.int64), bits)),
        fb.node("Or", fb.equal(rank, fb.const(1, np.int64)),
                fb.node("And", fb.equal(rank, fb.const(2, np.int64)),
                        fb.equal(first_dim, channels))))
    rows = fb.node("Div", fb.node("Size", "table"), width)
    channel = fb.node("Div", fb.node("Range", fb.const(0, np.int64), count, fb.const(1, np.int64)),
                      fb.node("Div", count, rows))
    flat = fb.node("Add", fb.node("Mul", channel, width), codes)
    # A code outside the table becomes an index Gather rejects: an error, never a wrong read.
    invalid = fb.node("Sub", fb.node("Neg", fb.node("Size", "table")), fb.const(1, np.int64))
    flat = fb.node("Where", fb.node("Less", codes, width), flat, invalid)
    flat_table = fb.node("Reshape", table, fb.const([-1], np.int64))
    values = fb.node("Gather", flat_table, flat, axis=0)
    fb.nodes.append(onnx.helper.make_node("Reshape", [values, shape], ["Y"]))
    return fb.build(["Y"], opset)


@torch.library.custom_op("qconvert::lut_gather", mutates_args=())
def lut_gather(codes: torch.Tensor, table: torch.Tensor, bits: int,
               shape: list[int]) -> torch.Tensor:
    count = math.prod(shape)
    values = unpack_codes_torch(codes, bits, count)
    rows, width = (1, table.shape[0]) if table.dim() == 1 else tuple(table.shape)
    if count and int(values.max()) >= width:
        raise ValueError(
            f"LutGather: code {int(values.max())} is outside a table of {width} levels")
    channel = torch.arange(count) // max(1, count // rows)
    return table.reshape(-1)[channel * width + values].reshape(shape)


@lut_gather.register_fake
def _(codes, table, bits, shape):
    return table.new_empty(shape)


def translate(codes, table, bits: int, shape: list[int]):
    return QCONVERT.LutGather(codes, table, bits=bits, shape=shape)


TORCH_OP = torch.ops.qconvert.lut_gather.default
