"""Segmentation, reconstruction and detection networks (random QAT parameters, W4A4) export
and pass `qconvert validate` by default; a corrupted weight fails each with the task's own
check and the layer named. The class-map measures are checked against a plain count."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from qconvert import manifest
from qconvert.archs import build_architecture
from qconvert.checkpoint import save_checkpoint
from qconvert.quant import quantize_model
from qconvert.validate import CLASS_MAP, distance

from .conftest import invoke

SMALL_RETINANET = {"width": 8, "fpn_channels": 16, "head_convs": 1, "num_classes": 3}
# name -> (architecture, kwargs, input size, task, a layer to corrupt, the task's check)
NETWORKS = {
    "lraspp": ("lraspp_mobilenetv3_small", {}, 32, "segmentation", "low_classifier",
               "referee_pixels"),
    "autoencoder": ("conv_autoencoder", {}, 16, "regression", "decoder.0", "referee_mean"),
    "retinanet": ("retinanet_resnet18_fpn", SMALL_RETINANET, 64, "detection",
                  "cls_heads.0.2", "referee_boxes"),
}
MEAN3, STD3 = (0.5,) * 3, (0.25,) * 3


def random_qat_checkpoint(path, arch: str, kwargs: dict, size: int, scheme: str):
    """build -> quantize_model W4A4 -> BatchNorm statistics from a few random batches (the
    running averages one batch leaves are far from the batch statistics) -> save."""
    torch.manual_seed(0)
    model = quantize_model(build_architecture(arch, kwargs), scheme, 4, 4)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None  # a plain average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model((torch.rand(8, 3, size, size) - MEAN3[0]) / STD3[0])
    for norm in norms:
        norm.momentum = 0.1
    save_checkpoint(path, model.eval(), arch=arch, arch_kwargs=kwargs,
                    input_shape=(3, size, size), mean=MEAN3, std=STD3)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(network, scheme) -> (checkpoint, onnx path), built on first use."""
    cache: dict[tuple[str, str], tuple] = {}
    root = tmp_path_factory.mktemp("tasks")

    def get(name: str, scheme: str):
        if (name, scheme) not in cache:
            arch, kwargs, size, *_ = NETWORKS[name]
            ckpt = random_qat_checkpoint(root / f"{name}-{scheme}.pt", arch, kwargs, size,
                                         scheme)
            model = root / f"{name}-{scheme}.onnx"
            result = invoke(["export", ckpt, "--out", model])
            assert result.exit_code == 0, result.output
            cache[name, scheme] = ckpt, model
        return cache[name, scheme]

    return get


def _validate(ckpt, model, tmp_path, *extra):
    report_path = tmp_path / "r.json"
    result = invoke(["validate", ckpt, model, "--synthetic", 16, "--report", report_path,
                     *extra])
    assert "Traceback" not in result.output
    return result, json.loads(report_path.read_text())


@pytest.mark.parametrize("scheme", ["lcq", "asq-post"])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_network_passes_validate_by_default(exported, tmp_path, name, scheme):
    ckpt, model = exported(name, scheme)
    result, report = _validate(ckpt, model, tmp_path, "--plot", tmp_path / "p.png")
    assert result.exit_code == 0, (result.output, report["diagnosis"])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    task, check = NETWORKS[name][3], NETWORKS[name][5]
    assert report["task"] == task  # the architecture's qconvert_task
    assert check in {c["name"] for c in report["checks"]}
    if task == "segmentation":
        (out,) = report["outputs"]
        assert out["kind"] == CLASS_MAP
        assert out["referee"]["onnx"]["pixels"] == 16 * 32 * 32
    if task == "detection":
        assert report["detection"]["onnx"]["reference"] > 0  # not a vacuous comparison
        assert len(report["outputs"]) == 10  # 5 levels x (class logits, box regressions)


def _negated_weight(model: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """``layer``'s stored weight negated: its level table (or scale) times -1."""
    corrupted = onnx.ModelProto()
    corrupted.CopyFrom(model)
    params = manifest.read(corrupted).layer(layer).weight.params
    (init,) = [i for i in corrupted.graph.initializer if i.name == params]
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), params))
    return corrupted


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_corrupted_weight_fails_with_the_task_check(exported, tmp_path, name):
    ckpt, model = exported(name, "lcq")
    _, _, _, task, layer, check = NETWORKS[name]
    bad = tmp_path / "bad.onnx"
    onnx.save(_negated_weight(onnx.load(model), layer), bad)
    result, report = _validate(ckpt, bad, tmp_path)
    assert result.exit_code == 1, result.output
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert {"op_exact", check} <= failed, report["checks"]
    assert layer in report["diagnosis"]
    assert f"FAIL: {report['diagnosis']}" in result.stderr


def test_class_map_measures_against_a_plain_count():
    rng = np.random.default_rng(0)
    shape = [3, 4, 5]
    a = rng.normal(size=(6, *shape))
    b = a.copy()
    b[0, :, 0, 0] = [0, 0, 9]  # a few pixels move to class 2
    b[1, :, 2, 3] = [9, 0, 0]
    b[5, :, 3, 4] = [0, 9, 0]
    d = distance(a.reshape(6, -1), b.reshape(6, -1), CLASS_MAP, shape)
    map_a, map_b = a.argmax(1), b.argmax(1)
    same = sum(int(map_a[n, y, x] == map_b[n, y, x])
               for n in range(6) for y in range(4) for x in range(5))
    assert d.pixels == 120 and d.pixel_disagreements == 120 - same
    assert d.pixel_agreement == same / 120
    ious = []
    for c in range(3):
        inter = sum(int(map_a[n, y, x] == c and map_b[n, y, x] == c)
                    for n in range(6) for y in range(4) for x in range(5))
        union = sum(int(map_a[n, y, x] == c or map_b[n, y, x] == c)
                    for n in range(6) for y in range(4) for x in range(5))
        ious.append(inter / union)
    assert d.agreement_iou == pytest.approx(sum(ious) / 3)
    assert d.top1_agreement is None  # no class-logit measures on a map


@pytest.mark.parametrize("shapes, task, kinds", [
    ([[10]], None, ["class logits"]),  # [N, C]: classification, inferred
    ([[1]], None, ["values"]),  # one column is a regression
    ([[5, 8, 8]], None, ["values"]),  # [N, C, H, W] alone is ambiguous: values
    ([[5, 8, 8]], "segmentation", ["class map"]),
    ([[1, 8, 8], [5, 8, 8]], "segmentation", ["values", "class map"]),
    ([[10], [4, 8, 8]], None, ["class logits", "values"]),
    ([[10], [4, 8, 8]], "regression", ["values", "values"]),
    ([[]], None, ["values"]),  # a 0-d scalar
])
def test_task_and_output_kinds(shapes, task, kinds):
    from qconvert.validate import output_kinds, task_of

    task = task or task_of(shapes)
    assert output_kinds(shapes, [f"[{i}]" for i in range(len(shapes))], task) == kinds


def test_unknown_task_is_refused():
    from qconvert.errors import QConvertError
    from qconvert.validate import output_kinds

    with pytest.raises(QConvertError, match="unknown task 'boxes'"):
        output_kinds([[10]], ["output"], "boxes")
