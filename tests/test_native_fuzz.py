"""Random-input fuzz driver for the native kernels.

Random shapes, attribute values (valid and not), float bit patterns (NaN,
Inf, denormals), packed-code byte streams of any length, inputs fed or stored
as initializers, 1 or 2 threads. Every case must end in a result or an ORT
error naming the node; nothing may crash. Where the inputs are valid the
result must equal the numpy reference bit for bit.

    python -m tests.test_native_fuzz --seconds 40 --cases 3000 --seed 1

tests/test_native_sanitizer.py runs it under ASan+UBSan at the CI size; the
test here is a short run against the release build.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import numpy as np

from qconvert.ops import OPS

from .test_native_ops import INPUT_NAMES, NODE, assert_bits_equal, model_bytes, session

F32 = np.float32


def random_floats(rng: np.random.Generator, shape) -> np.ndarray:
    """Mostly ordinary values, some raw bit patterns (NaN, Inf, denormals, huge)."""
    n = int(np.prod(shape))
    values = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 30.0])).astype(F32)
    raw = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(F32)
    pick = rng.random(n) < rng.choice([0.0, 0.05, 0.5])
    return np.where(pick, raw, values).astype(F32).reshape(shape)


def random_shape(rng: np.random.Generator, big: bool = False) -> list[int]:
    rank = int(rng.integers(1, 5))
    dims = [int(rng.integers(1, 7)) for _ in range(rank)]
    if big:
        dims[-1] = int(rng.integers(30_000, 120_000))
    elif rng.random() < 0.1:
        dims[int(rng.integers(rank))] = 0
    return dims


def maybe(rng: np.random.Generator, valid, invalid, p_invalid: float = 0.08):
    return invalid if rng.random() < p_invalid else valid


def case_compand(rng, big):
    bits = int(maybe(rng, rng.integers(2, 9), rng.choice([-1, 0, 1, 9, 64])))
    signed = int(maybe(rng, rng.integers(0, 2), rng.choice([-1, 2])))
    b = min(max(bits, 1), 8)
    S = (1 << (b - 1)) - 1 if signed == 1 else (1 << b) - 1
    K = int(maybe(rng, rng.integers(1, 40), rng.choice([0, 1000])))
    x = random_floats(rng, maybe(rng, random_shape(rng, big), [], 0.02))
    alpha = np.abs(random_floats(rng, [maybe(rng, 1, int(rng.choice([0, 2])))]))
    slopes = random_floats(rng, [K])
    offsets = random_floats(rng, [maybe(rng, K, K + 1)])
    levels = random_floats(rng, [maybe(rng, S + 1, S)])
    attrs = {"bits": bits, "signed": signed}
    if rng.random() < 0.03:
        del attrs["signed"]
    for name in ("mirror", "clip"):  # version 3's optional attributes, sometimes out of range
        if rng.random() < 0.4:
            attrs[name] = int(maybe(rng, rng.integers(0, 2), rng.choice([-1, 2])))
    valid_alpha = alpha.size == 1 and np.isfinite(alpha[0]) and alpha[0] > 0
    return [x, alpha, slopes, offsets, levels], attrs, valid_alpha


def case_sample_max(rng, big):
    bits = int(maybe(rng, rng.integers(2, 9), rng.choice([0, 1, 9])))
    signed = int(maybe(rng, rng.integers(0, 2), 3))
    x = random_floats(rng, maybe(rng, random_shape(rng, big), [], 0.02))
    return [x], {"bits": bits, "signed": signed}, True


def case_adaptive(rng, big):
    bits = int(maybe(rng, rng.integers(2, 9), rng.choice([0, 1, 9])))
    signed = int(maybe(rng, rng.integers(0, 2), 3))
    x = random_floats(rng, maybe(rng, random_shape(rng, big), [], 0.02))
    n = x.shape[0] if x.ndim else 1
    step = random_floats(rng, [maybe(rng, 1, 2)])
    beta = np.abs(random_floats(rng, [maybe(rng, n, n + 1)]))
    return [x, step, beta], {"bits": bits, "signed": signed}, True


def case_uniform(rng, big):
    bits = int(maybe(rng, rng.integers(2, 9), rng.choice([0, 1, 9])))
    signed = int(maybe(rng, rng.integers(0, 2), 3))
    x = random_floats(rng, maybe(rng, random_shape(rng, big), [], 0.02))
    step = random_floats(rng, [maybe(rng, 1, int(rng.choice([0, 2])))])
    return [x, step], {"bits": bits, "signed": signed}, True


def random_codes(rng, n: int, bits: int, limit: int) -> np.ndarray:
    need = (n * max(bits, 1) + 7) // 8
    if rng.random() < 0.5 and 1 <= bits <= 8 and limit > 0:
        codes = rng.integers(0, min(limit, 1 << bits), n)
        stream = np.zeros(need * 8, np.uint8)
        stream[: n * bits] = ((codes[:, None] >> np.arange(bits)) & 1).reshape(-1)
        packed = np.packbits(stream, bitorder="little")
    else:
        packed = rng.integers(0, 256, need, dtype=np.uint8)
    extra = int(maybe(rng, rng.integers(0, 4), -int(rng.integers(1, 3)), 0.1))
    if extra >= 0:
        return np.concatenate([packed, rng.integers(0, 256, extra, dtype=np.uint8)])
    return packed[: max(need + extra, 0)]


def decode_shape(rng, big):
    shape = random_shape(rng, big)
    return maybe(rng, shape, [int(rng.choice([0, -3]))] + shape[1:], 0.05)


def case_lut(rng, big):
    bits = int(maybe(rng, rng.integers(1, 9), rng.choice([0, 9])))
    shape = decode_shape(rng, big)
    n = int(np.prod([max(d, 0) for d in shape]))
    L = int(maybe(rng, rng.integers(1, (1 << min(max(bits, 1), 8)) + 1), 300))
    C = shape[0]
    table = random_floats(rng, maybe(rng, [L], [max(C, 0), L], 0.5))
    if rng.random() < 0.03:
        table = random_floats(rng, [int(rng.integers(1, 4)), L])
    codes = random_codes(rng, n, bits, L if rng.random() < 0.9 else L + 1)
    return [codes, table], {"bits": bits, "shape": shape}, True


def case_pow2(rng, big):
    bits = int(maybe(rng, rng.integers(2, 9), rng.choice([1, 9])))
    root = int(maybe(rng, rng.integers(1, 3), rng.choice([0, 3])))
    shape = decode_shape(rng, big)
    n = int(np.prod([max(d, 0) for d in shape]))
    alpha = random_floats(rng, [int(maybe(rng, rng.choice([1, max(shape[0], 1)]), 3))])
    codes = random_codes(rng, n, bits, 1 << 8)
    return [codes, alpha], {"bits": bits, "root": root, "shape": shape}, True


BUILDERS = {
    "CompandQuant": case_compand,
    "AdaptiveStep": case_adaptive,
    "UniformQuant": case_uniform,
    "LutGather": case_lut,
    "Pow2Shift": case_pow2,
    "SampleMaxQuant": case_sample_max,
}


def one_case(rng: np.random.Generator, op: str, stats: Counter) -> None:
    big = rng.random() < 0.01
    inputs, attrs, comparable = BUILDERS[op](rng, big)
    names = INPUT_NAMES[op]
    const = {n for n in names[1:] if rng.random() < 0.5}
    if op in ("LutGather", "Pow2Shift") and rng.random() < 0.5:
        const = set(names)
    threads = int(rng.integers(1, 3))
    try:
        sess = session(model_bytes(op, inputs, attrs, const), threads)
        out = sess.run(None, {n: a for n, a in zip(names, inputs, strict=True) if n not in const})
    except Exception as e:  # ORT's error classes; anything else is a bug
        if type(e).__module__.split(".")[0] != "onnxruntime":
            raise
        message = str(e)
        if f"qconvert::{op} node '{NODE}'" not in message and "Type Error" not in message:
            raise AssertionError(f"{op} {attrs}: error without node name: {message}") from e
        stats["refused"] += 1
        return
    stats["ran"] += 1
    y = out[0]
    assert y.dtype == np.float32
    if comparable:
        try:
            with np.errstate(all="ignore"):
                expected = OPS[op].reference(*inputs, **attrs)
        except (ValueError, IndexError):
            return  # the reference refuses what the kernel accepted: see the spec checks
        assert_bits_equal(y, expected)
        stats["compared"] += 1


def run_fuzz(seconds: float, max_cases: int, seed: int) -> Counter:
    rng = np.random.default_rng(seed)
    stats: Counter = Counter()
    deadline = time.monotonic() + seconds
    ops = list(BUILDERS)
    for i in range(max_cases):
        if time.monotonic() > deadline:
            break
        one_case(rng, ops[i % len(ops)], stats)
        stats["cases"] += 1
    return stats


def test_fuzz_short_run():
    stats = run_fuzz(seconds=20, max_cases=400, seed=12345)
    assert stats["cases"] >= 100
    assert stats["ran"] > 0 and stats["refused"] > 0 and stats["compared"] > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    start = time.monotonic()
    stats = run_fuzz(args.seconds, args.cases, args.seed)
    print(
        f"fuzz: {stats['cases']} cases ({stats['ran']} ran, {stats['compared']} compared "
        f"with the reference, {stats['refused']} refused with an error) "
        f"in {time.monotonic() - start:.1f} s, seed {args.seed}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
