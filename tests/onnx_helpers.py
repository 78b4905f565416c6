"""Build and run one-node models of the qconvert ops (shared by the op tests)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qconvert.ops import DOMAIN_VERSION, INTEGER_OPS, OPS, REFERENCE_OPS, functions


def element_type(a: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(a.dtype)


def one_node_model(
    op: str, inputs: list[np.ndarray], attrs: dict, opset: int = 20,
    with_functions: bool = True, output_shape: list | None = None,
) -> onnx.ModelProto:
    names = OPS[op].INPUTS
    value_infos = [helper.make_tensor_value_info(n, element_type(a), list(a.shape))
                   for n, a in zip(names, inputs, strict=True)]
    node = helper.make_node(op, names, ["Y"], domain="qconvert", name=f"{op}_node", **attrs)
    y_type = TensorProto.UINT8 if op in INTEGER_OPS else TensorProto.FLOAT
    graph = helper.make_graph([node], op, value_infos,
                              [helper.make_tensor_value_info("Y", y_type, output_shape)])
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset),
                              helper.make_opsetid("qconvert", DOMAIN_VERSION)],
        functions=functions(opset) if with_functions else [],
        ir_version=10,  # what exported models carry; onnxruntime 1.21 reads up to IR 10
    )


def feeds(op: str, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip(OPS[op].INPUTS, inputs, strict=True))


def run_function_body(op: str, inputs: list[np.ndarray], attrs: dict, opset: int = 20):
    model = one_node_model(op, inputs, attrs, opset)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds(op, inputs))[0]


def run_reference_evaluator(op: str, inputs: list[np.ndarray], attrs: dict, numpy_ops: bool):
    model = one_node_model(op, inputs, attrs)
    evaluator = ReferenceEvaluator(model, new_ops=REFERENCE_OPS if numpy_ops else None)
    return evaluator.run(None, feeds(op, inputs))[0]
