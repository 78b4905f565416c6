"""Layer inputs as uint8 codes, zero point 0 for unsigned quantizers: QuantizeLinear, a Clip
on uint8 for the quantizer's ceiling, DequantizeLinear (docs/integer-mode.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from ...errors import QConvertError
from ...ops import DOMAIN
from ...ops.adaptive_step import code_range
from .edit import GraphEdit, node_attrs

WIDE_ACT_STEPS = ("sqrt", "range")


@dataclass
class ActInfo:
    kind: str  # lcq | lsq | asq
    bits: int
    signed: bool
    scale: float | None  # None: per sample (ASQ)
    zero_point: int
    exact: bool  # codes equal the exact-mode quantizer's
    int_range: tuple[int, int]  # codes before the zero point is added
    lut_entries: int = 0
    lut_bytes: int = 0  # as stored (float32)


@dataclass
class IntAct:
    """A layer input: the DequantizeLinear output the layer reads, and how it was made."""

    value: str
    scale: float  # the DequantizeLinear scale (1.0 for ASQ: its step is per sample)
    zero_point: int
    scale_value: str | None  # ASQ: the per-sample step, [N]
    quantizer: onnx.NodeProto  # the exact-mode quantizer node it replaces
    info: ActInfo

    @property
    def max_code(self) -> int:
        """The largest uint8 value the layer's convolution reads."""
        return self.info.int_range[1] + self.zero_point


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


def _codes(g: GraphEdit, anchor, scope: str, x: str, scale: str, int_range, zero_point: int,
           axis: int | None = None, zp_value: str | None = None) -> str:
    """QuantizeLinear to uint8 and the Clip that holds the codes in ``int_range``."""
    if axis is None:
        zp = g.const(f"{scope}/int/act_zp", np.array(zero_point, np.uint8))
        q = g.node(anchor, "QuantizeLinear", [x, scale, zp])
    else:  # per-axis: no zero point means uint8 zero; else one per sample (``zp_value``)
        q = g.node(anchor, "QuantizeLinear", [x, scale] + ([zp_value] if zp_value else []),
                   axis=axis)
    lo, hi = int_range[0] + zero_point, int_range[1] + zero_point
    if (lo, hi) == (0, 255):
        return q
    return g.node(anchor, "Clip", [q, g.const(f"{scope}/int/clip_lo", np.array(lo, np.uint8)),
                                   g.const(f"{scope}/int/clip_hi", np.array(hi, np.uint8))])


def int_act(g: GraphEdit, act: str, scope: str, outer: int, wide: str) -> IntAct:
    node = g.producers.get(act)
    if node is None:
        raise QConvertError(f"layer {scope}: its input is not a quantized activation")
    if node.domain == DOMAIN and node.op_type == "CompandQuant":
        return _lcq_act(g, node, scope, outer)
    if node.domain == DOMAIN and node.op_type == "AdaptiveStep":
        return _asq_act(g, node, scope, outer, wide)
    if node.domain == DOMAIN and node.op_type == "UniformQuant":
        return _lsq_act(g, node, scope, outer, wide)
    raise QConvertError(f"layer {scope}: unsupported activation quantizer "
                        f"{node.domain + '::' if node.domain else ''}{node.op_type}")


def _ceiling_of_relu6(g: GraphEdit, node: onnx.NodeProto, scale: float) -> int | None:
    """A Clip(0, c) feeding only this quantizer becomes a Relu, and c a code ceiling:
    round(min(v, c) / s) = min(round(v / s), round(c / s)) since rounding is monotone."""
    clip = g.producers.get(node.input[0])
    if (clip is None or clip.op_type != "Clip" or len(clip.input) < 3
            or len(g.consumers.get(clip.output[0], [])) != 1
            or not all(g.is_const(i) for i in clip.input[1:3])):
        return None
    lo, hi = (float(g.array(i).reshape(-1)[0]) for i in clip.input[1:3])
    if lo != 0.0:
        return None
    clip.op_type = "Relu"
    del clip.input[1:]
    return code_ceiling(hi, scale)


def code_ceiling(bound: float, scale: float) -> int:
    """The code of a float upper bound ``bound`` on the grid ``scale``, as QuantizeLinear
    computes it (float32, half to even)."""
    return int(np.round(np.float32(bound) / np.float32(scale)))


def _lsq_act(g: GraphEdit, node: onnx.NodeProto, scope: str, outer: int, wide: str) -> IntAct:
    attrs = node_attrs(node)
    bits, signed = int(attrs["bits"]), bool(attrs["signed"])
    step = g.array(node.input[1]).reshape(-1)
    if step.size != 1:
        raise QConvertError(f"layer {scope}: per-channel activation steps are not supported "
                            "by integer mode; keep the exact mode")
    ratio, int_range, exact = _uniform_target(bits, signed, outer, wide)
    scale = float(np.float32(float(step[0]) * ratio))
    if not signed:
        ceiling = _ceiling_of_relu6(g, node, scale)
        if ceiling is not None and ceiling < int_range[1]:
            int_range = (int_range[0], max(ceiling, 0))
    zp = -int_range[0] if signed else 0
    s = g.const(f"{scope}/int/act_scale", np.array(scale, np.float32))
    codes = _codes(g, node, scope, node.input[0], s, int_range, zp)
    g.node(node, "DequantizeLinear", [codes, s, g.const(f"{scope}/int/act_dq_zp",
                                                         np.array(zp, np.uint8))],
           output=node.output[0])
    g.drop(node)
    return IntAct(node.output[0], scale, zp, None, node,
                  ActInfo("lsq", bits, signed, scale, zp, exact, int_range))


def _lcq_act(g: GraphEdit, node: onnx.NodeProto, scope: str, outer: int) -> IntAct:
    """LCQ keeps its companding op; its levels move onto the b'-bit grid Δa = top / qmax',
    so QuantizeLinear(levels', Δa) is exact."""
    attrs = node_attrs(node)
    bits, signed = int(attrs["bits"]), bool(attrs["signed"])
    if attrs.get("mirror") or attrs.get("clip"):  # imported nulsq LCQ: not a level table
        raise QConvertError(f"layer {scope}: integer mode does not support CompandQuant's "
                            "mirror / clip (imported checkpoints); keep the exact mode")
    levels = g.array(node.input[4]).astype(np.float32)
    qmax = (1 << (outer - 1)) - 1 if signed else (1 << outer) - 1
    top = float(levels[-1])
    if not top > 0:
        raise QConvertError(f"layer {scope}: LCQ levels end at {top}; no grid fits")
    delta = np.float32(top / qmax)
    new_levels = (np.round(levels / delta) * delta).astype(np.float32)
    exact = bool(np.array_equal(new_levels, levels))
    node.input[4] = g.const(f"{scope}/int/levels", new_levels)  # the old one may be shared
    out = node.output[0]
    node.output[0] = f"{out}/levels"
    zp = qmax if signed else 0
    s = g.const(f"{scope}/int/act_scale", np.array(delta))
    z = g.const(f"{scope}/int/act_zp", np.array(zp, np.uint8))
    q = g.node(node, "QuantizeLinear", [node.output[0], s, z], after=True)
    g.node(node, "DequantizeLinear", [q, s, z], output=out, after=True)
    info = ActInfo("lcq", bits, signed, float(delta), zp, exact, (-qmax if signed else 0, qmax),
                   lut_entries=levels.size, lut_bytes=new_levels.nbytes)
    return IntAct(out, float(delta), zp, None, node, info)


def _asq_act(g: GraphEdit, node: onnx.NodeProto, scope: str, outer: int, wide: str) -> IntAct:
    """ASQ: codes with each sample's own step (QuantizeLinear along the batch axis); the
    layer's convolution reads them with scale 1 and each sample's output is multiplied by
    its step afterwards."""
    attrs = node_attrs(node)
    bits, signed = int(attrs["bits"]), bool(attrs["signed"])
    x, step, beta = node.input[:3]
    ratio, int_range, exact = _uniform_target(bits, signed, outer, wide)
    s_a = g.node(node, "Mul", [step, beta])  # as the op computes it
    if ratio != 1.0:
        s_a = g.node(node, "Mul", [s_a, g.const(f"{scope}/int/act_ratio",
                                                np.array(ratio, np.float32))])
    s_a = g.node(node, "Reshape", [s_a, g.const(f"{scope}/int/flat", np.array([-1], np.int64))])
    zp = -int_range[0] if signed else 0
    zp_value = None
    if zp:  # a per-axis zero point has the scale's shape [N]
        zp_value = g.node(node, "Expand", [
            g.const(f"{scope}/int/act_zp_1d", np.array([zp], np.uint8)),
            g.node(node, "Shape", [s_a])])
    codes = _codes(g, node, scope, x, s_a, int_range, zp, axis=0, zp_value=zp_value)
    g.node(node, "DequantizeLinear", [
        codes, g.const(f"{scope}/int/unit", np.array(1.0, np.float32)),
        g.const(f"{scope}/int/act_dq_zp", np.array(zp, np.uint8))], output=node.output[0])
    g.drop(node)
    return IntAct(node.output[0], 1.0, zp, s_a, node,
                  ActInfo("asq", bits, signed, None, zp, exact, int_range))

