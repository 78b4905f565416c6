"""Layer inputs as uint8 codes on the b'-bit grid (docs/integer-mode.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from ...errors import QConvertError
from ...ops import DOMAIN
from ...ops.adaptive_step import code_range
from .edit import ZERO_POINT_SIGNED, GraphEdit, node_attrs

WIDE_ACT_STEPS = ("sqrt", "range")


@dataclass
class ActInfo:
    kind: str  # lcq | lsq | asq
    bits: int
    signed: bool
    scale: float | None  # None: per sample (ASQ)
    zero_point: int
    exact: bool  # codes equal the exact-mode quantizer's (times a constant)
    int_range: tuple[int, int]
    lut_entries: int = 0
    lut_bytes: int = 0  # as stored (float32)


@dataclass
class IntAct:
    """A layer input as uint8 codes: value name, zero-point initializer, and its scale."""

    value: str
    zero_point: str
    scale: float | None  # per tensor
    scale_value: str | None  # per sample: [N] float value
    info: ActInfo


def _uniform_target(bits: int, signed: bool, outer: int,
                    wide: str) -> tuple[float, tuple[int, int], bool]:
    """(grid step / quantizer step, integer range, exact?) of a b-bit uniform quantizer on
    the b'-bit grid. For b > b': ``range`` keeps the clip range, ratio (2^b-1)/(2^b'-1);
    ``sqrt`` takes the step LSQ's init rule (s0 = 2 mean|x| / sqrt(Qp)) gives at b' bits
    relative to b bits, ratio sqrt(Qp_b / Qp_b'), and clips the tail."""
    if bits <= outer:
        return 1.0, code_range(bits, signed), True
    ratio = ((1 << bits) - 1) / ((1 << outer) - 1)
    return (math.sqrt(ratio) if wide == "sqrt" else ratio), code_range(outer, signed), False


def _clip_u8(g: GraphEdit, before, scope: str, value: str, int_range, zero_point: int) -> str:
    lo, hi = int_range[0] + zero_point, int_range[1] + zero_point
    if (lo, hi) == (0, 255):
        return value
    return g.node(before, scope, "Clip", [value,
                  g.const(f"{scope}/int/clip_lo", np.array(lo, np.uint8)),
                  g.const(f"{scope}/int/clip_hi", np.array(hi, np.uint8))])


def int_act(g: GraphEdit, act: str, before: onnx.NodeProto, scope: str, outer: int,
             wide: str) -> IntAct:
    node = g.producers.get(act)
    if node is None:
        raise QConvertError(f"layer {scope}: its input is not a quantized activation")
    if node.domain == DOMAIN and node.op_type == "CompandQuant":
        return _lcq_act(g, node, before, scope, outer)
    if node.domain == DOMAIN and node.op_type == "AdaptiveStep":
        return _asq_act(g, node, before, scope, outer, wide)
    if node.domain == DOMAIN and node.op_type == "UniformQuant":
        return _lsq_act(g, node, before, scope, outer, wide)
    raise QConvertError(f"layer {scope}: unsupported activation quantizer "
                        f"{node.domain + '::' if node.domain else ''}{node.op_type}")


def _lsq_act(g: GraphEdit, node: onnx.NodeProto, before, scope: str, outer: int,
             wide: str) -> IntAct:
    attrs = node_attrs(node)
    bits, signed = int(attrs["bits"]), bool(attrs["signed"])
    step = float(g.array(node.input[1]).reshape(-1)[0])
    ratio, int_range, exact = _uniform_target(bits, signed, outer, wide)
    scale = float(np.float32(step * ratio))
    zp = ZERO_POINT_SIGNED if signed else 0
    zp_name = g.const(f"{scope}/int/act_zero_point", np.array(zp, np.uint8))
    q = g.node(before, scope, "QuantizeLinear",
               [node.input[0], g.const(f"{scope}/int/act_scale", np.array(scale, np.float32)),
                zp_name])
    q = _clip_u8(g, before, scope, q, int_range, zp)
    return IntAct(q, zp_name, scale, None, ActInfo("lsq", bits, signed, scale, zp, exact,
                                                   int_range))


def _lcq_act(g: GraphEdit, node: onnx.NodeProto, before, scope: str, outer: int) -> IntAct:
    attrs = node_attrs(node)
    bits, signed = int(attrs["bits"]), bool(attrs["signed"])
    levels = g.array(node.input[4]).astype(np.float32)
    qmax = (1 << (outer - 1)) - 1 if signed else (1 << outer) - 1
    top = float(levels[-1])
    if not top > 0:
        raise QConvertError(f"layer {scope}: LCQ levels end at {top}; no grid fits")
    delta = np.float32(top / qmax)
    ints = np.round(levels / delta)
    new_levels = (ints * delta).astype(np.float32)
    exact = bool(np.array_equal(new_levels, levels))
    node.input[4] = g.const(f"{scope}/int/levels", new_levels)  # the old one may be shared
    zp = ZERO_POINT_SIGNED if signed else 0
    zp_name = g.const(f"{scope}/int/act_zero_point", np.array(zp, np.uint8))
    q = g.node(before, scope, "QuantizeLinear",
               [node.output[0], g.const(f"{scope}/int/act_scale", np.array(delta)), zp_name])
    info = ActInfo("lcq", bits, signed, float(delta), zp, exact, (-qmax if signed else 0, qmax),
                   lut_entries=levels.size, lut_bytes=new_levels.nbytes)
    return IntAct(q, zp_name, float(delta), None, info)


def _asq_act(g: GraphEdit, node: onnx.NodeProto, before, scope: str, outer: int,
             wide: str) -> IntAct:
    attrs = node_attrs(node)
    bits, signed = int(attrs["bits"]), bool(attrs["signed"])
    x, step, beta = node.input[:3]
    ratio, int_range, exact = _uniform_target(bits, signed, outer, wide)
    s_a = g.node(before, scope, "Mul", [step, beta])  # [N], as the op computes it
    if ratio != 1.0:
        s_a = g.node(before, scope, "Mul", [s_a, g.const(f"{scope}/int/act_ratio",
                                                          np.array(ratio, np.float32))])
    zp = ZERO_POINT_SIGNED if signed else 0
    zp_scalar = g.const(f"{scope}/int/act_zero_point", np.array(zp, np.uint8))
    inputs = [x, s_a]
    if signed:  # a per-axis zero point has the scale's shape [N]
        inputs.append(g.node(before, scope, "Expand", [
            g.const(f"{scope}/int/act_zero_point_1d", np.array([zp], np.uint8)),
            g.node(before, scope, "Shape", [s_a])]))
    q = g.node(before, scope, "QuantizeLinear", inputs, axis=0)
    q = _clip_u8(g, before, scope, q, int_range, zp)
    return IntAct(q, zp_scalar, None, s_a,
                   ActInfo("asq", bits, signed, None, zp, exact, int_range))
