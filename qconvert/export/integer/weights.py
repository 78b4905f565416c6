"""Layer weights as int8 tensors with one step per output channel (docs/integer-mode.md).

The weight is read through the manifest's WeightRecord (packed codes and the decode's
table or alpha), never through the decode node, which may already be folded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...manifest import WeightRecord
from ...ops.packing import unpack_codes_np
from ...quant.pot import magnitude_levels
from .edit import GraphEdit

# vpmaddubsw (ONNX Runtime's u8 x s8 kernel on AVX2 without VNNI) adds two u8 x s8
# products in int16 with saturation: a layer whose activation codes reach A needs
# 2 * A * max|w| <= 32767 to stay exact.
INT16_PAIR_LIMIT = 32767
EXACT_REL_RMS = 1e-6  # float32 rounding of the step and the table entries, nothing more


@dataclass
class WeightInfo:
    kind: str  # LutGather | Pow2Shift (the exact-mode decode)
    bits: int
    grid: str  # tensor | channel: how many steps the re-grid chose
    max_int: int  # the largest |integer| allowed (b' bits, or less against saturation)
    exact: bool  # every decoded weight is an integer multiple of its step (to float32 rounding)
    max_abs_error: float
    rel_rms_error: float
    table_entries: int


@dataclass
class IntWeight:
    ints: np.ndarray  # int8 values, the layer's weight shape
    steps: np.ndarray  # float32 step per output channel (axis 0)
    info: WeightInfo


def decode_table(g: GraphEdit, weight: WeightRecord) -> tuple[np.ndarray, np.ndarray]:
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


def best_steps(values: np.ndarray, max_int: int) -> np.ndarray:
    """Per row of ``values`` [G, n]: the step m / K (m the row's largest magnitude,
    K = 1 .. max_int) with the least squared error of round(v / step) * step. Exact grids
    (LSQ codes, powers of two) have zero error and win; ties keep the finer grid."""
    m = np.abs(values).max(axis=1)
    m = np.where(m > 0, m, np.float32(1))
    best = np.full(len(values), np.inf)
    steps = (m / max_int).astype(np.float32)
    v64 = values.astype(np.float64)
    for k in range(max_int, 0, -1):
        step = (m / np.float32(k)).astype(np.float32)
        ints = np.clip(np.round(values / step[:, None]), -max_int, max_int)
        err = ((ints * step[:, None].astype(np.float64) - v64) ** 2).sum(axis=1)
        better = err < best
        best, steps = np.where(better, err, best), np.where(better, step, steps)
    return steps


def int_weight(g: GraphEdit, weight: WeightRecord, outer: int, max_act_code: int) -> IntWeight:
    """The weight as int8 on the best grid of each table row (one per tensor or channel)."""
    max_int = min((1 << (outer - 1)) - 1, INT16_PAIR_LIMIT // (2 * max(max_act_code, 1)))
    table, codes = decode_table(g, weight)
    rows = table if table.ndim == 2 else table[None, :]
    channels = weight.shape[0]
    per_row = codes.size // rows.shape[0]
    row_of = np.arange(codes.size) // per_row
    used = rows[row_of, codes].reshape(rows.shape[0], -1)
    steps = best_steps(used, max_int)
    int_rows = np.clip(np.round(rows / steps[:, None]), -max_int, max_int)
    ints = int_rows[row_of, codes]
    rebuilt = ints.reshape(used.shape) * steps[:, None].astype(np.float64)
    error = rebuilt - used
    rel_rms = float(np.sqrt((error**2).sum() / max((used.astype(np.float64)**2).sum(), 1e-30)))
    info = WeightInfo(
        weight.decode, weight.bits, "channel" if steps.size > 1 else "tensor", int(max_int),
        rel_rms < EXACT_REL_RMS, float(np.abs(error).max()), rel_rms, int(table.size))
    step_per_channel = np.repeat(steps, channels // steps.size) if steps.size > 1 else \
        np.full(channels, steps[0], np.float32)
    return IntWeight(ints.reshape(weight.shape).astype(np.int8),
                     step_per_channel.astype(np.float32), info)
