"""QDepthwiseConvClamp: QConvClamp's depthwise sibling on channels-last codes, with the
input's ceiling clamp folded in (docs/ops.md#qdepthwiseconvclamp). Its definition is a
uint8 Clip of X to x_hi, ONNX's depthwise QLinearConv (weight zero point 0) and a uint8
Clip, between transposes to and from NCHW; the native kernel does it in one pass.

Channels-last so that ONNX Runtime, which runs its own QLinearConv NHWC, cancels the
transposes written around this node against its own (docs/integer-mode.md)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import AttributeProto, TensorProto, helper

from . import qconv_clamp
from ._builder import DOMAIN, QCONVERT, FunctionBuilder, int_attr, typed_param

NAME = "QDepthwiseConvClamp"
SINCE_VERSION = 5  # added in version 5 of the op set
INPUTS = ["X", "W", "B", "scale"]
# In the torch op's argument order.
ATTRIBUTES = ["group", "strides", "pads", "lo", "hi", "zero_point", "x_zero_point", "x_hi"]
DEFAULTS = {"zero_point": 0, "x_zero_point": 0, "x_hi": 255}
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def schema() -> onnx.defs.OpSchema:
    return onnx.defs.OpSchema(
        NAME, DOMAIN, SINCE_VERSION,
        "Y = clamp(round_half_even(f32(dwconv(min(X, x_hi) - x_zero_point, W) + B) * "
        "scale[c]), lo - zero_point, hi - zero_point) + zero_point, channels last: "
        "Clip, depthwise QLinearConv (w_zero_point 0) and Clip.",
        inputs=[typed_param("X", "tensor(uint8)", "activation codes, [N, H, W, C]"),
                typed_param("W", "tensor(int8)", "weights, [C, 1, kH, kW], an initializer"),
                typed_param("B", "tensor(int32)", "bias in accumulator units, [C]"),
                typed_param("scale", "tensor(float)",
                       "float32(x_scale * w_scale[c]) / y_scale, [C]")],
        outputs=[typed_param("Y", "tensor(uint8)", "output codes, [N, OH, OW, C]")],
        attributes=[int_attr("group", "C: one group per channel"),
                    int_attr("strides", "[sh, sw], 1..4", kind="ints"),
                    int_attr("pads", "[top, left, bottom, right], each below the kernel",
                             kind="ints"),
                    int_attr("lo", "0..255"), int_attr("hi", "lo..255"),
                    int_attr("zero_point", "output zero point, 0..255", default=0),
                    int_attr("x_zero_point", "input zero point, 0..255", default=0),
                    int_attr("x_hi", "input ceiling, x_zero_point..255", default=255)],
    ).set_type_and_shape_inference_function(
        lambda ctx: qconv_clamp.infer_output_shape(ctx, channels_last=True))


def check(w_shape, b: np.ndarray, scale: np.ndarray, *, group: int, strides, pads, lo: int,
          hi: int, zero_point: int, x_zero_point: int, x_hi: int) -> None:
    """QConvClamp's rules for a [C, 1, kH, kW] weight, plus group = C and the input
    ceiling (ValueError otherwise)."""
    try:
        qconv_clamp.check(w_shape, b, scale, strides=strides, pads=pads, lo=lo, hi=hi,
                          zero_point=zero_point, x_zero_point=x_zero_point)
    except ValueError as exc:
        raise ValueError(str(exc).replace(qconv_clamp.NAME, NAME, 1)) from None
    if w_shape[1] != 1 or group != w_shape[0]:
        raise ValueError(f"{NAME}: W shape {list(w_shape)} must be [C, 1, kH, kW] with "
                         f"C = group = {group}")
    if not x_zero_point <= x_hi <= 255:
        raise ValueError(f"{NAME}: x_hi={x_hi} must lie in x_zero_point..255 "
                         f"(x_zero_point={x_zero_point})")


def output_shape(x_shape, w_shape, strides, pads) -> list[int]:
    """[N, OH, OW, C]; ValueError when X is not [N, H, W, C] or smaller than the kernel."""
    if len(x_shape) != 4 or x_shape[3] != w_shape[0]:
        raise ValueError(f"{NAME}: X shape {list(x_shape)} must be [N, H, W, {w_shape[0]}]")
    n, c, oh, ow = qconv_clamp.output_shape([x_shape[0], 1, *x_shape[1:3]],
                                            [w_shape[0], 1, *w_shape[2:]], strides, pads)
    return [n, oh, ow, c]


def reference(x, w, b, scale, *, group: int, strides, pads, lo: int, hi: int,
              zero_point: int = 0, x_zero_point: int = 0, x_hi: int = 255) -> np.ndarray:
    """Numpy transcription of the spec: exact integer sums, float32 requantization."""
    x, w = np.asarray(x, np.uint8), np.asarray(w, np.int8)
    b, scale = np.asarray(b, np.int32).reshape(-1), np.asarray(scale, np.float32).reshape(-1)
    check(w.shape, b, scale, group=group, strides=strides, pads=pads, lo=lo, hi=hi,
          zero_point=zero_point, x_zero_point=x_zero_point, x_hi=x_hi)
    output_shape(x.shape, w.shape, strides, pads)
    (sh, sw), (pt, pl, pb, pr) = strides, pads
    xc = np.minimum(x, np.uint8(x_hi)).transpose(TO_NCHW).astype(np.int64) - x_zero_point
    xp = np.pad(xc, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n, oh, ow, c = output_shape(x.shape, w.shape, strides, pads)
    acc = np.zeros((n, c, oh, ow), np.int64)
    for i in range(w.shape[2]):
        for j in range(w.shape[3]):
            patch = xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            acc += w[:, 0, i, j].astype(np.int64).reshape(1, -1, 1, 1) * patch
    total = (acc + b.astype(np.int64).reshape(1, -1, 1, 1)).astype(np.int32)
    return qconv_clamp.requantize(total, scale, lo, hi, zero_point).transpose(TO_NHWC)


def function(opset: int) -> onnx.FunctionProto:
    """Transpose to NCHW, Clip to x_hi, QLinearConv with group C (x_scale = y_scale = 1,
    w_scale = scale, as QConvClamp's body), Clip(lo, hi), Transpose back."""
    fb = FunctionBuilder(NAME, INPUTS, ATTRIBUTES, DEFAULTS)
    lo, hi = fb.attr("lo"), fb.attr("hi")
    zp, x_zp, x_hi = fb.attr("zero_point"), fb.attr("x_zero_point"), fb.attr("x_hi")
    strides, pads = fb.attr("strides", "ints"), fb.attr("pads", "ints")
    kernel = fb.node("Shape", "W", start=2)
    one = fb.require(fb.const(1.0), fb.in_range(lo, 0, 255), fb.in_range(zp, 0, 255),
                     fb.in_range(x_zp, 0, 255), fb.in_range(x_hi, 0, 255),
                     fb.node("GreaterOrEqual", x_hi, x_zp),
                     fb.node("And", fb.node("GreaterOrEqual", hi, lo), fb.in_range(hi, 0, 255)),
                     fb.all_of(fb.in_range(strides, 1, qconv_clamp.MAX_STRIDE)),
                     fb.all_of(fb.in_range(kernel, 1, qconv_clamp.MAX_KERNEL)),
                     fb.all_of(fb.in_range(pads, 0, qconv_clamp.MAX_KERNEL - 1)),
                     fb.all_of(fb.node("Less", pads, fb.node("Concat", kernel, kernel, axis=0))))
    codes = [fb.node("Cast", value, to=TensorProto.UINT8) for value in (x_zp, zp, lo, hi, x_hi)]
    x = fb.node("Clip", fb.node("Transpose", "X", perm=TO_NCHW), "", codes[4])
    conv = fb.node_with_refs(
        "QLinearConv", [x, one, codes[0], "W", "scale", fb.const(0, np.int8), one, codes[1], "B"],
        {"group": AttributeProto.INT, "strides": AttributeProto.INTS,
         "pads": AttributeProto.INTS})
    clamped = fb.node("Clip", conv, codes[2], codes[3])
    fb.nodes.append(helper.make_node("Transpose", [clamped], ["Y"], perm=TO_NHWC))
    return fb.build(["Y"], opset)


@torch.library.custom_op("qconvert::qdepthwise_conv_clamp", mutates_args=())
def qdepthwise_conv_clamp(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                          scale: torch.Tensor, group: int, strides: list[int], pads: list[int],
                          lo: int, hi: int, zero_point: int = 0, x_zero_point: int = 0,
                          x_hi: int = 255) -> torch.Tensor:
    check(tuple(w.shape), b.numpy(), scale.numpy(), group=group, strides=strides, pads=pads,
          lo=lo, hi=hi, zero_point=zero_point, x_zero_point=x_zero_point, x_hi=x_hi)
    output_shape(tuple(x.shape), tuple(w.shape), strides, pads)
    xc = torch.clamp(x.permute(TO_NCHW).to(torch.float64), max=float(x_hi)) - x_zero_point
    xp = torch.nn.functional.pad(xc, (pads[1], pads[3], pads[0], pads[2]))
    # float64 holds every partial sum exactly (|sum| < 2^30), so this is integer arithmetic.
    acc = torch.nn.functional.conv2d(xp, w.to(torch.float64), stride=tuple(strides),
                                     groups=group)
    total = (acc.to(torch.int64) + b.to(torch.int64).reshape(1, -1, 1, 1)).to(torch.int32)
    y = qconv_clamp.requantize_torch(total, scale, lo, hi, zero_point)
    return y.permute(TO_NHWC).contiguous()


@qdepthwise_conv_clamp.register_fake
def _(x, w, b, scale, group, strides, pads, lo, hi, zero_point=0, x_zero_point=0, x_hi=255):
    return x.new_empty(output_shape(tuple(x.shape), tuple(w.shape), strides, pads),
                       dtype=torch.uint8)


def translate(x, w, b, scale, group: int, strides: list[int], pads: list[int], lo: int,
              hi: int, zero_point: int = 0, x_zero_point: int = 0, x_hi: int = 255):
    # Written out even when default: not every ONNX evaluator applies a function's defaults.
    return QCONVERT.QDepthwiseConvClamp(x, w, b, scale, group=group, strides=strides,
                                        pads=pads, lo=lo, hi=hi, zero_point=zero_point,
                                        x_zero_point=x_zero_point, x_hi=x_hi)


TORCH_OP = torch.ops.qconvert.qdepthwise_conv_clamp.default
