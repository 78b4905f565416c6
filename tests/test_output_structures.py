"""Output structures through `qconvert export` and `qconvert validate`: every structure
either exports and validates (each output reported under its path) or is refused in one
line naming it (exit 2). Never a traceback."""

from __future__ import annotations

import json

import pytest
import torch

from qconvert.checkpoint import save_checkpoint
from qconvert.quant import quantize_model

from .conftest import MEAN, STD, assert_one_line_error, invoke

# structure -> the validate exit code and the outputs (path, shape per sample) expected
WORKS = {
    "tensor": (0, [("output", [4, 8, 8])]),
    "logits": (0, [("output", [4])]),
    "tuple": (0, [("[0]", [4]), ("[1]", [4, 8, 8])]),
    "dict": (0, [("['logits']", [4]), ("['map']", [4, 8, 8])]),
    "levels": (0, [("[0]", [4, 8, 8]), ("[1]", [4, 4, 4]), ("[2]", [4, 2, 2])]),
    "nested": (0, [("['cls'][0]", [4, 8, 8]), ("['cls'][1]", [4, 4, 4]),
                   ("['box'][0]", [4, 8, 8]), ("['box'][1][0]", [2, 8, 8])]),
    "namedtuple": (0, [(".maps", [4, 8, 8]), (".logits", [4])]),
    "with_scalar": (0, [("[0]", [4, 8, 8]), ("[1]", [])]),
    # one number per batch: nothing varies between samples, so nothing can be shown
    "scalar": (3, [("output", [])]),
    "integer": (0, [("output", [])]),
    "bool": (0, [("output", [4, 8, 8])]),
    "half": (0, [("output", [4, 8, 8])]),
    "none_inside": (0, [("[0]", [4, 8, 8])]),  # torch.export drops None outputs
    "same_twice": (0, [("[0]", [4, 8, 8]), ("[1]", [4, 8, 8])]),
    "input_through": (0, [("[0]", [4, 8, 8]), ("[1]", [1, 8, 8])]),
}
REFUSED = {
    "python_float": "output [1] is a float (1.5), not a tensor",
    "string": "output [1] is a str (boxes), not a tensor",
    "no_tensor": "the model returns no tensor",
    "complex": "the output is complex (torch.complex64)",
    "constant": "quantized layer conv does not reach any output",
    "shared_head": "quantized layer head runs 2 times in one forward",
}


def _checkpoint(tmp_path, structure: str):
    from tests import output_structure_archs

    torch.manual_seed(0)
    model = quantize_model(output_structure_archs.build(structure), "lcq", 4, 4)
    model.train()
    model(torch.randn(8, 1, 8, 8))
    path = tmp_path / f"{structure}.pt"
    save_checkpoint(path, model.eval(), arch="tests.output_structure_archs:build",
                    arch_kwargs={"structure": structure}, input_shape=(1, 8, 8), mean=MEAN,
                    std=STD)
    return path


def test_at_least_ten_structures_are_covered():
    assert len(WORKS) + len(REFUSED) >= 10


@pytest.mark.parametrize("structure", sorted(WORKS))
def test_structure_exports_and_validates(tmp_path, structure):
    code, outputs = WORKS[structure]
    ckpt = _checkpoint(tmp_path, structure)
    model = tmp_path / f"{structure}.onnx"
    exported = invoke(["export", ckpt, "--out", model])
    assert exported.exit_code == 0, exported.output
    report_path = tmp_path / "r.json"
    result = invoke(["validate", ckpt, model, "--synthetic", 8, "--report", report_path])
    assert result.exit_code == code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit) or result.exception is None
    assert "Traceback" not in result.output
    report = json.loads(report_path.read_text())
    assert [(o["name"], o["shape"]) for o in report["outputs"]] == outputs
    assert report["output_shapes"] == [shape for _, shape in outputs]
    assert all(layer["op_mismatches"] == 0 for layer in report["layers"])
    for out in report["outputs"]:  # class metrics exactly where an output is [N, classes]
        logits = len(out["shape"]) == 1 and out["shape"][0] > 1
        assert (out["referee"]["onnx"]["top1_agreement"] is not None) == logits


@pytest.mark.parametrize("structure", sorted(REFUSED))
def test_structure_the_exporter_cannot_give_is_refused_in_one_line(tmp_path, structure):
    ckpt = _checkpoint(tmp_path, structure)
    result = invoke(["export", ckpt, "--out", tmp_path / "m.onnx"])
    assert_one_line_error(result)
    assert REFUSED[structure] in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_output_of_data_dependent_size_exports_and_is_refused_by_validate(tmp_path):
    """f[f > 0] exports (torch.export allows data-dependent sizes), but its length changes
    from batch to batch, so there is nothing to compare element by element."""
    ckpt = _checkpoint(tmp_path, "masked")
    model = tmp_path / "m.onnx"
    assert invoke(["export", ckpt, "--out", model]).exit_code == 0
    result = invoke(["validate", ckpt, model, "--synthetic", 16, "--batch-size", 8])
    assert_one_line_error(result)
    assert "the output has shape [" in result.stderr
    assert "its size depends on the data" in result.stderr


@pytest.mark.parametrize("task, message", [
    ("classification", "--task classification needs an output of shape [N, classes]"),
    ("segmentation", "--task segmentation needs an output of shape [N, classes, H, W]"),
    ("detection", "--task detection needs the outputs as {'cls_logits'"),
])
def test_a_task_no_output_fits_is_refused_in_one_line(tmp_path, task, message):
    ckpt = _checkpoint(tmp_path, "with_scalar")  # [N, 4, 8, 8] and a scalar
    model = tmp_path / "m.onnx"
    assert invoke(["export", ckpt, "--out", model]).exit_code == 0
    if task == "segmentation":  # a single-channel map is no class map either
        ckpt = _checkpoint(tmp_path, "integer")
        model = tmp_path / "i.onnx"
        assert invoke(["export", ckpt, "--out", model]).exit_code == 0
    result = invoke(["validate", ckpt, model, "--synthetic", 4, "--task", task])
    assert_one_line_error(result)
    assert message in result.stderr
