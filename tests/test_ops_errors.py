"""Inputs the spec rejects make the function bodies fail with an error, never compute garbage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qconvert.ops import OPS
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
    inputs, attrs = _case("QConvClamp", -1)  # a 2x2 kernel
    for change in ({"hi": 256}, {"lo": 200, "hi": 100}, {"zero_point": -1},
                   {"x_zero_point": 256}, {"strides": [1, 5]}, {"strides": [0, 1]},
                   {"pads": [2, 0, 0, 0]}, {"pads": [0, -1, 0, 0]}):
        yield f"qconv-{change}", "QConvClamp", inputs, {**attrs, **change}
    yield "qconv-scale-short", "QConvClamp", [*inputs[:3], inputs[3][:-1]], attrs


BAD = list(_bad_inputs())


@pytest.mark.parametrize(("name", "op", "inputs", "attrs"), BAD, ids=[b[0] for b in BAD])
def test_function_body_refuses_bad_inputs(name, op, inputs, attrs):
    with pytest.raises(Exception, match=rf"{op}|out of data bounds|Incompatible") as info:
        run_function_body(op, inputs, attrs)
    assert "INVALID_ARGUMENT" in str(info.value) or "FAIL" in str(info.value)


QCONV = [b for b in BAD if b[1] == "QConvClamp"]


@pytest.mark.parametrize(("name", "op", "inputs", "attrs"), QCONV, ids=[b[0] for b in QCONV])
def test_numpy_and_torch_qconv_clamp_refuse_what_the_body_refuses(name, op, inputs, attrs):
    with pytest.raises(ValueError, match="QConvClamp: "):
        OPS[op].reference(*inputs, **attrs)
    with pytest.raises(ValueError, match="QConvClamp: "):
        OPS[op].TORCH_OP(*[torch.from_numpy(a) for a in inputs], *attrs.values())
