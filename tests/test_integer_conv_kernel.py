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
import torch
from click.testing import CliRunner
from onnx import helper

import qconvert
from qconvert import manifest
from qconvert.archs import build_architecture
from qconvert.calib import load_calibration
from qconvert.cli import main
from qconvert.errors import QConvertError
from qconvert.export.integer import check_qconv_clamp, to_integer, with_qconv_clamp
from qconvert.export.onnx_export import build_onnx
from qconvert.inspect_model import inspect_model
from qconvert.native import library_path, register
from qconvert.ops import DOMAIN_VERSION
from qconvert.ops.qdepthwise_conv_clamp import TO_NCHW, TO_NHWC
from qconvert.preprocess import prepare_inputs
from qconvert.quant import quantize_model

from .test_integer_layout import plain_session

ROOT = Path(__file__).resolve().parent.parent
RESNET20 = ROOT / "models" / "checkpoints" / "resnet20-lsq-w4a4.pt"
CALIB = ROOT / "models" / "data" / "digits_calib.npz"

pytestmark = [
    pytest.mark.skipif(not RESNET20.is_file() or not CALIB.is_file(),
                       reason="no shipped ResNet-20 checkpoint"),
    pytest.mark.skipif(library_path() is None, reason="native library not built"),
]


@pytest.fixture(scope="module")
def resnet20_exact() -> onnx.ModelProto:
    exact, _ = build_onnx(qconvert.load_checkpoint(RESNET20))
    return exact


@pytest.fixture(scope="module")
def resnet20(resnet20_exact):
    """(checkpoint, its calibration inputs, the standard integer model)."""
    ckpt = qconvert.load_checkpoint(RESNET20)
    data = load_calibration(CALIB, ckpt.input.shape)
    x = prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean, ckpt.input.std).numpy()
    return ckpt, x, to_integer(resnet20_exact, 8, calib=x)


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
    assert {(o.domain, o.version) for o in model.opset_import} >= {("qconvert", DOMAIN_VERSION)}
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


@pytest.mark.parametrize("change, message", [
    ("group", "layer layers.0.conv1: a grouped convolution (group=2)"),
    ("dilations", "layer layers.0.conv1: a dilated convolution"),
    ("stride", "layer layers.0.conv1: strides [5, 5]"),
])
def test_early_check_refuses_as_the_rewrite_does(resnet20_exact, resnet20, change, message):
    """The check on the exact-mode model (before calibration) and the rewrite of the
    integer model refuse the same geometry in the same words."""
    refusals = []
    for model, refuse in ((resnet20_exact, check_qconv_clamp), (resnet20[2], with_qconv_clamp)):
        changed = onnx.ModelProto()
        changed.CopyFrom(model)
        conv = _first_conv(changed, skip=1)
        _set_attribute(conv, *{"group": ("group", 2), "dilations": ("dilations", [2, 2]),
                               "stride": ("strides", [5, 5])}[change])
        with pytest.raises(QConvertError) as err:
            refuse(changed)
        refusals.append(str(err.value))
    assert refusals[0] == refusals[1] and message in refusals[0]


def test_early_check_admits_what_the_rewrite_rewrites(resnet20_exact):
    check_qconv_clamp(resnet20_exact)  # ResNet-20: every convolution rewritten (above)


@pytest.mark.parametrize("group", [1, 2])
def test_early_check_refuses_a_convolution_left_in_float(resnet20_exact, group):
    """A Conv that is no quantized layer's compute node stays float in integer mode (its
    weight shape unknown to the check, grouped or not)."""
    model = onnx.ModelProto()
    model.CopyFrom(resnet20_exact)
    model.graph.node.append(helper.make_node("Conv", ["x_float", "w_float"], ["y_float"],
                                             name="float_conv", group=group))
    with pytest.raises(QConvertError, match="layer float_conv: not a quantized layer, so "
                                            "integer mode leaves it in float"):
        check_qconv_clamp(model)


ASQ = ROOT / "models" / "checkpoints" / "digits_cnn-asq-lsq-w2a2.pt"
PER_SAMPLE = ("its input is ASQ-quantized, and ASQ's per-sample activation step cannot be "
              "folded into QConvClamp's per-channel constant multiplier; export without "
              "--conv-kernel")


def _first_asq_conv(ckpt) -> str:
    """From the PyTorch model: the first convolution whose input quantizer is ASQ's."""
    return next(name for name, m in ckpt.model.named_modules()
                if isinstance(m, torch.nn.Conv2d)
                and type(m.act_quant).__name__ == "ASQQuantizer")


def test_asq_refusal_names_the_per_sample_step():
    """Both the early check and the rewrite of an ASQ integer model give the real cause,
    not a symptom of the rewritten graph (a missing int32 bias)."""
    if not ASQ.is_file():
        pytest.skip("no shipped ASQ checkpoint")
    ckpt = qconvert.load_checkpoint(ASQ)
    exact, _ = build_onnx(ckpt)
    want = f"--conv-kernel qconvert: layer {_first_asq_conv(ckpt)}: {PER_SAMPLE}"
    for refuse, model in ((check_qconv_clamp, exact), (with_qconv_clamp, to_integer(exact, 8))):
        with pytest.raises(QConvertError) as err:
            refuse(model)
        assert str(err.value).startswith(want) and "\n" not in str(err.value)


@pytest.fixture
def no_calibration(monkeypatch) -> list[str]:
    """Integer mode's rewrite and calibration entry points, failing loudly: the names of
    those called."""
    import qconvert.export.integer.rewrite as rewrite
    import qconvert.export.onnx_export as onnx_export
    import qconvert.integer_search as integer_search

    called = []

    def forbidden(name):
        def fail(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"{name} ran before the refusal")
        return fail

    for module, name in ((onnx_export, "to_integer"), (integer_search, "to_integer"),
                         (rewrite, "calibrate")):
        monkeypatch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))
    return called


def test_cli_refuses_before_calibrating(tmp_path, no_calibration):
    """ASQ's per-sample steps: exit 2, one line naming the layer, before integer mode
    rewrites or calibrates anything (nor measures b')."""
    path = ROOT / "models" / "checkpoints" / "resnet20-asq-post-w4a4.pt"
    if not path.is_file():
        pytest.skip(f"no shipped {path.name}")
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", str(path), "-o", str(out), "--mode", "integer",
                                       "--conv-kernel", "qconvert", "--outer-bits", "auto",
                                       "--calib", str(CALIB)])
    assert no_calibration == [] and result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error")]
    layer = _first_asq_conv(qconvert.load_checkpoint(path))
    assert len(error) == 1 and f"--conv-kernel qconvert: layer {layer}: {PER_SAMPLE}" in error[0]
    assert not out.exists()


def test_cli_refuses_the_option_outside_integer_mode(tmp_path):
    result = CliRunner().invoke(main, ["export", str(RESNET20), "-o", str(tmp_path / "m.onnx"),
                                       "--conv-kernel", "qconvert"])
    assert result.exit_code == 2
    assert "--conv-kernel applies to integer mode: add --mode integer" in result.output


def _random_lsq(path: Path, arch: str, arch_kwargs: dict) -> Path:
    """The architecture at 3x32x32, LSQ W4A4 with quantizers initialised on random data."""
    torch.manual_seed(0)
    model = quantize_model(build_architecture(arch, arch_kwargs), "lsq", 4, 4)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    return qconvert.save_checkpoint(path, model, arch=arch, arch_kwargs=arch_kwargs,
                                    input_shape=(3, 32, 32))


def _narrow_resnet18(path: Path) -> Path:
    """ResNet-18's layout (7x7/2 stem, its max pool read by two branches) at width 8."""
    return _random_lsq(path, "resnet18", {"num_classes": 10, "width": 8})


def _pooled_integer_model(name: str, tmp_path: Path) -> tuple[np.ndarray, onnx.ModelProto]:
    path = ROOT / "models" / "checkpoints" / name if name.endswith(".pt") else \
        _narrow_resnet18(tmp_path / "resnet18.pt")
    ckpt = qconvert.load_checkpoint(path)
    if name.endswith(".pt"):
        data = load_calibration(CALIB, ckpt.input.shape)
        x = prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean, ckpt.input.std).numpy()
    else:
        x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    exact, _ = build_onnx(ckpt)
    return x, to_integer(exact, 8, calib=x)


@pytest.mark.parametrize("name", ["digits_cnn-lsq-w4a4.pt", "narrow resnet18"])
def test_max_pools_read_float_and_give_the_same_codes(name, tmp_path):
    """A uint8 MaxPool left NCHW beside QConvClamp runs ONNX Runtime's slow generic loop:
    the rewrite pools the codes in float between two Casts (digits CNN: a pool between a
    DequantizeLinear and a QuantizeLinear of one grid, which ORT would fold into a uint8
    pool; ResNet-18: the stem's pool of codes). Expected: the standard file's outputs."""
    x, standard = _pooled_integer_model(name, tmp_path)
    model = with_qconv_clamp(standard)
    producers = {o: n for n in model.graph.node for o in n.output}
    pools = [n for n in model.graph.node if n.op_type == "MaxPool"]
    assert pools and sum(n.op_type == "MaxPool" for n in standard.graph.node) == len(pools)
    for pool in pools:
        cast = producers[pool.input[0]]
        assert cast.op_type == "Cast" and helper.get_attribute_value(cast.attribute[0]) == \
            onnx.TensorProto.FLOAT
    want = _outputs(standard, x, library=False)
    np.testing.assert_array_equal(_outputs(model, x, library=True), want)
    np.testing.assert_array_equal(_outputs(model, x, library=False), want)


MOBILENET = ROOT / "models" / "checkpoints" / "mobilenetv2_small-lcq-w4a4.pt"


def _random_mobilenet(path: Path) -> Path:
    """MobileNetV2-small: 4-bit codes, so every depthwise layer's input has a ceiling Clip
    to fold."""
    return _random_lsq(path, "mobilenetv2_small", {"in_channels": 3})


def _optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    """Node types of the graph a plain ONNX Runtime session runs on the written file."""
    return plain_session(model, tmp_path)[1]


@pytest.mark.parametrize("name", ["shipped lcq", "random lsq"])
def test_depthwise_convolutions_become_channels_last_nodes(name, tmp_path):
    """A model with depthwise convolutions: those become QDepthwiseConvClamp between a
    transpose to channels-last and one back, every other convolution stays QDQ, and each
    4-bit input ceiling Clip folds into its node. Expected: the standard file's outputs, bit
    for bit (with the library and through the function bodies), and ONNX Runtime's optimized
    graph with no more transposes than the standard file's (they cancel against its NHWC
    QLinearConvs) and two Clips fewer per depthwise layer of 4-bit codes."""
    if name == "shipped lcq":
        if not MOBILENET.is_file():
            pytest.skip("no shipped MobileNetV2 checkpoint")
        ckpt = qconvert.load_checkpoint(MOBILENET)
        data = load_calibration(CALIB, ckpt.input.shape)
        x = prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean, ckpt.input.std).numpy()
    else:
        ckpt = qconvert.load_checkpoint(_random_mobilenet(tmp_path / "mobilenet.pt"))
        x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    exact, _ = build_onnx(ckpt)
    check_qconv_clamp(exact)
    standard = to_integer(exact, 8, calib=x)
    model = with_qconv_clamp(standard)
    convs = [n for n in standard.graph.node if n.op_type == "Conv"]
    depthwise = [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    producers = {o: n for n in model.graph.node for o in n.output}
    readers = {i: n for n in model.graph.node for i in n.input}
    nodes = [n for n in model.graph.node if n.op_type == "QDepthwiseConvClamp"]
    assert len(depthwise) == 7 and sorted(n.name for n in nodes) == sorted(
        n.name for n in depthwise)
    assert sum(n.op_type == "Conv" for n in model.graph.node) == len(convs) - len(depthwise)
    for node in nodes:
        before, after = producers[node.input[0]], readers[node.output[0]]
        assert before.op_type == after.op_type == "Transpose"
        assert list(before.attribute[0].ints) == TO_NHWC and list(after.attribute[0].ints) == \
            TO_NCHW
    x_hi = [helper.get_attribute_value(next(a for a in n.attribute if a.name == "x_hi"))
            for n in nodes]
    assert x_hi == [15] * 7 if name == "random lsq" else x_hi == [255] * 7  # LCQ: calibrated
    want = _outputs(standard, x, library=False)
    np.testing.assert_array_equal(_outputs(model, x, library=True), want)
    np.testing.assert_array_equal(_outputs(model, x, library=False), want)
    ours, theirs = _optimized_ops(model, tmp_path), _optimized_ops(standard, tmp_path)
    assert ours.count("Transpose") <= theirs.count("Transpose")
    # LSQ: each layer's input ceiling and output ceiling; LCQ's calibrated codes have none.
    assert theirs.count("Clip") - ours.count("Clip") == (14 if name == "random lsq" else 0)


def test_cli_exports_mobilenet_with_depthwise_nodes(tmp_path):
    """The shipped MobileNetV2: exported with the option, the summary and inspect say which
    convolutions are qconvert nodes, and inspect counts the standard file's integer MACs."""
    if not MOBILENET.is_file():
        pytest.skip("no shipped MobileNetV2 checkpoint")
    runner = CliRunner()
    for kernel in ("standard", "qconvert"):
        result = runner.invoke(main, ["export", str(MOBILENET), "-o", str(tmp_path / kernel),
                                      "--mode", "integer", "--calib", str(CALIB),
                                      "--conv-kernel", kernel])
        assert result.exit_code == 0, result.output
    assert "7 depthwise convolutions as qconvert QDepthwiseConvClamp (they need the qconvert " \
           "library" in result.output and "the others QDQ" in result.output
    inspected = runner.invoke(main, ["inspect", str(tmp_path / "qconvert")])
    assert inspected.exit_code == 0, inspected.output
    assert "convolutions: qconvert QDepthwiseConvClamp nodes" in inspected.output
    macs = [inspect_model(tmp_path / kernel, macs=True).integer_macs
            for kernel in ("standard", "qconvert")]
    assert macs[0] == macs[1] > 0
