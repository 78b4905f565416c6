"""The integer rewrite's view of the model: lookups, new constants and nodes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import QConvertError

# uint8 operands with zero point 128 for signed values: see docs/integer-mode.md.
ZERO_POINT_SIGNED = 128


@dataclass
class GraphEdit:
    """The model being rewritten, with lookups and a fresh-name source."""

    model: onnx.ModelProto
    inits: dict[str, onnx.TensorProto] = field(default_factory=dict)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    new_nodes: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)  # before node id
    layer_nodes: dict[str, list[str]] = field(default_factory=dict)  # scope -> new node names
    count: int = 0

    def __post_init__(self) -> None:
        self.inits = {i.name: i for i in self.model.graph.initializer}
        self.producers = {o: n for n in self.model.graph.node for o in n.output}

    def const(self, name: str, value: np.ndarray) -> str:
        if name in self.inits:
            raise QConvertError(f"integer rewrite: name clash on {name}")
        tensor = numpy_helper.from_array(np.asarray(value), name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def node(self, before: onnx.NodeProto, scope: str, op: str, inputs: list[str],
             output: str | None = None, **attrs) -> str:
        self.count += 1  # short names, as the exporter's n<index>: they add up in the file
        out = output or f"i{self.count}"
        node = helper.make_node(op, inputs, [out], name=f"i{self.count}", **attrs)
        self.new_nodes.setdefault(id(before), []).append(node)
        self.layer_nodes.setdefault(scope, []).append(node.name)
        return out


def node_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
