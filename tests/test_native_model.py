"""An exported model run through the ONNX Runtime C++ API with the native ops.

custom_ops/tools/make_example.py exports a checkpoint and stores an input and
the output ONNX Runtime computes WITHOUT the library (the function bodies);
custom_ops/build/qconvert_run_model (C++, linked against the pip wheel's
libonnxruntime) runs the model with the native kernels and compares bit for
bit. Models: the test zoo's "digits-mixed" (all four qconvert ops in one
network, tests/conftest.py) and "resnet20-lcq", plus the shipped checkpoints
(models/checkpoints/*.pt, one per scheme family) or $QCONVERT_EXAMPLE_CKPT.
The runner's timing mode (`--time N`) is checked for a sane, parseable line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "custom_ops" / "build" / "qconvert_run_model"
LIBRARY = REPO / "custom_ops" / "build" / "libqconvert_ops.so"
MAKE_EXAMPLE = REPO / "custom_ops" / "tools" / "make_example.py"


def checkpoints() -> list[Path]:
    if os.environ.get("QCONVERT_EXAMPLE_CKPT"):
        return [Path(p) for p in os.environ["QCONVERT_EXAMPLE_CKPT"].split(os.pathsep)]
    shipped = sorted((REPO / "models" / "checkpoints").glob("*.pt"))
    # One checkpoint per activation/weight scheme family keeps the run short.
    chosen: dict[str, Path] = {}
    for path in shipped:
        for family in ("lcq", "asq", "post", "pot", "lsq"):
            if family in path.stem and family not in chosen:
                chosen[family] = path
    return sorted(set(chosen.values()))[:3]


def require_runner() -> None:
    if not (RUNNER.exists() and LIBRARY.exists()):
        if os.environ.get("CI"):
            pytest.fail("qconvert_run_model or the library is not built (make ops)")
        pytest.skip("qconvert_run_model is not built: run `make ops`")


def run_cxx(directory: Path, model: Path) -> None:
    for threads in ("1", "2"):
        proc = subprocess.run(
            [
                str(RUNNER),
                str(model),
                str(LIBRARY),
                str(directory / "input.qct"),
                str(directory / "expected.qct"),
                threads,
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert " 0 mismatches" in proc.stdout, proc.stdout


def load_make_example():
    spec = importlib.util.spec_from_file_location("make_example", MAKE_EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("key", ["digits-mixed", "resnet20-lcq"])
def test_zoo_model_through_cxx_api(zoo, key, tmp_path):
    require_runner()
    model = zoo.onnx_path(key)  # exported with its function bodies
    x = zoo.case(key).inputs(batch=16)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    plain = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    expected = plain.run(None, {plain.get_inputs()[0].name: x})[0]
    assert np.isfinite(expected).all()
    qct = load_make_example()
    qct.write_qct(tmp_path / "input.qct", x)
    qct.write_qct(tmp_path / "expected.qct", expected)
    # The same export without function bodies: only the native kernels can run it.
    run_cxx(tmp_path, zoo.onnx_path(key, functions=False))


@pytest.mark.parametrize("checkpoint", checkpoints() or [None], ids=lambda p: p and p.stem)
def test_exported_model_through_cxx_api(checkpoint, tmp_path):
    if checkpoint is None:
        pytest.skip("no checkpoint in models/checkpoints/ (or $QCONVERT_EXAMPLE_CKPT)")
    require_runner()
    subprocess.run(
        [sys.executable, str(MAKE_EXAMPLE), str(checkpoint), str(tmp_path), "--batch", "16"],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    run_cxx(tmp_path, tmp_path / "model.onnx")


def test_timing_mode_prints_one_json_line(zoo):
    """`--time N`: a plain session on random input of the model's shape, batch set."""
    require_runner()
    model = zoo.onnx_path("digits-mixed", functions=False)  # only the kernels can run it
    proc = subprocess.run(
        [str(RUNNER), "--time", "5", str(model), str(LIBRARY), "--warmup", "1", "--batch", "3",
         "--threads", "2"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = proc.stdout.splitlines()
    result = json.loads(line)
    assert (result["batch"], result["threads"], result["warmup"], result["runs"]) == (3, 2, 1, 5)
    assert result["model"] == str(model)
    assert 0 < result["p10_ms"] <= result["median_ms"] <= result["p90_ms"] < 60_000


@pytest.mark.parametrize(("args", "fragment"), [
    (["--time", "0"], "--time needs a whole number >= 1"),
    (["--time", "3", "--batch", "x"], "--batch needs a whole number >= 1"),
    (["--time", "3", "--nope", "1"], "unknown option --nope"),
])
def test_timing_mode_usage_errors(args, fragment):
    require_runner()
    proc = subprocess.run([str(RUNNER), *args, "model.onnx", str(LIBRARY)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: ") and fragment in line
