"""ONNX graph helpers shared by export and the runtime: queries by PyTorch module scope
(the exporter records each node's module path in its ``pkg.torch.onnx.name_scopes``
metadata), node replacement, and the shapes of custom ops' outputs."""

from __future__ import annotations

import ast

import onnx

from .ops import DOMAIN

SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def node_scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            return list(ast.literal_eval(prop.value))
    return []


def scope_nodes(graph: onnx.GraphProto, scope: str,
                exclude: tuple[str, ...] = ()) -> list[onnx.NodeProto]:
    """Nodes inside module ``scope`` (not inside any scope of ``exclude``), in graph order."""
    return [n for n in graph.node
            if scope in (scopes := node_scopes(n)) and not any(e in scopes for e in exclude)]


def layer_scope_outputs(graph: onnx.GraphProto, scope: str,
                        exclude: tuple[str, ...] = ()) -> list[str]:
    """Values made inside ``scope`` and used outside it (or returned by the graph)."""
    inside = scope_nodes(graph, scope, exclude)
    inside_ids = {id(n) for n in inside}
    produced = [o for n in inside for o in n.output]
    used_outside = {i for n in graph.node if id(n) not in inside_ids for i in n.input}
    used_outside |= {o.name for o in graph.output}
    return [v for v in produced if v in used_outside]


def scope_inputs(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[str]:
    """Values the given nodes read that they do not make themselves and are not initializers."""
    produced = {o for n in nodes for o in n.output}
    constants = {i.name for i in graph.initializer}
    seen: list[str] = []
    for node in nodes:
        for value in node.input:
            if value and value not in produced and value not in constants and value not in seen:
                seen.append(value)
    return seen


def with_nodes_replaced(model: onnx.ModelProto, replaced: dict[int, onnx.NodeProto | None],
                        prepend: tuple[onnx.NodeProto, ...] = ()) -> onnx.ModelProto:
    """A copy of ``model`` in which each node whose ``id`` is in ``replaced`` is swapped for
    its new node, or dropped where that is None; ``prepend`` goes first."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(prepend)
    out.graph.node.extend(new for n in model.graph.node
                          if (new := replaced.get(id(n), n)) is not None)
    return out


def with_extra_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the float values ``names``."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    existing = {o.name for o in extended.graph.output}
    extended.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                 for n in names if n not in existing)
    return extended


def cut(model: onnx.ModelProto, removed: list[str]) -> onnx.ModelProto:
    """``model`` without the nodes named ``removed``, so what lies between them can be run
    on given values: each value they make that a kept node (or the graph) reads becomes a
    graph input, each value they read that a kept node makes becomes a graph output, after
    the model's own outputs (those the removed nodes make are dropped)."""
    gone = set(removed)
    kept = [n for n in model.graph.node if n.name not in gone]
    cut_nodes = [n for n in model.graph.node if n.name in gone]
    made_by_cut = {o for n in cut_nodes for o in n.output}
    made_by_kept = {o for n in kept for o in n.output}
    read_by_kept = {i for n in kept for i in n.input} | {o.name for o in model.graph.output}
    fed = [o for n in cut_nodes for o in n.output if o in read_by_kept]
    probed = [v for v in scope_inputs(model.graph, cut_nodes)
              if v in made_by_kept and v not in made_by_cut]
    outputs = [o for o in model.graph.output if o.name not in made_by_cut]
    returned = {o.name for o in outputs}
    probed = [v for v in dict.fromkeys(probed) if v not in returned]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    out.graph.input.extend(_value_infos(model.graph, fed))
    del out.graph.output[:]
    out.graph.output.extend([*outputs, *_value_infos(model.graph, probed)])
    moved = set(fed) | set(probed)
    del out.graph.value_info[:]
    out.graph.value_info.extend(v for v in model.graph.value_info if v.name not in moved)
    return out


def _value_infos(graph: onnx.GraphProto, names: list[str]) -> list[onnx.ValueInfoProto]:
    """Each value's recorded type and shape (so ONNX Runtime's layout passes see it), else
    float of unknown shape."""
    known = {v.name: v for v in graph.value_info}
    return [known.get(n) or onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
            for n in dict.fromkeys(names)]


def annotate_custom_op_shapes(model: onnx.ModelProto) -> None:
    """Record the shape of every qconvert op's output in ``value_info``.

    A runtime cannot infer shapes through a custom op, so without these every value after
    a quantizer has no shape, and ONNX Runtime's NCHWc layout pass, unable to prove that a
    residual addition's two inputs match, keeps the addition and its ReLU out of the
    convolution (reshapes, a separate Add and Relu per block). ONNX shape inference knows
    them from the ops' schemas (qconvert.ops: shaped_like_x, shaped_by_attribute)."""
    del model.graph.value_info[:]
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    outputs = {o.name for o in model.graph.output}
    model.graph.value_info.extend(
        inferred[name] for node in model.graph.node if node.domain == DOMAIN
        for name in node.output if name in inferred and name not in outputs)
