"""The qconvert command line: help, ops-lib, errors as exit codes, --debug."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from qconvert import native

from .conftest import assert_one_line_error, invoke

QCONVERT = Path(sys.executable).parent / "qconvert"
SUBCOMMANDS = ["export", "validate", "inspect", "ops-lib"]


def test_main_help():
    result = invoke(["--help"])
    assert result.exit_code == 0
    for command in SUBCOMMANDS:
        assert command in result.stdout
    assert "--debug" in result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command):
    result = invoke([command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage:")
    assert command in result.stdout.splitlines()[0]


def test_help_options_documented():
    assert "--opset" in invoke(["export", "--help"]).stdout
    assert "--no-functions" in invoke(["export", "--help"]).stdout
    text = invoke(["validate", "--help"]).stdout
    for option in ("--calib", "--synthetic", "--runtime", "--per-layer", "--min-agreement",
                   "--max-abs-diff", "--report", "--plot", "--strict"):
        assert option in text
    assert "--json" in invoke(["inspect", "--help"]).stdout


def test_version():
    result = invoke(["--version"])
    assert result.exit_code == 0 and version("qconvert") in result.stdout


def test_ops_lib_prints_existing_path(monkeypatch):
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    result = invoke(["ops-lib"])
    if native.library_path() is None:
        assert_one_line_error(result)
        pytest.skip("native library not built")
    assert result.exit_code == 0
    path = Path(result.stdout.strip())
    assert path.is_file() and path.name.endswith(".so")


def test_ops_lib_env_override_missing():
    result = invoke(["ops-lib"], env={native.ENV_VAR: "/nonexistent/libqconvert_ops.so"})
    assert "not built" in assert_one_line_error(result)


def test_ops_lib_env_override_existing(tmp_path):
    lib = tmp_path / "libcustom.so"
    lib.write_bytes(b"")
    result = invoke(["ops-lib"], env={native.ENV_VAR: str(lib)})
    assert result.exit_code == 0 and result.stdout.strip() == str(lib)


@pytest.mark.parametrize("command", [
    ["export", "{missing}", "--out", "{tmp}/m.onnx"],
    ["validate", "{missing}", "{tmp}/m.onnx", "--synthetic", "2"],
])
def test_missing_checkpoint(tmp_path, command):
    args = [a.format(missing=tmp_path / "missing.pt", tmp=tmp_path) for a in command]
    line = assert_one_line_error(invoke(args))
    assert "missing.pt" in line and "no such checkpoint" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["text", "random", "tensor", "dict"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "text":
        path.write_text("hello, I am not a checkpoint\n")
    elif content == "random":
        path.write_bytes(os.urandom(4096))
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    result = invoke(["export", path, "--out", tmp_path / "m.onnx"])
    assert "bad.pt" in assert_one_line_error(result)
    assert not (tmp_path / "m.onnx").exists()


def test_pickled_module_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    line = assert_one_line_error(invoke(["export", path, "--out", tmp_path / "m.onnx"]))
    assert "pickle" in line


def test_native_runtime_without_library(zoo):
    case = zoo.case("digits-lcq")
    result = invoke(["validate", case.path, zoo.onnx_path("digits-lcq"), "--synthetic", 2,
                     "--runtime", "native"], env={native.ENV_VAR: "/nonexistent/lib.so"})
    assert "native library" in assert_one_line_error(result)


def test_uninitialised_checkpoint_is_refused(tmp_path):
    from qconvert.archs import build_architecture
    from qconvert.checkpoint import save_checkpoint
    from qconvert.quant import quantize_model

    model = quantize_model(build_architecture("digits_cnn", {"in_channels": 1}), "lsq").eval()
    path = save_checkpoint(tmp_path / "fresh.pt", model, arch="digits_cnn",
                           arch_kwargs={"in_channels": 1}, input_shape=(1, 8, 8))
    line = assert_one_line_error(invoke(["export", path, "--out", tmp_path / "m.onnx"]))
    assert "initialised" in line
    assert not (tmp_path / "m.onnx").exists()


def test_debug_shows_traceback_subprocess(tmp_path):
    """The installed entry point: one line without --debug (checked in-process above), a
    traceback with it."""
    missing = tmp_path / "missing.pt"
    debug = subprocess.run([str(QCONVERT), "--debug", "export", str(missing), "--out",
                            str(tmp_path / "m.onnx")], capture_output=True, text=True,
                           timeout=120)
    assert debug.returncode not in (0, 2)
    assert "Traceback" in debug.stderr and "QConvertError" in debug.stderr
    assert "missing.pt" in debug.stderr


def test_debug_reraises_in_process(tmp_path):
    from qconvert.errors import QConvertError

    result = invoke(["--debug", "inspect", tmp_path / "nope.onnx"])
    assert isinstance(result.exception, QConvertError)
