"""The teacher-forced segment check: the graph cut (graph.cut) on a hand-built graph, and
the verdict on a network whose only difference from PyTorch is one float32 ulp that lands
on exact rounding ties (PASS, the flips diagnosed) or a real BatchNorm fault (FAIL)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qconvert.archs import build_architecture
from qconvert.checkpoint import save_checkpoint
from qconvert.graph import cut
from qconvert.quant import quantize_model

from .conftest import ARCH_KWARGS, MEAN, STD, invoke

# ------------------------------------------------------------------ the graph cut


def _two_quantizer_graph() -> onnx.ModelProto:
    """x -> Mul a -> [q1: Round] -> Add b -> ReduceMean (an "adapter": beta)
    -> [q2: Div by beta] -> Relu -> y; q1's output is also a graph output."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Mul", ["x", "a"], ["t1"], name="mul"),
        helper.make_node("Round", ["t1"], ["t1q"], name="q1"),
        helper.make_node("Add", ["t1q", "b"], ["t2"], name="add"),
        helper.make_node("ReduceMean", ["t2"], ["beta"], name="adapter", keepdims=1),
        helper.make_node("Div", ["t2", "beta"], ["t2q"], name="q2"),
        helper.make_node("Relu", ["t2q"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", f, [2, 3])],
        [helper.make_tensor_value_info("y", f, [2, 3]),
         helper.make_tensor_value_info("t1q", f, [2, 3])],
        [numpy_helper.from_array(np.float32([1.5, -2.0, 0.25]), "a"),
         numpy_helper.from_array(np.float32([0.5, 1.0, -3.0]), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_cut_feeds_quantizer_outputs_and_returns_their_inputs():
    model = cut(_two_quantizer_graph(), ["q1", "q2"])
    assert [n.name for n in model.graph.node] == ["mul", "add", "adapter", "relu"]
    assert [i.name for i in model.graph.input] == ["x", "t1q", "t2q"]
    # y stays; t1q (made by a removed node) is fed now, so it is no output; t1, t2 and the
    # adapter's beta are what the removed nodes read.
    assert [o.name for o in model.graph.output] == ["y", "t1", "t2", "beta"]
    rng = np.random.default_rng(0)
    x, t1q, t2q = (rng.standard_normal((2, 3)).astype(np.float32) for _ in range(3))
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    y, t1, t2, beta = session.run(None, {"x": x, "t1q": t1q, "t2q": t2q})
    a, b = np.float32([1.5, -2.0, 0.25]), np.float32([0.5, 1.0, -3.0])
    np.testing.assert_array_equal(y, np.maximum(t2q, 0))
    np.testing.assert_array_equal(t1, x * a)
    np.testing.assert_array_equal(t2, t1q + b)
    np.testing.assert_allclose(beta, (t1q + b).astype(np.float64).mean(keepdims=True),
                               rtol=1e-6)


def test_cut_keeps_the_recorded_shape_of_a_value_it_feeds():
    model = _two_quantizer_graph()
    model.graph.value_info.append(helper.make_tensor_value_info("t1q", TensorProto.FLOAT,
                                                                [2, 3]))
    model.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]))
    cut_model = cut(model, ["q1", "q2"])
    fed = next(i for i in cut_model.graph.input if i.name == "t1q")
    assert [d.dim_value for d in fed.type.tensor_type.shape.dim] == [2, 3]
    assert [v.name for v in cut_model.graph.value_info] == ["y"]


def test_cut_does_not_return_a_graph_input_a_removed_node_reads():
    model = cut(_two_quantizer_graph(), ["mul", "q1"])  # "mul" reads x, a graph input
    assert [i.name for i in model.graph.input] == ["x", "t1q"]
    assert [o.name for o in model.graph.output] == ["y"]


# ------------------------------------------------------------------ a tie flipped by one ulp

TIE_CHANNEL = 3


def _tie_checkpoint(path) -> torch.nn.Module:
    """digits_cnn LSQ W4A4 whose first conv is exact in float32: inputs 0 or 4 (on the
    input quantizer's grid, step 1/4), integer weights (step 1), positive in TIE_CHANNEL.
    Its BatchNorm adds 1/8, half of features.3's step 1/4, to TIE_CHANNEL: where a 3x3
    window holds only 0, that channel's value is exactly 1/8 in PyTorch float32 and in the
    referee, a rounding tie both round to even (level 0). Every other value is 0, negative
    (0 after the ReLU) or at least 4 x the BatchNorm scale, beyond the clip at 3.875."""
    torch.manual_seed(0)
    model = build_architecture("digits_cnn", ARCH_KWARGS)
    quantize_model(model, "lsq", 4, 4)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 1, 8, 8))  # initialises the quantizers
    model.eval()
    conv, bn, nxt = model.features[0], model.features[1], model.features[3]
    with torch.no_grad():
        conv.act_quant.step.fill_(0.25)
        conv.weight_quant.step.fill_(1.0)
        conv.weight.copy_(torch.randint(-3, 4, conv.weight.shape).float())
        conv.weight[TIE_CHANNEL] = torch.randint(1, 4, conv.weight[TIE_CHANNEL].shape).float()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        bn.bias[TIE_CHANNEL] = 0.125
        nxt.act_quant.step.fill_(0.25)
    save_checkpoint(path, model, arch="digits_cnn", arch_kwargs=ARCH_KWARGS,
                    input_shape=(1, 8, 8), mean=MEAN, std=STD, training={"key": "ties"})
    return model


def _tie_data(path, samples: int) -> np.ndarray:
    """Raw samples normalised to 0 (85 %) or 4; returns the normalised inputs."""
    rng = np.random.default_rng(3)
    normalised = 4.0 * (rng.random((samples, 1, 8, 8)) < 0.15)
    np.savez(path, x=(MEAN[0] + STD[0] * normalised).astype(np.float32))
    return normalised


def _with_bn_bias(model_path, out_path, bias: float) -> None:
    """The exported file with the first BatchNorm's bias of TIE_CHANNEL set to ``bias``."""
    model = onnx.load(str(model_path))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    init = next(i for i in model.graph.initializer if i.name == bn.input[2])
    values = numpy_helper.to_array(init).copy()
    values[TIE_CHANNEL] = bias
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, str(out_path))


def _validate(ckpt, model, data, tmp_path):
    """Batches of 8: on 16 or more, PyTorch's non-oneDNN convolutions (validate's second
    float32 evaluation) take NNPACK's Winograd path, which is not exact on these ties."""
    report_path = tmp_path / "r.json"
    result = invoke(["validate", ckpt, model, "--calib", data, "--report", report_path,
                     "--batch-size", 8])
    return result, json.loads(report_path.read_text())


@pytest.fixture(scope="module")
def ties(tmp_path_factory):
    root = tmp_path_factory.mktemp("ties")
    model = _tie_checkpoint(root / "ties.pt")
    result = invoke(["export", root / "ties.pt", "--out", root / "ties.onnx"])
    assert result.exit_code == 0, result.output
    # 72 samples: more than the per-layer pass's default 64, so the waiver needs the
    # teacher-forced checks extended to every sample.
    inputs = _tie_data(root / "ties.npz", 72)
    return root, model, inputs


def _expected_seeds(model: torch.nn.Module, inputs: np.ndarray) -> int:
    """Where TIE_CHANNEL's 3x3 window holds only zeros its BatchNorm output is the bias:
    PyTorch rounds 1/8 / (1/4) = 0.5 to 0, a bias one ulp above 1/8 rounds to 1. Elsewhere
    the value is at least 4 + 1/8, clipped to the top level either way."""
    weight = model.features[0].weight[TIE_CHANNEL].detach().double().numpy()
    conv = torch.nn.functional.conv2d(torch.from_numpy(inputs), torch.from_numpy(weight[None]),
                                      padding=1).numpy()
    return int((conv == 0).sum())


def test_one_ulp_on_rounding_ties_passes_with_the_amplification_diagnosed(ties, tmp_path):
    root, model, inputs = ties
    onnx_path = tmp_path / "ulp.onnx"
    _with_bn_bias(root / "ties.onnx", onnx_path, np.nextafter(np.float32(0.125), np.inf))
    result, report = _validate(root / "ties.pt", onnx_path, root / "ties.npz", tmp_path)
    assert result.exit_code == 0, result.output
    assert report["verdict"] == "PASS" and report["per_layer_samples"] == 72
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["op_exact"]["passed"] and checks["segments"]["passed"]
    assert not checks["referee_mean"]["passed"] and checks["referee_mean"]["waived"]
    # PyTorch float32 is exact here: only ONNX leaves the referee, at features.3.
    assert report["level_flips"]["torch"] == 0
    seeds = [s for s in report["segments"] if s["seed_flips"]]
    assert [s["name"] for s in seeds] == ["features.3 input"]
    expected = _expected_seeds(model, inputs)
    assert expected > 100
    assert seeds[0]["seed_flips"] == seeds[0]["seed_ties"] == expected
    assert seeds[0]["seed_max_ulps"] == pytest.approx(1.0)
    diagnosis = report["diagnosis"]
    assert "amplified" in diagnosis and "level flips start at features.3" in diagnosis
    assert f"{expected} quantizer inputs in 1 layers (first: features.3)" in diagnosis
    assert "all on rounding ties" in diagnosis
    assert f"PASS: {diagnosis}" in result.stdout


def test_a_real_batchnorm_fault_on_the_same_ties_fails_naming_the_layer(ties, tmp_path):
    root, _, _ = ties
    onnx_path = tmp_path / "fault.onnx"
    _with_bn_bias(root / "ties.onnx", onnx_path, 0.125 + 0.01)
    result, report = _validate(root / "ties.pt", onnx_path, root / "ties.npz", tmp_path)
    assert result.exit_code == 1, result.output
    assert report["verdict"] == "FAIL" and report["first_departure"] == "features.3"
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert "segments" in failed and "op_exact" not in failed
    assert not any(c.get("waived") for c in report["checks"])
    (fail_line,) = [line for line in result.stderr.splitlines() if line.startswith("FAIL:")]
    assert "features.3 input" in fail_line


def test_a_fault_within_the_segment_mean_but_off_the_ties_fails(ties, tmp_path):
    """The bias 1e-5 above 1/8: TIE_CHANNEL's mean error (1e-5 over 1 of 16 channels) is
    within what the segment rule allows a segment PyTorch computes exactly (2^-23 x its
    largest value, about 13), but the values it flips sit 1e-5 from the tie, hundreds of
    ulps: no float32 rounding puts them there, so nothing is waived."""
    root, _, _ = ties
    onnx_path = tmp_path / "near.onnx"
    _with_bn_bias(root / "ties.onnx", onnx_path, 0.125 + 1e-5)
    result, report = _validate(root / "ties.pt", onnx_path, root / "ties.npz", tmp_path)
    assert result.exit_code == 1, result.output
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["segments"]["passed"] and not checks["referee_mean"]["passed"]
    assert not checks["referee_mean"].get("waived")
    seg = next(s for s in report["segments"] if s["name"] == "features.3 input")
    assert seg["seed_flips"] > 100 and seg["seed_ties"] == 0
    assert report["first_departure"] == "features.3"
    assert "not amplified rounding" in report["diagnosis"]


# ------------------------------------------------------------------ the waiver rule alone


def _report(samples: int = 8, per_layer: int = 8, seeds: int = 0, ties: int = 0,
            segment_mean: float = 1e-8):
    """A report whose end-to-end mean fails (ONNX 1e-2, PyTorch 1e-8) while every
    quantizer is exact; one segment with the given ONNX mean (PyTorch 1e-8, max 1)."""
    from qconvert.validate import Distance, LayerReport, Report, SegmentReport

    def dist(mean: float) -> Distance:
        return Distance(mean, mean, None, None, None, None)
    report = Report(samples=samples, runtime="native", top1_agreement=None,
                    top5_agreement=None, max_abs_diff=1e-2, mean_abs_diff=1e-2,
                    max_abs_output=1.0, sqnr_db=None, nan_samples=0, torch_accuracy=None,
                    onnx_accuracy=None, task="regression")
    report.referee = {"torch": dist(1e-8), "onnx": dist(1e-2)}
    report.per_layer_samples = per_layer
    report.layers = [LayerReport("conv", "lsq", op_elements=10, level_elements=10,
                                 onnx_level_flips=3)]
    report.level_flips = {"torch": 0, "onnx": 3, "elements": 10}
    report.segments = [SegmentReport("x", "conv", "input", elements=10, max_abs_value=1.0,
                                     onnx_mean_diff=segment_mean, torch_mean_diff=1e-8,
                                     seed_flips=seeds, seed_ties=ties, seed_max_ulps=0.5)]
    return report


def test_waiver_needs_exact_layers_on_every_sample_and_ties_only():
    from qconvert.verdict import judge, needs_every_sample

    waived = judge(_report(seeds=2, ties=2))
    assert waived.verdict == "PASS"
    assert [c["name"] for c in waived.checks if c.get("waived")] == ["referee_mean"]
    assert "2 quantizer inputs in 1 layers (first: conv)" in waived.diagnosis
    subset = judge(_report(samples=100, per_layer=64))
    assert subset.verdict == "FAIL" and needs_every_sample(subset)
    assert "rerun with --per-layer" in subset.diagnosis
    untied = judge(_report(seeds=2, ties=1))
    assert untied.verdict == "FAIL" and not needs_every_sample(untied)
    assert "not amplified rounding" in untied.diagnosis and untied.first_departure == "conv"
    wrong_segment = judge(_report(segment_mean=1e-3))  # allowed 4e-8 + 2^-23
    assert wrong_segment.verdict == "FAIL" and wrong_segment.first_departure == "conv"
    user_bound = judge(_report(), max_abs_diff=1e-3)
    assert user_bound.verdict == "FAIL"
    assert {c["name"] for c in user_bound.checks if not c["passed"]} == {"referee_mean",
                                                                          "max_abs_diff"}
