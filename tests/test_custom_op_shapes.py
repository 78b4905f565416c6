"""The shapes of the qconvert ops' outputs: each op's schema states them, the exporter
records them in the file, and that is what lets ONNX Runtime's NCHWc layout pass fuse a
residual addition into its convolution in a plain load (ORT cannot infer through a
custom op)."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qconvert import native
from qconvert.graph import with_extra_outputs
from qconvert.ops import DOMAIN, DOMAIN_VERSION, INTEGER_OPS, OPS

X_SHAPE = ["batch", 3, 5, 7]  # symbolic batch, as exports have it
DECODED_SHAPE = [4, 2, 3, 3]
PARAM_TYPES = {"tensor(float)": TensorProto.FLOAT, "tensor(uint8)": TensorProto.UINT8}


def _one_node_model(name: str) -> onnx.ModelProto:
    schema = onnx.defs.get_schema(name, DOMAIN_VERSION, DOMAIN)
    attrs = {a: 4 for a in schema.attributes if schema.attributes[a].required}
    if "shape" in schema.attributes:
        attrs["shape"] = DECODED_SHAPE
    inputs = [helper.make_tensor_value_info(
        p.name, PARAM_TYPES[p.type_str], X_SHAPE if i == 0 and p.name == "X" else [2])
        for i, p in enumerate(schema.inputs)]
    node = helper.make_node(name, [p.name for p in schema.inputs], ["Y"], domain=DOMAIN,
                            **attrs)
    graph = helper.make_graph([node, helper.make_node("Relu", ["Y"], ["Z"])], "g", inputs,
                              [helper.make_tensor_value_info("Z", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                   helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", sorted(set(OPS) - set(INTEGER_OPS)))
def test_each_schema_states_its_output_shape(name):
    inferred = onnx.shape_inference.infer_shapes(_one_node_model(name), strict_mode=True)
    (y,) = [v for v in inferred.graph.value_info if v.name == "Y"]
    schema = onnx.defs.get_schema(name, DOMAIN_VERSION, DOMAIN)
    assert y.type.tensor_type.elem_type == TensorProto.FLOAT
    assert _dims(y) == (DECODED_SHAPE if "shape" in schema.attributes else X_SHAPE)


def _qconv_clamp_output(x_shape: list, w_shape: list, strides: list, pads: list,
                        op: str = "QConvClamp", **attrs) -> list:
    inputs = [helper.make_tensor_value_info("X", TensorProto.UINT8, x_shape),
              helper.make_tensor_value_info("W", TensorProto.INT8, w_shape),
              helper.make_tensor_value_info("B", TensorProto.INT32, [w_shape[0]]),
              helper.make_tensor_value_info("scale", TensorProto.FLOAT, [w_shape[0]])]
    node = helper.make_node(op, ["X", "W", "B", "scale"], ["Y"], domain=DOMAIN,
                            strides=strides, pads=pads, lo=0, hi=15, **attrs)
    graph = helper.make_graph([node, helper.make_node("Identity", ["Y"], ["Z"])], "g", inputs,
                              [helper.make_tensor_value_info("Z", TensorProto.UINT8, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    (y,) = [v for v in inferred.graph.value_info if v.name == "Y"]
    assert y.type.tensor_type.elem_type == TensorProto.UINT8
    return _dims(y)


def test_qconv_clamp_schema_states_its_output_shape():
    """[N, M, (H + pt + pb - kH) // sh + 1, (W + pl + pr - kW) // sw + 1], worked by hand."""
    assert _qconv_clamp_output(["batch", 3, 9, 7], [4, 3, 3, 2], [2, 1], [1, 0, 1, 1]) == [
        "batch", 4, 5, 7]
    batch, m, height, width = _qconv_clamp_output(["batch", 3, "h", 8], [4, 3, 3, 3], [1, 2],
                                                  [1, 1, 1, 1])
    assert (batch, m, width) == ("batch", 4, 4)
    assert height.startswith("unk__")  # not known: onnx names it afresh, no number is claimed


def test_qdepthwise_conv_clamp_schema_states_its_output_shape():
    """Channels last: [N, OH, OW, C] with QConvClamp's OH and OW, worked by hand."""
    assert _qconv_clamp_output(["batch", 9, 7, 6], [6, 1, 3, 2], [2, 1], [1, 0, 1, 1],
                               "QDepthwiseConvClamp", group=6) == ["batch", 5, 7, 6]


def _custom_outputs(model: onnx.ModelProto) -> list[str]:
    graph_outputs = {o.name for o in model.graph.output}
    return [o for n in model.graph.node if n.domain == DOMAIN for o in n.output
            if o not in graph_outputs]


@pytest.mark.skipif(native.library_path() is None, reason="native library not built")
@pytest.mark.parametrize("functions", [True, False], ids=["functions", "no-functions"])
def test_export_records_the_runtime_shape_of_every_custom_op_output(zoo, functions):
    model = zoo.onnx_model("digits-mixed", functions=functions)  # all activation ops
    recorded = {v.name: _dims(v) for v in model.graph.value_info}
    names = _custom_outputs(model)
    assert names and set(names) <= set(recorded)
    options = ort.SessionOptions()
    native.register(options)
    sess = ort.InferenceSession(with_extra_outputs(model, names).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    batch = 3
    x = zoo.case("digits-mixed").inputs(batch)
    values = dict(zip([o.name for o in sess.get_outputs()],
                      sess.run(None, {sess.get_inputs()[0].name: x}), strict=True))
    for name in names:  # a dimension the inference could not name stays unchecked
        got = values[name].shape
        want = [batch if d == "batch" else d for d in recorded[name]]
        assert len(got) == len(want), name
        assert all(w == g for g, w in zip(got, want, strict=True) if isinstance(w, int)), name


def _optimized_op_types(path, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    native.register(options)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


@pytest.mark.skipif(native.library_path() is None, reason="native library not built")
def test_plain_load_fuses_residual_additions_into_convolutions(zoo, tmp_path):
    """With the recorded shapes every ResNet-20 residual Add + ReLU goes into its NCHWc
    convolution; the same file without them keeps an Add, a Relu and reshapes per block."""
    path = zoo.onnx_path("resnet20-lcq")
    ops = _optimized_op_types(path, tmp_path)
    assert "Add" not in ops and "Relu" not in ops and ops.count("Reshape") == 1  # the head's
    bare = onnx.load(str(path))
    del bare.graph.value_info[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    assert _optimized_op_types(tmp_path / "bare.onnx", tmp_path).count("Add") == 9

