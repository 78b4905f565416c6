"""The integer rewrite's view of the model: lookups, new constants and nodes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ...errors import QConvertError


@dataclass
class GraphEdit:
    """The model being rewritten: lookups, nodes to emit in place of (or after) an existing
    node, nodes to drop, and a fresh-name source."""

    model: onnx.ModelProto
    inits: dict[str, onnx.TensorProto] = field(default_factory=dict)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    before: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)  # anchor node id
    after: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    dropped: set[int] = field(default_factory=set)
    count: int = 0

    def __post_init__(self) -> None:
        self.inits = {i.name: i for i in self.model.graph.initializer}
        self.producers = {o: n for n in self.model.graph.node for o in n.output}
        for node in self.model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def const(self, name: str, value: np.ndarray) -> str:
        if name in self.inits:
            raise QConvertError(f"integer rewrite: name clash on {name}")
        tensor = numpy_helper.from_array(np.asarray(value), name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def is_const(self, name: str) -> bool:
        return name in self.inits

    def node(self, anchor: onnx.NodeProto, op: str, inputs: list[str],
             output: str | None = None, after: bool = False, **attrs) -> str:
        """A new node emitted just before ``anchor`` (or after it); returns its output."""
        self.count += 1  # short names, as the exporter's n<index>: they add up in the file
        out = output or f"i{self.count}"
        node = helper.make_node(op, inputs, [out], name=f"i{self.count}", **attrs)
        (self.after if after else self.before).setdefault(id(anchor), []).append(node)
        return out

    def reroute(self, anchor: onnx.NodeProto, old: str, new: str) -> None:
        """The nodes emitted before ``anchor`` read ``new`` in place of ``old``."""
        for node in self.before.get(id(anchor), []):
            for k, name in enumerate(node.input):
                if name == old:
                    node.input[k] = new

    def drop(self, node: onnx.NodeProto) -> None:
        self.dropped.add(id(node))

    def assemble(self) -> None:
        """Write the edited node list back into the model."""
        nodes: list[onnx.NodeProto] = []
        for node in self.model.graph.node:
            nodes.extend(self.before.get(id(node), []))
            if id(node) not in self.dropped:
                nodes.append(node)
            nodes.extend(self.after.get(id(node), []))
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)


def node_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def stock_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """Stock ONNX Runtime on the model's function bodies, for the calibration runs of the
    rewrite (qconvert.runtime sits above export, so export does not use it)."""
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def prune(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads, then unread initializers, stale value_info,
    unused functions and op-set imports."""
    graph = model.graph
    wanted = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in wanted for o in node.output):
            kept.append(node)
            wanted.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    read = {i for n in graph.node for i in n.input}
    inits = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    values = {o for n in graph.node for o in n.output}
    infos = [v for v in graph.value_info if v.name in values]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    used = {(n.domain, n.op_type) for n in graph.node}
    functions = [f for f in model.functions if (f.domain, f.name) in used]
    del model.functions[:]
    model.functions.extend(functions)
    domains = {d for d, _ in used} | {f.domain for f in functions} | {""}
    opsets = [o for o in model.opset_import if o.domain in domains]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
