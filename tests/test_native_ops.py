"""The native kernels (custom_ops/, libqconvert_ops.so) against docs/ops.md.

Expectations come from the shared test vectors and numpy references in
qconvert.ops (written from the spec, independently of the C++), plus a few
values worked out by hand. Every comparison is bit-exact (NaN == NaN).

QCONVERT_OPS_LIB selects the library (the sanitizer test points it at the
ASan build); QCONVERT_OPS_PORTABLE=1 makes the kernels skip their AVX2 loops.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qconvert import native
from qconvert.ops import DOMAIN_VERSION, INTEGER_OPS, OPS, SUPPORTED_DOMAIN_VERSIONS, vectors
from qconvert.ops.packing import pack_codes

INPUT_NAMES = {
    "CompandQuant": ["X", "alpha", "slopes", "offsets", "levels"],
    "AdaptiveStep": ["X", "step", "beta"],
    "UniformQuant": ["X", "step"],
    "LutGather": ["codes", "table"],
    "Pow2Shift": ["codes", "alpha"],
    "SampleMaxQuant": ["X"],
    "QConvClamp": ["X", "W", "B", "scale"],
    "QDepthwiseConvClamp": ["X", "W", "B", "scale"],
}
# Which inputs become initializers in "const" mode: the parameters of the
# activation ops, everything for the weight-decode ops (their cached path).
CONST_INPUTS = {
    "CompandQuant": {"alpha", "slopes", "offsets", "levels"},
    "AdaptiveStep": {"step", "beta"},
    "UniformQuant": {"step"},
    "LutGather": {"codes", "table"},
    "Pow2Shift": {"codes", "alpha"},
    "SampleMaxQuant": set(),
    "QConvClamp": {"W", "B", "scale"},  # the kernel packs W at load: always constant
    "QDepthwiseConvClamp": {"W", "B", "scale"},  # likewise
}
NODE = "node_under_test"


def require_library():
    path = native.library_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("libqconvert_ops.so is not built (make ops)")
        pytest.skip("libqconvert_ops.so is not built: run `make ops`")
    return path


def elem_type(a: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(a.dtype)


def model_bytes(
    op: str,
    inputs: list[np.ndarray],
    attrs: dict,
    const: set[str] = frozenset(),
    input_names: list[str] | None = None,
    domain_version: int = DOMAIN_VERSION,
) -> bytes:
    """A one-node model; inputs named in ``const`` are initializers, the rest graph inputs."""
    names = input_names or INPUT_NAMES[op][: len(inputs)]
    graph_inputs = [
        helper.make_tensor_value_info(n, elem_type(a), None)
        for n, a in zip(names, inputs, strict=True)
        if n not in const
    ]
    inits = [
        numpy_helper.from_array(a, n) for n, a in zip(names, inputs, strict=True) if n in const
    ]
    node = helper.make_node(op, names, ["Y"], domain="qconvert", name=NODE, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        graph_inputs,
        [helper.make_tensor_value_info(
            "Y", TensorProto.UINT8 if op in INTEGER_OPS else TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 20),
            helper.make_opsetid("qconvert", domain_version),
        ],
    )
    model.ir_version = 10
    return model.SerializeToString()


def session(model: bytes, threads: int = 1) -> ort.InferenceSession:
    require_library()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 4  # expected errors need not be logged
    native.register(so)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def run_op(
    op: str, inputs: list[np.ndarray], attrs: dict, const: set[str] = frozenset(), threads: int = 1
) -> np.ndarray:
    names = INPUT_NAMES[op]
    sess = session(model_bytes(op, inputs, attrs, const), threads)
    feeds = {n: a for n, a in zip(names, inputs, strict=True) if n not in const}
    return sess.run(None, feeds)[0]


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same shape, dtype and values; NaN equals NaN; +0 equals -0 (docs/ops.md allows it).
    float32 out, uint8 for the integer ops."""
    assert actual.dtype == (np.uint8 if expected.dtype == np.uint8 else np.float32)
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected.astype(actual.dtype), strict=False)


# --------------------------------------------------------------- shared vectors


def vector_params():
    for op in INPUT_NAMES:
        for case in vectors.cases(op):
            # The integer ops refuse a fed W (tests/test_native_qconv_clamp.py,
            # tests/test_native_qdepthwise_conv_clamp.py), so const only.
            for mode in ("const",) if op in INTEGER_OPS else ("feed", "const"):
                yield pytest.param(op, case, mode, id=f"{op}-{case.name}-{mode}")


@pytest.mark.parametrize(("op", "case", "mode"), list(vector_params()))
def test_shared_vectors(op, case, mode):
    const = CONST_INPUTS[op] if mode == "const" else set()
    actual = run_op(op, case.inputs, case.attrs, const)
    assert_bits_equal(actual, case.expected)


# ------------------------------------------------------- values worked by hand


def test_adaptive_step_by_hand():
    x = np.array(
        [[0.5, 1.5, 2.5, -0.5, -2.5, 7.4, 100.0, -100.0, np.nan, np.inf, -np.inf]], np.float32
    )
    y = run_op(
        "AdaptiveStep",
        [x, np.array([0.5], np.float32), np.array([2.0], np.float32)],
        {"bits": 4, "signed": 1},
    )
    # s = 1: half-to-even rounding, then clamp to [-8, 7].
    expected = [0.0, 2.0, 2.0, -0.0, -2.0, 7.0, 7.0, -8.0, np.nan, 7.0, -8.0]
    assert_bits_equal(y, np.array([expected], np.float32))


@pytest.mark.parametrize("const", [set(), {"step"}], ids=["feed", "const"])
def test_uniform_quant_by_hand(const):
    x = np.array([[0.25, 0.75, 1.25, -0.25, -4.1, 100.0, -100.0, np.nan, np.inf, -np.inf]],
                 np.float32)
    y = run_op("UniformQuant", [x, np.array([0.5], np.float32)], {"bits": 4, "signed": 1}, const)
    # x / 0.5 = 0.5, 1.5, 2.5, -0.5, -8.2, ...: half-to-even, clamp to [-8, 7], times 0.5.
    expected = [0.0, 1.0, 1.0, -0.0, -4.0, 3.5, -4.0, np.nan, 3.5, -4.0]
    assert_bits_equal(y, np.array([expected], np.float32))
    unsigned = run_op("UniformQuant", [x, np.array([0.5], np.float32)], {"bits": 2, "signed": 0})
    assert_bits_equal(unsigned, np.array([[0.0, 1.0, 1.0, 0.0, 0.0, 1.5, 0.0, np.nan, 1.5, 0.0]],
                                         np.float32))


def test_uniform_quant_divides_instead_of_multiplying_by_the_reciprocal():
    # float32: 1.65 / 0.3 rounds to 5, 1.65 * (1 / 0.3) to 6 (found with numpy float32).
    step = np.float32(0.3)
    x = np.array([np.float32(1.65), np.float32(-1.65)], np.float32)
    assert np.round(x[0] * (np.float32(1) / step)) == 6  # the shortcut would differ
    y = run_op("UniformQuant", [x, np.array([step], np.float32)], {"bits": 8, "signed": 1})
    assert_bits_equal(y, np.array([np.float32(5) * step, np.float32(-5) * step], np.float32))


def random_conv_geometry(rng) -> tuple:
    """A random 2-D convolution's (kernel, strides, pads, H, W) within the conv ops' bounds
    (kernel 1..5, strides 1..4, pads below the kernel, an image no smaller than it)."""
    k = (int(rng.integers(1, 6)), int(rng.integers(1, 6)))
    stride = (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    pad = [int(rng.integers(0, k[0])), int(rng.integers(0, k[1])),
           int(rng.integers(0, k[0])), int(rng.integers(0, k[1]))]
    h = int(rng.integers(max(1, k[0] - pad[0] - pad[2]), 20))
    wd = int(rng.integers(max(1, k[1] - pad[1] - pad[3]), 20))
    return k, stride, pad, h, wd


def portable_run(tmp_path, code: str, arrays: list[np.ndarray]) -> bytes:
    """What ``code`` writes to stdout in a process with QCONVERT_OPS_PORTABLE=1 (the
    kernels' exact loops), the repository on its path; ``arrays`` reach it as the .npz file
    sys.argv[1] (arr_0, arr_1, ...)."""
    path = tmp_path / "portable_inputs.npz"
    np.savez(path, *arrays)
    env = dict(os.environ, QCONVERT_OPS_PORTABLE="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code, str(path)], env=env, cwd=root,
                          capture_output=True, check=True).stdout


def test_uniform_quant_avx2_and_portable_loops_agree(tmp_path):
    """The same input through a process with QCONVERT_OPS_PORTABLE=1 gives the same bits."""
    rng = np.random.default_rng(12)
    step = np.float32(0.0137)
    ties = (np.arange(-128, 127, dtype=np.float32) + np.float32(0.5)) * step
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-40, 3.4e38], np.float32)
    x = np.concatenate([ties, special, rng.standard_normal(70_001).astype(np.float32)])
    attrs = {"bits": 8, "signed": 1}
    here = run_op("UniformQuant", [x, np.array([step], np.float32)], attrs)
    assert_bits_equal(here, OPS["UniformQuant"].reference(x, np.array([step]), **attrs))
    code = (
        "import sys, numpy as np\n"
        "from tests.test_native_ops import run_op\n"
        "x = np.load(sys.argv[1])['arr_0']\n"
        f"y = run_op('UniformQuant', [x, np.array([{float(step)!r}], np.float32)], {attrs!r})\n"
        "sys.stdout.buffer.write(y.tobytes())\n"
    )
    portable = np.frombuffer(portable_run(tmp_path, code, [x]), np.float32)
    np.testing.assert_array_equal(portable.view(np.uint32), here.view(np.uint32))


@pytest.mark.parametrize("version", SUPPORTED_DOMAIN_VERSIONS)
@pytest.mark.parametrize("op", ["CompandQuant", "AdaptiveStep", "LutGather", "Pow2Shift"])
def test_ops_serve_every_supported_domain_version(op, version):
    """Models importing version 1 (exported before UniformQuant) or 2 bind to the kernels:
    the one-node models carry no function body, so only a kernel can run them."""
    (case, *_) = vectors.cases(op)
    names = INPUT_NAMES[op]
    sess = session(model_bytes(op, case.inputs, case.attrs, domain_version=version))
    actual = sess.run(None, dict(zip(names, case.inputs, strict=True)))[0]
    assert_bits_equal(actual, case.expected)


def test_sample_max_quant_needs_domain_version_3():
    x = np.array([[1.0, -0.5, 0.25]], np.float32)
    attrs = {"bits": 8, "signed": 1}
    y = session(model_bytes("SampleMaxQuant", [x], attrs, domain_version=3)).run(
        None, {"X": x})[0]
    assert_bits_equal(y, vectors.OPS["SampleMaxQuant"].reference(x, **attrs))
    with pytest.raises(Exception, match="SampleMaxQuant"):  # noqa: B017
        session(model_bytes("SampleMaxQuant", [x], attrs, domain_version=2))


def test_qconv_clamp_needs_domain_version_4():
    (case, *_) = vectors.cases("QConvClamp")
    const = CONST_INPUTS["QConvClamp"]
    y = session(model_bytes("QConvClamp", case.inputs, case.attrs, const, domain_version=4)).run(
        None, {"X": case.inputs[0]})[0]
    assert_bits_equal(y, case.expected)
    with pytest.raises(Exception, match="QConvClamp"):  # noqa: B017
        session(model_bytes("QConvClamp", case.inputs, case.attrs, const, domain_version=3))


def test_qdepthwise_conv_clamp_needs_domain_version_5():
    (case, *_) = vectors.cases("QDepthwiseConvClamp")
    const = CONST_INPUTS["QDepthwiseConvClamp"]
    y = session(model_bytes("QDepthwiseConvClamp", case.inputs, case.attrs, const,
                            domain_version=5)).run(None, {"X": case.inputs[0]})[0]
    assert_bits_equal(y, case.expected)
    with pytest.raises(Exception, match="QDepthwiseConvClamp"):  # noqa: B017
        session(model_bytes("QDepthwiseConvClamp", case.inputs, case.attrs, const,
                            domain_version=4))


def test_compand_mirror_and_clip_by_hand():
    """Identity compressor, 2 bits unsigned (levels 0, 1/3, 2/3, 1 times alpha = 3): the
    magnitude is quantized and the sign restored (mirror); at |x| >= alpha exactly alpha
    (clip), where the table's top level here is alpha * 1 anyway, so use a table whose top
    entry differs from alpha to see the clip."""
    slopes, offsets = np.ones(1, np.float32), np.zeros(1, np.float32)
    levels = np.array([0.0, 1.0, 2.0, 2.9], np.float32)  # top entry deliberately not alpha
    alpha = np.array([3.0], np.float32)
    x = np.array([[-3.5, -3.0, -1.4, 0.0, 1.6, 2.9, 3.0, 7.0]], np.float32)
    attrs = {"bits": 2, "signed": 0, "mirror": 1, "clip": 1}
    y = run_op("CompandQuant", [x, alpha, slopes, offsets, levels], attrs)
    assert_bits_equal(y, np.array([[-3.0, -3.0, -1.0, 0.0, 2.0, 2.9, 3.0, 3.0]], np.float32))
    plain = run_op("CompandQuant", [x, alpha, slopes, offsets, levels], {"bits": 2, "signed": 0})
    assert_bits_equal(plain, np.array([[0, 0, 0, 0, 2.0, 2.9, 2.9, 2.9]], np.float32))
    with pytest.raises(Exception, match="mirror=1 needs signed=0"):  # noqa: B017
        run_op("CompandQuant", [x, alpha, slopes, offsets, levels[:2]],
               {"bits": 2, "signed": 1, "mirror": 1})


def test_uniform_quant_needs_domain_version_2():
    x, step = np.ones((1, 3), np.float32), np.array([0.5], np.float32)
    attrs = {"bits": 4, "signed": 0}
    y = session(model_bytes("UniformQuant", [x, step], attrs, domain_version=2)).run(
        None, {"X": x, "step": step})[0]
    assert_bits_equal(y, np.full((1, 3), 1.0, np.float32))
    with pytest.raises(Exception, match="UniformQuant"):  # noqa: B017
        session(model_bytes("UniformQuant", [x, step], attrs, domain_version=1))


def test_lut_gather_by_hand():
    # 3-bit codes, least significant bit first; code 5 (0b101) straddles bytes 1 and 2.
    codes = np.array([0, 1, 2, 3, 4, 5, 7, 6], np.int64)
    packed = pack_codes(codes, 3)
    assert packed.tolist() == [0b10001000, 0b11000110, 0b11011110]
    table = np.arange(8, dtype=np.float32) * 10
    y = run_op("LutGather", [packed, table], {"bits": 3, "shape": [2, 4]})
    assert_bits_equal(y, np.array([[0, 10, 20, 30], [40, 50, 70, 60]], np.float32))


def test_pow2_shift_by_hand():
    # 3 bits: the sign is bit 2, magnitude m = 0..3, M = 3, e = M - m; alpha = 2.
    codes = pack_codes(np.arange(8), 3)
    alpha = np.array([2.0], np.float32)
    y1 = run_op("Pow2Shift", [codes, alpha], {"bits": 3, "root": 1, "shape": [8]})
    # e = 2, 1, 0 -> 1/4, 1/2, 1.
    assert_bits_equal(y1, np.array([0, 0.5, 1, 2, -0.0, -0.5, -1, -2], np.float32))
    assert np.signbit(y1[4]) and not np.signbit(y1[0])  # m = 0 with the sign bit: -0.0
    y2 = run_op("Pow2Shift", [codes, alpha], {"bits": 3, "root": 2, "shape": [8]})
    # e = 2 -> 2^-1, e = 1 (odd) -> r = float32(sqrt(1/2)), e = 0 -> 1.
    two_r = np.float32(2) * np.float32(np.sqrt(0.5))
    assert_bits_equal(y2, np.array([0, 1, two_r, 2, -0.0, -1, -two_r, -2], np.float32))


def test_compand_identity_compressor_by_hand():
    # K = 1 with slope 1, offset 0: f = v, j = round(v * S); levels = j so y = j * sign(x).
    bits, S = 3, 3
    levels = np.arange(S + 1, dtype=np.float32)
    x = np.array([[0.0, 1 / 6, 0.5, 5 / 6, 1.0, 2.0, -0.5, -5 / 6, np.nan]], np.float32)
    y = run_op(
        "CompandQuant",
        [x, np.array([1.0], np.float32), np.ones(1, np.float32), np.zeros(1, np.float32), levels],
        {"bits": bits, "signed": 1},
    )
    # v * 3 = 0, 0.5 (tie -> 0), 1.5 (tie -> 2), 2.5 (tie -> 2), 3, 3, 1.5, 2.5.
    f = x.astype(np.float32)[0, :8] * np.float32(3)
    assert f[1] == np.float32(0.5) and f[2] == np.float32(1.5)
    assert_bits_equal(y, np.array([[0, 0, 2, 2, 3, 3, -2, -2, np.nan]], np.float32))


# ------------------------------------------- shapes, threads, chunk boundaries


def lcq_inputs(rng, bits: int, signed: int, K: int, alpha: float = 1.3):
    theta = rng.standard_normal(K).astype(np.float32)
    p = np.exp(theta) / np.exp(theta).sum(dtype=np.float32)
    slopes = (np.float32(K) * p).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(p)[:-1]]).astype(np.float32)
    S = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    levels = np.sort(rng.uniform(0, alpha, S + 1)).astype(np.float32)
    levels[0] = 0
    return np.array([alpha], np.float32), slopes, offsets, levels


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 7), (2, 40_003), (5, 1, 65_537)])
def test_activation_ops_odd_shapes_and_threads(shape, threads):
    rng = np.random.default_rng(sum(shape) + threads)
    x = (rng.standard_normal(shape) * 2).astype(np.float32)
    x.reshape(-1)[::97] = np.nan
    for bits, signed in ((2, 0), (4, 1), (8, 0), (7, 1)):
        params = lcq_inputs(rng, bits, signed, K=int(rng.integers(1, 40)))
        inputs = [x, *params]
        attrs = {"bits": bits, "signed": signed}
        assert_bits_equal(
            run_op("CompandQuant", inputs, attrs, threads=threads),
            OPS["CompandQuant"].reference(*inputs, **attrs),
        )
        beta = rng.uniform(0.5, 3, shape[0]).astype(np.float32)
        inputs = [x, np.array([0.05], np.float32), beta]
        assert_bits_equal(
            run_op("AdaptiveStep", inputs, attrs, threads=threads),
            OPS["AdaptiveStep"].reference(*inputs, **attrs),
        )
        inputs = [x, np.array([0.05], np.float32)]
        for const in (set(), CONST_INPUTS["UniformQuant"]):
            assert_bits_equal(
                run_op("UniformQuant", inputs, attrs, const, threads=threads),
                OPS["UniformQuant"].reference(*inputs, **attrs),
            )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [[1], [3, 7], [17, 3, 3, 3], [2, 70_001], [300, 1100]])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_decode_ops_odd_shapes_and_threads(shape, bits, threads):
    rng = np.random.default_rng(bits * 1000 + len(shape))
    n = int(np.prod(shape))
    codes = rng.integers(0, 2**bits, n)
    packed = np.concatenate([pack_codes(codes, bits), rng.integers(0, 256, 3).astype(np.uint8)])
    for table in (rng.standard_normal(2**bits), rng.standard_normal((shape[0], 2**bits))):
        table = table.astype(np.float32)
        for const in (set(), {"codes", "table"}):
            inputs = [packed, table]
            attrs = {"bits": bits, "shape": shape}
            assert_bits_equal(
                run_op("LutGather", inputs, attrs, const, threads),
                OPS["LutGather"].reference(*inputs, **attrs),
            )
    if bits >= 2:
        for alpha in (np.array([0.3], np.float32), rng.uniform(1e-3, 4, shape[0])):
            inputs = [packed, alpha.astype(np.float32)]
            attrs = {"bits": bits, "root": 2, "shape": shape}
            assert_bits_equal(
                run_op("Pow2Shift", inputs, attrs, threads=threads),
                OPS["Pow2Shift"].reference(*inputs, **attrs),
            )


def test_every_float_class_through_compand_and_adaptive():
    """Denormals, signed zeros, huge values and exact .5 ties, all bit widths."""
    rng = np.random.default_rng(7)
    tiny = np.array([1e-45, -1e-45, 1e-40, -1e-40, 1.17e-38, 0.0, -0.0], np.float32)
    big = np.array([3.4e38, -3.4e38, np.inf, -np.inf, np.nan], np.float32)
    for bits in range(2, 9):
        for signed in (0, 1):
            alpha, slopes, offsets, levels = lcq_inputs(rng, bits, signed, K=16, alpha=1e-39)
            x = np.concatenate([tiny, big, rng.standard_normal(51).astype(np.float32) * 1e-39])
            inputs = [x.reshape(3, -1), alpha, slopes, offsets, levels]
            attrs = {"bits": bits, "signed": signed}
            assert_bits_equal(
                run_op("CompandQuant", inputs, attrs),
                OPS["CompandQuant"].reference(*inputs, **attrs),
            )
            s = np.float32(1e-40)  # a denormal step
            lo, hi = OPS["AdaptiveStep"].code_range(bits, signed)
            ties = (np.arange(lo, hi, dtype=np.float32) + np.float32(0.5)) * np.float32(0.25)
            x2 = np.concatenate([tiny, big, ties]).reshape(1, -1)
            for step in (np.float32(0.25), s):
                inputs = [x2, np.array([step], np.float32), np.array([1.0], np.float32)]
                assert_bits_equal(
                    run_op("AdaptiveStep", inputs, attrs),
                    OPS["AdaptiveStep"].reference(*inputs, **attrs),
                )


def test_invalid_compressor_stays_in_bounds_and_matches_reference():
    """Negative or NaN slopes break monotonicity; the kernels must still follow the formula."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 1000)).astype(np.float32) * 2
    for slopes in (
        np.array([3.0, -2.0, 5.0, -40.0], np.float32),
        np.array([1.0, np.nan, np.inf, 1.0], np.float32),
    ):
        offsets = np.array([0.0, 0.9, -3.0, 0.5], np.float32)
        for bits, signed in ((3, 1), (4, 0), (8, 0)):
            S = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
            levels = rng.standard_normal(S + 1).astype(np.float32)
            inputs = [x, np.array([1.5], np.float32), slopes, offsets, levels]
            attrs = {"bits": bits, "signed": signed}
            assert_bits_equal(
                run_op("CompandQuant", inputs, attrs),
                OPS["CompandQuant"].reference(*inputs, **attrs),
            )


def exact_level_changes(op_ref, x_sorted: np.ndarray) -> np.ndarray:
    """The least floats at which the reference output changes, found by bisection
    on bit patterns between neighbours of a sorted positive sweep."""
    y = op_ref(x_sorted)
    i = np.nonzero(y[1:] != y[:-1])[0]
    lo, hi = x_sorted[i].view(np.uint32).copy(), x_sorted[i + 1].view(np.uint32).copy()
    y_lo = op_ref(x_sorted[i])
    while np.any(hi - lo > 1):
        mid = lo + (hi - lo) // 2
        same = op_ref(mid.view(np.float32)) == y_lo
        lo, hi = np.where(same, mid, lo), np.where(same, hi, mid)
    return hi.view(np.float32)


@pytest.mark.parametrize(
    ("bits", "signed", "K"),
    [(2, 0, 16), (3, 1, 16), (4, 1, 5), (4, 0, 16), (5, 1, 16), (3, 0, 1), (6, 1, 16), (5, 0, 7)],
)
def test_compand_at_every_level_change(bits, signed, K):
    """Each float where the output steps, and 3 ulps either side, fed (one run
    big enough to take the step-threshold path) and as initializers."""
    rng = np.random.default_rng(bits * 100 + signed * 10 + K)
    params = list(lcq_inputs(rng, bits, signed, K))
    attrs = {"bits": bits, "signed": signed}

    def ref(x):
        return OPS["CompandQuant"].reference(x, *params, **attrs)

    a = params[0][0]
    sweep = np.sort(rng.uniform(0, 1.2 * a, 200_000).astype(np.float32))
    edges = exact_level_changes(ref, sweep)
    assert edges.size >= 2 ** (bits - 1) - 2  # most levels are reached
    ulps = (edges.view(np.int32)[:, None] + np.arange(-3, 4)).reshape(-1)
    points = ulps[ulps >= 0].view(np.float32)
    x = np.concatenate([points, -points, sweep, -sweep[::7], [0, -0.0, np.nan, np.inf, -np.inf]])
    x = x.astype(np.float32).reshape(1, -1)
    assert x.size >= 65_536
    expected = OPS["CompandQuant"].reference(x, *params, **attrs)
    for const in (set(), CONST_INPUTS["CompandQuant"]):
        for threads in (1, 2):
            actual = run_op("CompandQuant", [x, *params], attrs, const, threads)
            assert_bits_equal(actual, expected)


@pytest.mark.parametrize("op", ["CompandQuant", "AdaptiveStep", "UniformQuant"])
def test_empty_activations(op):
    rng = np.random.default_rng(9)
    for shape in ((0,), (0, 3), (2, 0, 5)):
        x = np.zeros(shape, np.float32)
        if op == "CompandQuant":
            inputs = [x, *lcq_inputs(rng, 4, 1, K=4)]
            attrs = {"bits": 4, "signed": 1}
        elif op == "AdaptiveStep":
            inputs = [x, np.array([0.1], np.float32), np.ones(shape[0], np.float32)]
            attrs = {"bits": 4, "signed": 0}
        else:
            inputs = [x, np.array([0.1], np.float32)]
            attrs = {"bits": 4, "signed": 0}
        y = run_op(op, inputs, attrs)
        assert y.shape == shape and y.dtype == np.float32


def test_constant_weights_are_decoded_once():
    """With constant inputs the output is the cached decode; a second run gives the same."""
    rng = np.random.default_rng(10)
    codes = rng.integers(0, 16, 4096)
    table = rng.standard_normal((64, 16)).astype(np.float32)
    inputs = [pack_codes(codes, 4), table]
    attrs = {"bits": 4, "shape": [64, 64]}
    sess = session(model_bytes("LutGather", inputs, attrs, {"codes", "table"}))
    first, second = sess.run(None, {})[0], sess.run(None, {})[0]
    expected = OPS["LutGather"].reference(*inputs, **attrs)
    assert_bits_equal(first, expected)
    assert_bits_equal(second, expected)
    first[:] = 0  # the caller owns its output; the cache must not be shared with it
    assert_bits_equal(sess.run(None, {})[0], expected)


# ------------------------------------------------------------------ error paths


def lcq_good():
    return [
        np.ones((2, 3), np.float32),
        np.array([1.0], np.float32),
        np.ones(4, np.float32),
        np.zeros(4, np.float32),
        np.zeros(8, np.float32),
    ]


def packed(n, bits):
    return pack_codes(np.zeros(n, np.int64), bits)


# (op, inputs, attrs, message fragment)
ERROR_CASES = [
    ("UniformQuant", [np.ones(3, np.float32), np.ones(2, np.float32)], {"bits": 4, "signed": 1},
     "step has 2 elements, expected 1"),
    ("UniformQuant", [np.ones(3, np.float32), np.ones(0, np.float32)], {"bits": 4, "signed": 1},
     "step has 0 elements, expected 1"),
    ("UniformQuant", [np.ones(3, np.float32), np.ones(1, np.float32)], {"bits": 1, "signed": 0},
     "bits=1 outside 2..8"),
    ("UniformQuant", [np.ones(3, np.float32), np.ones(1, np.float32)], {"bits": 9, "signed": 0},
     "bits=9 outside 2..8"),
    ("UniformQuant", [np.ones(3, np.float32), np.ones(1, np.float32)], {"bits": 4, "signed": 2},
     "signed=2 outside 0..1"),
    ("UniformQuant", [np.ones(3, np.float32), np.ones(1, np.float32)], {"signed": 0},
     "attribute 'bits' missing"),
    ("CompandQuant", lcq_good(), {"bits": 1, "signed": 1}, "bits=1 outside 2..8"),
    ("CompandQuant", lcq_good(), {"bits": 9, "signed": 1}, "bits=9 outside 2..8"),
    ("CompandQuant", lcq_good(), {"bits": 4, "signed": 2}, "signed=2 outside 0..1"),
    ("CompandQuant", lcq_good(), {"bits": 4}, "attribute 'signed' missing"),
    (
        "CompandQuant",
        lcq_good(),
        {"bits": 4, "signed": 0},
        "levels has 8 elements, expected S + 1 = 16",
    ),
    (
        "CompandQuant",
        lcq_good()[:1] + [np.ones(2, np.float32)] + lcq_good()[2:],
        {"bits": 4, "signed": 1},
        "alpha has 2 elements",
    ),
    (
        "CompandQuant",
        lcq_good()[:3] + [np.zeros(3, np.float32), lcq_good()[4]],
        {"bits": 4, "signed": 1},
        "slopes has 4 elements but offsets has 3",
    ),
    (
        "CompandQuant",
        lcq_good()[:2] + [np.zeros(0, np.float32)] * 2 + lcq_good()[4:],
        {"bits": 4, "signed": 1},
        "slopes is empty",
    ),
    (
        "AdaptiveStep",
        [np.ones((3, 2), np.float32), np.ones(1, np.float32), np.ones(2, np.float32)],
        {"bits": 4, "signed": 1},
        "beta has 2 elements",
    ),
    (
        "AdaptiveStep",
        [np.ones((3, 2), np.float32), np.ones(2, np.float32), np.ones(3, np.float32)],
        {"bits": 4, "signed": 1},
        "step has 2 elements",
    ),
    (
        "AdaptiveStep",
        [np.array(1.0, np.float32), np.ones(1, np.float32), np.ones(1, np.float32)],
        {"bits": 4, "signed": 1},
        "rank >= 1",
    ),
    (
        "AdaptiveStep",
        [np.ones(3, np.float32), np.ones(1, np.float32), np.ones(3, np.float32)],
        {"bits": 0, "signed": 1},
        "bits=0 outside 2..8",
    ),
    (
        "LutGather",
        [packed(6, 3), np.ones(8, np.float32)],
        {"bits": 0, "shape": [6]},
        "bits=0 outside 1..8",
    ),
    (
        "LutGather",
        [packed(6, 3), np.ones(8, np.float32)],
        {"bits": 3, "shape": [2, 0]},
        "has an entry < 1",
    ),
    ("LutGather", [packed(6, 3), np.ones(8, np.float32)], {"bits": 3}, "attribute 'shape' missing"),
    (
        "LutGather",
        [packed(6, 3), np.ones(8, np.float32)],
        {"bits": 3, "shape": [1 << 40, 1 << 20]},
        "more than 2^48 elements",
    ),
    (
        "LutGather",
        [packed(6, 3)[:2], np.ones(8, np.float32)],
        {"bits": 3, "shape": [7]},
        "codes has 2 bytes, 7 codes of 3 bits need 3",
    ),
    (
        "LutGather",
        [pack_codes(np.array([0, 1, 5]), 3), np.ones(5, np.float32)],
        {"bits": 3, "shape": [3]},
        "code 5 at element 2 is out of range for a table of 5 levels",
    ),
    (
        "LutGather",
        [packed(6, 3), np.ones(9, np.float32)],
        {"bits": 3, "shape": [6]},
        "more than 2^bits = 8",
    ),
    (
        "LutGather",
        [packed(6, 3), np.ones((3, 8), np.float32)],
        {"bits": 3, "shape": [2, 3]},
        "has 3 rows, the output shape [2, 3] has C = 2",
    ),
    (
        "LutGather",
        [packed(6, 3), np.ones((1, 2, 8), np.float32)],
        {"bits": 3, "shape": [6]},
        "table must be [L] or [C, L]",
    ),
    (
        "LutGather",
        [packed(8, 3).reshape(3, 1), np.ones(8, np.float32)],
        {"bits": 3, "shape": [6]},
        "codes must be 1-D",
    ),
    (
        "LutGather",
        [packed(6, 3), np.ones(0, np.float32)],
        {"bits": 3, "shape": [6]},
        "out of range for a table of 0 levels",
    ),
    (
        "Pow2Shift",
        [packed(6, 3), np.ones(1, np.float32)],
        {"bits": 1, "root": 1, "shape": [6]},
        "bits=1 outside 2..8",
    ),
    (
        "Pow2Shift",
        [packed(6, 3), np.ones(1, np.float32)],
        {"bits": 3, "root": 3, "shape": [6]},
        "root=3 outside 1..2",
    ),
    (
        "Pow2Shift",
        [packed(6, 3), np.ones(3, np.float32)],
        {"bits": 3, "root": 1, "shape": [2, 3]},
        "alpha has 3 elements, expected 1 or C = 2",
    ),
    (
        "Pow2Shift",
        [packed(6, 3)[:1], np.ones(1, np.float32)],
        {"bits": 3, "root": 1, "shape": [6]},
        "codes has 1 bytes",
    ),
]


def error_params():
    for i, (op, inputs, attrs, fragment) in enumerate(ERROR_CASES):
        for mode in ("feed", "const"):
            yield pytest.param(op, inputs, attrs, fragment, mode, id=f"{i}-{op}-{mode}")


@pytest.mark.parametrize(("op", "inputs", "attrs", "fragment", "mode"), list(error_params()))
def test_errors_name_node_and_problem(op, inputs, attrs, fragment, mode):
    """Bad attributes fail at session creation; bad inputs at creation when they are
    initializers, else at run; either way the message names the node and the problem."""
    with pytest.raises(Exception) as info:  # noqa: B017 - ORT raises its own classes
        run_op(op, inputs, attrs, CONST_INPUTS[op] if mode == "const" else set())
    message = str(info.value)
    assert f"qconvert::{op} node '{NODE}'" in message, message
    assert fragment in message, message


def test_wrong_input_type_is_refused():
    x = np.ones((2, 2), np.float64)
    model = model_bytes(
        "AdaptiveStep",
        [x, np.ones(1, np.float32), np.ones(2, np.float32)],
        {"bits": 4, "signed": 1},
    )
    with pytest.raises(Exception, match=NODE):  # noqa: B017
        session(model).run(
            None, {"X": x, "step": np.ones(1, np.float32), "beta": np.ones(2, np.float32)}
        )


def test_register_reports_missing_library(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_VAR, str(tmp_path / "missing.so"))
    assert native.library_path() is None
    with pytest.raises(FileNotFoundError, match="make ops"):
        native.register(ort.SessionOptions())
