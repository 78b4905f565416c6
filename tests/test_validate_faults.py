"""Faults injected into an exported model: `qconvert validate` with default options must FAIL
each one (exit 1) and name the layer.

Each fault finds what it corrupts through the exporter's per-layer records (the nodes of a
layer's quantizer and weight decode) and the PyTorch quantizer's own parameters, never by
matching op patterns, so the tests hold whatever ops implement a quantizer.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from qconvert import manifest

from .conftest import MEAN, STD, invoke, quantized_layers


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _layer(model: onnx.ModelProto, layer: str) -> manifest.LayerRecord:
    return manifest.read(model).layer(layer)


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _replace_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    init = _initializers(model)[name]
    init.CopyFrom(numpy_helper.from_array(array, name))


def _node_inputs(model: onnx.ModelProto, node_names: list[str]) -> list[str]:
    wanted = set(node_names)
    return [i for n in model.graph.node if n.name in wanted for i in n.input]


def _inits_equal_to(model: onnx.ModelProto, node_names: list[str],
                    value: np.ndarray) -> list[str]:
    """Initializers read by the given nodes whose value is exactly ``value``."""
    inits = _initializers(model)
    found = []
    for name in dict.fromkeys(_node_inputs(model, node_names)):
        if name in inits:
            array = numpy_helper.to_array(inits[name])
            if array.dtype == value.dtype and array.size == value.size and np.array_equal(
                    array.reshape(-1), value.reshape(-1)):
                found.append(name)
    return found


def _validate(zoo, key: str, model: onnx.ModelProto, tmp_path, data,
              *extra) -> tuple[object, dict]:
    path, report = tmp_path / "faulty.onnx", tmp_path / "r.json"
    onnx.save(model, str(path))
    result = invoke(["validate", zoo.case(key).path, path, "--calib", data, "--report", report,
                     *extra])
    return result, json.loads(report.read_text()) if report.exists() else {}


def _assert_fails_naming(result, report: dict, layer: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    fail_lines = [line for line in result.stderr.splitlines() if line.startswith("FAIL:")]
    assert len(fail_lines) == 1 and layer in fail_lines[0], result.stderr
    assert report["verdict"] == "FAIL" and report["passed"] is False
    assert report["first_departure"] == layer
    assert "Traceback" not in result.output


def _act_quant(zoo, key: str, layer: str):
    return dict(quantized_layers(zoo.case(key).model))[layer].act_quant


# ------------------------------------------------------------- 1: rounding half away from 0


def _tie_calibration(zoo, key: str, layer: str, path) -> None:
    """Samples where ``layer``'s quantizer input x gives x / step = k + 0.5 exactly (k even)
    at a quarter of the pixels: half-to-even and half-away-from-zero disagree there."""
    step = _act_quant(zoo, key, layer).step.detach().reshape(())
    shape = zoo.case(key).shape
    ties = []
    for k in range(0, 16, 2):
        centre = np.float32((k + 0.5) * float(step) * STD[0] + MEAN[0])
        for candidate in centre + np.arange(-8, 9, dtype=np.float32) * np.spacing(centre):
            x = (torch.tensor([candidate], dtype=torch.float32) - MEAN[0]) / STD[0]
            if float(x / step) == k + 0.5:
                ties.append(candidate)
                break
    assert len(ties) >= 4, ties
    rng = np.random.default_rng(7)
    x = rng.random((24, *shape), dtype=np.float32)
    mask = rng.random(x.shape) < 0.25
    x[mask] = rng.choice(np.array(ties, np.float32), int(mask.sum()))
    np.savez(path, x=x)


def _half_away_quantizer(model: onnx.ModelProto, layer: str, step: float, lo: int,
                         hi: int) -> onnx.ModelProto:
    """The layer's quantizer nodes replaced by clip(sign(t) floor(|t| + 0.5)) * step."""
    out = _copy(model)
    man = manifest.read(out)
    names = man.layer(layer).act_nodes
    nodes = {n.name: n for n in out.graph.node}
    source, result = nodes[names[0]].input[0], nodes[names[-1]].output[0]
    p = f"fault_{layer}"
    consts = {f"{p}_step": step, f"{p}_half": 0.5, f"{p}_lo": float(lo), f"{p}_hi": float(hi)}
    out.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), k)
                                 for k, v in consts.items())
    new = [
        helper.make_node("Div", [source, f"{p}_step"], [f"{p}_t"], name=f"{p}_div"),
        helper.make_node("Abs", [f"{p}_t"], [f"{p}_abs"], name=f"{p}_absn"),
        helper.make_node("Add", [f"{p}_abs", f"{p}_half"], [f"{p}_up"], name=f"{p}_add"),
        helper.make_node("Floor", [f"{p}_up"], [f"{p}_floor"], name=f"{p}_floorn"),
        helper.make_node("Sign", [f"{p}_t"], [f"{p}_sign"], name=f"{p}_signn"),
        helper.make_node("Mul", [f"{p}_sign", f"{p}_floor"], [f"{p}_r"], name=f"{p}_mulr"),
        helper.make_node("Clip", [f"{p}_r", f"{p}_lo", f"{p}_hi"], [f"{p}_c"], name=f"{p}_clip"),
        helper.make_node("Mul", [f"{p}_c", f"{p}_step"], [result], name=f"{p}_muls"),
    ]
    first = next(i for i, n in enumerate(out.graph.node) if n.name == names[0])
    kept = [n for n in out.graph.node if n.name not in set(names)]
    del out.graph.node[:]
    out.graph.node.extend(kept[:first] + new + kept[first:])
    man.layer(layer).act_nodes = [n.name for n in new]
    manifest.write(out, man)
    onnx.checker.check_model(out)
    return out


def test_rounding_half_away_from_zero_fails_naming_the_layer(zoo, tmp_path):
    key, layer = "digits-lsq", "features.0"
    q = _act_quant(zoo, key, layer)
    data = tmp_path / "ties.npz"
    _tie_calibration(zoo, key, layer, data)
    clean, _ = _validate(zoo, key, zoo.onnx_model(key), tmp_path, data)
    assert clean.exit_code == 0, clean.output  # the data alone is fine
    lo, hi = q.code_range
    faulty = _half_away_quantizer(zoo.onnx_model(key), layer, float(q.step.detach()), lo, hi)
    result, report = _validate(zoo, key, faulty, tmp_path, data)
    _assert_fails_naming(result, report, layer)
    layers = {r["name"]: r for r in report["layers"]}
    assert layers[layer]["op_mismatches"] > 0


# ------------------------------------------------------------- 2: a level moved by 1 ulp


def _most_used_level(zoo, key: str, layer: str, data) -> float:
    case = zoo.case(key)
    seen = []
    q = _act_quant(zoo, key, layer)
    handle = q.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        x = torch.from_numpy((np.load(data)["x"] - MEAN[0]) / STD[0]).float()
        with torch.no_grad():
            case.model(x)
    finally:
        handle.remove()
    values = np.abs(seen[0].numpy().reshape(-1))
    uniq, counts = np.unique(values[values != 0], return_counts=True)
    return float(uniq[counts.argmax()])


def test_level_table_entry_moved_by_one_ulp_fails_naming_the_layer(zoo, calib_npz, tmp_path):
    key, layer = "digits-lcq", "features.3"
    q = _act_quant(zoo, key, layer)
    model = _copy(zoo.onnx_model(key))
    table = q.magnitude_levels().numpy()
    (name,) = _inits_equal_to(model, _layer(model, layer).act_nodes, table)
    index = int(np.flatnonzero(table == np.float32(_most_used_level(zoo, key, layer,
                                                                     calib_npz)))[0])
    moved = table.copy()
    moved[index] = np.nextafter(moved[index], np.float32(np.inf))
    _replace_initializer(model, name, moved)
    result, report = _validate(zoo, key, model, tmp_path, calib_npz)
    _assert_fails_naming(result, report, layer)


# ------------------------------------------------------------- 3: a packed weight code flipped


def test_flipped_weight_code_fails_naming_the_layer(zoo, calib_npz, tmp_path):
    key, layer = "digits-lsq", "features.3"
    model = _copy(zoo.onnx_model(key))
    inits = _initializers(model)
    (codes,) = [i for i in dict.fromkeys(_node_inputs(model, _layer(model, layer).weight.nodes))
                if i in inits and inits[i].data_type == onnx.TensorProto.UINT8]
    packed = numpy_helper.to_array(inits[codes]).copy()
    packed.reshape(-1)[0] ^= 1  # code of weight 0 moves by one level of a distinct table
    _replace_initializer(model, codes, packed)
    result, report = _validate(zoo, key, model, tmp_path, calib_npz)
    _assert_fails_naming(result, report, layer)
    assert {r["name"]: r for r in report["layers"]}[layer]["weight_mismatches"] == 1


# ------------------------------------------------------------- 4: a BatchNorm epsilon changed


def test_changed_batchnorm_epsilon_fails_naming_the_next_layer(zoo, calib_npz, tmp_path):
    """Not a quantizer: only the distance to the referee can see it. The first BatchNorm
    follows features.0's conv, so the first quantizer it feeds is features.3's."""
    key = "digits-lcq"
    model = _copy(zoo.onnx_model(key))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    # The exporter drops attributes equal to their default, as epsilon = 1e-5 is.
    assert all(a.name != "epsilon" or a.f == pytest.approx(1e-5) for a in bn.attribute)
    kept = [a for a in bn.attribute if a.name != "epsilon"]
    del bn.attribute[:]
    bn.attribute.extend([*kept, helper.make_attribute("epsilon", 1e-3)])  # Keras' default
    result, report = _validate(zoo, key, model, tmp_path, calib_npz)
    _assert_fails_naming(result, report, "features.3")
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert "referee_mean" in failed and "op_exact" not in failed


# ------------------------------------------------------------- 5: an activation step x 1.001


def test_activation_step_scaled_fails_naming_the_layer(zoo, calib_npz, tmp_path):
    key, layer = "digits-lsq", "features.3"
    q = _act_quant(zoo, key, layer)
    model = _copy(zoo.onnx_model(key))
    step = q.step.detach().numpy()
    names = _inits_equal_to(model, _layer(model, layer).act_nodes, step)
    assert names
    for name in names:
        array = numpy_helper.to_array(_initializers(model)[name])
        _replace_initializer(model, name, (array * np.float32(1.001)).astype(np.float32))
    result, report = _validate(zoo, key, model, tmp_path, calib_npz)
    _assert_fails_naming(result, report, layer)


# ------------------------------------------------------------- 6: faults between quantizers
# Only the teacher-forced segment check sees these layer by layer: the graph is cut at every
# quantizer and fed PyTorch's quantized values, so a wrong float node shows at the next
# quantizer's input whatever the network does with it downstream.


def _failed_checks(report: dict) -> set[str]:
    return {c["name"] for c in report["checks"] if not c["passed"]}


def _segment(report: dict, name: str) -> dict:
    return next(s for s in report["segments"] if s["name"] == name)


def test_batchnorm_epsilon_on_rounding_ties_fails_the_segment_check(zoo, calib_npz, tmp_path):
    """digits-lsq's layers sit on rounding ties (conftest BOUNDARY_REASON): its float32
    evaluations spread so far end to end that an epsilon of 1e-3 (Keras' default) for the
    first BatchNorm stays inside the referee_mean envelope. Teacher-forced, it is far
    outside float32 rounding at the input of features.3, the quantizer that BatchNorm feeds."""
    key = "digits-lsq"
    model = _copy(zoo.onnx_model(key))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.attribute.append(helper.make_attribute("epsilon", 1e-3))
    result, report = _validate(zoo, key, model, tmp_path, calib_npz)
    _assert_fails_naming(result, report, "features.3")
    assert _failed_checks(report) == {"segments"}
    seg = _segment(report, "features.3 input")
    assert seg["onnx_mean_diff"] > 100 * seg["torch_mean_diff"]


def test_tampered_batchnorm_scale_fails_naming_the_next_layer(zoo, calib_npz, tmp_path):
    """One channel's BatchNorm scale x 1.01 in the BatchNorm after features.3's conv: the
    quantizer it feeds is features.7's (conv, BN, ReLU, max pool, then features.7)."""
    key = "digits-lcq"
    model = _copy(zoo.onnx_model(key))
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    scale = numpy_helper.to_array(_initializers(model)[bns[1].input[1]]).copy()
    scale[0] *= np.float32(1.01)
    _replace_initializer(model, bns[1].input[1], scale)
    result, report = _validate(zoo, key, model, tmp_path, calib_npz)
    _assert_fails_naming(result, report, "features.7")
    assert "segments" in _failed_checks(report) and "op_exact" not in _failed_checks(report)
    (check,) = [c for c in report["checks"] if c["name"] == "segments"]
    assert "features.7 input: ONNX" in check["detail"]
    assert check["detail"].count(": ONNX ") == 1  # that segment alone


def _producer(model: onnx.ModelProto, value: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if value in n.output)


def _quantizer_input(model: onnx.ModelProto, layer: str) -> str:
    first = _layer(model, layer).act_nodes[0]
    return next(n for n in model.graph.node if n.name == first).input[0]


def test_rewired_residual_add_fails_naming_the_next_layer(zoo, calib_npz, tmp_path):
    """ResNet-20's block layers.1 adds its input (identity shortcut) to its conv branch;
    rewired to add block layers.0's input instead (same shape), the sum is wrong from the
    first sample on, and the first quantizer that reads it is layers.2.conv1's."""
    key = "resnet20-lcq"
    model = _copy(zoo.onnx_model(key))
    relu = _producer(model, _quantizer_input(model, "layers.2.conv1"))
    add = _producer(model, relu.input[0])
    assert add.op_type == "Add"
    block_input = _quantizer_input(model, "layers.1.conv1")
    (slot,) = [i for i, v in enumerate(add.input) if v == block_input]
    add.input[slot] = _quantizer_input(model, "layers.0.conv1")
    result, report = _validate(zoo, key, model, tmp_path, calib_npz, "--resize")
    _assert_fails_naming(result, report, "layers.2.conv1")
    assert "segments" in _failed_checks(report) and "op_exact" not in _failed_checks(report)
    assert not _segment(report, "layers.1.conv2 input")["onnx_mean_diff"] > 1e-3
    assert _segment(report, "layers.2.conv1 input")["onnx_mean_diff"] > 1e-3
