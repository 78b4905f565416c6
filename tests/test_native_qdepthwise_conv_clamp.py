"""The native QDepthwiseConvClamp kernel (custom_ops/src/qdepthwise_conv_clamp.cc): a
depthwise uint8 x int8 convolution on channels-last codes, with the input's ceiling
min(X, x_hi), requantized per channel and clamped to [lo, hi] in one kernel.

Expectations: torch's float64 conv2d with groups = C on the clamped, shifted codes
(every partial sum is an integer far below 2^53, so exact), requantized here in float32
with round half to even; ONNX Runtime's own Clip + depthwise QLinearConv + Clip in NCHW
(what the op's function body runs); and the op's numpy reference. Both the AVX2 loops
(int16 sums, and the int32 sums when int16 could overflow) and the exact loop
(QCONVERT_OPS_PORTABLE=1) are checked; tests/test_native_sanitizer.py runs this file under
ASan+UBSan. The shared test vectors run through tests/test_native_ops.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qconvert.ops.qdepthwise_conv_clamp import reference as spec_reference

from .test_native_ops import NODE, model_bytes, portable_run, random_conv_geometry, session

OP = "QDepthwiseConvClamp"


def dw_sums(x, w, strides, pads, x_zero_point=0, x_hi=255) -> np.ndarray:
    """int64 [N, OH, OW, C] sums of (min(X, x_hi) - x_zero_point) * W, zero outside X."""
    shifted = np.minimum(x, x_hi).astype(np.float64) - x_zero_point
    xt = torch.from_numpy(shifted).permute(0, 3, 1, 2)
    xt = torch.nn.functional.pad(xt, (pads[1], pads[3], pads[0], pads[2]))
    acc = torch.nn.functional.conv2d(xt, torch.from_numpy(w.astype(np.float64)),
                                     stride=tuple(strides), groups=w.shape[0])
    return acc.permute(0, 2, 3, 1).numpy().astype(np.int64)


def reference(x, w, b, scale, *, strides, pads, lo, hi, zero_point=0, x_zero_point=0,
              x_hi=255, group=None) -> np.ndarray:
    """Y = clamp(round_half_even(f32(acc + B) * scale), lo - zp, hi - zp) + zp."""
    acc = dw_sums(x, w, strides, pads, x_zero_point, x_hi)
    total = (acc + b.astype(np.int64)).astype(np.int32)
    v = total.astype(np.float32) * scale.astype(np.float32)
    v = np.clip(v, np.float32(lo - zero_point), np.float32(hi - zero_point))
    return (np.rint(v).astype(np.int64) + zero_point).astype(np.uint8)


def model(w, b, scale, attrs, *, const_w=True) -> bytes:
    """The one-node model; W an initializer unless ``const_w`` is False (X only typed)."""
    const = {"W", "B", "scale"} if const_w else {"B", "scale"}
    return model_bytes(OP, [np.zeros(1, np.uint8), w, b, scale], attrs, const)


def run(x, w, b, scale, attrs, threads=1) -> np.ndarray:
    return session(model(w, b, scale, attrs), threads).run(None, {"X": x})[0]


def ort_clip_qlinearconv_clip(x, w, b, scale, attrs) -> np.ndarray:
    """ONNX Runtime's own nodes in NCHW: Clip(X, 0, x_hi), QLinearConv with group C,
    x_scale = y_scale = 1 and w_scale = scale (so its multiplier is scale), Clip(lo, hi)."""
    t = numpy_helper.from_array
    inits = [t(np.float32(1), "one"), t(np.uint8(attrs["x_zero_point"]), "xz"), t(w, "W"),
             t(scale, "ws"), t(np.zeros(len(scale), np.int8), "wz"),
             t(np.uint8(attrs["zero_point"]), "yz"), t(b, "B"), t(np.uint8(0), "zero"),
             t(np.uint8(attrs["x_hi"]), "xhi"), t(np.uint8(attrs["lo"]), "lo"),
             t(np.uint8(attrs["hi"]), "hi")]
    nodes = [helper.make_node("Transpose", ["X"], ["xt"], perm=[0, 3, 1, 2]),
             helper.make_node("Clip", ["xt", "zero", "xhi"], ["xc"]),
             helper.make_node("QLinearConv", ["xc", "one", "xz", "W", "ws", "wz", "one", "yz",
                                              "B"], ["c"], kernel_shape=list(w.shape[2:]),
                              strides=attrs["strides"], pads=attrs["pads"], group=w.shape[0]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["ct"]),
             helper.make_node("Transpose", ["ct"], ["Y"], perm=[0, 2, 3, 1])]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("X", TensorProto.UINT8, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.UINT8, None)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    return session(m.SerializeToString()).run(None, {"X": x})[0]  # standard ops only


def random_case(rng, c, h, wd, k, stride, *, x_max=15, x_hi=255, w_max=127, n=1, x_zp=0,
                y_zp=0, lo=0, hi=15, pad=None):
    """Codes up to x_max (x_hi may cut them), weights, bias and a per-channel scale that
    spreads the outputs over about 1.5 times [lo, hi], so the rounding and both clamp
    edges are exercised."""
    kh, kw = k if isinstance(k, tuple) else (k, k)
    sh, sw = stride if isinstance(stride, tuple) else (stride, stride)
    pads = pad if pad is not None else [kh // 2, kw // 2, kh // 2, kw // 2]
    x = rng.integers(0, x_max + 1, (n, h, wd, c)).astype(np.uint8)
    w = rng.integers(-w_max, w_max + 1, (c, 1, kh, kw)).astype(np.int8)
    b = rng.integers(-4 * kh * kw, 4 * kh * kw + 1, c).astype(np.int32)
    attrs = {"group": c, "strides": [sh, sw], "pads": pads, "lo": lo, "hi": hi,
             "zero_point": y_zp, "x_zero_point": x_zp, "x_hi": x_hi}
    spread = float(np.std(dw_sums(x[:1], w, [sh, sw], pads, x_zp, x_hi))) + 1.0
    scale = (rng.uniform(0.6, 1.4, c) * (hi - lo + 1) / (1.5 * spread)).astype(np.float32)
    return x, w, b, scale, attrs


MOBILENET_SHAPES = [  # (C, input size, stride, x_max, x_hi, x zero point, w_max)
    (16, 28, 1, 15, 15, 0, 127),   # 4-bit codes: int16 sums (9 * 15 * 127 < 32767)
    (32, 28, 2, 20, 15, 0, 127),   # codes above the ceiling
    (64, 14, 1, 15, 15, 0, 127),
    (96, 14, 2, 15, 15, 0, 127),
    (96, 14, 1, 255, 255, 0, 127),  # 8-bit codes: int32 sums
    (48, 14, 2, 255, 255, 128, 64),
    (24, 15, 1, 15, 15, 3, 127),    # 16 + 8 channels
]


@pytest.mark.parametrize("shape", MOBILENET_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mobilenet_shapes_equal_reference_and_ort(shape):
    c, size, stride, x_max, x_hi, x_zp, w_max = shape
    rng = np.random.default_rng(sum(shape))
    for lo, hi, y_zp in [(0, 15, 0), (0, 255, 0), (3, 200, 3), (0, 255, 131)]:
        x, w, b, scale, attrs = random_case(rng, c, size, size, 3, stride, x_max=x_max,
                                            x_hi=x_hi, w_max=w_max, x_zp=x_zp, y_zp=y_zp,
                                            lo=lo, hi=hi)
        got = run(x, w, b, scale, attrs)
        np.testing.assert_array_equal(got, reference(x, w, b, scale, **attrs))
        np.testing.assert_array_equal(got, spec_reference(x, w, b, scale, **attrs))
        if x_max <= 15:  # ORT's depthwise kernel is exact on 4-bit codes
            np.testing.assert_array_equal(got, ort_clip_qlinearconv_clip(x, w, b, scale, attrs))


def test_ceiling_and_ties_by_hand():
    """1x1, weight 1, scale 0.5, x_hi 9: codes above 9 read as 9; odd sums are ties."""
    x = np.array([0, 1, 3, 5, 7, 9, 10, 200], np.uint8).reshape(1, 1, 8, 1)
    attrs = {"group": 1, "strides": [1, 1], "pads": [0, 0, 0, 0], "lo": 0, "hi": 255,
             "x_hi": 9}
    got = run(x, np.ones((1, 1, 1, 1), np.int8), np.zeros(1, np.int32),
              np.array([0.5], np.float32), attrs)
    np.testing.assert_array_equal(got.reshape(-1), [0, 0, 2, 2, 4, 4, 4, 4])


def random_config(rng):
    k, stride, pad, h, wd = random_conv_geometry(rng)
    wide = rng.random() < 0.4  # 8-bit codes: int32 sums when the weights are large
    x_zp = int(rng.choice([0, 0, 7, 128])) if wide else int(rng.choice([0, 0, 3]))
    x_max = 255 if wide else 15
    lo = int(rng.integers(0, 40))
    return dict(c=int(rng.integers(1, 70)), h=h, wd=wd, k=k, stride=stride, pad=pad,
                x_max=x_max, x_hi=int(rng.choice([x_max, int(rng.integers(x_zp, x_max + 1))])),
                w_max=int(rng.choice([8, 64, 127])), n=int(rng.integers(1, 3)), x_zp=x_zp,
                y_zp=int(rng.choice([0, 0, 5])), lo=lo, hi=int(rng.integers(lo, 256)))


def random_case_from(rng, cfg):
    return random_case(rng, cfg.pop("c"), cfg.pop("h"), cfg.pop("wd"), cfg.pop("k"),
                       cfg.pop("stride"), **cfg)


def test_random_shapes_equal_reference():
    """Channel counts not multiples of 16, strides up to 4, asymmetric kernels and pads,
    odd sizes, batches, ceilings and zero points: border and interior pixels, tail
    channels, both sums."""
    rng = np.random.default_rng(5)
    for _ in range(80):
        x, w, b, scale, attrs = random_case_from(rng, random_config(rng))
        np.testing.assert_array_equal(run(x, w, b, scale, attrs),
                                      reference(x, w, b, scale, **attrs), err_msg=str(attrs))


def _all_at_ceiling(weights, x_hi, c=16, size=6):
    """Every code at x_hi and one kernel for all channels: each interior sum is x_hi times
    the kernel's sum; scale 1 / 512 keeps it apart from its int16 wrap in the output."""
    k = len(weights)
    w = np.tile(np.array(weights, np.int8).reshape(1, 1, 1, k), (c, 1, 1, 1))
    x = np.full((1, size, size, c), x_hi, np.uint8)
    attrs = {"group": c, "strides": [1, 1], "pads": [0, 0, 0, 0], "lo": 0, "hi": 255,
             "zero_point": 128, "x_hi": x_hi}
    return x, w, np.zeros(c, np.int32), np.full(c, 1 / 512, np.float32), attrs


@pytest.mark.parametrize("weights, x_hi, total", [
    ([127, 90], 151, 32767),      # the largest sum int16 holds: the int16 path
    ([127, 91], 151, 32918),      # one step above: int32 sums
    ([-128, -19], 223, -32781),   # just below -32768
    ([-128, -127], 255, -65025),  # far below
])
def test_int16_boundary(weights, x_hi, total):
    x, w, b, scale, attrs = _all_at_ceiling(weights, x_hi)
    assert int(dw_sums(x, w, [1, 1], [0, 0, 0, 0], 0, x_hi)[0, 0, 0, 0]) == total
    want = np.rint(np.float32(total) * np.float32(1 / 512)) + 128
    got = run(x, w, b, scale, attrs)
    np.testing.assert_array_equal(got, np.full(got.shape, want, np.uint8))
    np.testing.assert_array_equal(got, reference(x, w, b, scale, **attrs))


@pytest.mark.parametrize("n, c, size, stride, x_max", [(2, 96, 56, 1, 15), (4, 24, 80, 1, 15),
                                                       (2, 40, 120, 2, 255), (1, 17, 130, 1, 15)])
def test_two_threads_give_the_same_bytes(n, c, size, stride, x_max):
    """Layers big enough to be split into runs of output rows across images (4-bit codes
    under a ceiling: int16 sums; 8-bit codes: int32 sums): the same bytes as one thread
    and as the reference."""
    x, w, b, scale, attrs = random_case(np.random.default_rng(c), c, size, size, 3, stride,
                                        x_max=x_max, x_hi=x_max, n=n)
    one = run(x, w, b, scale, attrs, threads=1)
    assert run(x, w, b, scale, attrs, threads=2).tobytes() == one.tobytes()
    np.testing.assert_array_equal(one, reference(x, w, b, scale, **attrs))


def test_portable_loop_gives_the_same_bits(tmp_path: Path):
    """The exact loop (QCONVERT_OPS_PORTABLE=1) against this process's AVX2 loops."""
    rng = np.random.default_rng(3)
    cases = [random_case(rng, 32, 16, 16, 3, 1, x_hi=15),
             random_case(rng, 24, 9, 9, 3, 2, x_max=255, x_zp=128, lo=0, hi=255),
             random_case(rng, 17, 8, 11, (5, 3), (1, 2), x_max=40, x_hi=30, x_zp=4, n=2)]
    here = [run(*case) for case in cases]
    code = (
        "import sys, numpy as np; from tests import test_native_qdepthwise_conv_clamp as t; "
        "d = np.load(sys.argv[1]); v = [d[f'arr_{i}'] for i in range(len(d.files))]; "
        f"attrs = {[case[4] for case in cases]!r}; "
        "sys.stdout.buffer.write(b''.join(t.run(*v[4 * i:4 * i + 4], a).tobytes() "
        "for i, a in enumerate(attrs)))"
    )
    out = portable_run(tmp_path, code, [v for case in cases for v in case[:4]])
    assert out == b"".join(y.tobytes() for y in here)


GOOD = {"group": 4, "strides": [1, 1], "pads": [1, 1, 1, 1], "lo": 0, "hi": 15}


def _weights(c=4, k=3):
    return (np.ones((c, 1, k, k), np.int8), np.zeros(c, np.int32), np.ones(c, np.float32))


def _refusal(fn) -> str:
    with pytest.raises(Exception) as err:  # noqa: PT011 - ORT raises its own classes
        fn()
    message = str(err.value)
    assert f"qconvert::{OP} node '{NODE}'" in message and "\n" not in message.strip(), message
    return message


@pytest.mark.parametrize("change, message", [
    ({"group": 2}, "attribute group=2 must equal C = 4"),
    ({"strides": [0, 1]}, "strides[0]=0 outside 1..4"),
    ({"strides": [1, 5]}, "strides[1]=5 outside 1..4"),
    ({"strides": [1]}, "strides needs 2 entries"),
    ({"pads": [1, 1, 1]}, "pads needs 4 entries"),
    ({"pads": [3, 1, 1, 1]}, "pads must be smaller than the kernel"),
    ({"lo": 16}, "hi=15 outside 16..255"),
    ({"zero_point": 300}, "zero_point=300 outside 0..255"),
    ({"x_zero_point": -1}, "x_zero_point=-1 outside 0..255"),
    ({"x_hi": 256}, "x_hi=256 outside 0..255"),
    ({"x_zero_point": 8, "x_hi": 7}, "x_hi=7 outside 8..255"),
])
def test_refuses_bad_attributes(change, message):
    w, b, s = _weights()
    assert message in _refusal(lambda: session(model(w, b, s, {**GOOD, **change})))


@pytest.mark.parametrize("what, message", [
    ("w_input", "input W must be a constant initializer"),
    ("w_not_depthwise", "W must be [C, 1, kH, kW], got shape [4, 2, 3, 3]"),
    ("bias_len", "B and scale need C = 4 elements"),
    ("nan_scale", "scale[0] is not finite"),
    ("big_bias", "B[0] = 1073741824 is outside (-2^30, 2^30)"),
    ("big_kernel", "W kernel height=12 outside 1..11"),
])
def test_refuses_bad_constants(what, message):
    w, b, s = _weights()
    if what == "w_not_depthwise":
        w = np.ones((4, 2, 3, 3), np.int8)
    elif what == "bias_len":
        b = np.zeros(3, np.int32)
    elif what == "nan_scale":
        s = np.array([np.nan, 1, 1, 1], np.float32)
    elif what == "big_bias":
        b = np.array([1 << 30, 0, 0, 0], np.int32)
    elif what == "big_kernel":
        w = np.ones((4, 1, 12, 3), np.int8)
    const_w = what != "w_input"
    assert message in _refusal(lambda: session(model(w, b, s, GOOD, const_w=const_w)))


@pytest.mark.parametrize("x_shape, message", [
    ((1, 8, 8, 3), "X has 3 channels (its last dimension), W expects C = 4"),
    ((1, 4, 8, 8), "X has 8 channels"),  # NCHW by mistake
    ((8, 8, 4), "X must be [N, H, W, C]"),
    ((1, 1, 8, 4), "is smaller than the kernel [3, 3] after padding"),
    ((1, 0, 8, 4), "is smaller than the kernel"),
    ((1, 1 << 21, 1, 4), "is larger than 2^20 in H or W"),
])
def test_refuses_bad_inputs_at_run_time(x_shape, message):
    w, b, s = _weights()
    sess = session(model(w, b, s, {**GOOD, "pads": [0, 1, 0, 1]}))
    x = np.zeros(x_shape, np.uint8)
    assert message in _refusal(lambda: sess.run(None, {"X": x}))
