"""Integer / LUT deployment mode: a graph rewrite of the exact-mode ONNX model.

Every quantized layer's multiply-accumulates run on integers of an *outer* bit width
b' (2..8): the activation becomes integer codes on a uniform b'-bit grid, the weight
becomes b'-bit integers, ``ConvInteger`` / ``MatMulInteger`` accumulate in int32, and one
float multiply per layer (``Δa * Δw_c``, per output channel; per sample too for ASQ)
brings the result back to float. BatchNorm, ReLU, pooling and the ASQ adapters stay
float. This is the LCQ paper's "LUT inference": each LCQ quantizer keeps a table of 2^b
entries, now holding b'-bit integers.

Per layer (see ``to_integer``):

- activation, LCQ (``CompandQuant``): the ``levels`` table is re-quantized onto the grid
  ``Δa = levels[-1] / qmax'`` (``qmax' = 2^(b'-1) - 1`` signed, ``2^b' - 1`` unsigned),
  ``levels' = round(levels / Δa) * Δa``; ``QuantizeLinear(act_q, Δa)`` is then exact.
- activation, LSQ / ASQ (already ``clamp(round(x / s), lo, hi) * s``): the integer is
  computed straight from the quantizer's input, ``QuantizeLinear(x, s)`` (ASQ: per-sample
  ``s_a = step * beta`` as a per-axis scale on the batch axis), which rounds half to even
  after a true division exactly as PyTorch does, so with b <= b' the codes are bit-exact.
  With b > b' (8-bit first / last layers at b' < 8) the input is quantized directly onto
  a coarser grid (one rounding, not a rounding of the b-bit code), clipped to the b'-bit
  range. Its step is ``s * sqrt(Qp_b / Qp_b')``, the ratio LSQ's own init rule
  (``2 mean|x| / sqrt(Qp)``) gives between the two widths, not ``s * Qp_b / Qp_b'`` (which
  keeps the clip range but spends the few levels on the tail): on the digits
  checkpoints top-1 agreement at b' = 6 is 98-99.7 % against 91-94 %
  (``wide_act_step="range"`` keeps the latter).
- weight: the decode (``LutGather`` / ``Pow2Shift``) is replaced by a ``LutGather`` over the
  SAME packed codes whose table holds integers (as floats), then ``Cast``: the file stays
  packed; ORT folds the decode at session creation (function runtime) and
  ``qconvert.runtime`` folds it natively. The grid follows the table: one step per tensor
  for a 1-D table (LCQ, per-tensor LSQ / POT / POST), one per output channel for a
  per-channel table. The step is ``Δw = m / K`` with ``m`` the largest magnitude the layer
  uses and ``K <= 2^(b'-1)`` chosen to minimise the squared re-quantization error of the
  layer's weights: ``K = 2^(b'-1) - 1`` is the plain max-scaling, and the search finds the
  exact grids where they exist (``K = k_max`` for uniform LSQ weights; ``K = 2^(b'-2)``
  for POT, where every power of two down to ``m * 2^-(b'-2)`` is an exact integer and
  smaller magnitudes round half-to-even, e.g. ``0.5 * Δw`` to 0; 4-bit POT at b' = 8 is
  exact, at b' = 6 its two smallest magnitudes 2^-5, 2^-6 become 0; POST's odd powers of
  sqrt(2) round to the nearest integer either way).
- weight, POST (``Pow2Shift`` with root 2): the POST paper's shift + table semantics, kept
  exact. Every magnitude is ``2^-j`` (even exponent) or ``sqrt(1/2) * 2^-j`` (odd), so the
  weight splits into two integer tensors on the grid ``Δw = alpha * 2^-(b'-2)``, one holding
  the even-exponent weights and one the odd ones divided by ``sqrt(1/2)``: both are exact
  powers of two (down to ``2^-(b'-2)``; smaller ones round half-to-even). Two integer
  convolutions over the same activation codes accumulate apart and the odd sum is scaled by
  ``sqrt(1/2)`` once per output: ``y = Δa Δw (acc_even + sqrt(1/2) acc_odd)``. Twice the
  integer MACs, but no rounding of the odd powers (a single b'-bit grid rounds
  ``sqrt(1/2)^k`` to the nearest integer: 2-6 % error on 4-bit POST at b' = 8).

Integer types: ``uint8`` for both operands, with zero point 128 for signed values. That
is the one combination ONNX Runtime's kernels compute exactly on AVX2 machines for both
ops (``MatMulInteger`` u8 x s8 saturates its int16 pair sums there; ``ConvInteger``
s8 x u8 is wrong), see tests/test_integer.py. Wider grids (b' > 8) need int16 operands,
which neither op accepts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import QConvertError
from ..ops import DOMAIN
from ..ops.adaptive_step import code_range, width_of_range
from ..ops.packing import unpack_codes_np
from ..quant.pot import SQRT_HALF, magnitude_levels
from .graph import uniform_chain
from .weight_decode import fold_constant_decodes, is_weight_decode

MIN_OUTER_BITS, MAX_OUTER_BITS = 2, 8
ZERO_POINT_SIGNED = 128
MODE_KEY, OUTER_BITS_KEY, DETAIL_KEY = "qconvert_mode", "qconvert_outer_bits", "qconvert_integer"
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
class WeightInfo:
    kind: str  # LutGather | Pow2Shift (the exact-mode decode)
    bits: int
    grid: str  # tensor | channel
    scale: list[float]  # one step per tensor, or per output channel
    max_abs_error: float
    rel_rms_error: float
    lut_entries: int
    lut_bytes: int
    branches: int = 1  # integer convolutions per layer: 2 for POST (even / odd exponents)


@dataclass
class _IntWeight:
    """A layer weight as uint8 tensors; each branch's int32 accumulator is scaled by its
    factor and the branches summed before the per-layer rescale."""

    branches: list[tuple[str, float]]  # (uint8 weight value, factor)
    scale: np.ndarray  # Δw per output channel
    info: WeightInfo


@dataclass
class LayerInfo:
    op: str  # ConvInteger | MatMulInteger
    act: ActInfo
    weight: WeightInfo
    lut_bytes: int = 0
    lut_bits_ideal: int = 0  # table entries x b' bits (the paper's LUT memory)


@dataclass
class _IntAct:
    """A layer input as uint8 codes: value name, zero-point initializer, and its scale."""

    value: str
    zero_point: str
    scale: float | None  # per tensor
    scale_value: str | None  # per sample: [N] float value
    info: ActInfo


@dataclass
class _Graph:
    """The model being rewritten, with lookups and a fresh-name source."""

    model: onnx.ModelProto
    inits: dict[str, onnx.TensorProto] = field(default_factory=dict)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    new_nodes: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)  # before node id
    count: int = 0

    def __post_init__(self) -> None:
        self.inits = {i.name: i for i in self.model.graph.initializer}
        self.producers = {o: n for n in self.model.graph.node for o in n.output}

    def const(self, name: str, value: np.ndarray) -> str:
        if name in self.inits:
            raise QConvertError(f"integer rewrite: name clash on {name}")
        tensor = numpy_helper.from_array(np.asarray(value), name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def node(self, before: onnx.NodeProto, scope: str, op: str, inputs: list[str],
             output: str | None = None, **attrs) -> str:
        self.count += 1  # short names, as the exporter's n<index>: they add up in the file
        out = output or f"i{self.count}"
        node = helper.make_node(op, inputs, [out], name=f"i{self.count}", **attrs)
        self.new_nodes.setdefault(id(before), []).append(node)
        return out


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


# ---------------------------------------------------------------- activations


def _lsq_parts(g: _Graph, mul: onnx.NodeProto):
    """Div(x, s) -> Round -> Clip(lo, hi) -> Mul(., s): (x, s, lo, hi), or None."""
    chain = uniform_chain(mul, g.producers)
    if chain is None:
        return None
    div, _, clip, _ = chain
    if mul.input[1] not in g.inits or not all(i in g.inits for i in clip.input[1:3]):
        return None
    step = g.array(mul.input[1]).reshape(-1)
    lo, hi = (float(g.array(i)) for i in clip.input[1:3])
    if step.size != 1 or lo != round(lo) or hi != round(hi):
        return None
    return div.input[0], float(step[0]), int(lo), int(hi)


def _bits_of_range(lo: int, hi: int) -> tuple[int, bool]:
    width = width_of_range(lo, hi)
    if width is None:
        raise QConvertError(f"integer rewrite: clip range [{lo}, {hi}] is not a b-bit range")
    return width


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


def _clip_u8(g: _Graph, before, scope: str, value: str, int_range, zero_point: int) -> str:
    lo, hi = int_range[0] + zero_point, int_range[1] + zero_point
    if (lo, hi) == (0, 255):
        return value
    return g.node(before, scope, "Clip", [value,
                  g.const(f"{scope}/int/clip_lo", np.array(lo, np.uint8)),
                  g.const(f"{scope}/int/clip_hi", np.array(hi, np.uint8))])


def _int_act(g: _Graph, act: str, before: onnx.NodeProto, scope: str, outer: int,
             wide: str) -> _IntAct:
    node = g.producers.get(act)
    if node is None:
        raise QConvertError(f"layer {scope}: its input is not a quantized activation")
    if node.domain == DOMAIN and node.op_type == "CompandQuant":
        return _lcq_act(g, node, before, scope, outer)
    if node.domain == DOMAIN and node.op_type == "AdaptiveStep":
        return _asq_act(g, node, before, scope, outer, wide)
    if node.op_type == "Mul" and (parts := _lsq_parts(g, node)) is not None:
        x, step, lo, hi = parts
        bits, signed = _bits_of_range(lo, hi)
        ratio, int_range, exact = _uniform_target(bits, signed, outer, wide)
        scale = float(np.float32(step * ratio))
        zp = ZERO_POINT_SIGNED if signed else 0
        zp_name = g.const(f"{scope}/int/act_zero_point", np.array(zp, np.uint8))
        q = g.node(before, scope, "QuantizeLinear",
                   [x, g.const(f"{scope}/int/act_scale", np.array(scale, np.float32)), zp_name])
        q = _clip_u8(g, before, scope, q, int_range, zp)
        return _IntAct(q, zp_name, scale, None,
                       ActInfo("lsq", bits, signed, scale, zp, exact, int_range))
    raise QConvertError(f"layer {scope}: unsupported activation quantizer "
                        f"{node.domain + '::' if node.domain else ''}{node.op_type}")


def _lcq_act(g: _Graph, node: onnx.NodeProto, before, scope: str, outer: int) -> _IntAct:
    attrs = _attrs(node)
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
    return _IntAct(q, zp_name, float(delta), None, info)


def _asq_act(g: _Graph, node: onnx.NodeProto, before, scope: str, outer: int,
             wide: str) -> _IntAct:
    attrs = _attrs(node)
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
    return _IntAct(q, zp_scalar, None, s_a,
                   ActInfo("asq", bits, signed, None, zp, exact, int_range))


# ---------------------------------------------------------------- weights


def _decode_table(g: _Graph, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray, int, list]:
    """The decode as a table: (table [L] or [C, L], codes [n], bits, shape)."""
    attrs = _attrs(node)
    bits, shape = int(attrs["bits"]), list(attrs["shape"])
    codes = unpack_codes_np(g.array(node.input[0]), bits, math.prod(shape))
    if node.op_type == "LutGather":
        return g.array(node.input[1]).astype(np.float32), codes, bits, shape
    # Pow2Shift: code = sign << (b - 1) | m; a table over all 2^b patterns
    alpha = g.array(node.input[1]).astype(np.float32).reshape(-1)
    mags = magnitude_levels(bits, int(attrs["root"])).numpy()  # by m = 0..M
    signs = np.where(np.arange(1 << bits) >> (bits - 1), -1, 1).astype(np.float32)
    pattern = signs * mags[np.arange(1 << bits) & ((1 << (bits - 1)) - 1)]
    table = (alpha[:, None] * pattern[None, :]).astype(np.float32)
    return (table[0] if alpha.size == 1 else table), codes, bits, shape


def _best_steps(values: np.ndarray, outer: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``values`` [G, n]: the step m / K with the least squared re-quantization
    error (integers clipped to the signed b'-bit range; K = 1 .. 2^(b'-1)). A search that also
    clips the largest weights (K up to 4 * 2^(b'-1)) was tried: it did not help."""
    lo, hi = code_range(outer, True)
    m = np.abs(values).max(axis=1)
    m = np.where(m > 0, m, np.float32(1))
    best = np.full(len(values), np.inf)
    steps = (m / hi).astype(np.float32)
    v64 = values.astype(np.float64)
    for k in range(-lo, 0, -1):  # finest first: ties keep the finer grid
        step = (m / np.float32(k)).astype(np.float32)
        ints = np.clip(np.round(values / step[:, None]), lo, hi)
        err = ((ints * step[:, None].astype(np.float64) - v64) ** 2).sum(axis=1)
        better = err < best
        best, steps = np.where(better, err, best), np.where(better, step, steps)
    return steps, best


def _uint8_weight(g: _Graph, node: onnx.NodeProto, before, scope: str, table: np.ndarray,
                  name: str, transpose: bool) -> str:
    """The packed codes of ``node`` decoded through an integer ``table`` (zero point added)."""
    attrs = _attrs(node)
    decoded = g.node(before, scope, "LutGather", [
        node.input[0], g.const(f"{scope}/int/{name}", (table + ZERO_POINT_SIGNED).astype(
            np.float32))], bits=int(attrs["bits"]), shape=list(attrs["shape"]), domain=DOMAIN)
    w = g.node(before, scope, "Cast", [decoded], to=TensorProto.UINT8)
    return g.node(before, scope, "Transpose", [w], perm=[1, 0]) if transpose else w


def _weight_info(node: onnx.NodeProto, bits: int, steps: np.ndarray, used: np.ndarray,
                 rebuilt: np.ndarray, tables: list[np.ndarray]) -> WeightInfo:
    error = rebuilt - used
    return WeightInfo(
        node.op_type, bits, "channel" if steps.size > 1 else "tensor",
        [float(v) for v in steps.astype(np.float32)],  # one per grid row: 1 for a tensor
        float(np.abs(error).max()), float(np.sqrt((error**2).sum() / max((used**2).sum(), 1e-30))),
        sum(t.size for t in tables), sum(t.size * 4 for t in tables), len(tables))


def _by_row(table: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The table as grid rows ([1, L] or [C, L]), each code's row, the decoded weight by row."""
    rows = table if table.ndim == 2 else table[None, :]
    channel = np.arange(codes.size) // (codes.size // rows.shape[0])
    return rows, channel, rows[channel, codes].reshape(rows.shape[0], -1)


def _int_weight(g: _Graph, node: onnx.NodeProto, before, scope: str, outer: int,
                transpose: bool) -> _IntWeight:
    if node.op_type == "Pow2Shift" and int(_attrs(node)["root"]) == 2:
        return _post_weight(g, node, before, scope, outer, transpose)
    table, codes, bits, shape = _decode_table(g, node)
    rows, channel, used = _by_row(table, codes)
    steps, _ = _best_steps(used, outer)
    lo, hi = code_range(outer, True)
    ints = np.clip(np.round(rows / steps[:, None]), lo, hi)
    rebuilt = ints[channel, codes].reshape(used.shape) * steps[:, None].astype(np.float64)
    ints = ints if table.ndim == 2 else ints[0]
    w = _uint8_weight(g, node, before, scope, ints, "weight_table", transpose)
    return _IntWeight([(w, 1.0)], np.broadcast_to(steps, (shape[0],)).astype(np.float32),
                      _weight_info(node, bits, steps, used, rebuilt, [ints]))


def _post_weight(g: _Graph, node: onnx.NodeProto, before, scope: str, outer: int,
                 transpose: bool) -> _IntWeight:
    """POST weights as an even-exponent and an odd-exponent integer tensor (module doc)."""
    table, codes, bits, shape = _decode_table(g, node)
    alpha = g.array(node.input[1]).astype(np.float32).reshape(-1)
    pattern = np.arange(1 << bits)
    magnitude_code = pattern & ((1 << (bits - 1)) - 1)  # m = 0 is zero, m = M is 1
    exponent = ((1 << (bits - 1)) - 1) - magnitude_code  # |w| / alpha = sqrt(1/2)^exponent
    sign = np.where(pattern >> (bits - 1), -1.0, 1.0)
    shift = outer - 2
    power = sign * np.ldexp(1.0, shift - exponent // 2)  # 2^-j on the grid 2^-shift
    lo, hi = code_range(outer, True)
    even, odd = (np.clip(np.round(np.where((magnitude_code > 0) & (exponent % 2 == parity),
                                           power, 0.0)), lo, hi) for parity in (0, 1))
    steps = np.ldexp(alpha, -shift).astype(np.float32)  # exact: a power-of-two scaling
    _, _, used = _by_row(table, codes)
    rebuilt = (even[codes] + float(SQRT_HALF) * odd[codes]).reshape(used.shape) \
        * steps[:, None].astype(np.float64)
    branches = [(_uint8_weight(g, node, before, scope, even, "weight_table", transpose), 1.0),
                (_uint8_weight(g, node, before, scope, odd, "weight_table_odd", transpose),
                 float(SQRT_HALF))]
    return _IntWeight(branches, np.broadcast_to(steps, (shape[0],)).astype(np.float32),
                      _weight_info(node, bits, steps, used, rebuilt, [even, odd]))


# ---------------------------------------------------------------- layers


def _layer_name(node: onnx.NodeProto, decode: onnx.NodeProto) -> str:
    codes = decode.input[0]
    return codes[: -len(".weight.codes")] if codes.endswith(".weight.codes") else node.name


def _rewrite_layer(g: _Graph, node: onnx.NodeProto, decode: onnx.NodeProto, outer: int,
                   acts: dict[str, _IntAct], wide: str) -> LayerInfo:
    scope = _layer_name(node, decode)
    is_conv = node.op_type == "Conv"
    attrs = _attrs(node)
    if not is_conv and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                        or attrs.get("beta", 1.0) != 1.0):
        raise QConvertError(f"layer {scope}: Gemm with transA/alpha/beta is not supported")
    if node.input[0] not in acts:
        acts[node.input[0]] = _int_act(g, node.input[0], node, scope, outer, wide)
    act = acts[node.input[0]]
    weight = _int_weight(g, decode, node, scope, outer,
                         transpose=not is_conv and attrs.get("transB", 0) == 1)
    w_zp = g.const(f"{scope}/int/weight_zero_point", np.array(ZERO_POINT_SIGNED, np.uint8))
    conv_attrs = {k: v for k, v in attrs.items()
                  if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")}
    accs = []
    for w, factor in weight.branches:
        acc = g.node(node, scope, "ConvInteger" if is_conv else "MatMulInteger",
                     [act.value, w, act.zero_point, w_zp], **(conv_attrs if is_conv else {}))
        acc = g.node(node, scope, "Cast", [acc], to=TensorProto.FLOAT)
        if factor != 1.0:
            acc = g.node(node, scope, "Mul", [acc, g.const(
                f"{scope}/int/branch_factor", np.array(factor, np.float32))])
        accs.append(acc)
    acc = accs[0] if len(accs) == 1 else g.node(node, scope, "Add", accs)
    view = [1, -1, 1, 1] if is_conv else [1, -1]
    if act.scale is not None:
        scale = g.const(f"{scope}/int/out_scale",
                        (np.float32(act.scale) * weight.scale).astype(np.float32).reshape(view))
    else:  # ASQ: per sample x per channel, [N, C, 1, 1]
        sample_view = np.array([-1, 1, 1, 1] if is_conv else [-1, 1], np.int64)
        per_sample = g.node(node, scope, "Reshape", [
            act.scale_value, g.const(f"{scope}/int/sample_view", sample_view)])
        scale = g.node(node, scope, "Mul", [per_sample, g.const(
            f"{scope}/int/weight_scale", weight.scale.reshape(view))])
    has_bias = len(node.input) > 2 and node.input[2]
    out = g.node(node, scope, "Mul", [acc, scale], output=None if has_bias else node.output[0])
    if has_bias:
        bias = g.array(node.input[2]).astype(np.float32).reshape(view)
        g.node(node, scope, "Add", [out, g.const(f"{scope}/int/bias", bias)],
               output=node.output[0])
    info = weight.info
    return LayerInfo("ConvInteger" if is_conv else "MatMulInteger", act.info, info,
                     info.lut_bytes + act.info.lut_bytes,
                     (info.lut_entries + act.info.lut_entries) * outer)


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads, then unread initializers and functions."""
    graph = model.graph
    wanted = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in wanted for o in node.output):
            kept.append(node)
            wanted.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    read = {i for n in graph.node for i in n.input}
    inits = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    used = {n.op_type for n in graph.node if n.domain == DOMAIN}
    functions = [f for f in model.functions if f.domain != DOMAIN or f.name in used]
    del model.functions[:]
    model.functions.extend(functions)


def to_integer(model: onnx.ModelProto, outer_bits: int, *,
               wide_act_step: str = "sqrt") -> onnx.ModelProto:
    """The integer-mode twin of an exact-mode qconvert model (a new ModelProto).

    Every Conv / Gemm fed by a weight decode becomes ConvInteger / MatMulInteger on b'-bit
    codes plus one float rescale. Metadata gains ``qconvert_mode=integer``,
    ``qconvert_outer_bits`` and ``qconvert_integer`` (per layer: grids, scales, errors,
    LUT bytes). The result passes the full ONNX checker.

    ``wide_act_step`` picks the grid of an LSQ / ASQ activation wider than b' (8-bit first
    and last layers at b' < 8): ``sqrt`` (default; step ratio sqrt(Qp_b / Qp_b'), LSQ's
    init rule) or ``range`` (ratio Qp_b / Qp_b', keeps the clip range). On the digits
    checkpoints ``sqrt`` kept 98-99.7 % top-1 agreement at b' = 6 where ``range`` kept
    91-94 %.
    """
    if wide_act_step not in WIDE_ACT_STEPS:
        raise QConvertError(f"wide_act_step {wide_act_step!r}: choose from {WIDE_ACT_STEPS}")
    if not MIN_OUTER_BITS <= int(outer_bits) <= MAX_OUTER_BITS:
        raise QConvertError(f"outer bits {outer_bits} outside {MIN_OUTER_BITS}..{MAX_OUTER_BITS}"
                            " (ConvInteger / MatMulInteger take 8-bit operands at most)")
    outer = int(outer_bits)
    meta = _metadata(model)
    if meta.get(MODE_KEY, "exact") != "exact":
        raise QConvertError(f"the model is already in {meta[MODE_KEY]} mode; "
                            "rewrite the exact-mode export")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out)
    acts: dict[str, _IntAct] = {}
    layers: dict[str, LayerInfo] = {}
    replaced: set[int] = set()
    for node in list(out.graph.node):
        if node.op_type not in ("Conv", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        decode = g.producers.get(node.input[1])
        if decode is None or not is_weight_decode(decode) \
                or not all(i in g.inits for i in decode.input):
            continue  # a float layer (e.g. an ASQ adapter)
        layers[_layer_name(node, decode)] = _rewrite_layer(g, node, decode, outer, acts,
                                                          wide_act_step)
        replaced.add(id(node))
    if not layers:
        raise QConvertError("no quantized Conv / Gemm layer found; is this a qconvert export?")
    nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        nodes.extend(g.new_nodes.get(id(node), []))
        if id(node) not in replaced:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    _prune(out)
    fold_constant_decodes(out)  # the integer weights, too, fold at load
    _update_metadata(out, outer, layers)
    try:
        onnx.checker.check_model(out, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise QConvertError(f"integer model fails the ONNX checker: {exc}") from exc
    return out


def _update_metadata(model: onnx.ModelProto, outer: int, layers: dict[str, LayerInfo]) -> None:
    meta = _metadata(model)
    records = json.loads(meta.get("qconvert_layers", "{}"))
    present = {o for n in model.graph.node for o in n.output}
    for record in records.values():
        # The exact-mode act / weight nodes are gone or changed: the teacher-forced op checks
        # (bit-exact against PyTorch) do not apply to integer mode.
        for key in [k for k in record if k.endswith("_nodes")]:
            record[key] = []
        # Values still in the graph keep their per-layer SQNR (LSQ / ASQ act_q are gone).
        if "values" in record:
            record["values"] = {k: v for k, v in record["values"].items() if v in present}
    meta["qconvert_layers"] = json.dumps(records, separators=(",", ":"))
    meta[MODE_KEY] = "integer"
    meta[OUTER_BITS_KEY] = str(outer)
    meta[DETAIL_KEY] = json.dumps({name: asdict(info) for name, info in layers.items()},
                                  separators=(",", ":"))
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)


def integer_details(model: onnx.ModelProto) -> dict[str, dict]:
    """Per-layer integer-mode record (empty for an exact-mode model)."""
    return json.loads(_metadata(model).get(DETAIL_KEY, "{}"))


def is_integer(model: onnx.ModelProto) -> bool:
    return _metadata(model).get(MODE_KEY) == "integer"


def lut_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all level tables of an integer model, as stored (float32 entries)."""
    return sum(int(v["lut_bytes"]) for v in integer_details(model).values())


def choose_outer_bits(exact_model: onnx.ModelProto, ckpt, data, min_agreement: float,
                      candidates: Iterable[int] = range(4, 9),
                      make_session: Callable | None = None,
                      batch_size: int = 64) -> tuple[int, dict[int, float]]:
    """The smallest b' whose integer model's top-1 agreement with the PyTorch QAT model on
    ``data`` reaches ``min_agreement``, and the agreements measured (ascending b', stopping
    at the first that passes). Raises QConvertError when none does."""
    from ..runtime import session
    from ..validate import validate

    if make_session is None:
        def make_session(m):
            return session(m, announce=None)
    agreements: dict[int, float] = {}
    for bits in sorted(set(int(b) for b in candidates)):
        report = validate(ckpt, to_integer(exact_model, bits), data, make_session,
                          batch_size=batch_size, per_layer=False)
        agreements[bits] = report.top1_agreement
        if report.top1_agreement >= min_agreement:
            return bits, agreements
    best = max(agreements, key=lambda b: (agreements[b], -b)) if agreements else None
    detail = ", ".join(f"{b} bits {a:.2%}" for b, a in agreements.items())
    raise QConvertError(
        f"no outer bit width reaches top-1 agreement {min_agreement:.2%} ({detail}); "
        f"lower --min-agreement, pick --outer-bits {best}, or keep the exact mode")
