"""What validate guarantees about what it measured: the deployed file end to end, a PyTorch
reference whose every quantizer ran, no PASS on a degenerate comparison, exit 1 only for a
parity failure; and export's file mode and quiet logs."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qconvert.validate as val
from qconvert import manifest
from qconvert.calib import load_calibration
from qconvert.checkpoint import Checkpoint, InputSpec, load_checkpoint, save_checkpoint
from qconvert.errors import QConvertError
from qconvert.preprocess import prepare_inputs
from qconvert.quant import quantize_model
from qconvert.runtime import session

from .conftest import ARCH_KWARGS, MEAN, STD, assert_one_line_error, invoke


def _export(ckpt_path, out) -> None:
    result = invoke(["export", ckpt_path, "--out", out])
    assert result.exit_code == 0, result.output


def _save_variant(zoo, key: str, tmp_path, edit) -> tuple:
    """A copy of the zoo model changed by ``edit``, saved and exported."""
    case = zoo.case(key)
    model = copy.deepcopy(case.model)
    with torch.no_grad():
        edit(model)
    path, out = tmp_path / "variant.pt", tmp_path / "variant.onnx"
    save_checkpoint(path, model, arch=case.spec.arch, arch_kwargs=ARCH_KWARGS,
                    input_shape=case.shape, mean=MEAN, std=STD)
    _export(path, out)
    return path, out


# ------------------------------------------------------------- the file as deployed


def test_end_to_end_figures_come_from_the_file_as_deployed(zoo, calib_npz):
    """The per-layer pass adds graph outputs, which changes how ONNX Runtime optimizes the
    graph; the end-to-end figures must come from a session on the unmodified file."""
    case = zoo.case("digits-lcq")
    model = zoo.onnx_model("digits-lcq")
    built = []

    def make_session(m):
        built.append(m.SerializeToString())
        return session(m, "function", announce=None)

    ckpt = load_checkpoint(case.path)
    data = load_calibration(calib_npz, case.shape)
    report = val.validate(ckpt, model, data, make_session, per_layer=True)
    assert model.SerializeToString() in built  # a session on the file exactly as it is
    assert len(report.layers) == 4 and report.per_layer_samples == 48
    assert report.level_flips["elements"] == sum(layer.level_elements for layer in report.layers)
    assert report.level_flips["elements"] > 0
    bare = session(model, "function", announce=None)
    x = prepare_inputs(data.x, case.shape, MEAN, STD)
    with torch.no_grad():
        want = case.model(x).numpy().astype(np.float64)
    got = bare.run({bare.input_names[0]: x.numpy()})[0].astype(np.float64)
    assert report.max_abs_diff == float(np.abs(got - want).max())
    assert report.mean_abs_diff == pytest.approx(float(np.abs(got - want).mean()), rel=1e-12)


# ------------------------------------------------------------- every quantizer ran


class _StubSession:
    """Stands in for the ONNX side: validate must refuse before comparing anything."""

    runtime, input_names, output_names = "stub", ["input"], ["output"]

    def run(self, feeds, outputs=None):
        return [np.zeros((len(feeds["input"]), 10), np.float32)]


class _Bypass(nn.Module):
    """Reads a layer's float weight directly (as nn.MultiheadAttention's fused path did with
    out_proj): that layer's quantizers never run."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(F.linear(x, self.inner.weight, self.inner.bias)))


def test_validate_refuses_a_pytorch_model_whose_quantizers_did_not_run():
    torch.manual_seed(0)
    model = quantize_model(_Bypass(), "lsq", 4, 4)
    model.train()
    model(torch.randn(4, 16))
    ckpt = Checkpoint(model=model.eval(), arch="test", arch_kwargs={}, scheme="lsq",
                      layer_specs={}, input=InputSpec((16,)))
    data = val.CalibData(np.random.default_rng(0).random((4, 16), dtype=np.float32),
                         None, "test")
    exported = onnx.ModelProto()
    manifest.write(exported, manifest.Manifest("0", "lsq", "test", "", {"shape": [16]}, []))
    with pytest.raises(QConvertError, match="did not run 2 of its quantizers"):
        val.validate(ckpt, exported, data, lambda m: _StubSession())


# ------------------------------------------------------------- degenerate comparisons


def _zero_head(model) -> None:
    model.classifier.weight.zero_()
    model.classifier.bias.zero_()


def _collapse_first_batchnorm(model) -> None:
    model.features[1].running_mean.fill_(1e3)  # every value below 0: ReLU gives 0


@pytest.mark.parametrize("edit, reason", [
    (_zero_head, "every output of the PyTorch model is 0"),
    (_collapse_first_batchnorm, "quantizers output only 0 on this data (features.3.act_quant"),
], ids=["zero-head", "collapsed-batchnorm"])
def test_degenerate_comparison_is_inconclusive_not_pass(zoo, calib_npz, tmp_path, edit, reason):
    ckpt, model = _save_variant(zoo, "digits-lcq", tmp_path, edit)
    report_path = tmp_path / "r.json"
    result = invoke(["validate", ckpt, model, "--calib", calib_npz, "--report", report_path])
    assert result.exit_code == 3, result.output
    assert "PASS" not in result.stdout
    assert "INCONCLUSIVE" in result.stderr and reason in result.stderr
    report = json.loads(report_path.read_text())
    assert report["verdict"] == "INCONCLUSIVE" and report["passed"] is False
    assert any(reason in line for line in report["degenerate"])


# ------------------------------------------------------------- exit codes


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


def test_unexpected_error_in_validate_is_exit_4_in_one_line(zoo, monkeypatch):
    monkeypatch.setattr(val, "validate", _boom)
    args = ["validate", zoo.case("digits-lsq").path, zoo.onnx_path("digits-lsq"),
            "--synthetic", 4]
    message = assert_one_line_error(invoke(args), code=4)
    assert "RuntimeError: boom" in message and "--debug" in message
    debug = invoke(["--debug", *args])
    assert isinstance(debug.exception, RuntimeError)  # the traceback, on request


def test_unexpected_error_in_inspect_is_exit_4(zoo, monkeypatch):
    import qconvert.inspect_model

    monkeypatch.setattr(qconvert.inspect_model, "inspect_model", _boom)
    message = assert_one_line_error(invoke(["inspect", zoo.onnx_path("digits-lsq")]), code=4)
    assert "boom" in message


# ------------------------------------------------------------- calibration shapes


def test_npz_samples_of_another_shape_are_an_error_naming_both(zoo, tmp_path):
    path = tmp_path / "narrow.npz"
    np.savez(path, x=np.random.default_rng(0).random((8, 1, 8, 3), dtype=np.float32),
             y=np.arange(8) % 10)
    args = ["validate", zoo.case("digits-lcq").path, zoo.onnx_path("digits-lcq"),
            "--calib", path]
    message = assert_one_line_error(invoke(args))
    assert "(1, 8, 3)" in message and "(1, 8, 8)" in message and "--resize" in message
    resized = invoke([*args, "--resize"])
    assert resized.exit_code in (0, 3), resized.output  # runs, on resized samples


# ------------------------------------------------------------- --json and --report


def test_json_prints_the_report_on_stdout(zoo, tmp_path):
    report_path = tmp_path / "r.json"
    result = invoke(["validate", zoo.case("digits-pot").path, zoo.onnx_path("digits-pot"),
                     "--synthetic", 16, "--json", "--report", report_path])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # nothing else on stdout
    assert printed == json.loads(report_path.read_text())
    assert printed["verdict"] == "PASS" and printed["samples"] == 16
    assert set(printed["referee"]) >= {"torch", "onnx"}
    assert "PASS" in result.stderr


# ------------------------------------------------------------- export: file mode, logs


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_file_mode_follows_the_umask(zoo, tmp_path, umask):
    out = tmp_path / "m.onnx"
    previous = os.umask(umask)
    try:
        _export(zoo.case("digits-lsq").path, out)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_torch_log_lines_do_not_leak_from_a_failed_export(tmp_path):
    """torch's log handlers hold the process's real stderr, so this runs the CLI in a
    process of its own, as a user does."""
    from .test_hostile import _checkpoint

    root = Path(__file__).resolve().parent.parent
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    ckpt = _checkpoint(tmp_path, "tests.hostile_arch:data_dependent")
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv[0] = 'qconvert'; "
         "from qconvert.cli import main; main()", "export", ckpt, "--out",
         str(tmp_path / "m.onnx")],
        capture_output=True, text=True, cwd=root,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *pythonpath])))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and line.strip() != "folding layers"]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    glog = re.compile(r"^[EWI]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)
    assert not glog.search(result.stderr), result.stderr
