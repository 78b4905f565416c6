"""Every implementation of every op against the same shared test vectors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from qconvert.ops import INTEGER_OPS, MAX_OPSET, MIN_OPSET, OPS, functions
from qconvert.ops.vectors import SATURATES_INT16, cases

from .onnx_helpers import one_node_model, run_function_body, run_reference_evaluator

ALL_CASES = [(op, case) for op in OPS for case in cases(op)]
IDS = [f"{op}-{case.name}" for op, case in ALL_CASES]
# Where a stock runtime's standard op is known not to give the spec's bits, so the function
# body cannot (docs/ops.md#qconvclamp): strict xfails, so a runtime that changes shows up.
KNOWN_DEVIATIONS = {
    ("onnxruntime", "QConvClamp", SATURATES_INT16):
        "ORT's U8S8 QLinearConv sums uint8 x int8 pairs in saturating int16",
    ("onnx.reference", "QConvClamp", "float32_ties"):
        "onnx.reference's QLinearConv multiplies int32 by the float32 scale in float64",
    ("onnx.reference", "QDepthwiseConvClamp", "float32_ties"):
        "onnx.reference's QLinearConv multiplies int32 by the float32 scale in float64",
}


def runtime_cases(runtime: str, every: int) -> list:
    """Every ``every``-th case, every case of the integer ops (few, and each one a rule)."""
    params = []
    for i, ((op, case), name) in enumerate(zip(ALL_CASES, IDS, strict=True)):
        if i % every and op not in INTEGER_OPS:
            continue
        reason = [r for (rt, o, prefix), r in KNOWN_DEVIATIONS.items()
                  if rt == runtime and o == op and case.name.startswith(prefix)]
        marks = [pytest.mark.xfail(strict=True, reason=reason[0])] if reason else []
        params.append(pytest.param(op, case, id=name, marks=marks))
    return params


def assert_same(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal values and shapes, NaN where NaN (the sign of zero may differ, per docs/ops.md);
    float32 out, uint8 for the integer ops."""
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("op", "case"), ALL_CASES, ids=IDS)
def test_torch_op_matches_vectors(op, case):
    got = OPS[op].TORCH_OP(*[torch.from_numpy(a) for a in case.inputs], *case.attrs.values())
    assert_same(got.numpy(), case.expected)


@pytest.mark.parametrize(("op", "case"), runtime_cases("onnxruntime", 1))
def test_function_body_in_onnxruntime_matches_vectors(op, case):
    assert_same(run_function_body(op, case.inputs, case.attrs), case.expected)


@pytest.mark.parametrize(("op", "case"), runtime_cases("onnx.reference", 7))
def test_function_body_in_onnx_reference_matches_vectors(op, case):
    got = run_reference_evaluator(op, case.inputs, case.attrs, numpy_ops=False)
    assert_same(np.asarray(got, case.expected.dtype), case.expected)


@pytest.mark.parametrize(("op", "case"), runtime_cases("numpy", 5))
def test_numpy_ops_plug_into_onnx_reference(op, case):
    got = run_reference_evaluator(op, case.inputs, case.attrs, numpy_ops=True)
    assert_same(got, case.expected)


@pytest.mark.parametrize("opset", range(MIN_OPSET, MAX_OPSET + 1))
def test_models_with_function_bodies_pass_the_full_checker(opset):
    for op in OPS:
        case = cases(op)[0]
        model = one_node_model(op, case.inputs, case.attrs, opset,
                               output_shape=list(case.expected.shape))
        onnx.checker.check_model(model, full_check=True)
        for function in functions(opset, {op}):
            assert function.opset_import[0].version == opset


def test_every_case_family_has_nan_inf_and_ties():
    x = np.concatenate([c.inputs[0].reshape(-1) for c in cases("CompandQuant")])
    assert np.isnan(x).any() and np.isposinf(x).any() and np.isneginf(x).any()
    assert (np.abs(x[np.isfinite(x)]) < np.finfo(np.float32).tiny).any()  # denormals
    # AdaptiveStep: ties land exactly on k + 0.5 after scaling.
    case = cases("AdaptiveStep")[0]
    scaled = case.inputs[0] / (case.inputs[1] * case.inputs[2])[:, None]
    assert np.any(scaled == np.floor(scaled) + 0.5)


@pytest.mark.parametrize("case", [c for c in cases("UniformQuant") if c.inputs[0].size],
                         ids=lambda c: c.name)
def test_uniform_quant_reference_is_the_lsq_quantizer(case):
    """The LSQ activation quantizer of the QAT model, on finite inputs, is the op."""
    from qconvert.quant import LSQQuantizer

    x, step = case.inputs
    quantizer = LSQQuantizer(case.attrs["bits"], signed=bool(case.attrs["signed"])).eval()
    quantizer.initialized.fill_(True)
    quantizer.signed_flag.fill_(bool(case.attrs["signed"]))
    with torch.no_grad():
        quantizer.step.copy_(torch.from_numpy(step))
        want = quantizer(torch.from_numpy(x)).numpy()
    finite = np.isfinite(x)
    np.testing.assert_array_equal(case.expected[finite], want[finite])
