"""QConvClamp: a uint8 x int8 convolution requantized per channel and clamped to [lo, hi]
(docs/ops.md#qconvclamp). Its definition is ONNX's QLinearConv (weight zero point 0)
followed by a uint8 Clip; the native kernel does both in one pass."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import AttributeProto, TensorProto, helper

from ._builder import DOMAIN, QCONVERT, FunctionBuilder, int_attr, typed_param

NAME = "QConvClamp"
SINCE_VERSION = 4  # added in version 4 of the op set
INPUTS = ["X", "W", "B", "scale"]
# In the torch op's argument order.
ATTRIBUTES = ["strides", "pads", "lo", "hi", "zero_point", "x_zero_point"]
DEFAULTS = {"zero_point": 0, "x_zero_point": 0}
# The native kernel's bounds (custom_ops/src/qconv_clamp.cc), which every implementation
# enforces so a file means the same everywhere.
MAX_KERNEL, MAX_STRIDE = 11, 4
MAX_REDUCTION, MAX_BIAS = 1 << 15, 1 << 30


def infer_output_shape(ctx, channels_last: bool = False) -> None:
    """Y: uint8 [N, M, OH, OW] (channels_last: [N, OH, OW, M]) from X's and W's shapes; a
    dimension not known stays unnamed."""
    x, w = ctx.get_input_type(0), ctx.get_input_type(1)
    x_dims = list(x.tensor_type.shape.dim) if x.tensor_type.HasField("shape") else []
    w_dims = list(w.tensor_type.shape.dim) if w.tensor_type.HasField("shape") else []
    if len(x_dims) != 4 or len(w_dims) != 4:
        ctx.set_output_type(0, helper.make_tensor_type_proto(TensorProto.UINT8, None))
        return
    strides, pads = list(ctx.get_attribute("strides").ints), list(ctx.get_attribute("pads").ints)
    first_spatial = 1 if channels_last else 2
    spatial = []
    for axis in (0, 1):
        size, kernel = x_dims[first_spatial + axis].dim_value, w_dims[2 + axis].dim_value
        known = size and kernel and len(strides) == 2 and len(pads) == 4 and strides[axis] > 0
        spatial.append((size + pads[axis] + pads[axis + 2] - kernel) // strides[axis] + 1
                       if known else None)
    batch, m = x_dims[0].dim_param or x_dims[0].dim_value or None, w_dims[0].dim_value or None
    dims = [batch, *spatial, m] if channels_last else [batch, m, *spatial]
    ctx.set_output_type(0, helper.make_tensor_type_proto(TensorProto.UINT8, dims))


def schema() -> onnx.defs.OpSchema:
    return onnx.defs.OpSchema(
        NAME, DOMAIN, SINCE_VERSION,
        "Y = clamp(round_half_even(f32(conv(X - x_zero_point, W) + B) * scale[m]), "
        "lo - zero_point, hi - zero_point) + zero_point: QLinearConv (w_zero_point 0) + Clip.",
        inputs=[typed_param("X", "tensor(uint8)", "activation codes, [N, C, H, W]"),
                typed_param("W", "tensor(int8)", "weights, [M, C, kH, kW], an initializer"),
                typed_param("B", "tensor(int32)", "bias in accumulator units, [M]"),
                typed_param("scale", "tensor(float)",
                       "float32(x_scale * w_scale[m]) / y_scale, [M]")],
        outputs=[typed_param("Y", "tensor(uint8)", "output codes, [N, M, OH, OW]")],
        attributes=[int_attr("strides", "[sh, sw], 1..4", kind="ints"),
                    int_attr("pads", "[top, left, bottom, right], each below the kernel",
                             kind="ints"),
                    int_attr("lo", "0..255"), int_attr("hi", "lo..255"),
                    int_attr("zero_point", "output zero point, 0..255", default=0),
                    int_attr("x_zero_point", "input zero point, 0..255", default=0)],
    ).set_type_and_shape_inference_function(infer_output_shape)


def check(w_shape, b: np.ndarray, scale: np.ndarray, *, strides, pads, lo: int, hi: int,
          zero_point: int, x_zero_point: int) -> None:
    """The attribute and constant rules of docs/ops.md#qconvclamp (ValueError otherwise)."""
    def bad(what: str) -> ValueError:
        return ValueError(f"QConvClamp: {what}")

    if len(strides) != 2 or not all(1 <= s <= MAX_STRIDE for s in strides):
        raise bad(f"strides={list(strides)} must be 2 values in 1..{MAX_STRIDE}")
    if not (0 <= lo <= hi <= 255 and 0 <= zero_point <= 255 and 0 <= x_zero_point <= 255):
        raise bad(f"lo={lo} hi={hi} zero_point={zero_point} x_zero_point={x_zero_point} "
                  "must satisfy 0 <= lo <= hi <= 255, zero points in 0..255")
    if len(w_shape) != 4 or not all(1 <= k <= MAX_KERNEL for k in w_shape[2:]):
        raise bad(f"W shape {list(w_shape)} must be [M, C, kH, kW], kernel 1..{MAX_KERNEL}")
    m, c, kh, kw = w_shape
    if len(pads) != 4 or not all(0 <= p < k for p, k in zip(pads, (kh, kw, kh, kw),
                                                              strict=True)):
        raise bad(f"pads={list(pads)} must be 4 values, each 0..kernel - 1")
    if c * kh * kw > MAX_REDUCTION or b.size != m or scale.size != m or m < 1:
        raise bad(f"C * kH * kW must be <= {MAX_REDUCTION}; B and scale need M = {m} elements")
    if not np.isfinite(scale).all():
        raise bad("scale must be finite")
    if np.any(np.abs(np.asarray(b, np.int64)) >= MAX_BIAS):
        raise bad("B must lie in (-2^30, 2^30)")


def output_shape(x_shape, w_shape, strides, pads) -> list[int]:
    """[N, M, OH, OW]; ValueError when X is not [N, C, H, W] or smaller than the kernel."""
    if len(x_shape) != 4 or x_shape[1] != w_shape[1]:
        raise ValueError(f"QConvClamp: X shape {list(x_shape)} must be [N, {w_shape[1]}, H, W]")
    sizes = [(x_shape[2 + a] + pads[a] + pads[a + 2] - w_shape[2 + a]) // strides[a] + 1
             for a in (0, 1)]
    if min(*x_shape[2:], *sizes) < 1:  # an empty image too, whatever the padding
        raise ValueError(f"QConvClamp: X shape {list(x_shape)} is smaller than the kernel "
                         f"{list(w_shape[2:])} after padding")
    return [int(x_shape[0]), int(w_shape[0]), *sizes]


def _sums(x: np.ndarray, w: np.ndarray, strides, pads, x_zero_point: int) -> np.ndarray:
    """int64 sums of (X - x_zero_point) * W, zero outside the image."""
    (sh, sw), (pt, pl, pb, pr) = strides, pads
    kh, kw = w.shape[2:]
    n, m, oh, ow = output_shape(x.shape, w.shape, strides, pads)
    xp = np.pad(x.astype(np.int64) - x_zero_point, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    acc = np.zeros((n, m, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            acc += np.einsum("mc,nchw->nmhw", w[:, :, i, j].astype(np.int64), patch)
    return acc


def requantize(total: np.ndarray, scale: np.ndarray, lo: int, hi: int,
                zero_point: int) -> np.ndarray:
    """float32(total) * scale in float32, clamped, rounded half to even, zero point added."""
    v = total.astype(np.float32) * scale.astype(np.float32).reshape(1, -1, 1, 1)
    v = np.clip(v, np.float32(lo - zero_point), np.float32(hi - zero_point))
    return (np.rint(v).astype(np.int64) + zero_point).astype(np.uint8)


def reference(x, w, b, scale, *, strides, pads, lo: int, hi: int, zero_point: int = 0,
              x_zero_point: int = 0) -> np.ndarray:
    """Numpy transcription of the spec: exact integer sums, float32 requantization."""
    x, w = np.asarray(x, np.uint8), np.asarray(w, np.int8)
    b, scale = np.asarray(b, np.int32).reshape(-1), np.asarray(scale, np.float32).reshape(-1)
    check(w.shape, b, scale, strides=strides, pads=pads, lo=lo, hi=hi,
          zero_point=zero_point, x_zero_point=x_zero_point)
    total = _sums(x, w, strides, pads, x_zero_point) + b.astype(np.int64).reshape(1, -1, 1, 1)
    return requantize(total.astype(np.int32), scale, lo, hi, zero_point)


def function(opset: int) -> onnx.FunctionProto:
    """QLinearConv with x_scale = y_scale = 1 and w_scale = scale (so ORT's multiplier
    float32(1 * scale) / 1 is scale itself), weight zero point 0, then Clip(lo, hi)."""
    fb = FunctionBuilder(NAME, INPUTS, ATTRIBUTES, DEFAULTS)
    lo, hi = fb.attr("lo"), fb.attr("hi")
    zp, x_zp = fb.attr("zero_point"), fb.attr("x_zero_point")
    strides, pads = fb.attr("strides", "ints"), fb.attr("pads", "ints")
    kernel = fb.node("Shape", "W", start=2)
    one = fb.require(fb.const(1.0), fb.in_range(lo, 0, 255), fb.in_range(zp, 0, 255),
                     fb.in_range(x_zp, 0, 255),
                     fb.node("And", fb.node("GreaterOrEqual", hi, lo), fb.in_range(hi, 0, 255)),
                     fb.all_of(fb.in_range(strides, 1, MAX_STRIDE)),
                     fb.all_of(fb.in_range(kernel, 1, MAX_KERNEL)),
                     fb.all_of(fb.in_range(pads, 0, MAX_KERNEL - 1)),
                     fb.all_of(fb.node("Less", pads, fb.node("Concat", kernel, kernel, axis=0))))
    codes = [fb.node("Cast", value, to=TensorProto.UINT8) for value in (x_zp, zp, lo, hi)]
    conv = fb.node_with_refs(
        "QLinearConv", ["X", one, codes[0], "W", "scale", fb.const(0, np.int8), one, codes[1], "B"],
        {"strides": AttributeProto.INTS, "pads": AttributeProto.INTS})
    fb.nodes.append(helper.make_node("Clip", [conv, codes[2], codes[3]], ["Y"]))
    return fb.build(["Y"], opset)


@torch.library.custom_op("qconvert::qconv_clamp", mutates_args=())
def qconv_clamp(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                strides: list[int], pads: list[int], lo: int, hi: int, zero_point: int = 0,
                x_zero_point: int = 0) -> torch.Tensor:
    check(tuple(w.shape), b.numpy(), scale.numpy(), strides=strides, pads=pads, lo=lo, hi=hi,
          zero_point=zero_point, x_zero_point=x_zero_point)
    output_shape(tuple(x.shape), tuple(w.shape), strides, pads)
    # float64 holds every partial sum exactly (|sum| < 2^30), so this is integer arithmetic.
    xp = torch.nn.functional.pad(x.to(torch.float64) - x_zero_point,
                                 (pads[1], pads[3], pads[0], pads[2]))
    acc = torch.nn.functional.conv2d(xp, w.to(torch.float64), stride=tuple(strides))
    total = (acc.to(torch.int64) + b.to(torch.int64).reshape(1, -1, 1, 1)).to(torch.int32)
    return requantize_torch(total, scale, lo, hi, zero_point)


def requantize_torch(total: torch.Tensor, scale: torch.Tensor, lo: int, hi: int,
                     zero_point: int) -> torch.Tensor:
    """``requantize`` in torch: int32 [N, M, ...] sums to uint8 codes."""
    v = total.to(torch.float32) * scale.to(torch.float32).reshape(1, -1, 1, 1)
    v = torch.clamp(v, float(lo - zero_point), float(hi - zero_point))
    return (torch.round(v).to(torch.int64) + zero_point).to(torch.uint8)


@qconv_clamp.register_fake
def _(x, w, b, scale, strides, pads, lo, hi, zero_point=0, x_zero_point=0):
    return x.new_empty(output_shape(tuple(x.shape), tuple(w.shape), strides, pads),
                       dtype=torch.uint8)


def translate(x, w, b, scale, strides: list[int], pads: list[int], lo: int, hi: int,
              zero_point: int = 0, x_zero_point: int = 0):
    # Written out even when 0: not every ONNX evaluator applies a function's defaults.
    return QCONVERT.QConvClamp(x, w, b, scale, strides=strides, pads=pads, lo=lo, hi=hi,
                               zero_point=zero_point, x_zero_point=x_zero_point)


TORCH_OP = torch.ops.qconvert.qconv_clamp.default
