"""Inputs the spec rejects make the function bodies fail with an error, never compute garbage."""

from __future__ import annotations

import numpy as np
import pytest

from qconvert.ops.vectors import cases

from .onnx_helpers import run_function_body


def _case(op: str, index: int):
    case = cases(op)[index]
    return case.inputs, case.attrs


def _bad_inputs():
    x, alpha, slopes, offsets, levels = _case("CompandQuant", 5)[0]
    attrs = _case("CompandQuant", 5)[1]
    yield "levels-short", "CompandQuant", [x, alpha, slopes, offsets, levels[:-1]], attrs
    yield "levels-long", "CompandQuant", [x, alpha, slopes, offsets,
                                          np.append(levels, levels[-1])], attrs
    yield "bits-9", "CompandQuant", [x, alpha, slopes, offsets, levels], {**attrs, "bits": 9}
    yield "signed-2", "CompandQuant", [x, alpha, slopes, offsets, levels], {**attrs, "signed": 2}
    yield "slopes-vs-offsets", "CompandQuant", [x, alpha, slopes[:-1], offsets, levels], attrs
    yield "alpha-two", "CompandQuant", [x, np.ones(2, np.float32), slopes, offsets, levels], attrs
    inputs, attrs = _case("AdaptiveStep", 0)
    yield "beta-short", "AdaptiveStep", [inputs[0], inputs[1], inputs[2][:-1]], attrs
    yield "step-two", "AdaptiveStep", [inputs[0], np.ones(2, np.float32), inputs[2]], attrs
    yield "bits-1", "AdaptiveStep", inputs, {**attrs, "bits": 1}
    inputs, attrs = _case("LutGather", 7)
    yield "codes-short", "LutGather", [inputs[0][:2], inputs[1]], attrs
    yield "table-wider-than-bits", "LutGather", [
        inputs[0], np.zeros(1 << (attrs["bits"] + 1), np.float32)], attrs
    codes_over = np.full_like(inputs[0], 0xFF)
    yield "code-outside-table", "LutGather", [codes_over, inputs[1][:2]], attrs
    inputs, attrs = _case("Pow2Shift", -1)
    yield "alpha-three", "Pow2Shift", [inputs[0], np.ones(3, np.float32)], attrs
    yield "root-3", "Pow2Shift", inputs, {**attrs, "root": 3}
    yield "codes-empty", "Pow2Shift", [inputs[0][:0], inputs[1]], attrs


BAD = list(_bad_inputs())


@pytest.mark.parametrize(("name", "op", "inputs", "attrs"), BAD, ids=[b[0] for b in BAD])
def test_function_body_refuses_bad_inputs(name, op, inputs, attrs):
    with pytest.raises(Exception, match=rf"{op}|out of data bounds|Incompatible") as info:
        run_function_body(op, inputs, attrs)
    assert "INVALID_ARGUMENT" in str(info.value) or "FAIL" in str(info.value)
