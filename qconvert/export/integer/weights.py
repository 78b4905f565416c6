"""Layer weights as uint8 tensors on the b'-bit grid, and the exact POST split
(docs/integer-mode.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ...manifest import WeightRecord
from ...ops import DOMAIN
from ...ops.adaptive_step import code_range
from ...ops.packing import unpack_codes_np
from ...quant.pot import SQRT_HALF, magnitude_levels
from .edit import ZERO_POINT_SIGNED, GraphEdit


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
class IntWeight:
    """A layer weight as uint8 tensors; each branch's int32 accumulator is scaled by its
    factor and the branches summed before the per-layer rescale."""

    branches: list[tuple[str, float]]  # (uint8 weight value, factor)
    scale: np.ndarray  # Δw per output channel
    info: WeightInfo


def _decode_table(g: GraphEdit, weight: WeightRecord) -> tuple[np.ndarray, np.ndarray]:
    """The decode as a table: (table [L] or [C, L], codes [n])."""
    bits = weight.bits
    codes = unpack_codes_np(g.array(weight.codes), bits, math.prod(weight.shape))
    if weight.decode == "LutGather":
        return g.array(weight.params).astype(np.float32), codes
    # Pow2Shift: code = sign << (b - 1) | m; a table over all 2^b patterns
    alpha = g.array(weight.params).astype(np.float32).reshape(-1)
    mags = magnitude_levels(bits, weight.root).numpy()  # by m = 0..M
    signs = np.where(np.arange(1 << bits) >> (bits - 1), -1, 1).astype(np.float32)
    pattern = signs * mags[np.arange(1 << bits) & ((1 << (bits - 1)) - 1)]
    table = (alpha[:, None] * pattern[None, :]).astype(np.float32)
    return (table[0] if alpha.size == 1 else table), codes


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


def _uint8_weight(g: GraphEdit, weight: WeightRecord, before, scope: str, table: np.ndarray,
                  name: str, transpose: bool) -> str:
    """The packed codes decoded through an integer ``table`` (zero point added)."""
    decoded = g.node(before, scope, "LutGather", [
        weight.codes, g.const(f"{scope}/int/{name}", (table + ZERO_POINT_SIGNED).astype(
            np.float32))], bits=weight.bits, shape=weight.shape, domain=DOMAIN)
    w = g.node(before, scope, "Cast", [decoded], to=TensorProto.UINT8)
    return g.node(before, scope, "Transpose", [w], perm=[1, 0]) if transpose else w


def _weight_info(weight: WeightRecord, steps: np.ndarray, used: np.ndarray,
                 rebuilt: np.ndarray, tables: list[np.ndarray]) -> WeightInfo:
    error = rebuilt - used
    return WeightInfo(
        weight.decode, weight.bits, "channel" if steps.size > 1 else "tensor",
        [float(v) for v in steps.astype(np.float32)],  # one per grid row: 1 for a tensor
        float(np.abs(error).max()), float(np.sqrt((error**2).sum() / max((used**2).sum(), 1e-30))),
        sum(t.size for t in tables), sum(t.size * 4 for t in tables), len(tables))


def _by_row(table: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The table as grid rows ([1, L] or [C, L]), each code's row, the decoded weight by row."""
    rows = table if table.ndim == 2 else table[None, :]
    channel = np.arange(codes.size) // (codes.size // rows.shape[0])
    return rows, channel, rows[channel, codes].reshape(rows.shape[0], -1)


def int_weight(g: GraphEdit, weight: WeightRecord, before, scope: str, outer: int,
                transpose: bool) -> IntWeight:
    if weight.decode == "Pow2Shift" and weight.root == 2:
        return _post_weight(g, weight, before, scope, outer, transpose)
    table, codes = _decode_table(g, weight)
    rows, channel, used = _by_row(table, codes)
    steps, _ = _best_steps(used, outer)
    lo, hi = code_range(outer, True)
    ints = np.clip(np.round(rows / steps[:, None]), lo, hi)
    rebuilt = ints[channel, codes].reshape(used.shape) * steps[:, None].astype(np.float64)
    ints = ints if table.ndim == 2 else ints[0]
    w = _uint8_weight(g, weight, before, scope, ints, "weight_table", transpose)
    return IntWeight([(w, 1.0)], np.broadcast_to(steps, (weight.shape[0],)).astype(np.float32),
                      _weight_info(weight, steps, used, rebuilt, [ints]))


def _post_weight(g: GraphEdit, weight: WeightRecord, before, scope: str, outer: int,
                 transpose: bool) -> IntWeight:
    """POST weights as an even-exponent and an odd-exponent integer tensor (module doc)."""
    table, codes = _decode_table(g, weight)
    bits = weight.bits
    alpha = g.array(weight.params).astype(np.float32).reshape(-1)
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
    branches = [(_uint8_weight(g, weight, before, scope, even, "weight_table", transpose), 1.0),
                (_uint8_weight(g, weight, before, scope, odd, "weight_table_odd", transpose),
                 float(SQRT_HALF))]
    return IntWeight(branches, np.broadcast_to(steps, (weight.shape[0],)).astype(np.float32),
                      _weight_info(weight, steps, used, rebuilt, [even, odd]))
