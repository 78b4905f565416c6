"""Integer mode's opt-in convolution kernel (``qconvert export --mode integer
--conv-kernel qconvert``): every convolution as one QConvClamp, or a one-line refusal.

Expectation: the standard integer file (QDQ, run by a stock ONNX Runtime as QLinearConv),
whose outputs the QConvClamp file must give bit for bit, with the library and through the
function bodies without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper

import qconvert
from qconvert import manifest
from qconvert.calib import load_calibration
from qconvert.cli import main
from qconvert.errors import QConvertError
from qconvert.export.integer import to_integer, with_qconv_clamp
from qconvert.export.onnx_export import build_onnx
from qconvert.native import library_path, register
from qconvert.preprocess import prepare_inputs

ROOT = Path(__file__).resolve().parent.parent
RESNET20 = ROOT / "models" / "checkpoints" / "resnet20-lsq-w4a4.pt"
CALIB = ROOT / "models" / "data" / "digits_calib.npz"

pytestmark = [
    pytest.mark.skipif(not RESNET20.is_file() or not CALIB.is_file(),
                       reason="no shipped ResNet-20 checkpoint"),
    pytest.mark.skipif(library_path() is None, reason="native library not built"),
]


@pytest.fixture(scope="module")
def resnet20():
    """(checkpoint, its calibration inputs, the standard integer model)."""
    ckpt = qconvert.load_checkpoint(RESNET20)
    data = load_calibration(CALIB, ckpt.input.shape)
    x = prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean, ckpt.input.std).numpy()
    exact, _ = build_onnx(ckpt)
    return ckpt, x, to_integer(exact, 8, calib=x)


def _outputs(model: onnx.ModelProto, x: np.ndarray, library: bool) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if library:
        register(options)
    sess = ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {manifest.INPUT_NAME: x})[0]


def test_every_convolution_becomes_one_qconv_clamp(resnet20):
    _, _, standard = resnet20
    model = with_qconv_clamp(standard)
    ops = [n.op_type for n in model.graph.node]
    convs = sum(op == "Conv" for op in [n.op_type for n in standard.graph.node])
    assert convs == 21 and ops.count("QConvClamp") == convs and "Conv" not in ops
    assert {(o.domain, o.version) for o in model.opset_import} >= {("qconvert", 4)}
    assert [f.name for f in model.functions] == ["QConvClamp"]
    assert manifest.read(model).needs_library and not manifest.read(standard).needs_library
    onnx.checker.check_model(model, full_check=True)


def test_outputs_bit_identical_to_the_standard_integer_file(resnet20):
    _, x, standard = resnet20
    model = with_qconv_clamp(standard)
    want = _outputs(standard, x, library=False)
    np.testing.assert_array_equal(_outputs(model, x, library=True), want)
    np.testing.assert_array_equal(_outputs(model, x, library=False), want)  # function bodies


def test_cli_export_and_validate(resnet20, tmp_path):
    """The CLI writes the file (summary and metadata say it needs the library) and validate
    judges it by top-1 agreement, as it does the standard file, with the same figure."""
    runner = CliRunner()
    reports = {}
    for kernel in ("standard", "qconvert"):
        out = tmp_path / f"{kernel}.onnx"
        result = runner.invoke(main, ["export", str(RESNET20), "-o", str(out), "--mode",
                                      "integer", "--calib", str(CALIB), "--conv-kernel", kernel])
        assert result.exit_code == 0, result.output
        assert ("QConvClamp (they need the qconvert library" in result.output) == (
            kernel == "qconvert")
        report = tmp_path / f"{kernel}.json"
        result = runner.invoke(main, ["validate", str(RESNET20), str(out), "--calib", str(CALIB),
                                      "--resize", "--min-agreement", "0.9",
                                      "--report", str(report)])
        assert result.exit_code == 0, result.output
        reports[kernel] = report.read_text()
        if kernel == "qconvert":
            assert "convolutions as qconvert QConvClamp" in result.output
            assert manifest.metadata(onnx.load(str(out)))[manifest.Key.CONV_KERNEL] == "qconvert"
            inspected = runner.invoke(main, ["inspect", str(out)])
            assert inspected.exit_code == 0 and "QConvClamp': 21" in inspected.output
    agreement = [json.loads(r)["top1_agreement"] for r in reports.values()]
    assert agreement[0] == agreement[1] >= 0.99


def _set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, value)])


def _first_conv(model: onnx.ModelProto, skip: int = 0) -> onnx.NodeProto:
    return [n for n in model.graph.node if n.op_type == "Conv"][skip]


@pytest.mark.parametrize("change, message", [
    ("group", "layer layers.0.conv1: a grouped convolution (group=2)"),
    ("float_output", "layer layers.0.conv1: its output is not requantized to uint8"),
    ("computed_weights", "layer layers.0.conv1: its weights are not constant int8 codes"),
    ("stride", "layer layers.0.conv1: strides [5, 5]"),
    ("per_axis_input", "layer layers.0.conv1: its input is not uint8 codes with a constant "
                       "per-tensor scale"),
])
def test_refuses_naming_the_layer(resnet20, change, message):
    _, _, standard = resnet20
    model = onnx.ModelProto()
    model.CopyFrom(standard)
    conv = _first_conv(model, skip=1)  # conv1 is the stem; layers.0.conv1 next
    if change == "group":
        _set_attribute(conv, "group", 2)
    elif change == "stride":
        _set_attribute(conv, "strides", [5, 5])
    elif change == "per_axis_input":  # as ASQ's per-sample steps are
        producer = {o: n for n in model.graph.node for o in n.output}[conv.input[0]]
        model.graph.initializer.append(onnx.numpy_helper.from_array(
            np.ones(2, np.float32), "per_sample_scale"))
        producer.input[1] = "per_sample_scale"
    elif change == "float_output":
        model.graph.output.append(helper.make_tensor_value_info(conv.output[0], 1, None))
    else:
        producer = {o: n for n in model.graph.node for o in n.output}[conv.input[1]]
        model.graph.input.append(helper.make_tensor_value_info("w_fed", 3, None))
        producer.input[0] = "w_fed"
    with pytest.raises(QConvertError) as err:
        with_qconv_clamp(model)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_depthwise_in_one_line(tmp_path):
    """MobileNetV2's depthwise convolutions: exit 2, one line naming the layer."""
    path = ROOT / "models" / "checkpoints" / "mobilenetv2_small-lcq-w4a4.pt"
    if not path.is_file():
        pytest.skip("no shipped MobileNetV2 checkpoint")
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", str(path), "-o", str(out), "--mode", "integer",
                                       "--conv-kernel", "qconvert"])
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(error) == 1 and "a grouped convolution" in error[0] and "layer " in error[0]
    assert not out.exists()


def test_cli_refuses_the_option_outside_integer_mode(tmp_path):
    result = CliRunner().invoke(main, ["export", str(RESNET20), "-o", str(tmp_path / "m.onnx"),
                                       "--conv-kernel", "qconvert"])
    assert result.exit_code == 2
    assert "--conv-kernel applies to integer mode: add --mode integer" in result.output
