"""Integer mode's requantization (qconvert/export/integer/requant.py): every value reaches
uint8 once, on the grid of the quantizer that reads it where that is exact, so ONNX
Runtime's optimised graph holds only its fused integer kernels and the quantizers' ceiling
Clips, the same Quantize/DequantizeLinear count as ONNX Runtime's own U8S8 model; and the
codes a quantizer reads off a shared grid are the QAT model's codes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import qconvert
from qconvert import manifest
from qconvert.archs import build_architecture
from qconvert.calib import load_calibration
from qconvert.export.integer import to_integer
from qconvert.export.onnx_export import build_onnx
from qconvert.graph import with_extra_outputs
from qconvert.preprocess import prepare_inputs
from qconvert.quant import quantize_model
from qconvert.runtime import session

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "models" / "data" / "digits_calib.npz"
RESNET20 = ROOT / "models" / "checkpoints" / "resnet20-lsq-w4a4.pt"
FUSED = {"QLinearConv", "QLinearAdd", "QGemm", "NhwcMaxPool"}
# ONNX Runtime's own U8S8 model of these networks, optimised: the input's Quantize and
# layout Transpose, the pooled output's Dequantize -> ReduceMean -> Quantize before QGemm
U8S8_EXTRAS = {"QuantizeLinear": 2, "DequantizeLinear": 1, "Transpose": 2, "ReduceMean": 1,
               "Reshape": 1}


def _optimized(model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


def _assert_fused_with_ceilings_only(model: onnx.ModelProto, tmp_path: Path) -> None:
    """Nothing between the fused kernels but uint8 Clips (one per quantizer ceiling)."""
    graph = _optimized(model, tmp_path).graph
    ops = Counter(n.op_type for n in graph.node)
    assert "Conv" not in ops and "Add" not in ops and "Relu" not in ops, ops
    extras = {op: k for op, k in ops.items() if op not in FUSED | {"Clip"}}
    assert extras.keys() <= U8S8_EXTRAS.keys(), ops
    assert all(k <= U8S8_EXTRAS[op] for op, k in extras.items()), ops
    producers = {o: n for n in graph.node for o in n.output}
    readers = {i: n for n in graph.node for i in n.input}
    for clip in (n for n in graph.node if n.op_type == "Clip"):
        source = producers[clip.input[0]].op_type
        if readers[clip.output[0]].op_type == "ReduceMean":
            continue  # a ReLU6 in the float head before the classifier
        assert source in FUSED | {"QuantizeLinear", "Clip"}, source  # on uint8 codes


@pytest.fixture(scope="module")
def resnet20():
    if not RESNET20.is_file() or not CALIB.is_file():
        pytest.skip("no shipped ResNet-20 checkpoint")
    ckpt = qconvert.load_checkpoint(RESNET20)
    data = load_calibration(CALIB, ckpt.input.shape)
    x = prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean, ckpt.input.std).numpy()
    exact, _ = build_onnx(ckpt)
    return exact, to_integer(exact, 8, calib=x, residual="quantized"), x


def test_resnet20_has_no_requantization_between_fused_kernels(resnet20, tmp_path):
    """The stem's output (read by a quantizer and a residual addition) lands on that
    quantizer's grid; a sum read by two quantizers on different grids (stage transitions)
    is added once per grid; so no DequantizeLinear -> QuantizeLinear pair is left."""
    _, model, _ = resnet20
    _assert_fused_with_ceilings_only(model, tmp_path)
    residual = manifest.read(model).integer["#graph"]["residual_adds"]
    assert residual == {"quantized": 9, "float": 0}  # a sum added per grid counts once


def _codes_read_by(model: onnx.ModelProto, layer: str, x: np.ndarray) -> np.ndarray:
    """The integer codes the layer's convolution reads: its DequantizeLinear's output over
    its scale."""
    record = manifest.read(model).layer(layer)
    compute = next(n for n in model.graph.node if n.name == record.compute_node)
    dq = next(n for n in model.graph.node if compute.input[0] in n.output)
    scale = next(numpy_helper.to_array(i) for i in model.graph.initializer
                 if i.name == dq.input[1])
    sess = ort.InferenceSession(with_extra_outputs(model, [compute.input[0]])
                                .SerializeToString(), providers=["CPUExecutionProvider"])
    value = sess.run([compute.input[0]], {manifest.INPUT_NAME: x})[0] / scale
    np.testing.assert_allclose(value, np.round(value), atol=1e-4)
    return np.round(value).astype(np.int64)


def _exact_codes(exact: onnx.ModelProto, layer: str, x: np.ndarray) -> np.ndarray:
    """The QAT quantizer's codes from the exact-mode model: its output over its step."""
    record = manifest.read(exact).layer(layer)
    compute = next(n for n in exact.graph.node if n.name == record.compute_node)
    quant = next(n for n in exact.graph.node if compute.input[0] in n.output)
    step = numpy_helper.to_array(next(i for i in exact.graph.initializer
                                      if i.name == quant.input[1])).reshape(-1)
    sess = session(with_extra_outputs(exact, [compute.input[0]]), "function",
                                    announce=None)
    value = sess.run({manifest.INPUT_NAME: x}, [compute.input[0]])[0]
    codes = np.round(value / step[0])
    np.testing.assert_allclose(value / step[0], codes, atol=1e-4)
    return codes.astype(np.int64)


def _assert_same_codes(got: np.ndarray, want: np.ndarray) -> None:
    """Equal but for float rounding at ties (the accumulator is rescaled in float32 by
    ONNX Runtime and in float32 by the exact model, in different orders)."""
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1
    assert (got == want).mean() >= 0.999, (got == want).mean()


def _random_lsq(arch: str, shape: tuple[int, ...], root: Path):
    """(exact, integer, inputs) of ``arch`` with random LSQ W4A4 QAT parameters."""
    torch.manual_seed(0)
    model = quantize_model(build_architecture(arch, {}), "lsq", 4, 4)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, *shape))
    model.eval()
    path = root / f"{arch}.pt"
    qconvert.save_checkpoint(path, model, arch=arch, arch_kwargs={}, input_shape=shape)
    exact, _ = build_onnx(qconvert.load_checkpoint(path))
    x = np.random.default_rng(0).standard_normal((32, *shape)).astype(np.float32)
    return exact, to_integer(exact, 8, calib=x, residual="quantized"), x


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """MobileNetV2: its stem's ReLU6 output feeds the first block's quantizer and that
    block's residual addition."""
    return _random_lsq("mobilenetv2_small", (3, 32, 32), tmp_path_factory.mktemp("mbv2"))


def test_resnet18_pools_uint8_codes(tmp_path):
    """ResNet-18's stem: Relu -> MaxPool -> (quantizer, residual addition). The codes go
    through the pool on one grid, so ONNX Runtime pools uint8 (max commutes with rounding)
    and no float pool, Transpose pair or float addition is left."""
    _, model, _ = _random_lsq("resnet18", (3, 32, 32), tmp_path)
    _assert_fused_with_ceilings_only(model, tmp_path)
    ops = Counter(n.op_type for n in _optimized(model, tmp_path).graph.node)
    assert ops["NhwcMaxPool"] == 1 and "MaxPool" not in ops, ops


def test_mobilenet_has_no_requantization_between_fused_kernels(mobilenet, tmp_path):
    """The stem's ReLU6 (read by a quantizer and an addition) becomes a Relu folded into
    the requantization and a ceiling on the uint8 codes; sums read by one quantizer land
    on its grid whatever its zero point."""
    _, model, _ = mobilenet
    _assert_fused_with_ceilings_only(model, tmp_path)


def test_shared_relu6_grid_gives_the_quantizer_its_own_codes(mobilenet):
    """The first block's quantizer reads its codes off the stem's shared uint8 grid: they
    are the QAT quantizer's codes (the stem's 8-bit input codes and weights are exact)."""
    exact, model, x = mobilenet
    layer = manifest.read(exact).layers[1].name
    _assert_same_codes(_codes_read_by(model, layer, x), _exact_codes(exact, layer, x))
