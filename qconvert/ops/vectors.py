"""Shared test vectors: every implementation of every op is checked against these.

Cases cover every bit width, signed and unsigned, per-tensor and per-channel
parameters, exact .5 ties after scaling, clip boundaries, NaN, +-Inf, signed
zeros, denormals and empty tensors. ``expected`` comes from the op's numpy
reference; the references themselves are checked against the QAT quantizers
and closed forms in tests/test_ops.py.

    python -m qconvert.ops.vectors --out DIR   # one .npz per case, for non-Python tests
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..quant.lcq import compressor, expand
from . import OPS
from .packing import pack_codes

SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40, 1e-45, 3e38, -3e38],
                   np.float32)


@dataclass
class VectorCase:
    name: str
    inputs: list[np.ndarray]
    attrs: dict
    expected: np.ndarray


def _case(op: str, name: str, inputs: list[np.ndarray], attrs: dict) -> VectorCase:
    return VectorCase(name, inputs, attrs, OPS[op].reference(*inputs, **attrs))


def _lcq_tables(theta: np.ndarray, alpha: float, top: int) -> tuple[np.ndarray, ...]:
    slopes, offsets = compressor(torch.from_numpy(theta))
    j = torch.arange(top + 1, dtype=torch.float32)
    levels = torch.tensor([alpha], dtype=torch.float32) * expand(j / top, slopes, offsets)
    return slopes.numpy(), offsets.numpy(), levels.numpy()


def _compand_variants(signed: int, bits: int, intervals: int) -> list[tuple[int, int]]:
    """(mirror, clip) pairs: the plain op everywhere; the version-3 attributes on a spread of
    widths (mirror only unsigned)."""
    variants = [(0, 0)]
    if intervals == 16 and bits in (2, 3, 4, 8):
        variants += [(0, 1)] + ([] if signed else [(1, 0), (1, 1)])
    return variants


def compand_quant_cases() -> list[VectorCase]:
    rng = np.random.default_rng(1)
    cases = []
    for bits in range(2, 9):
        for signed in (0, 1):
            top = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
            for intervals, spread, alpha in ((16, 0.7, 1.7), (5, 1.5, 0.3), (16, 0.0, 2.0)):
                theta = (rng.standard_normal(intervals) * spread).astype(np.float32)
                slopes, offsets, levels = _lcq_tables(theta, alpha, top)
                a = np.float32(alpha)
                # Exact ties when theta = 0 (f is the identity).
                ties = (np.arange(top) + np.float32(0.5)) / np.float32(top) * a
                bounds = np.array([a, -a, np.nextafter(a, 0), np.nextafter(a, 2 * a), a / 16],
                                  np.float32)
                x = np.concatenate([rng.standard_normal(120).astype(np.float32) * a,
                                    ties, -ties, bounds, SPECIAL]).astype(np.float32)
                inputs = [x.reshape(1, -1), np.array([a], np.float32), slopes, offsets, levels]
                for mirror, clip in _compand_variants(signed, bits, intervals):
                    extra = {"mirror": mirror, "clip": clip}  # explicit: see translate()
                    tag = f"_m{mirror}c{clip}" if mirror or clip else ""
                    cases.append(_case("CompandQuant",
                                       f"b{bits}_s{signed}_k{intervals}_a{alpha}{tag}", inputs,
                                       {"bits": bits, "signed": signed, **extra}))
    slopes, offsets, levels = _lcq_tables(np.zeros(16, np.float32), 1.0, 15)
    cases.append(_case("CompandQuant", "empty", [np.zeros((0, 3), np.float32),
                        np.array([1.0], np.float32), slopes, offsets, levels],
                       {"bits": 4, "signed": 0}))
    return cases


def adaptive_step_cases() -> list[VectorCase]:
    rng = np.random.default_rng(2)
    cases = []
    for bits in range(2, 9):
        for signed in (0, 1):
            step = np.array([0.25], np.float32)
            beta = np.array([1.0, 2.0, 0.5, 1.37, 1e-8], np.float32)
            s_a = (step * beta)[:, None]
            lo, hi = OPS["AdaptiveStep"].code_range(bits, signed)
            ties = (np.arange(lo, hi, dtype=np.float32) + np.float32(0.5))[None, :] * s_a
            bounds = np.concatenate([lo * s_a, hi * s_a, (hi + 1) * s_a, (lo - 1) * s_a], axis=1)
            noise = rng.standard_normal((5, 40)).astype(np.float32) * s_a * (hi - lo) / 2
            special = np.tile(SPECIAL, (5, 1))
            x = np.concatenate([ties, bounds, noise, special], axis=1).astype(np.float32)
            cases.append(_case("AdaptiveStep", f"b{bits}_s{signed}", [x, step, beta],
                               {"bits": bits, "signed": signed}))
    cases.append(_case("AdaptiveStep", "rank4", [
        rng.standard_normal((3, 4, 5, 6)).astype(np.float32), np.array([0.1], np.float32),
        np.array([0.9, 1.1, 3.0], np.float32)], {"bits": 4, "signed": 1}))
    cases.append(_case("AdaptiveStep", "empty", [np.zeros((0, 4), np.float32),
                       np.array([0.1], np.float32), np.zeros(0, np.float32)],
                       {"bits": 4, "signed": 0}))
    return cases


def uniform_quant_cases() -> list[VectorCase]:
    rng = np.random.default_rng(5)
    cases = []
    for bits in range(2, 9):
        for signed in (0, 1):
            for step in (np.float32(0.25), np.float32(0.0137), np.float32(3.1e-5)):
                lo, hi = OPS["UniformQuant"].code_range(bits, signed)
                ties = (np.arange(lo, hi, dtype=np.float32) + np.float32(0.5)) * step
                bounds = np.array([lo, hi, hi + 1, lo - 1, hi + 0.5, lo - 0.5],
                                  np.float32) * step
                noise = rng.standard_normal(60).astype(np.float32) * step * (hi - lo) / 2
                x = np.concatenate([ties, bounds, noise, SPECIAL]).astype(np.float32)
                cases.append(_case("UniformQuant", f"b{bits}_s{signed}_step{step:g}",
                                   [x.reshape(1, -1), np.array([step], np.float32)],
                                   {"bits": bits, "signed": signed}))
    cases.append(_case("UniformQuant", "rank4", [
        rng.standard_normal((2, 3, 4, 5)).astype(np.float32), np.array([0.1], np.float32)],
        {"bits": 4, "signed": 0}))
    cases.append(_case("UniformQuant", "empty", [np.zeros((0, 4), np.float32),
                       np.array([0.1], np.float32)], {"bits": 4, "signed": 1}))
    return cases


def lut_gather_cases() -> list[VectorCase]:
    rng = np.random.default_rng(3)
    cases = []
    for bits in range(1, 9):
        for shape in ([6, 3, 3, 3], [7], [10, 16]):
            count = int(np.prod(shape))
            for per_channel in (False, True):
                width = (1 << bits) - (1 if bits > 1 else 0)  # also a table shorter than 2^b
                rows = (shape[0], width) if per_channel else (width,)
                table = rng.standard_normal(rows).astype(np.float32)
                codes = rng.integers(0, width, count)
                codes[: min(count, 2)] = [0, width - 1][: min(count, 2)]
                packed = np.concatenate([pack_codes(codes, bits), np.array([0xFF], np.uint8)])
                tag = "pc" if per_channel else "pt"
                cases.append(_case("LutGather", f"b{bits}_{tag}_{'x'.join(map(str, shape))}",
                                   [packed, table], {"bits": bits, "shape": shape}))
    return cases


def pow2_shift_cases() -> list[VectorCase]:
    rng = np.random.default_rng(4)
    cases = []
    for bits in range(2, 9):
        every_code = np.arange(1 << bits)
        for root in (1, 2):
            for channels, alpha in ((1, [0.7]), (4, [0.5, 1.0, 3.3, 1e-38])):
                shape = [channels, len(every_code)]
                codes = np.tile(rng.permutation(every_code), channels)
                cases.append(_case("Pow2Shift", f"b{bits}_r{root}_c{channels}",
                                   [pack_codes(codes, bits), np.array(alpha, np.float32)],
                                   {"bits": bits, "root": root, "shape": shape}))
    return cases


def sample_max_quant_cases() -> list[VectorCase]:
    rng = np.random.default_rng(6)
    cases = []
    for bits in range(2, 9):
        for signed in (0, 1):
            q = np.float32((1 << (bits - 1)) - 1 if signed else (1 << bits) - 1)
            m = np.float32(1.7)
            ties = (np.arange(-q, q, dtype=np.float32) + np.float32(0.5)) / q * m
            below = np.array([-2 * m, -3.3 * m, m, -m, np.nextafter(m, 0)], np.float32)
            noise = rng.standard_normal(60).astype(np.float32) * m / 2
            specials = np.array([0.0, -0.0, 1e-40, -1e-40, 1e-45], np.float32)
            plain = np.concatenate([ties, below, np.clip(noise, None, m), specials])
            rows = [plain,
                    np.concatenate([plain[:-3], [np.nan, 1.0, 2.0]]),  # NaN: whole sample NaN
                    np.concatenate([plain[:-3], [np.inf, 1.0, 2.0]]),  # max +Inf
                    -np.abs(plain) - np.float32(0.25),  # negative max
                    np.concatenate([-np.abs(plain), [np.float32(0)] * 3])[3:],  # max 0
                    np.concatenate([plain[:-3] * np.float32(1e-30), [-np.inf, 1.0, 2.0]])]
            x = np.stack([r.astype(np.float32) for r in rows])
            cases.append(_case("SampleMaxQuant", f"b{bits}_s{signed}", [x],
                               {"bits": bits, "signed": signed}))
    cases.append(_case("SampleMaxQuant", "rank4", [
        rng.standard_normal((3, 4, 5, 6)).astype(np.float32)], {"bits": 8, "signed": 1}))
    cases.append(_case("SampleMaxQuant", "rank1", [
        rng.standard_normal(5).astype(np.float32)], {"bits": 8, "signed": 0}))
    cases.append(_case("SampleMaxQuant", "empty", [np.zeros((0, 4), np.float32)],
                       {"bits": 8, "signed": 0}))
    return cases


def _conv_case(name: str, x, w, b, scale, *, strides=(1, 1), pads=(0, 0, 0, 0), lo=0, hi=255,
               zero_point=0, x_zero_point=0) -> VectorCase:
    attrs = {"strides": list(strides), "pads": list(pads), "lo": lo, "hi": hi,
             "zero_point": zero_point, "x_zero_point": x_zero_point}  # explicit: translate()
    inputs = [np.asarray(x, np.uint8), np.asarray(w, np.int8), np.asarray(b, np.int32),
              np.asarray(scale, np.float32)]
    return _case("QConvClamp", name, inputs, attrs)


def _random_conv(rng, name: str, c: int, m: int, size: int, k: int, stride: int, *,
                 x_max: int, w_max: int, n: int = 1, pads=None, **attrs) -> VectorCase:
    """Codes and weights at random, bias and scale that spread the outputs over about 1.5
    times [lo, hi], so the rounding and both clamp edges are exercised."""
    x = rng.integers(0, x_max + 1, (n, c, size, size))
    w = rng.integers(-w_max, w_max + 1, (m, c, k, k))
    spread = np.sqrt(c * k * k) * x_max * w_max / 2 + 1
    scale = rng.uniform(0.6, 1.4, m) * (attrs.get("hi", 255) - attrs.get("lo", 0) + 1) / spread
    b = rng.integers(-c * k * k * 4, c * k * k * 4 + 1, m)
    pads = [k // 2] * 4 if pads is None else pads
    return _conv_case(name, x, w, b, scale, strides=(stride, stride), pads=pads, **attrs)


# Name prefix of the QConvClamp cases whose int16 pair sums 2 * 255 * 127 exceed 32767.
SATURATES_INT16 = "pair_sums_beyond_int16"


def qconv_clamp_cases() -> list[VectorCase]:
    rng = np.random.default_rng(7)
    codes = np.arange(16).reshape(1, 1, 1, 16)
    one = np.ones((1, 1, 1, 1))
    cases = [
        # acc = x - x_zero_point, scale 0.5: every odd acc is a tie (-3.5 .. 3.5 included).
        _conv_case("ties_half_even", codes, one, [0], [0.5], x_zero_point=8, zero_point=8),
        _conv_case("ties_bias", codes, one, [-7], [0.25], zero_point=100),
        # 2 * x + 10 against [12, 20]: below, on and above each edge.
        _conv_case("clamp_edges", codes, 2 * one, [0], [1.0], lo=12, hi=20, zero_point=10),
        _conv_case("clamp_full_range", codes * 17, 127 * one, [-100], [0.125], lo=0, hi=255),
        _conv_case("clamp_point", codes, one, [0], [1.0], lo=7, hi=7),
        # Ties only in float32: 3 * 16.833334f is 50.500002 exactly but 50.5f; 2^25 + 1 is
        # 2^25 in float32, and 2^25 * 100.5 / 2^25 a tie. Both round to even, 50 and 100.
        _conv_case("float32_ties", [[[[3]]]], [[[[1]]], [[[0]]]], [0, (1 << 25) + 1],
                   np.array([1099344555, 0], np.uint32).view(np.float32) + [0, 100.5 * 2**-25]),
        # acc + B beyond 2^24: float32(acc + B) rounds before the multiply.
        _conv_case("acc_beyond_2p24", rng.integers(240, 256, (1, 128, 4, 4)),
                   np.full((3, 128, 3, 3), 64), [1, 0, (1 << 29) - 3],
                   [1.0733e-5, 1.1e-5, 4.1e-7], pads=[1, 1, 1, 1]),
        # 255 * 127 twice exceeds int16: the exact sum, which stock ORT's U8S8 QLinearConv
        # (int16 pair sums, saturating) does not give (docs/ops.md#qconvclamp).
        _random_conv(rng, f"{SATURATES_INT16}_c3_m5", 3, 5, 6, 2, 1, x_max=255, w_max=127,
                     pads=[1, 0, 0, 1], lo=10, hi=250),
    ]
    for shape in [(1, 16, 8, 3, 1, 255, 64, {"x_zero_point": 128}),  # the 8-bit first layer
                  (16, 16, 8, 3, 1, 15, 8, {"hi": 15}),
                  (16, 32, 8, 1, 2, 15, 8, {"hi": 15, "pads": [0, 0, 0, 0]}),
                  (16, 32, 9, 3, 2, 15, 8, {"lo": 3, "hi": 200, "zero_point": 3}),
                  (64, 8, 4, 3, 1, 15, 8, {"zero_point": 131}),  # 576 taps: int16 widening
                  (5, 7, 7, 5, 3, 15, 8, {"n": 2, "pads": [1, 4, 2, 0], "x_zero_point": 7}),
                  (3, 5, 6, 2, 1, 255, 64, {"pads": [1, 0, 0, 1], "lo": 10, "hi": 250})]:
        c, m, size, k, stride, x_max, w_max, extra = shape
        cases.append(_random_conv(rng, f"c{c}_m{m}_s{size}_k{k}_st{stride}_x{x_max}_w{w_max}",
                                  c, m, size, k, stride, x_max=x_max, w_max=w_max, **extra))
    return cases


def _dw_case(name: str, x, w, b, scale, *, strides=(1, 1), pads=(0, 0, 0, 0), lo=0, hi=255,
             zero_point=0, x_zero_point=0, x_hi=255) -> VectorCase:
    w = np.asarray(w, np.int8)
    attrs = {"group": w.shape[0], "strides": list(strides), "pads": list(pads), "lo": lo,
             "hi": hi, "zero_point": zero_point, "x_zero_point": x_zero_point, "x_hi": x_hi}
    inputs = [np.asarray(x, np.uint8), w, np.asarray(b, np.int32), np.asarray(scale, np.float32)]
    return _case("QDepthwiseConvClamp", name, inputs, attrs)


def _random_dw(rng, name: str, c: int, size: int, k: int, stride: int, *, x_max: int,
               w_max: int, n: int = 1, pads=None, **attrs) -> VectorCase:
    """As _random_conv, channels last; codes up to x_max, which x_hi may clamp."""
    x = rng.integers(0, x_max + 1, (n, size, size, c))
    w = rng.integers(-w_max, w_max + 1, (c, 1, k, k))
    top = min(x_max, attrs.get("x_hi", 255))
    spread = np.sqrt(k * k) * top * w_max / 2 + 1
    scale = rng.uniform(0.6, 1.4, c) * (attrs.get("hi", 255) - attrs.get("lo", 0) + 1) / spread
    b = rng.integers(-k * k * 4, k * k * 4 + 1, c)
    pads = [k // 2] * 4 if pads is None else pads
    return _dw_case(name, x, w, b, scale, strides=(stride, stride), pads=pads, **attrs)


def qdepthwise_conv_clamp_cases() -> list[VectorCase]:
    rng = np.random.default_rng(11)
    codes = np.arange(32).reshape(1, 1, 16, 2)  # two channels, 0..31
    ones = np.ones((2, 1, 1, 1))
    cases = [
        # acc = x - x_zero_point, scale 0.5: every odd acc is a tie.
        _dw_case("ties_half_even", codes, ones, [0, 0], [0.5, 0.5], x_zero_point=8,
                 zero_point=8),
        # min(x, x_hi) before the sum: codes above 12 read as 12, x_hi = x_zero_point too.
        _dw_case("input_ceiling", codes, ones, [0, 1], [1.0, 1.0], x_hi=12),
        _dw_case("input_ceiling_at_zero_point", codes, ones, [0, 0], [1.0, 1.0],
                 x_zero_point=5, x_hi=5, zero_point=9),
        # 2 * x + 10 against [12, 20]: below, on and above each edge.
        _dw_case("clamp_edges", codes, 2 * ones, [0, 0], [1.0, 1.0], lo=12, hi=20,
                 zero_point=10),
        # QConvClamp's float32-only ties, one per channel: both round to even, 50 and 100.
        _dw_case("float32_ties", [[[[3, 3]]]], [[[[1]]], [[[0]]]], [0, (1 << 25) + 1],
                 np.array([1099344555, 0], np.uint32).view(np.float32) + [0, 100.5 * 2**-25]),
        # acc + B beyond 2^24: float32(acc + B) rounds before the multiply.
        _dw_case("acc_beyond_2p24", rng.integers(240, 256, (1, 5, 5, 3)),
                 np.full((3, 1, 3, 3), 127), [1, 0, (1 << 29) - 3],
                 [1.0733e-5, 1.1e-5, 4.1e-7], pads=[1, 1, 1, 1]),
    ]
    for shape in [(16, 8, 3, 1, 15, 127, {"hi": 15, "x_hi": 15}),  # MobileNet's 4-bit block
                  (32, 9, 3, 2, 255, 127, {"hi": 15, "x_hi": 15}),  # codes above x_hi
                  (48, 7, 3, 1, 255, 127, {"n": 2}),  # 8-bit codes: sums beyond int16
                  (24, 6, 3, 2, 15, 8, {"lo": 3, "hi": 200, "zero_point": 3}),  # 16 + 8 lanes
                  (5, 7, 5, 3, 15, 8, {"n": 2, "pads": [1, 4, 2, 0], "x_zero_point": 7}),
                  (16, 11, 11, 1, 15, 127, {"x_hi": 15, "pads": [5, 5, 5, 5]}),  # 121 taps
                  (17, 4, 2, 1, 255, 64, {"pads": [1, 0, 0, 1], "lo": 10, "hi": 250})]:
        c, size, k, stride, x_max, w_max, extra = shape
        cases.append(_random_dw(rng, f"c{c}_s{size}_k{k}_st{stride}_x{x_max}_w{w_max}", c, size,
                                k, stride, x_max=x_max, w_max=w_max, **extra))
    return cases


BUILDERS = {
    "UniformQuant": uniform_quant_cases,
    "CompandQuant": compand_quant_cases,
    "AdaptiveStep": adaptive_step_cases,
    "LutGather": lut_gather_cases,
    "Pow2Shift": pow2_shift_cases,
    "SampleMaxQuant": sample_max_quant_cases,
    "QConvClamp": qconv_clamp_cases,
    "QDepthwiseConvClamp": qdepthwise_conv_clamp_cases,
}


def cases(op_name: str) -> list[VectorCase]:
    """All test vectors of one op (deterministic)."""
    return BUILDERS[op_name]()


def write(out: Path) -> int:
    """One .npz per case: inputs as in0..inN, attributes as attr_<name>, and ``expected``."""
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for op in BUILDERS:
        for case in cases(op):
            arrays = {f"in{i}": a for i, a in enumerate(case.inputs)}
            arrays |= {f"attr_{k}": np.asarray(v, np.int64) for k, v in case.attrs.items()}
            np.savez(out / f"{op}__{case.name}.npz", expected=case.expected, **arrays)
            count += 1
    return count


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    print(f"wrote {write(parser.parse_args().out)} cases")
