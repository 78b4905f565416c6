"""validate on models whose outputs are not one [N, classes] tensor: no crash, every output
compared, class metrics only where the output is class logits."""

from __future__ import annotations

import json

import pytest
import torch

from qconvert.checkpoint import save_checkpoint
from qconvert.quant import quantize_model

from .conftest import MEAN, STD, invoke


def _checkpoint(tmp_path, name: str):
    from tests import validate_output_archs

    torch.manual_seed(0)
    model = quantize_model(getattr(validate_output_archs, name)(), "lcq", 4, 4)
    model.train()
    model(torch.randn(8, 1, 8, 8))
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, model.eval(), arch=f"tests.validate_output_archs:{name}",
                    input_shape=(1, 8, 8), mean=MEAN, std=STD)
    return path


@pytest.mark.parametrize("name, shapes, classes", [
    ("dense_map", [[5, 8, 8]], False),
    ("autoencoder", [[1, 8, 8]], False),
    ("two_heads", [[10], [4, 8, 8]], False),
])
def test_any_output_structure_validates(tmp_path, name, shapes, classes):
    ckpt = _checkpoint(tmp_path, name)
    model = tmp_path / f"{name}.onnx"
    exported = invoke(["export", ckpt, "--out", model])
    if exported.exit_code == 2 and name == "two_heads":
        pytest.skip(f"the exporter refuses tuple outputs: {exported.stderr.strip()}")
    assert exported.exit_code == 0, exported.output
    report_path = tmp_path / "r.json"
    result = invoke(["validate", ckpt, model, "--synthetic", 16, "--report", report_path])
    assert result.exit_code in (0, 3), (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    report = json.loads(report_path.read_text())
    assert report["output_shapes"] == shapes
    assert (report["top1_agreement"] is not None) == classes
    assert report["referee"]["onnx"]["mean_abs_diff"] >= 0
    assert all(layer["op_mismatches"] == 0 for layer in report["layers"])
    assert [o["shape"] for o in report["outputs"]] == shapes
    for out in report["outputs"]:
        logits = len(out["shape"]) == 1
        assert out["kind"] == ("class logits" if logits else "values")
        assert (out["referee"]["onnx"]["top1_agreement"] is not None) == logits
    if name == "two_heads":  # the logits among the outputs get their own top-1 check
        assert "referee_top1" in {c["name"] for c in report["checks"]}
