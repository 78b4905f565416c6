"""Integer files and ONNX Runtime's layout pass (docs/integer-mode.md, "Float islands").

ORT runs each QLinearConv channels-last and puts a transpose on either side, which its
transpose optimiser pushes through standard elementwise ops until pairs cancel. A custom
op stops them, so each float island of a non-uniform quantizer (LCQ's CompandQuant between
a DequantizeLinear and a QuantizeLinear) kept a transpose on each side. An elementwise op
whose parameters are per tensor computes the same on either layout: written between a
transpose to channels-last and one back, it lets ORT cancel both pairs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ...ops import DOMAIN, OPS
from ...ops.qdepthwise_conv_clamp import TO_NCHW, TO_NHWC
from .edit import GraphEdit

# Elementwise on X; every other input a table or one of these one-element parameters.
LAYOUT_FREE = {"UniformQuant": ("step",), "CompandQuant": ("alpha",)}
SUFFIX_IN, SUFFIX_OUT = "/channels_last_in", "/channels_last_out"


def _per_tensor(g: GraphEdit, node: onnx.NodeProto) -> bool:
    names = OPS[node.op_type].INPUTS
    for param in LAYOUT_FREE[node.op_type]:
        value = node.input[names.index(param)]
        if not g.is_const(value) or np.asarray(g.array(value)).size != 1:
            return False
    return True


def channels_last_islands(model: onnx.ModelProto) -> None:
    """Wrap each layout-free qconvert op on a 4-D activation in a transpose to
    channels-last and one back (in place)."""
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in onnx.shape_inference.infer_shapes(model).graph.value_info
             if v.type.tensor_type.HasField("shape")}
    g = GraphEdit(model)
    nodes = []
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type not in LAYOUT_FREE or \
                ranks.get(node.input[0]) != 4 or not _per_tensor(g, node):
            nodes.append(node)
            continue
        name = node.name or node.output[0]
        x, y = node.input[0], node.output[0]
        node.input[0], node.output[0] = name + SUFFIX_IN, name + SUFFIX_OUT
        nodes += [helper.make_node("Transpose", [x], [node.input[0]], name=name + SUFFIX_IN,
                                   perm=TO_NHWC),
                  node,
                  helper.make_node("Transpose", [node.output[0]], [y], name=name + SUFFIX_OUT,
                                   perm=TO_NCHW)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def channels_first_islands(model: onnx.ModelProto) -> None:
    """Undo channels_last_islands (in place): for files whose convolutions run NCHW."""
    renamed: dict[str, str] = {}  # wrapped op's value -> the original
    kept = []
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.name.endswith((SUFFIX_IN, SUFFIX_OUT)):
            renamed[node.output[0] if node.name.endswith(SUFFIX_IN) else node.input[0]] = (
                node.input[0] if node.name.endswith(SUFFIX_IN) else node.output[0])
            continue
        kept.append(node)
    for node in kept:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    del model.graph.node[:]
    model.graph.node.extend(kept)
