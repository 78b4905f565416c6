"""Integer / LUT deployment mode (qconvert.export.integer): graph shape, an independent
numpy emulation of the integer arithmetic, agreement with PyTorch, runtimes, file size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import qconvert
from qconvert import manifest
from qconvert.archs import build_architecture
from qconvert.calib import CalibData, load_calibration
from qconvert.errors import QConvertError
from qconvert.export.integer import integer_details, lut_bytes, to_integer
from qconvert.export.onnx_export import build_onnx
from qconvert.integer_search import choose_outer_bits
from qconvert.native import library_path
from qconvert.ops import compand_quant, lut_gather, pow2_shift
from qconvert.quant import quantize_model
from qconvert.runtime import session
from qconvert.validate import validate, with_extra_outputs

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "models" / "data" / "digits_calib.npz"
SCHEMES = ("lcq", "asq-post", "asq-lsq", "lsq", "pot")
SQRT_HALF = np.float32(math.sqrt(0.5))
SHAPE = (1, 8, 8)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """Real digits when the calibration split is there, else separable synthetic blobs."""
    if CALIB.is_file():
        with np.load(CALIB) as data:
            return data["x"].astype(np.float32), data["y"].astype(np.int64)
    rng = np.random.default_rng(0)
    templates = rng.random((10, *SHAPE), dtype=np.float32)
    y = rng.integers(0, 10, 300)
    x = np.clip(templates[y] + 0.15 * rng.standard_normal((300, *SHAPE)), 0, 1)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return _digits()


class Trained:
    def __init__(self, scheme: str, root: Path, x: np.ndarray, y: np.ndarray) -> None:
        torch.manual_seed(0)
        mean, std = (float(x.mean()),), (float(x.std()),)
        model = build_architecture("digits_cnn", {"in_channels": 1})
        quantize_model(model, scheme, 4, 4)
        model.train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny model: one thread is faster on a shared machine
        try:
            model(torch.rand(16, *SHAPE))  # initialises the quantizers
            xs = torch.from_numpy((x - mean[0]) / std[0])
            ys = torch.from_numpy(y)
            opt = torch.optim.Adam(model.parameters(), lr=2e-3)
            gen = torch.Generator().manual_seed(1)
            for _ in range(40):  # confident logits, so that agreement means something
                idx = torch.randint(0, len(xs), (32,), generator=gen)
                loss = F.cross_entropy(model(xs[idx]), ys[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(threads)
        model.eval()
        self.path = root / f"{scheme}.pt"
        qconvert.save_checkpoint(self.path, model, arch="digits_cnn",
                                 arch_kwargs={"in_channels": 1}, input_shape=SHAPE,
                                 mean=mean, std=std)
        self.ckpt = qconvert.load_checkpoint(self.path)
        self.exact, _ = build_onnx(self.ckpt)
        self.data = CalibData(x=x, y=y, source="test digits")
        self.mean, self.std = mean, std
        self._integer: dict[int, onnx.ModelProto] = {}

    def integer(self, bits: int) -> onnx.ModelProto:
        if bits not in self._integer:
            self._integer[bits] = to_integer(self.exact, bits)
        return self._integer[bits]

    def inputs(self, n: int = 64) -> np.ndarray:
        return ((self.data.x[:n] - self.mean[0]) / self.std[0]).astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("integer")
    cache: dict[str, Trained] = {}

    def get(scheme: str) -> Trained:
        if scheme not in cache:
            cache[scheme] = Trained(scheme, root, *digits)
        return cache[scheme]

    return get


def _function(model):
    return session(model, "function", announce=None)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ------------------------------------------------------------------ graph


@pytest.mark.parametrize("scheme", SCHEMES)
def test_integer_graph_replaces_every_quantized_layer(trained, scheme):
    case = trained(scheme)
    model = case.integer(8)
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    post = scheme == "asq-post"  # two integer convolutions per POST layer
    assert ops.count("ConvInteger") == (5 if post else 3) and ops.count("MatMulInteger") == 1
    assert "Conv" not in ops
    inits = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gemm":  # only the float ASQ adapters remain
            assert node.input[1] in inits and "adapter" in node.input[1]
    assert not {"Pow2Shift", "AdaptiveStep"} & set(ops)  # folded into tables / standard ops
    man = manifest.read(model)
    assert man.mode == "integer" and man.outer_bits == 8
    details = integer_details(model)
    assert set(details) == {"features.0", "features.3", "features.7", "classifier"}
    assert lut_bytes(model) == sum(d["lut_bytes"] for d in details.values()) > 0
    assert all(not r.act_nodes and not r.weight.nodes for r in man.layers)
    for name in ("features.0/out", "features.3/out", "features.7/out", "output"):
        assert name in {o for n in model.graph.node for o in n.output}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_weights_stay_packed(trained, scheme):
    case = trained(scheme)
    exact_inits, int_inits = _inits(case.exact), _inits(case.integer(8))
    codes = [r.weight.codes for r in manifest.read(case.exact).layers]
    assert codes and all(np.array_equal(exact_inits[n], int_inits[n]) for n in codes)
    params = sum(math.prod(n.dims) for n in case.exact.graph.initializer) * 0
    for node in case.exact.graph.node:
        if node.op_type in ("LutGather", "Pow2Shift"):
            params += math.prod(_attrs(node)["shape"])
    # no decoded weight stored: every initializer is far smaller than an FP32 weight copy
    int_bytes = len(case.integer(8).SerializeToString())
    exact_bytes = len(case.exact.SerializeToString())
    assert int_bytes < exact_bytes * 1.35 + 4096, (int_bytes, exact_bytes)
    assert int_bytes < 0.5 * 4 * params


# ------------------------------------------------------------------ numpy emulation


def _layer_nodes(exact: onnx.ModelProto, layer: str):
    producers = {o: n for n in exact.graph.node for o in n.output}
    for node in exact.graph.node:
        if node.op_type in ("Conv", "Gemm") and node.input[1] in producers:
            decode = producers[node.input[1]]
            if decode.input[0] == manifest.read(exact).layer(layer).weight.codes:
                return node, decode, producers[node.input[0]], producers
    raise AssertionError(layer)


def _decoded_weight(exact, decode) -> np.ndarray:
    inits, attrs = _inits(exact), _attrs(decode)
    if decode.op_type == "LutGather":
        return lut_gather.reference(inits[decode.input[0]], inits[decode.input[1]],
                                    bits=attrs["bits"], shape=list(attrs["shape"]))
    return pow2_shift.reference(inits[decode.input[0]], inits[decode.input[1]],
                                bits=attrs["bits"], root=attrs["root"],
                                shape=list(attrs["shape"]))


def _int_conv(a: np.ndarray, w: np.ndarray, pads, strides) -> np.ndarray:
    a = np.pad(a, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(a, (kh, kw), axis=(2, 3))
    win = win[:, :, ::strides[0], ::strides[1]]
    return np.einsum("nchwij,ocij->nohw", win, w, optimize=True)


def _weight_branches(w: np.ndarray, delta_w: np.ndarray, decode) -> list[tuple]:
    """The integer weight tensors and the factor on each one's accumulator. POST
    (Pow2Shift, root 2): a weight that is an integer multiple of its step has an even
    sqrt(2) exponent; the rest, divided by sqrt(1/2), must be integers too."""
    ratio = w.astype(np.float64) / delta_w
    if decode.op_type == "Pow2Shift" and _attrs(decode)["root"] == 2:
        even = np.where(ratio == np.round(ratio), ratio, 0.0)
        odd = np.round((ratio - even) / SQRT_HALF)
        np.testing.assert_allclose(even + SQRT_HALF * odd, ratio, rtol=1e-6, atol=1e-6)
        assert np.all((even == 0) | (odd == 0)) and np.any(odd != 0) and np.any(even != 0)
        return [(even, 1.0), (odd, SQRT_HALF)]
    w_int = np.round(ratio)
    assert np.abs(w_int - ratio).max() <= 0.5 * (1 + 1e-6)
    return [(w_int, 1.0)]


def _emulate(case: Trained, layer: str, outer: int) -> tuple[np.ndarray, np.ndarray]:
    """(numpy emulation, ONNX) of ``layer``'s output in the integer model at ``outer`` bits.

    Everything but the weight grid (read from the integer model's metadata) comes from the
    exact-mode model: activation codes from its quantizer parameters, weights from its
    decode, the accumulation in int64, one float32 rescale."""
    exact, model = case.exact, case.integer(outer)
    compute, decode, act, producers = _layer_nodes(exact, layer)
    inits = _inits(exact)
    detail = integer_details(model)[layer]
    if act.op_type == "CompandQuant":
        x_name, feed_names = act.input[0], [act.input[0]]
    elif act.op_type == "AdaptiveStep":
        x_name, feed_names = act.input[0], [act.input[0], act.input[2]]
    else:  # UniformQuant(x, s)
        x_name, feed_names = act.input[0], [act.input[0]]
    out_name = compute.output[0]
    probe = with_extra_outputs(model, [n for n in feed_names + [out_name]
                                       if n not in {o.name for o in model.graph.output}])
    values = dict(zip(feed_names + [out_name],
                      _function(probe).run({"input": case.inputs()}, feed_names + [out_name]),
                      strict=True))
    x = values[x_name]
    hi8 = (1 << (outer - 1)) - 1
    if act.op_type == "CompandQuant":
        a_attrs = _attrs(act)
        y = compand_quant.reference(x, *(inits[i] for i in act.input[1:5]), bits=a_attrs["bits"],
                                    signed=a_attrs["signed"])
        levels = inits[act.input[4]]
        qmax = hi8 if a_attrs["signed"] else (1 << outer) - 1
        delta_a = np.float32(levels[-1] / qmax)
        codes = np.round(y / delta_a)
        assert np.abs(codes).max() <= qmax
    elif act.op_type == "AdaptiveStep":
        a_attrs = _attrs(act)
        lo, hi = ((-(1 << (a_attrs["bits"] - 1)), (1 << (a_attrs["bits"] - 1)) - 1)
                  if a_attrs["signed"] else (0, (1 << a_attrs["bits"]) - 1))
        s_a = (inits[act.input[1]] * values[act.input[2]]).astype(np.float32)
        delta_a = s_a.reshape(-1, *[1] * (x.ndim - 1))
        codes = np.clip(np.round(x / delta_a), lo, hi)
    else:
        a_attrs = _attrs(act)
        lo, hi = ((-(1 << (a_attrs["bits"] - 1)), (1 << (a_attrs["bits"] - 1)) - 1)
                  if a_attrs["signed"] else (0, (1 << a_attrs["bits"]) - 1))
        delta_a = np.float32(inits[act.input[1]].reshape(()))
        codes = np.clip(np.round(x / delta_a), lo, hi)
    assert detail["act"]["exact"] or act.op_type == "CompandQuant"
    w = _decoded_weight(exact, decode)
    delta_w = np.broadcast_to(np.asarray(detail["weight"]["scale"], np.float32), (w.shape[0],))
    view = (-1,) + (1,) * (w.ndim - 1)
    a64 = codes.astype(np.int64)
    acc = np.float32(0)
    for w_int, factor in _weight_branches(w, delta_w.reshape(view), decode):
        assert w_int.min() >= -hi8 - 1 and w_int.max() <= hi8
        w64 = w_int.astype(np.int64)
        if compute.op_type == "Conv":
            c_attrs = _attrs(compute)
            branch = _int_conv(a64, w64, c_attrs.get("pads", [0] * 4),
                               c_attrs.get("strides", [1, 1]))
        else:
            branch = a64 @ w64.T
        assert np.abs(branch).max() < 2**31
        acc = acc + branch.astype(np.float32) * np.float32(factor)
    if compute.op_type == "Conv":
        wv = delta_w.reshape(1, -1, 1, 1)
        scale = (delta_a * wv if np.ndim(delta_a) == 0 else
                 (delta_a.reshape(-1, 1, 1, 1) * wv)).astype(np.float32)
    else:
        scale = (np.float32(delta_a) * delta_w.reshape(1, -1) if np.ndim(delta_a) == 0 else
                 (delta_a.reshape(-1, 1) * delta_w.reshape(1, -1))).astype(np.float32)
    emulated = acc * scale
    if len(compute.input) > 2 and compute.input[2]:
        emulated = emulated + inits[compute.input[2]].reshape(1, -1, *[1] * (acc.ndim - 2))
    return emulated, values[out_name]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("layer", ["features.3", "classifier"])
def test_numpy_emulation_matches_onnx_layer(trained, scheme, layer):
    emulated, got = _emulate(trained(scheme), layer, 8)
    assert emulated.shape == got.shape
    np.testing.assert_allclose(got, emulated, rtol=2e-6, atol=1e-6 * np.abs(emulated).max())


def test_numpy_emulation_below_8_bits(trained):
    """b' = 6: the inner 4-bit layer stays exact; weights move onto a 6-bit grid."""
    emulated, got = _emulate(trained("lsq"), "features.7", 6)
    np.testing.assert_allclose(got, emulated, rtol=2e-6, atol=1e-6 * np.abs(emulated).max())


def test_narrow_grid_keeps_codes_in_range(trained):
    """b' = 5: the 8-bit first/last layers are re-quantized into the 5-bit range."""
    case = trained("lcq")
    model = case.integer(5)
    last = {}  # layer -> its last activation-code node's output
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "Clip"):
            scope = node.input[1].split("/")[0]
            if scope in ("features.0", "classifier"):
                last[scope] = node.output[0]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(v, TensorProto.UINT8, None)
                              for v in last.values())
    codes = _function(probe).run({"input": case.inputs()}, list(last.values()))
    first, cls = codes
    assert first.astype(int).min() >= 128 - 16 and first.astype(int).max() <= 128 + 15
    assert cls.max() <= 31
    tables = _inits(model)
    for name in ("features.0/int/weight_table", "classifier/int/weight_table"):
        assert tables[name].min() >= 128 - 16 and tables[name].max() <= 128 + 15


def test_pot_weights_exact_on_8_bit_grid(trained):
    details = integer_details(trained("pot").integer(8))
    for layer in ("features.3", "features.7"):
        assert details[layer]["weight"]["max_abs_error"] == 0.0


@pytest.mark.parametrize("outer", [6, 8])
def test_post_weights_split_exactly(trained, outer):
    """4-bit POST magnitudes reach sqrt(1/2)^6 = 2^-3: both branches are exact from
    b' = 5 on; only float32 rounding of the odd-exponent table entries remains."""
    model = trained("asq-post").integer(outer)
    details = integer_details(model)
    for layer in ("features.3", "features.7"):
        weight = details[layer]["weight"]
        assert weight["branches"] == 2 and weight["rel_rms_error"] < 1e-6, weight
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("ConvInteger") == 2 * 2 + 1  # first layer: 8-bit LSQ, one branch


# ------------------------------------------------------------------ agreement / runtimes


@pytest.mark.parametrize("scheme", SCHEMES)
def test_agreement_at_8_bits(trained, scheme):
    case = trained(scheme)
    report = validate(case.ckpt, case.integer(8), case.data, _function, per_layer=False)
    assert report.top1_agreement >= 0.98, report.top1_agreement
    assert abs(report.onnx_accuracy - report.torch_accuracy) <= 0.02


@pytest.mark.skipif(library_path() is None, reason="native library not built")
@pytest.mark.parametrize("scheme", ["lcq", "asq-post"])
def test_native_runtime_matches_function_runtime(trained, scheme):
    case = trained(scheme)
    model = case.integer(8)
    x = case.inputs()
    got = session(model, "native", announce=None).run({"input": x})[0]
    want = _function(model).run({"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["lcq", "asq-post"])
def test_reference_runtime(trained, scheme):
    case = trained(scheme)
    model = case.integer(8)
    x = case.inputs(8)
    got = session(model, "reference", announce=None).run({"input": x})[0]
    want = _function(model).run({"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_choose_outer_bits(trained):
    case = trained("lcq")
    bits, agreements = choose_outer_bits(case.exact, case.ckpt, case.data, 0.0,
                                         candidates=(6, 8), make_session=_function)
    assert bits == 6 and list(agreements) == [6]
    bits, agreements = choose_outer_bits(case.exact, case.ckpt, case.data, 0.99,
                                         candidates=range(4, 9), make_session=_function)
    assert agreements[bits] >= 0.99 and all(a < 0.99 for b, a in agreements.items() if b < bits)
    with pytest.raises(QConvertError, match="no outer bit width"):
        choose_outer_bits(case.exact, case.ckpt, case.data, 1.01, candidates=(7, 8),
                          make_session=_function)


def test_rejects_bad_requests(trained):
    case = trained("lsq")
    with pytest.raises(QConvertError, match="outside"):
        to_integer(case.exact, 9)
    with pytest.raises(QConvertError, match="already in integer mode"):
        to_integer(case.integer(8), 8)
    with pytest.raises(QConvertError, match="wide_act_step"):
        to_integer(case.exact, 6, wide_act_step="nope")


def test_exact_model_is_not_modified(trained):
    case = trained("lcq")
    before = case.exact.SerializeToString()
    to_integer(case.exact, 6)
    assert case.exact.SerializeToString() == before


# ------------------------------------------------------------------ ORT kernels


@pytest.mark.parametrize("op", ["ConvInteger", "MatMulInteger"])
def test_ort_u8u8_kernels_exact_at_extremes(op):
    """The operand types integer mode uses (uint8 x uint8, zero points 0/128) accumulate
    exactly at the extremes. (u8 x s8 MatMulInteger saturates int16 pair sums on AVX2.)"""
    rng = np.random.default_rng(0)
    x = rng.choice(np.array([0, 255], np.uint8), size=(2, 64, 6, 6))
    w = rng.choice(np.array([0, 1, 255], np.uint8), size=(32, 64, 3, 3))
    x[0] = 255
    w[:8] = 255
    for x_zp in (0, 128):
        inits = [numpy_helper.from_array(np.array(x_zp, np.uint8), "xz"),
                 numpy_helper.from_array(np.array(128, np.uint8), "wz")]
        if op == "ConvInteger":
            node = helper.make_node(op, ["x", "w", "xz", "wz"], ["y"], pads=[1, 1, 1, 1])
            feed, weight = x, w
            want = _int_conv(x.astype(np.int64) - x_zp, w.astype(np.int64) - 128,
                             [1, 1, 1, 1], [1, 1])
        else:
            node = helper.make_node(op, ["x", "w", "xz", "wz"], ["y"])
            feed, weight = x.reshape(2, -1)[:, :576], w.reshape(32, -1).T.copy()
            want = (feed.astype(np.int64) - x_zp) @ (weight.astype(np.int64) - 128)
        graph = helper.make_graph(
            [node], "k", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
            [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
            inits + [numpy_helper.from_array(weight, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
        got = _function(model).run({"x": feed})[0]
        assert np.array_equal(got, want)


# ------------------------------------------------------------------ shipped checkpoints


SHIPPED = sorted(p for p in (ROOT / "models" / "checkpoints").glob("digits_cnn-*.pt")
                 if "-float" not in p.name)


@pytest.mark.skipif(not SHIPPED or not CALIB.is_file(), reason="no shipped digits checkpoints")
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_checkpoint_at_8_bits(path):
    ckpt = qconvert.load_checkpoint(path)
    exact, _ = build_onnx(ckpt)
    data = load_calibration(CALIB, ckpt.input.shape)
    report = validate(ckpt, to_integer(exact, 8), data, _function, per_layer=False)
    assert report.top1_agreement >= 0.98
    assert abs(report.onnx_accuracy - report.torch_accuracy) <= 0.01
