"""Keep the activation quantizers inside ONNX Runtime's blocked (NCHWc) layout.

ORT's NCHWc transformer rewrites Conv chains into a blocked channel layout (nearly 2x
faster on AVX2), but only through ops it knows: around anything else (a custom-domain
node, or Round and Clip) it inserts a ReorderOutput / ReorderInput pair, and it stops
fusing a residual Add + ReLU into the Conv. The activation quantizers are elementwise with
per-tensor (or, for AdaptiveStep, per-sample) parameters, so they compute the same values
in any layout (the blocked tensor keeps the batch as its first dimension).
``spliced_session`` lets the transformer see a 1x1 ``MaxPool`` (an identity it does
handle) in place of each activation quantizer (``UniformQuant``, ``CompandQuant``,
``AdaptiveStep``) that feeds only convolutions, takes ORT's optimized graph, puts
the quantizer back on the blocked tensor, and opens that graph without re-running the
layout pass. Outputs are bit-identical to the plain native session (tests/test_native_rewrites.py);
the speed-up is in docs/benchmarks.md.

Anything unexpected (a quantizer the transformer did not keep, an ORT that names nodes
differently, a model ORT rejects) returns None and the caller opens the plain session,
which reports any error.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import helper

from .graph import with_nodes_replaced
from .ops import ACTIVATION_OPS, DOMAIN

# 1x1 MaxPool variants with distinct attributes, so that ORT's common-subexpression pass
# does not merge two quantizers of the same tensor (a ResNet shortcut and its block).
_VARIANTS = ({}, {"ceil_mode": 1}, {"pads": [0, 0, 0, 0]}, {"ceil_mode": 1, "pads": [0] * 4})
_NCHWC_SUFFIX = "_nchwc"  # ORT names a transformed node after its first output


def _quantizer_units(model: onnx.ModelProto) -> list[list[onnx.NodeProto]]:
    """The activation quantizers, one node each (a unit is a node chain, restored as one)."""
    return [[node] for node in model.graph.node
            if node.domain == DOMAIN and node.op_type in ACTIVATION_OPS]


def _placeholders(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list]]:
    """A copy of ``model`` with a MaxPool stand-in for each quantizer that feeds only
    convolutions, and the quantizers' node chains by stand-in name."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    per_input: dict[str, int] = {}
    saved: dict[str, list[onnx.NodeProto]] = {}
    replaced: dict[int, onnx.NodeProto | None] = {}  # node id -> stand-in (None: dropped)
    for unit in _quantizer_units(model):
        source, result = unit[0].input[0], unit[-1].output[0]
        users = consumers.get(result, [])
        inner = [o for n in unit[:-1] for o in n.output]
        variant = per_input.get(source, 0)
        if (result in outputs or not users or variant >= len(_VARIANTS)
                or any(c.op_type != "Conv" or c.domain not in ("", "ai.onnx") for c in users)
                or any(o in outputs or len(consumers.get(o, [])) != 1 for o in inner)):
            continue
        per_input[source] = variant + 1
        name = f"qconvert_placeholder_{len(saved)}"
        saved[name] = unit
        replaced.update({id(n): None for n in unit})
        replaced[id(unit[-1])] = helper.make_node("MaxPool", [source], [result], name=name,
                                                  kernel_shape=[1, 1], **_VARIANTS[variant])
    stand_in = with_nodes_replaced(model, replaced)
    # Computed parameters (AdaptiveStep's per-sample beta from its adapter) lose their
    # reader while the stand-in is there: graph outputs keep ORT from pruning them.
    produced = {o for n in model.graph.node for o in n.output}
    stand_in.graph.output.extend(
        helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        for name in dict.fromkeys(i for unit in saved.values() for n in unit for i in n.input[1:]
                                  if i in produced and i not in outputs))
    return stand_in, saved


def _restore(optimized: onnx.ModelProto, original: onnx.ModelProto,
             saved: dict[str, list]) -> onnx.ModelProto | None:
    """``optimized`` with every stand-in turned back into its quantizer, or None."""
    by_name = dict(saved)
    by_name.update({unit[-1].output[0] + _NCHWC_SUFFIX: unit for unit in saved.values()})
    restored, nodes = set(), []
    for node in optimized.graph.node:
        unit = by_name.get(node.name) if node.op_type == "MaxPool" else None
        if unit is None:
            nodes.append(node)
            continue
        restored.add(unit[-1].output[0])
        for member in unit:  # same nodes, now reading and writing the blocked tensors
            copy = onnx.NodeProto()
            copy.CopyFrom(member)
            if member is unit[0]:
                copy.input[0] = node.input[0]
            if member is unit[-1]:
                copy.output[0] = node.output[0]
            nodes.append(copy)
    if restored != {unit[-1].output[0] for unit in saved.values()}:
        return None
    del optimized.graph.node[:]
    optimized.graph.node.extend(nodes)
    original_outputs = {o.name for o in original.graph.output}
    wanted_outputs = [o for o in optimized.graph.output if o.name in original_outputs]
    del optimized.graph.output[:]
    optimized.graph.output.extend(wanted_outputs)
    present = {i.name for i in optimized.graph.initializer}
    wanted = {i for unit in saved.values() for n in unit for i in n.input[1:]}
    optimized.graph.initializer.extend(
        i for i in original.graph.initializer if i.name in wanted and i.name not in present)
    domains = {o.domain for o in optimized.opset_import}
    optimized.opset_import.extend(o for o in original.opset_import if o.domain not in domains)
    return optimized


def spliced_model(model: onnx.ModelProto,
                  make_options: Callable[[], ort.SessionOptions]) -> onnx.ModelProto | None:
    """ORT's optimized graph of ``model`` with its activation quantizers put back on the
    NCHWc tensors (to be opened without re-running the layout pass), or None when there
    is nothing to splice or anything does not go as expected."""
    stand_in, saved = _placeholders(model)
    if not saved:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            options = make_options()
            options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            ort.InferenceSession(stand_in.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
            optimized = onnx.load(options.optimized_model_filepath)
        return _restore(optimized, model, saved)
    except Exception:  # any failure (ORT raises many types): the caller opens the plain one
        return None


def spliced_session(model: onnx.ModelProto,
                    make_options: Callable[[], ort.SessionOptions]) -> ort.InferenceSession | None:
    """An ORT session running ``model``'s activation quantizers in the NCHWc layout, or
    None when there is nothing to splice or anything does not go as expected."""
    spliced = spliced_model(model, make_options)
    if spliced is None:
        return None
    try:
        options = make_options()
        # The layout pass already ran; the extended level keeps the graph as spliced.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        return ort.InferenceSession(spliced.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception:  # any failure (ORT raises many types): the caller opens the plain one
        return None
