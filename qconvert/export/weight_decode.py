"""Constant weight decodes that any ONNX Runtime folds at load, with the file kept packed.

ONNX Runtime never constant-folds a node of a custom domain whose kernel a library
registers: a ``qconvert::LutGather`` / ``Pow2Shift`` over constant codes would decode the
weight on every inference, and the convolution behind it would lose weight pre-packing,
Conv+BatchNorm fusion and the NCHWc layout. So each decode whose inputs are all
initializers moves to the function-only domain ``qconvert.decode``: the same op, the same
inputs and attributes, defined only by its model-local function body (the standard-ONNX
body of the op, ``qconvert/ops/<op>.py``). No runtime registers a kernel for that domain,
so ONNX Runtime inlines the body (with or without the native library) and constant-folds
it into a float initializer at session creation: the decoded weight is computed once, by
standard ops, from the packed codes stored in the file.

The body is stored once per op in the file, whatever the number of layers (a per-layer
inlined body would repeat its nodes for every weight: +56 % to +104 % on the shipped
checkpoints). It is a lean form of the op's portable body, written for folding: the
codes are unpacked eight at a time (eight codes of ``bits`` bits fill exactly ``bits``
bytes, so each code's byte and shift within its group are constants of the bit width)
with 32-bit BitShift / BitwiseAnd, and the weight is one Gather from a ``[rows, levels]``
table (Pow2Shift's table is its 2^bits sign + magnitude patterns per
channel, computed in the order docs/ops.md gives). Decodes whose inputs are computed at
run time stay ``qconvert`` ops and run on the native kernels.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..ops import DECODE_DOMAIN, DECODE_DOMAIN_VERSION, DECODE_OPS, DOMAIN, OPS
from ..ops._builder import FunctionBuilder
from ..ops.pow2_shift import MAX_BITS
from ..quant.pot import magnitude_table


def is_weight_decode(node: onnx.NodeProto) -> bool:
    """A weight decode in either form: a ``qconvert`` kernel op or its foldable twin."""
    return node.domain in (DOMAIN, DECODE_DOMAIN) and node.op_type in DECODE_OPS


class _CompactBuilder(FunctionBuilder):
    """Short value names and one Constant node per distinct value: the body is stored in
    every file that has a constant decode."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._constants: dict[tuple, str] = {}

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"t{self._count}"

    def const(self, value, dtype=np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = super().const(array, dtype)
        return self._constants[key]


def decode_function(op_type: str, opset: int) -> onnx.FunctionProto:
    """The op's body for folding, under the function-only domain (same inputs, attributes
    and errors as the op, docs/ops.md)."""
    fb = _CompactBuilder(op_type, OPS[op_type].INPUTS, OPS[op_type].ATTRIBUTES)
    shape, bits = fb.attr("shape", "ints"), fb.attr("bits")
    count = fb.node("ReduceProd", shape, keepdims=0)
    codes = _unpacked_codes(fb, bits, count)
    if op_type == "LutGather":
        table = _checked_lut_table(fb, shape, bits, count)
    else:
        table = _pow2_table(fb, shape, bits, count)
    values = fb.node("Gather", fb.node("Reshape", table, fb.const([-1], np.int64)),
                     _flat_index(fb, codes, table), axis=0)
    fb.nodes.append(onnx.helper.make_node("Reshape", [values, shape], ["Y"]))
    function = fb.build(["Y"], opset)
    function.domain = DECODE_DOMAIN
    return function


def _flat_index(fb: FunctionBuilder, codes: str, table: str) -> str:
    """int32 index of each code into the flattened [rows, levels] table: row * levels + code,
    rows splitting the codes evenly (one row: a per-tensor table). A code outside its row
    becomes an index Gather refuses: an error, never a read of the next row."""
    int32 = onnx.TensorProto.INT32
    size = fb.node("Size", table)
    levels = _last_dim(fb, table)
    rows = fb.node("Div", size, levels)
    by_row = fb.node("Reshape", codes, fb.node("Concat", _vector(fb, rows),
                                               fb.const([-1], np.int64), axis=0))
    levels32 = fb.node("Cast", levels, to=int32)
    first = fb.node("Mul", fb.node("Cast", fb.node("Range", fb.const(0, np.int64), rows,
                                                   fb.const(1, np.int64)), to=int32), levels32)
    flat = fb.node("Add", by_row, fb.node("Reshape", first, fb.const([-1, 1], np.int64)))
    refused = fb.node("Cast", fb.node("Sub", fb.node("Neg", size), fb.const(1, np.int64)),
                      to=int32)
    return fb.node("Where", fb.node("Less", by_row, levels32), flat, refused)


def _vector(fb: FunctionBuilder, scalar: str) -> str:
    return fb.node("Reshape", scalar, fb.const([1], np.int64))


def _last_dim(fb: FunctionBuilder, tensor: str) -> str:
    return fb.node("Gather", fb.node("Shape", tensor), fb.const(-1, np.int64), axis=0)


def _unpacked_codes(fb: FunctionBuilder, bits: str, count: str) -> str:
    """int32 codes [count] from the packed stream ``codes``: eight codes of ``bits`` bits
    fill ``bits`` bytes, so the stream is read as a [groups, bits] grid (one zero column
    appended for the byte after the last), and code k of a group is
    ``(byte[j] | byte[j + 1] << 8) >> s & mask`` with j, s constants of (bits, k)."""
    eight = fb.const(8, np.int64)
    position = fb.node("Mul", fb.node("Range", fb.const(0, np.int64), eight, fb.const(1, np.int64)),
                       bits)  # bit offset of code k in its group
    byte = fb.node("Div", position, eight)
    shift = fb.node("Cast", fb.node("Mod", position, eight), to=onnx.TensorProto.UINT32)
    groups = fb.node("Div", fb.node("Add", count, fb.const(7, np.int64)), fb.const(8, np.int64))
    grid_bytes = fb.node("Mul", groups, bits)
    missing = fb.node("Max", fb.node("Sub", grid_bytes, fb.node("Size", "codes")),
                      fb.const(0, np.int64))
    zeros = fb.node("ConstantOfShape", _vector(fb, missing),
                    value=numpy_helper.from_array(np.zeros(1, np.uint8)))
    stream = fb.node("Slice", fb.node("Concat", "codes", zeros, axis=0),
                     fb.const([0], np.int64), _vector(fb, grid_bytes))
    grid = fb.node("Reshape", stream, fb.node("Concat", _vector(fb, groups), _vector(fb, bits),
                                              axis=0))
    grid = fb.node("Cast", fb.node("Pad", grid, fb.const([0, 0, 0, 1], np.int64)),
                   to=onnx.TensorProto.UINT32)
    low = fb.node("Gather", grid, byte, axis=1)
    high = fb.node("Gather", grid, fb.node("Add", byte, fb.const(1, np.int64)), axis=1)
    word = fb.node("BitwiseOr", low, fb.node("BitShift", high, fb.const(8, np.uint32),
                                             direction="LEFT"))
    one = fb.const(1, np.uint32)
    wide_bits = fb.node("Cast", bits, to=onnx.TensorProto.UINT32)
    mask = fb.node("Sub", fb.node("BitShift", one, wide_bits, direction="LEFT"), one)
    shifted = fb.node("BitShift", word, shift, direction="RIGHT")
    flat = fb.node("Reshape", fb.node("BitwiseAnd", shifted, mask), fb.const([-1], np.int64))
    flat = fb.node("Slice", flat, fb.const([0], np.int64), _vector(fb, count))
    return fb.node("Cast", flat, to=onnx.TensorProto.INT32)


def _long_enough(fb: FunctionBuilder, bits: str, count: str) -> str:
    needed = fb.node("Div", fb.node("Add", fb.node("Mul", count, bits), fb.const(7, np.int64)),
                     fb.const(8, np.int64))
    return fb.node("GreaterOrEqual", fb.node("Size", "codes"), needed)


def _checked_lut_table(fb: FunctionBuilder, shape: str, bits: str, count: str) -> str:
    """``table`` as [rows, levels], after the op's checks."""
    width = _last_dim(fb, "table")
    rank = fb.node("Size", fb.node("Shape", "table"))
    first_dim = fb.node("Gather", fb.node("Shape", "table"), fb.const(0, np.int64), axis=0)
    channels = fb.node("Gather", shape, fb.const(0, np.int64), axis=0)
    table = fb.require(
        "table", fb.bits_in(bits, 1, 8), _long_enough(fb, bits, count),
        fb.node("LessOrEqual", width, fb.node("Pow", fb.const(2, np.int64), bits)),
        fb.node("Or", fb.equal(rank, fb.const(1, np.int64)),
                fb.node("And", fb.equal(rank, fb.const(2, np.int64)),
                        fb.equal(first_dim, channels))))
    return fb.node("Reshape", table, fb.node("Concat", fb.const([-1], np.int64),
                                             _vector(fb, width), axis=0))


def _pow2_table(fb: FunctionBuilder, shape: str, bits: str, count: str) -> str:
    """[rows, 2^bits]: the value of every sign + magnitude pattern for each alpha, computed
    as the op computes each element (alpha * mag[e], zero for m = 0, times the sign)."""
    half = fb.node("Pow", fb.const(2, np.int64), fb.node("Sub", bits, fb.const(1, np.int64)))
    pattern = fb.node("Range", fb.const(0, np.int64), fb.node("Mul", half, fb.const(2, np.int64)),
                      fb.const(1, np.int64))
    negative, m = fb.node("Div", pattern, half), fb.node("Mod", pattern, half)
    exponent = fb.node("Sub", fb.node("Sub", half, fb.const(1, np.int64)), m)
    tables = np.stack([magnitude_table(MAX_BITS, 1).numpy(), magnitude_table(MAX_BITS, 2).numpy()])
    mags = fb.node("Gather", fb.const(tables), fb.node("Sub", fb.attr("root"),
                                                       fb.const(1, np.int64)), axis=0)
    mag = fb.node("Gather", mags, fb.node("Min", exponent, fb.const(tables.shape[1] - 1, np.int64)),
                  axis=0)
    channels = fb.node("Gather", shape, fb.const(0, np.int64), axis=0)
    alpha_size = fb.node("Size", "alpha")
    alpha = fb.require(
        "alpha", fb.bits_in(bits, 2, 8), fb.bits_in(fb.attr("root"), 1, 2),
        _long_enough(fb, bits, count),
        fb.node("Or", fb.equal(alpha_size, fb.const(1, np.int64)),
                fb.equal(alpha_size, channels)))
    column = fb.node("Reshape", alpha, fb.const([-1, 1], np.int64))
    table = fb.node("Mul", column, fb.node("Reshape", mag, fb.const([1, -1], np.int64)))
    table = fb.node("Where", fb.node("Equal", m, fb.const(0, np.int64)), fb.const(0.0), table)
    sign = fb.node("Cast", fb.node("Sub", fb.const(1, np.int64),
                                   fb.node("Mul", negative, fb.const(2, np.int64))), to=1)
    return fb.node("Mul", table, sign)


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def fold_constant_decodes(model: onnx.ModelProto) -> list[str]:
    """Move every constant-input weight decode of ``model`` (in place) to the function-only
    domain, add that domain's function bodies and opset import, and drop the bodies of
    both domains that no node uses any more. Returns the names of the moved nodes.

    Idempotent; a model without constant decodes is left as it is.
    """
    constants = {i.name for i in model.graph.initializer}
    moved = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in DECODE_OPS
             and all(i in constants for i in n.input if i)]
    for node in moved:
        node.domain = DECODE_DOMAIN
    needed = {n.op_type for n in model.graph.node if n.domain == DECODE_DOMAIN}
    present = {f.name for f in model.functions if f.domain == DECODE_DOMAIN}
    opset = _default_opset(model)
    model.functions.extend(decode_function(op, opset) for op in sorted(needed - present))
    used = {(n.domain, n.op_type) for n in model.graph.node}
    kept = [f for f in model.functions
            if f.domain not in (DOMAIN, DECODE_DOMAIN) or (f.domain, f.name) in used]
    if len(kept) != len(model.functions):
        del model.functions[:]
        model.functions.extend(kept)
    if needed and all(o.domain != DECODE_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DECODE_DOMAIN, DECODE_DOMAIN_VERSION))
    return [n.name for n in moved]
