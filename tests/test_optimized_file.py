"""``export --optimize-for cpu``: ONNX Runtime's optimized model, written next to the export,
loads in a plain session and computes bit for bit what qconvert's session computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qconvert import native
from qconvert.optimized_file import CPU_KEY, ORT_VERSION_KEY, TARGET_KEY, cpu_signature
from qconvert.runtime import session

from .conftest import assert_one_line_error, invoke

pytestmark = pytest.mark.skipif(native.library_path() is None, reason="native library not built")


def _plain(path, level=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = level
    native.register(options)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("key", ["digits-mixed", "digits-lsq", "resnet20-lcq"])
def test_optimized_file_is_bit_identical(zoo, key, tmp_path):
    case = zoo.case(key)
    out = tmp_path / "model.onnx"
    result = invoke(["export", case.path, "--out", out, "--optimize-for", "cpu"])
    assert result.exit_code == 0, result.output
    optimized_path = tmp_path / "model.ort-cpu.onnx"
    assert "model.ort-cpu.onnx" in result.output
    meta = {p.key: p.value for p in onnx.load(str(optimized_path)).metadata_props}
    assert meta[ORT_VERSION_KEY] == ort.__version__
    assert meta[TARGET_KEY] == "cpu" and meta[CPU_KEY] == cpu_signature()
    assert meta["qconvert_checkpoint_sha256"] == case.sha256()
    x = case.inputs(5, seed=11)
    want = session(out, "native", announce=None).run({"input": x})[0]
    for level in (None, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED):
        got = _plain(optimized_path, level).run(None, {"input": x})[0]
        assert got.tobytes() == np.ascontiguousarray(want).tobytes()


def test_existing_optimized_file_is_refused_before_exporting(zoo, tmp_path):
    (tmp_path / "model.ort-cpu.onnx").write_bytes(b"keep")
    result = invoke(["export", zoo.case("digits-lsq").path, "--out", tmp_path / "model.onnx",
                     "--optimize-for", "cpu"])
    assert "model.ort-cpu.onnx exists" in assert_one_line_error(result)
    assert not (tmp_path / "model.onnx").exists()
    assert (tmp_path / "model.ort-cpu.onnx").read_bytes() == b"keep"
