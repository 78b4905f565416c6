"""A small builder for model-local FunctionProtos, so each op's body reads as its spec does."""

from __future__ import annotations

import numpy as np
import onnx
import onnxscript
from onnx import AttributeProto, helper, numpy_helper

DOMAIN = "qconvert"
# Version 2 added UniformQuant; version 3 added SampleMaxQuant and CompandQuant's optional
# mirror / clip attributes; version 4 added QConvClamp, version 5 QDepthwiseConvClamp.
# Models of older versions (without them) still load and run.
DOMAIN_VERSION = 5
SUPPORTED_DOMAIN_VERSIONS = (1, 2, 3, 4, 5)
# Weight decodes over constants live in a function-only domain that no runtime registers a
# kernel for, so ONNX Runtime inlines and folds them at load (qconvert/export/weight_decode.py).
DECODE_DOMAIN, DECODE_DOMAIN_VERSION = "qconvert.decode", 1
MIN_OPSET, MAX_OPSET = 18, 22
QCONVERT = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


class FunctionBuilder:
    """Collects nodes; ``op.Name(*inputs, **attrs)`` style calls return the output name."""

    def __init__(self, name: str, inputs: list[str], attributes: list[str],
                 defaults: dict[str, int] | None = None) -> None:
        self.name = name
        self.inputs = inputs
        self.attributes = attributes
        self.defaults = dict(defaults or {})  # optional attributes and their values
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def node(self, op_type: str, *inputs: str, name: str | None = None, **attrs) -> str:
        out = self._fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name or out,
                                           **attrs))
        return out

    def node_with_refs(self, op_type: str, inputs: list[str], refs: dict[str, int]) -> str:
        """A node whose attributes (name -> AttributeProto type) are the function's own
        attributes of the same names."""
        out = self._fresh(op_type.lower())
        node = helper.make_node(op_type, inputs, [out], name=out)
        for name, kind in refs.items():
            node.attribute.append(helper.make_attribute_ref(name, kind))
        self.nodes.append(node)
        return out

    def const(self, value, dtype=np.float32) -> str:
        out = self._fresh("const")
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), out)
        self.nodes.append(helper.make_node("Constant", [], [out], value=tensor))
        return out

    def attr(self, name: str, kind: str = "int") -> str:
        """The function attribute ``name`` as an int64 tensor (scalar, or 1-D for ``ints``)."""
        out = self._fresh(name)
        field, attr_type = {"int": ("value_int", AttributeProto.INT),
                            "ints": ("value_ints", AttributeProto.INTS)}[kind]
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(helper.make_attribute_ref(field, attr_type, ref_attr_name=name))
        self.nodes.append(node)
        return out

    def require(self, value: str, *conditions: str) -> str:
        """``value`` + 0, where the 0 comes from a Gather that fails unless every
        condition (a bool scalar) holds: standard ONNX's way to refuse bad inputs with an
        error that names the node, instead of computing garbage. ``value`` must be float."""
        ok = conditions[0]
        for condition in conditions[1:]:
            ok = self.node("And", ok, condition)
        index = self.node("Cast", self.node("Not", ok), to=onnx.TensorProto.INT64)
        zero = self.node("Gather", self.const([0.0]), index, axis=0,  # index 1: out of bounds
                         name=f"{self.name}_rejects_its_inputs_see_docs_ops_md")
        return self.node("Add", value, self.node("Reshape", zero, self.const([], np.int64)))

    def bits_in(self, bits: str, low: int, high: int) -> str:
        return self.in_range(bits, low, high)

    def in_range(self, value: str, low: int, high: int) -> str:
        """low <= value <= high for an int64 tensor, elementwise."""
        return self.node("And", self.node("GreaterOrEqual", value, self.const(low, np.int64)),
                         self.node("LessOrEqual", value, self.const(high, np.int64)))

    def all_of(self, conditions: str) -> str:
        """A bool scalar: every element of the bool tensor ``conditions`` holds."""
        as_int = self.node("Cast", conditions, to=onnx.TensorProto.INT64)
        return self.node("Equal", self.node("ReduceMin", as_int, keepdims=0),
                         self.const(1, np.int64))

    def code_range(self, bits: str, signed: str) -> tuple[str, str]:
        """(lo, hi) as float scalars: [-2^(b-1), 2^(b-1) - 1] signed, [0, 2^b - 1] unsigned."""
        span = self.node("Pow", self.const(2, np.int64), self.node("Sub", bits, signed))
        hi = self.node("Cast", self.node("Sub", span, self.const(1, np.int64)),
                       to=onnx.TensorProto.FLOAT)
        lo = self.node("Cast", self.node("Neg", self.node("Mul", span, signed)),
                       to=onnx.TensorProto.FLOAT)
        return lo, hi

    def equal(self, a: str, b: str) -> str:
        return self.node("Equal", a, b)

    def build(self, outputs: list[str], opset: int) -> onnx.FunctionProto:
        required = [a for a in self.attributes if a not in self.defaults]
        optional = [helper.make_attribute(a, v) for a, v in self.defaults.items()]
        return helper.make_function(
            DOMAIN, self.name, self.inputs, outputs, self.nodes,
            opset_imports=[helper.make_opsetid("", opset)], attributes=required,
            attribute_protos=optional or None,
        )


def typed_param(name: str, type_str: str,
                description: str) -> onnx.defs.OpSchema.FormalParameter:
    return onnx.defs.OpSchema.FormalParameter(name, type_str, description)


def float_param(name: str, description: str) -> onnx.defs.OpSchema.FormalParameter:
    return typed_param(name, "tensor(float)", description)


def int_attr(name: str, description: str, kind: str = "int",
             default: int | None = None) -> onnx.defs.OpSchema.Attribute:
    """A required integer attribute, or an optional one with ``default``."""
    if default is not None:
        return onnx.defs.OpSchema.Attribute(name, helper.make_attribute(name, default),
                                            description)
    attr_type = {"int": onnx.defs.OpSchema.AttrType.INT,
                 "ints": onnx.defs.OpSchema.AttrType.INTS}[kind]
    return onnx.defs.OpSchema.Attribute(name, attr_type, description, required=True)


def shaped_like_x(schema: onnx.defs.OpSchema) -> onnx.defs.OpSchema:
    """Give an elementwise op's schema its shape rule: Y has X's type and shape. Runtimes
    cannot infer through a custom op; the exporter records these shapes in the file."""
    return schema.set_type_and_shape_inference_function(
        lambda ctx: ctx.set_output_type(0, ctx.get_input_type(0)))


def shaped_by_attribute(schema: onnx.defs.OpSchema) -> onnx.defs.OpSchema:
    """Give a decode op's schema its shape rule: float Y of the ``shape`` attribute."""
    return schema.set_type_and_shape_inference_function(
        lambda ctx: ctx.set_output_type(0, helper.make_tensor_type_proto(
            onnx.TensorProto.FLOAT, list(ctx.get_attribute("shape").ints))))


def register(schema: onnx.defs.OpSchema) -> None:
    """Register once per process (onnx refuses duplicates)."""
    try:
        onnx.defs.get_schema(schema.name, schema.since_version, schema.domain)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(schema)
