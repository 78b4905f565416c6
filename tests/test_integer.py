"""Integer mode (qconvert.export.integer): the u8 x s8 QDQ form ONNX Runtime fuses, an
independent numpy emulation of the integer arithmetic, per-sample steps at every batch size,
agreement with PyTorch, stock ONNX Runtime without the qconvert library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
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
from qconvert.graph import with_extra_outputs
from qconvert.integer_search import choose_outer_bits
from qconvert.native import library_path
from qconvert.ops import DOMAIN
from qconvert.quant import quantize_model
from qconvert.runtime import session
from qconvert.validate import validate

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "models" / "data" / "digits_calib.npz"
SCHEMES = ("lcq", "asq-post", "asq-lsq", "lsq", "pot")
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
            self._integer[bits] = to_integer(self.exact, bits, calib=self.inputs(256))
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

UNIFORM = ("lsq", "pot")  # every quantizer uniform: stock ONNX Runtime runs the file
LAYERS = ("features.0", "features.3", "features.7", "classifier")


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    """The node types ONNX Runtime runs after its own graph optimisations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    if any(n.domain == DOMAIN for n in model.graph.node):
        options.register_custom_ops_library(str(library_path()))
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_layers_read_uint8_codes_and_int8_per_channel_weights(trained, scheme):
    case = trained(scheme)
    model = case.integer(8)
    onnx.checker.check_model(model, full_check=True)
    man = manifest.read(model)
    assert man.mode == "integer" and man.outer_bits == 8
    assert set(integer_details(model)) == set(LAYERS)
    producers, inits = _producers(model), _inits(model)
    for record in man.layers:
        node = next(n for n in model.graph.node if n.name == record.compute_node)
        assert node.op_type in ("Conv", "Gemm")
        act, weight = (producers[i] for i in node.input[:2])
        assert act.op_type == weight.op_type == "DequantizeLinear"
        assert inits[weight.input[0]].dtype == np.int8
        assert inits[weight.input[1]].shape == (inits[weight.input[0]].shape[0],)
        assert not np.any(inits[weight.input[2]])  # zero point 0
        assert producers[act.input[0]].op_type in ("QuantizeLinear", "Clip")
    ops = {n.op_type for n in model.graph.node}
    assert not {"BatchNormalization", "LutGather", "Pow2Shift", "AdaptiveStep",
                "UniformQuant", "ConvInteger", "MatMulInteger"} & ops
    assert ("CompandQuant" in ops) == (scheme == "lcq")
    tables = [n for n in model.graph.node if n.op_type == "CompandQuant"]
    assert lut_bytes(model) == 4 * 16 * len(tables)  # float32 levels of the 4-bit LCQ layers


@pytest.mark.parametrize("scheme", ["lsq", "asq-lsq"])
def test_onnx_runtime_fuses_every_conv(trained, scheme, tmp_path):
    ops = _optimized_ops(trained(scheme).integer(8), tmp_path)
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops, ops
    if scheme == "lsq":  # per-tensor steps: every Relu folds into a requantization
        assert "Relu" not in ops and "QGemm" in ops, ops


@pytest.mark.parametrize("scheme", UNIFORM)
def test_uniform_model_runs_in_stock_onnx_runtime(trained, scheme):
    case = trained(scheme)
    model = case.integer(8)
    assert all(n.domain != DOMAIN for n in model.graph.node)
    assert all(o.domain != DOMAIN for o in model.opset_import) and not model.functions
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = case.inputs()
    np.testing.assert_allclose(plain.run(None, {"input": x})[0],
                               _function(model).run({"input": x})[0], rtol=1e-6, atol=1e-6)


def test_weight_range_avoids_int16_saturation(trained):
    """u8 x s8 on AVX2 (vpmaddubsw) adds product pairs in int16 with saturation: every
    layer keeps 2 * (largest uint8 code) * max|w| <= 32767. The first layer reads 8-bit
    signed codes (zero point 128, codes up to 255)."""
    for scheme in ("lsq", "lcq"):
        model = trained(scheme).integer(8)
        producers, inits = _producers(model), _inits(model)
        for record in manifest.read(model).layers:
            node = next(n for n in model.graph.node if n.name == record.compute_node)
            act, weight = (producers[i] for i in node.input[:2])
            codes = producers[act.input[0]]
            top = int(inits[codes.input[2]]) if codes.op_type == "Clip" else 255
            assert 2 * top * int(np.abs(inits[weight.input[0]].astype(int)).max()) <= 32767
        first_layer = manifest.read(model).layer("features.0").compute_node
        first = producers[producers[next(n for n in model.graph.node
                                         if n.name == first_layer).input[0]].input[0]]
        assert first.op_type == "QuantizeLinear" and int(inits[first.input[2]]) == 128


# ------------------------------------------------------------------ numpy emulation


def _int_conv(a: np.ndarray, w: np.ndarray, pads, strides) -> np.ndarray:
    a = np.pad(a, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(a, (kh, kw), axis=(2, 3))
    win = win[:, :, ::strides[0], ::strides[1]]
    return np.einsum("nchwij,ocij->nohw", win, w, optimize=True)


def _exact_values(case: Trained, names: list[str]) -> dict[str, np.ndarray]:
    probe = with_extra_outputs(case.exact, [n for n in names if n != "output"])
    return dict(zip(names, _function(probe).run({"input": case.inputs()}, names), strict=True))


def _emulate(case: Trained, layer: str, outer: int) -> tuple[np.ndarray, np.ndarray, object]:
    """(numpy emulation, exact-mode model) of ``layer``'s output before the next rounding:
    the exact model's quantized input as integer codes (they must be integers), the integer
    model's int8 weights accumulated in int64, one float rescale per channel (and sample),
    the bias; the target is the exact model's Conv + BatchNorm (or Gemm) output. Also
    half the int32 bias's step per channel: the bias's own rounding."""
    exact, model = case.exact, case.integer(outer)
    record = manifest.read(exact).layer(layer)
    compute = next(n for n in exact.graph.node if n.name == record.compute_node)
    readers = [n for n in exact.graph.node if compute.output[0] in n.input]
    target = (readers[0].output[0] if readers and readers[0].op_type == "BatchNormalization"
              else compute.output[0])
    act = _producers(exact)[compute.input[0]]
    names = [compute.input[0], target] + ([act.input[2]] if act.op_type == "AdaptiveStep" else [])
    values = _exact_values(case, names)
    inits, einits = _inits(model), _inits(exact)
    if act.op_type == "AdaptiveStep":
        s_a = (einits[act.input[1]] * values[act.input[2]]).astype(np.float32).reshape(-1)
    else:
        s_a = np.full(len(values[target]), inits[f"{layer}/int/act_scale"], np.float32)
    view = (-1,) + (1,) * (values[target].ndim - 1)
    ratio = values[compute.input[0]] / s_a.reshape(view)
    codes = np.round(ratio)
    np.testing.assert_allclose(ratio, codes, atol=1e-4)  # b <= b': the codes are exact
    w_int = inits[f"{layer}/int/weight"].astype(np.int64)
    w_scale = inits[f"{layer}/int/weight_scale"]
    if compute.op_type == "Conv":
        attrs = _attrs(compute)
        acc = _int_conv(codes.astype(np.int64), w_int, attrs.get("pads", [0] * 4),
                        attrs.get("strides", [1, 1]))
        channel = (1, -1, 1, 1)
    else:
        acc = codes.astype(np.int64) @ w_int.T
        channel = (1, -1)
    assert np.abs(acc).max() < 2**31
    scale = s_a.reshape(view).astype(np.float64) * w_scale.reshape(channel)
    emulated = acc * scale
    half_bias_step = 0.0
    if f"{layer}/int/bias" in inits:
        half_bias_step = 0.5 * inits[f"{layer}/int/bias_scale"].astype(np.float64).reshape(channel)
        emulated = emulated + inits[f"{layer}/int/bias"].reshape(channel) * \
            inits[f"{layer}/int/bias_scale"].astype(np.float64).reshape(channel)
    elif f"{layer}/int/bias_float" in inits:
        emulated = emulated + inits[f"{layer}/int/bias_float"]
    return emulated, values[target], half_bias_step


@pytest.mark.parametrize("scheme", ["lsq", "pot", "asq-lsq"])
@pytest.mark.parametrize("layer", ["features.3", "features.7", "classifier"])
def test_integer_arithmetic_reproduces_the_qat_layer(trained, scheme, layer):
    """LSQ / POT / ASQ-LSQ codes and weights are integers already: the int64 accumulation
    times one scale equals the QAT layer's float output up to float rounding and the int32
    bias's half step."""
    emulated, want, half_bias_step = _emulate(trained(scheme), layer, 8)
    assert emulated.shape == want.shape
    tolerance = 1e-4 * np.abs(want) + 1e-5 * np.abs(want).max() + half_bias_step
    assert np.all(np.abs(emulated - want) <= tolerance), np.abs(emulated - want).max()


def test_weight_grid_exact_for_integer_quantizers(trained):
    for scheme in ("lsq", "pot", "asq-lsq"):
        details = integer_details(trained(scheme).integer(8))
        for layer in ("features.3", "features.7"):
            assert details[layer]["weight"]["exact"], (scheme, layer)
            assert details[layer]["act"]["exact"]


@pytest.mark.parametrize("scheme", ["lcq", "asq-post"])
def test_regridded_weights_stay_within_half_a_step(trained, scheme):
    """LCQ levels and POST magnitudes move onto the b'-bit grid: the recorded error is at
    most half the largest magnitude / max_int, and small relative to the weights."""
    for outer in (6, 8):
        details = integer_details(trained(scheme).integer(outer))
        for layer in ("features.3", "features.7"):
            weight = details[layer]["weight"]
            assert weight["max_int"] <= (1 << (outer - 1)) - 1
            assert weight["rel_rms_error"] < (0.05 if outer == 8 else 0.2), weight


# ------------------------------------------------------------------ per-sample steps


@pytest.mark.parametrize("scheme", ["asq-lsq", "asq-post"])
def test_per_sample_step_holds_at_every_batch_size(trained, scheme):
    """Each sample's output is the same alone as inside a batch: the per-sample step is
    never one sample's step applied to the whole batch."""
    case = trained(scheme)
    model, x = case.integer(8), case.inputs(16)
    sess = _function(model)
    batch = sess.run({"input": x})[0]
    single = np.concatenate([sess.run({"input": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(batch, single, rtol=1e-5, atol=1e-5)
    steps = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
             and any(a.name == "axis" for a in n.attribute)]
    assert steps  # codes quantized along the batch axis


# ------------------------------------------------------------------ agreement / runtimes


@pytest.mark.parametrize("scheme", SCHEMES)
def test_agreement_at_8_bits(trained, scheme):
    case = trained(scheme)
    report = validate(case.ckpt, case.integer(8), case.data, _function, per_layer=False)
    assert report.top1_agreement >= 0.98, report.top1_agreement
    assert abs(report.onnx_accuracy - report.torch_accuracy) <= 0.02


def test_quantized_residual_agrees_with_float_residual():
    """ResNet-20's residual additions in uint8 (fused QLinearAdd); ``auto`` keeps them
    there when they agree as well as float ones."""
    path = ROOT / "models" / "checkpoints" / "resnet20-lsq-w4a4.pt"
    if not path.is_file() or not CALIB.is_file():
        pytest.skip("no shipped ResNet-20 checkpoint")
    ckpt = qconvert.load_checkpoint(path)
    exact, _ = build_onnx(ckpt)
    data = load_calibration(CALIB, ckpt.input.shape)
    from qconvert.preprocess import prepare_inputs
    x = prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean, ckpt.input.std).numpy()
    model = to_integer(exact, 8, calib=x, residual="quantized")
    residual = manifest.read(model).integer["#graph"]["residual_adds"]
    assert residual["quantized"] >= 8
    report = validate(ckpt, model, data, _function, per_layer=False)
    assert report.top1_agreement >= 0.99
    floating = to_integer(exact, 8, calib=x, residual="float")
    assert manifest.read(floating).integer["#graph"]["residual_adds"]["quantized"] == 0
    chosen = manifest.read(to_integer(exact, 8, calib=x)).integer["#graph"]["residual_adds"]
    assert chosen == residual  # agreement holds on this model: quantized


@pytest.mark.skipif(library_path() is None, reason="native library not built")
def test_lcq_model_runs_with_the_library_alone(trained):
    case = trained("lcq")
    model = case.integer(8)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library_path()))
    plain = ort.InferenceSession(model.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
    x = case.inputs()
    np.testing.assert_allclose(plain.run(None, {"input": x})[0],
                               _function(model).run({"input": x})[0], rtol=1e-5, atol=1e-5)


def test_choose_outer_bits(trained):
    case = trained("lsq")
    bits, agreements = choose_outer_bits(case.exact, case.ckpt, case.data, 0.0,
                                         candidates=(6, 8), make_session=_function)
    assert bits == 6 and list(agreements) == [6]
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
    with pytest.raises(QConvertError, match="residual"):
        to_integer(case.exact, 8, residual="nope")


def test_exact_model_is_not_modified(trained):
    case = trained("lcq")
    before = case.exact.SerializeToString()
    to_integer(case.exact, 6)
    assert case.exact.SerializeToString() == before


# ------------------------------------------------------------------ ORT kernels


def test_ort_u8s8_qlinearconv_exact_at_the_saturation_limit():
    """uint8 codes up to 255 against int8 weights up to |64|: ONNX Runtime's QLinearConv
    accumulates exactly (2 * 255 * 64 < 32768); unit scales keep the output integral."""
    rng = np.random.default_rng(0)
    x = rng.choice(np.array([0, 255], np.uint8), size=(1, 16, 5, 5))
    x[0, :, 2, 2] = 255
    w = rng.choice(np.array([-64, 64, 0], np.int8), size=(4, 16, 3, 3))
    w[0] = 64
    want = _int_conv(x.astype(np.int64), w.astype(np.int64), [1, 1, 1, 1], [1, 1])
    scale = float(np.abs(want).max() / 100.0)
    consts = {"xs": np.array(1.0, np.float32), "xz": np.array(0, np.uint8), "w": w,
              "ws": np.array(1.0, np.float32), "wz": np.array(0, np.int8),
              "ys": np.array(scale, np.float32), "yz": np.array(128, np.uint8)}
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"],
                            ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "k", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    got = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = np.clip(np.round(want / np.float32(scale)) + 128, 0, 255)
    assert np.abs(got.astype(int) - expected).max() <= 1  # requantization rounding only


# ------------------------------------------------------------------ shipped checkpoints


SHIPPED = sorted(p for p in (ROOT / "models" / "checkpoints").glob("digits_cnn-*.pt")
                 if "-float" not in p.name)


@pytest.mark.skipif(not SHIPPED or not CALIB.is_file(), reason="no shipped digits checkpoints")
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_checkpoint_at_8_bits(path):
    from qconvert.preprocess import prepare_inputs
    ckpt = qconvert.load_checkpoint(path)
    exact, _ = build_onnx(ckpt)
    data = load_calibration(CALIB, ckpt.input.shape)
    x = prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean, ckpt.input.std).numpy()
    report = validate(ckpt, to_integer(exact, 8, calib=x), data, _function, per_layer=False)
    assert report.top1_agreement >= 0.99
    assert abs(report.onnx_accuracy - report.torch_accuracy) <= 0.01


# ------------------------------------------------------------------ inspect


def test_inspect_counts_integer_macs_and_lut_bytes(trained, tmp_path):
    """Integer MACs per layer against PyTorch's own layer shapes; LUT bytes are the LCQ
    activation tables; int8 weights are one byte per parameter."""
    from qconvert.inspect_model import inspect_model
    case = trained("lcq")
    path = tmp_path / "integer.onnx"
    onnx.save(case.integer(8), str(path))
    info = inspect_model(path, macs=True)
    want: dict[str, int] = {}
    hooks = [module.register_forward_hook(
        lambda m, _, out, name=name: want.__setitem__(
            name, out[0].numel() * m.weight[0].numel()))
        for name, module in case.ckpt.model.named_modules()
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and name in LAYERS]
    with torch.no_grad():
        case.ckpt.model(torch.from_numpy(case.inputs(1)))
    for hook in hooks:
        hook.remove()
    assert {layer.layer: layer.macs for layer in info.layers} == want
    assert info.integer_macs == sum(want.values())
    assert info.lut_bytes == 4 * 16 * sum(n.op_type == "CompandQuant"
                                          for n in case.integer(8).graph.node)
    assert all(layer.code_bytes == layer.params for layer in info.layers)
