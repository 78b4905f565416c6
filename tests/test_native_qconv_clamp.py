"""The native QConvClamp kernel (custom_ops/src/qconv_clamp.cc): a uint8 x int8
convolution, requantized per channel and clamped to [lo, hi] in one kernel.

Expectations: ONNX Runtime's own QLinearConv + Clip on the same codes (what integer
mode runs today), and a numpy reference written here from the formula in the kernel's
header (int64 sums, float32 requantization, round half to even). Both the AVX2 loops and
the exact int32 loop (QCONVERT_OPS_PORTABLE=1, and codes whose single tap could overflow
int16) are checked; tests/test_native_sanitizer.py runs this file under ASan+UBSan.
The shared test vectors (qconvert.ops.vectors) run through tests/test_native_ops.py. The
fuzz below stays here rather than in tests/test_native_fuzz.py: that harness feeds float
activations to elementwise ops, this op takes uint8 codes and constant int8 weights whose
shapes must agree with the input's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from .test_native_ops import NODE, model_bytes, portable_run, random_conv_geometry, session

OP = "QConvClamp"


def conv_sums(x, w, strides, pads, x_zero_point=0) -> np.ndarray:
    """int64 convolution of (X - x_zero_point), zero outside the image, by im2col: each
    output position's receptive field gathered by index arithmetic, then one product with
    the weights (the op's numpy reference sums tap by tap instead)."""
    n, c, h, wd = x.shape
    m, _, kh, kw = w.shape
    (sh, sw), (pt, pl, pb, pr) = strides, pads
    oh, ow = (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1
    shifted = x.astype(np.int64) - x_zero_point
    cols = np.zeros((n, oh, ow, c, kh, kw), np.int64)
    for oy in range(oh):
        for ox in range(ow):
            for i in range(kh):
                for j in range(kw):
                    row, col = oy * sh - pt + i, ox * sw - pl + j
                    if 0 <= row < h and 0 <= col < wd:
                        cols[:, oy, ox, :, i, j] = shifted[:, :, row, col]
    return np.einsum("nyxckl,mckl->nmyx", cols, w.astype(np.int64))


def reference(x, w, b, scale, *, strides, pads, lo, hi, zero_point=0, x_zero_point=0):
    """Y = clamp(round_half_even(f32(acc + B) * scale), lo - zp, hi - zp) + zp."""
    acc = conv_sums(x, w, strides, pads, x_zero_point)
    total = (acc + b.astype(np.int64)[None, :, None, None]).astype(np.int32)
    v = total.astype(np.float32) * scale.astype(np.float32)[None, :, None, None]
    v = np.clip(v, np.float32(lo - zero_point), np.float32(hi - zero_point))
    return (np.rint(v).astype(np.int64) + zero_point).astype(np.uint8)


def model(w, b, scale, attrs, *, const_w=True) -> bytes:
    """The one-node model; W an initializer unless ``const_w`` is False (X only typed)."""
    const = {"W", "B", "scale"} if const_w else {"B", "scale"}
    return model_bytes(OP, [np.zeros(1, np.uint8), w, b, scale], attrs, const)


def run(x, w, b, scale, attrs) -> np.ndarray:
    return session(model(w, b, scale, attrs)).run(None, {"X": x})[0]


def qlinearconv_clip(x, w, b, x_scale, w_scale, y_scale, attrs) -> np.ndarray:
    """ONNX Runtime's QLinearConv (zero points as in attrs) followed by Clip(lo, hi)."""
    t = numpy_helper.from_array
    inits = [t(np.float32(x_scale), "xs"), t(np.uint8(attrs.get("x_zero_point", 0)), "xz"),
             t(w, "W"), t(w_scale, "ws"), t(np.zeros(len(w_scale), np.int8), "wz"),
             t(np.float32(y_scale), "ys"), t(np.uint8(attrs.get("zero_point", 0)), "yz"),
             t(b, "B"), t(np.uint8(attrs["lo"]), "lo"), t(np.uint8(attrs["hi"]), "hi")]
    nodes = [helper.make_node("QLinearConv", ["X", "xs", "xz", "W", "ws", "wz", "ys", "yz", "B"],
                              ["c"], kernel_shape=list(w.shape[2:]), strides=attrs["strides"],
                              pads=attrs["pads"]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["Y"])]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("X", TensorProto.UINT8, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.UINT8, None)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    return session(m.SerializeToString()).run(None, {"X": x})[0]  # standard ops only


def random_case(rng, c, m, h, wd, k, stride, *, x_max=15, w_max=8, n=1, x_zp=0, y_zp=0,
                lo=0, hi=15, pad=None):
    """Codes, weights, bias and ORT's scales (multiplier = x_scale * w_scale / y_scale in
    float32) with outputs spread over [lo, hi]."""
    kh, kw = k if isinstance(k, tuple) else (k, k)
    sh, sw = stride if isinstance(stride, tuple) else (stride, stride)
    pads = pad if pad is not None else [kh // 2, kw // 2, kh // 2, kw // 2]
    x = rng.integers(0, x_max + 1, (n, c, h, wd)).astype(np.uint8)
    w = rng.integers(-w_max, w_max + 1, (m, c, kh, kw)).astype(np.int8)
    b = rng.integers(-4 * c * kh * kw, 4 * c * kh * kw + 1, m).astype(np.int32)
    x_scale, w_scale = np.float32(0.05), rng.uniform(0.005, 0.02, m).astype(np.float32)
    attrs = {"strides": [sh, sw], "pads": pads, "lo": lo, "hi": hi, "zero_point": y_zp,
             "x_zero_point": x_zp}
    # y_scale: the sums' spread maps onto about 1.5 times [lo, hi], so both the clamp
    # and the rounding are exercised.
    spread = float(np.std(conv_sums(x[:1], w[:1], [sh, sw], pads, x_zp))) + 1.0
    y_scale = np.float32(spread * float(x_scale) * float(w_scale.mean()) / (0.75 * (hi - lo) + 1))
    return x, w, b, x_scale, w_scale, y_scale, attrs


def multiplier(x_scale, w_scale, y_scale) -> np.ndarray:
    return ((np.float32(x_scale) * w_scale) / np.float32(y_scale)).astype(np.float32)


RESNET20_SHAPES = [  # (C, M, input size, kernel, stride, x_max, w_max, x zero point)
    (1, 16, 16, 3, 1, 255, 64, 128),
    (16, 16, 16, 3, 1, 15, 8, 0),
    (16, 32, 16, 1, 2, 15, 8, 0),
    (16, 32, 16, 3, 2, 15, 8, 0),
    (32, 32, 8, 3, 1, 15, 8, 0),
    (32, 64, 8, 1, 2, 15, 8, 0),
    (32, 64, 8, 3, 2, 15, 8, 0),
    (64, 64, 4, 3, 1, 15, 8, 0),  # 144 taps: the int16 sums are widened twice
]


@pytest.mark.parametrize("shape", RESNET20_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_equals_qlinearconv_and_clip(shape):
    c, m, size, k, stride, x_max, w_max, x_zp = shape
    rng = np.random.default_rng(sum(shape))
    for lo, hi, y_zp in [(0, 15, 0), (0, 255, 0), (3, 200, 3), (0, 255, 131)]:
        x, w, b, xs, ws, ys, attrs = random_case(rng, c, m, size, size, k, stride, x_max=x_max,
                                                 w_max=w_max, x_zp=x_zp, y_zp=y_zp, lo=lo, hi=hi)
        want = qlinearconv_clip(x, w, b, xs, ws, ys, attrs)
        got = run(x, w, b, multiplier(xs, ws, ys), attrs)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, reference(x, w, b, multiplier(xs, ws, ys), **attrs))


def test_ties_round_half_to_even():
    """1x1, one channel, weight 1, multiplier 0.5: codes 1, 3, 5, 7 land on .5 exactly."""
    x = np.array([1, 3, 5, 7, 9, 2], np.uint8).reshape(1, 1, 1, 6)
    w = np.ones((1, 1, 1, 1), np.int8)
    attrs = {"strides": [1, 1], "pads": [0, 0, 0, 0], "lo": 0, "hi": 255}
    got = run(x, w, np.zeros(1, np.int32), np.array([0.5], np.float32), attrs)
    np.testing.assert_array_equal(got.reshape(-1), [0, 2, 2, 4, 4, 1])


def test_clamp_and_zero_point_by_hand():
    """acc = 2 * x; scale 1: codes 10 + 2x clamped to [12, 20] with zero point 10."""
    x = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8], np.uint8).reshape(1, 1, 1, 9)
    w = np.full((1, 1, 1, 1), 2, np.int8)
    attrs = {"strides": [1, 1], "pads": [0, 0, 0, 0], "lo": 12, "hi": 20, "zero_point": 10}
    got = run(x, w, np.zeros(1, np.int32), np.ones(1, np.float32), attrs)
    np.testing.assert_array_equal(got.reshape(-1), [12, 12, 14, 16, 18, 20, 20, 20, 20])


def random_config(rng):
    k, stride, pad, h, wd = random_conv_geometry(rng)
    wide = rng.random() < 0.3  # 8-bit codes: large weights take the exact int32 loop
    lo = int(rng.integers(0, 40))
    return dict(c=int(rng.integers(1, 70)), m=int(rng.integers(1, 40)), h=h, wd=wd, k=k,
                stride=stride, pad=pad, x_max=255 if wide else int(rng.integers(1, 16)),
                w_max=int(rng.choice([64, 127])) if wide else int(rng.integers(1, 9)),
                n=int(rng.integers(1, 3)), x_zp=int(rng.choice([0, 0, 7, 128])),
                y_zp=int(rng.choice([0, 0, 5])), lo=lo, hi=int(rng.integers(lo, 256)))


def test_random_shapes_equal_reference():
    """Channel counts not multiples of 4 or 8, strides up to 4, asymmetric kernels and pads,
    odd sizes, batches: AVX2 position and channel lanes, the int16 widening, the exact loop."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        cfg = random_config(rng)
        x, w, b, xs, ws, ys, attrs = random_case(rng, cfg.pop("c"), cfg.pop("m"), cfg.pop("h"),
                                                 cfg.pop("wd"), cfg.pop("k"), cfg.pop("stride"),
                                                 **cfg)
        scale = multiplier(xs, ws, ys)
        np.testing.assert_array_equal(run(x, w, b, scale, attrs),
                                      reference(x, w, b, scale, **attrs), err_msg=str(attrs))


@pytest.mark.parametrize("n, c, m, h, wd", [(1, 32, 48, 40, 24), (1, 64, 64, 21, 21),
                                            (3, 32, 32, 16, 16), (8, 32, 40, 9, 9)])
def test_threads_share_the_work_and_not_the_result(n, c, m, h, wd):
    """Layers big enough for the kernel to use two intra-op threads: one image's output
    positions split into tasks (position lanes, rows of 8; channel lanes), or the batch's
    images one per task. The same codes as the reference."""
    x, w, b, xs, ws, ys, attrs = random_case(np.random.default_rng(n * h), c, m, h, wd, 3, 1,
                                             n=n)
    scale = multiplier(xs, ws, ys)
    sess = session(model(w, b, scale, attrs), threads=2)
    np.testing.assert_array_equal(sess.run(None, {"X": x})[0],
                                  reference(x, w, b, scale, **attrs))


def test_portable_loop_gives_the_same_bits(tmp_path: Path):
    """The exact int32 loop (QCONVERT_OPS_PORTABLE=1) against this process's AVX2 loops."""
    rng = np.random.default_rng(3)
    cases = [random_case(rng, 16, 16, 16, 16, 3, 1), random_case(rng, 64, 64, 4, 4, 3, 1),
             random_case(rng, 32, 64, 8, 8, 3, 2)]
    here = [run(x, w, b, multiplier(xs, ws, ys), a) for x, w, b, xs, ws, ys, a in cases]
    code = (
        "import sys, numpy as np; from tests import test_native_qconv_clamp as t; "
        "d = np.load(sys.argv[1]); v = [d[f'arr_{i}'] for i in range(len(d.files))]; "
        f"attrs = {[case[6] for case in cases]!r}; "
        "sys.stdout.buffer.write(b''.join(t.run(*v[4 * i:4 * i + 4], a).tobytes() "
        "for i, a in enumerate(attrs)))"
    )
    out = portable_run(tmp_path, code, [v for case in cases for v in
                                        (case[0], case[1], case[2], multiplier(*case[3:6]))])
    assert out == b"".join(y.tobytes() for y in here)


GOOD = {"strides": [1, 1], "pads": [1, 1, 1, 1], "lo": 0, "hi": 15}


def _weights(m=4, c=4, k=3):
    return (np.ones((m, c, k, k), np.int8), np.zeros(m, np.int32), np.ones(m, np.float32))


@pytest.mark.parametrize("change, message", [
    ({"strides": [0, 1]}, "strides[0]=0 outside 1..4"),
    ({"strides": [1, 5]}, "strides[1]=5 outside 1..4"),
    ({"strides": [1]}, "strides needs 2 entries"),
    ({"pads": [1, 1, 1]}, "pads needs 4 entries"),
    ({"pads": [3, 1, 1, 1]}, "pads must be smaller than the kernel"),
    ({"pads": [-1, 1, 1, 1]}, "pads=-1 outside"),
    ({"lo": 16}, "hi=15 outside 16..255"),
    ({"hi": 256}, "hi=256 outside 0..255"),
    ({"zero_point": 300}, "zero_point=300 outside 0..255"),
    ({"x_zero_point": -1}, "x_zero_point=-1 outside 0..255"),
])
def test_refuses_bad_attributes(change, message):
    w, b, s = _weights()
    with pytest.raises(Exception) as err:
        session(model(w, b, s, {**GOOD, **change}))
    assert f"qconvert::{OP} node '{NODE}'" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("what, message", [
    ("w_input", "input W must be a constant initializer"),
    ("w_rank", "W must be [M, C, kH, kW]"),
    ("bias_len", "B and scale need M = 4 elements"),
    ("nan_scale", "scale[0] is not finite"),
    ("big_bias", "B[0] = 1073741824 is outside (-2^30, 2^30)"),
    ("big_kernel", "W kernel height=12 outside 1..11"),
])
def test_refuses_bad_constants(what, message):
    w, b, s = _weights()
    const_w = True
    if what == "w_input":
        const_w = False
    elif what == "w_rank":
        w = np.ones((4, 4, 3), np.int8)
    elif what == "bias_len":
        b = np.zeros(3, np.int32)
    elif what == "nan_scale":
        s = np.array([np.nan, 1, 1, 1], np.float32)
    elif what == "big_bias":
        b = np.array([1 << 30, 0, 0, 0], np.int32)
    elif what == "big_kernel":
        w = np.ones((4, 4, 12, 3), np.int8)
    with pytest.raises(Exception) as err:
        session(model(w, b, s, GOOD, const_w=const_w))
    assert f"qconvert::{OP} node '{NODE}'" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("x_shape, message", [
    ((1, 3, 8, 8), "X has 3 channels, W expects C = 4"),
    ((4, 8, 8), "X must be [N, C, H, W]"),
    ((1, 4, 1, 8), "is smaller than the kernel [3, 3] after padding"),
    ((1, 4, 0, 8), "is smaller than the kernel"),
    ((1, 4, 4100, 4100), "needs a scratch buffer above 64 MiB"),  # 67 MB of codes
])
def test_refuses_bad_inputs_at_run_time(x_shape, message):
    w, b, s = _weights()
    sess = session(model(w, b, s, {**GOOD, "pads": [0, 1, 0, 1]}))
    with pytest.raises(Exception) as err:
        sess.run(None, {"X": np.zeros(x_shape, np.uint8)})
    assert f"qconvert::{OP} node '{NODE}'" in str(err.value) and message in str(err.value)


def test_fuzz_shapes_and_attributes():
    """Random shapes and attributes, some invalid: each case is a result equal to the
    reference or one error naming the node, never a crash (ASan: test_native_sanitizer)."""
    rng = np.random.default_rng(2024)
    ran = refused = 0
    for _ in range(150):
        cfg = random_config(rng)
        x, w, b, xs, ws, ys, attrs = random_case(rng, cfg.pop("c"), cfg.pop("m"), cfg.pop("h"),
                                                 cfg.pop("wd"), cfg.pop("k"), cfg.pop("stride"),
                                                 **cfg)
        scale = multiplier(xs, ws, ys)
        if rng.random() < 0.3:  # one thing wrong: an attribute or the input's shape
            key = str(rng.choice(["strides", "pads", "lo", "hi", "zero_point", "x_shape"]))
            if key == "x_shape":
                dims = list(x.shape)
                dims[int(rng.integers(0, 4))] = int(rng.choice([0, 1, 2, 300]))
                x = np.zeros(dims, np.uint8)
            elif key in ("strides", "pads"):
                attrs[key] = [int(v) for v in rng.integers(-2, 14, int(rng.choice([1, 2, 4, 5])))]
            else:
                attrs[key] = int(rng.choice([-1, 256, 1000]))
        try:
            got = run(x, w, b, scale, attrs)
        except Exception as e:  # noqa: BLE001 - ORT's error classes
            assert type(e).__module__.split(".")[0] == "onnxruntime", e
            assert f"qconvert::{OP} node '{NODE}'" in str(e), str(e)
            refused += 1
            continue
        np.testing.assert_array_equal(got, reference(x, w, b, scale, **attrs))
        ran += 1
    assert ran > 50 and refused > 10
