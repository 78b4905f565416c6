"""Models qconvert cannot export faithfully, and ONNX models edited by hand: a clear
refusal with exit code 2, never a wrong model or a traceback."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest
import torch

from qconvert import QConvertError, load_checkpoint, save_checkpoint
from qconvert.ops import SUPPORTED_DOMAIN_VERSIONS
from qconvert.quant import quantize_model

from .conftest import PROGRESS_LABELS, assert_one_line_error, invoke


def _checkpoint(tmp_path, builder: str) -> str:
    from tests import hostile_arch

    model = getattr(hostile_arch, builder.split(":")[1])()
    quantize_model(model, "lsq", 4, 4).train()
    model(torch.rand(4, 1, 8, 8))
    path = tmp_path / "hostile.pt"
    save_checkpoint(path, model.eval(), arch=builder, input_shape=(1, 8, 8))
    return str(path)


def test_data_dependent_control_flow_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path, "tests.hostile_arch:data_dependent")
    out = tmp_path / "m.onnx"
    message = assert_one_line_error(invoke(["export", ckpt, "--out", str(out)]))
    assert "cannot export" in message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hostile.pt"]


def test_unsupported_conv_variant_is_refused_naming_the_layer():
    with pytest.raises(ValueError, match=r"layer conv: padding_mode 'reflect'"):
        from tests import hostile_arch

        quantize_model(hostile_arch.reflect_padded(), "lsq", 4, 4)


def _edited(zoo, tmp_path, edit) -> str:
    model = onnx.ModelProto()
    model.CopyFrom(zoo.onnx_model("digits-lcq"))
    edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return str(path)


def _drop_function(model: onnx.ModelProto) -> None:
    kept = [f for f in model.functions if f.name != "CompandQuant"]
    del model.functions[:]
    model.functions.extend(kept)


UNSUPPORTED_VERSION = max(SUPPORTED_DOMAIN_VERSIONS) + 1


def _bump_domain_version(model: onnx.ModelProto) -> None:
    for opset in model.opset_import:
        if opset.domain == "qconvert":
            opset.version = UNSUPPORTED_VERSION
    for function in model.functions:
        function.domain = f"qconvert.v{UNSUPPORTED_VERSION}"


def _truncate_levels(model: onnx.ModelProto) -> None:
    node = next(n for n in model.graph.node if n.op_type == "CompandQuant")
    init = next(i for i in model.graph.initializer if i.name == node.input[4])
    values = onnx.numpy_helper.to_array(init)[:-1]
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))


def _truncate_codes(model: onnx.ModelProto) -> None:
    node = next(n for n in model.graph.node if n.op_type == "LutGather")
    init = next(i for i in model.graph.initializer if i.name == node.input[0])
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init)[:3], init.name))


EDITS = {
    "missing-function-body": (_drop_function, ("function body",)),
    "wrong-domain-version": (_bump_domain_version, (f"version {UNSUPPORTED_VERSION}",)),
    "levels-table-too-short": (_truncate_levels, ("levels", "CompandQuant_rejects")),
    "packed-buffer-too-short": (_truncate_codes, ("Gather", "codes")),
}


@pytest.mark.parametrize("runtime", ["function", "native"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_hand_edited_model_fails_cleanly(zoo, calib_npz, tmp_path, edit, runtime):
    from qconvert.native import library_path

    if runtime == "native" and library_path() is None:
        pytest.skip("native library not built")
    if runtime == "native" and edit == "missing-function-body":
        pytest.skip("the native kernels need no function bodies: that model is valid there")
    change, expected = EDITS[edit]
    model = _edited(zoo, tmp_path, change)
    result = invoke(["validate", str(zoo.case("digits-lcq").path), model, "--calib",
                     str(calib_npz), "--runtime", runtime])
    message = assert_one_line_error(result)
    assert any(e in message for e in expected), message


def test_checkpoint_error_reaches_the_cli_as_one_line(tmp_path):
    payload = torch.load(_checkpoint(tmp_path, "tests.hostile_arch:reflect_padded".replace(
        "reflect_padded", "data_dependent")), weights_only=True)
    payload["state_dict"]["conv.weight"] = payload["state_dict"]["conv.weight"] * float("inf")
    bad = tmp_path / "inf.pt"
    torch.save(payload, bad)
    with pytest.raises(QConvertError, match="layer conv: weight holds NaN or Inf"):
        load_checkpoint(bad)
    message = assert_one_line_error(invoke(["export", str(bad), "--out", str(tmp_path / "x.onnx")]))
    assert str(bad) in message and "layer conv" in message


def _mutations():
    """(name, change to the checkpoint payload, text the error must contain)."""
    def state(key, fn):
        return lambda p: p["state_dict"].__setitem__(key, fn(p["state_dict"][key]))

    def spec(layer, role, **fields):
        return lambda p: p["layers"][layer][role].update(fields)

    yield "nan-weight", state("features.3.weight", lambda t: t * float("nan")), "features.3"
    yield "inf-bias", state("classifier.bias", lambda t: t + float("inf")), "classifier"
    yield "nan-alpha", state("features.3.act_quant.alpha", lambda t: t * float("nan")), "alpha"
    yield "negative-alpha", state("features.3.act_quant.alpha", lambda t: -t), "not positive"
    yield "zero-step", state("features.0.act_quant.step", lambda t: t * 0), "not positive"
    yield "non-monotone-compressor", state(
        "features.3.weight_quant.theta", lambda t: torch.tensor([200.0] + [0.0] * 15)), "monotone"
    yield "inf-theta", state("features.7.act_quant.theta", lambda t: t + float("inf")), "theta"
    yield "uninitialised", state("features.7.act_quant.initialized",
                                 lambda t: torch.tensor(False)), "never initialised"
    yield "bits-9", spec("features.3", "weight", bits=9), "bit width 9"
    yield "bits-1", spec("features.3", "act", bits=1), "bit width 1"
    yield "unknown-weight-kind", spec("features.3", "weight", kind="apot"), "apot"
    yield "unknown-act-kind", spec("features.3", "act", kind="pact"), "pact"
    yield "missing-key", lambda p: p["state_dict"].pop("classifier.bias"), "classifier.bias"
    yield "extra-key", lambda p: p["state_dict"].__setitem__("extra.w", torch.zeros(1)), "extra.w"
    yield "wrong-shape", state("classifier.bias", lambda t: torch.zeros(3)), "classifier.bias"
    yield ("unknown-architecture", lambda p: p["arch"].__setitem__("name", "resnet9000"),
           "resnet9000")
    yield "format-version", lambda p: p.__setitem__("version", 99), "version 99"


MUTATIONS = list(_mutations())


@pytest.mark.parametrize(("name", "mutate", "expected"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_broken_checkpoint_is_one_line_naming_file_and_problem(zoo, tmp_path, name, mutate,
                                                               expected):
    payload = torch.load(zoo.case("digits-lcq").path, weights_only=True)
    mutate(payload)
    bad = tmp_path / f"{name}.pt"
    torch.save(payload, bad)
    out = tmp_path / "m.onnx"
    message = assert_one_line_error(invoke(["export", str(bad), "--out", str(out)]))
    assert str(bad) in message and expected in message, message
    assert not out.exists()


def _truncate_table(model: onnx.ModelProto) -> None:
    node = next(n for n in model.graph.node if n.op_type == "LutGather")
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init)[:3], init.name))


@pytest.mark.parametrize("edit", [_truncate_levels, _truncate_table], ids=["kernel", "folded"])
def test_runtime_failure_is_one_line_on_the_real_stderr(zoo, calib_npz, tmp_path, edit):
    """ONNX Runtime logs a failing kernel on the process's stderr (below Python, where
    CliRunner does not look) before it raises: a separate process sees both."""
    from qconvert.native import library_path

    if library_path() is None:
        pytest.skip("native library not built")
    model = _edited(zoo, tmp_path, edit)
    done = subprocess.run(
        [sys.executable, "-c", "from qconvert.cli import main; main()", "validate",
         str(zoo.case("digits-lcq").path), model, "--calib", str(calib_npz)],
        capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stderr.splitlines()
             if line.strip() and line.strip() not in PROGRESS_LABELS]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in done.stderr
