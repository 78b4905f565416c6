"""Constant weight decodes that any ONNX Runtime folds at load, with the file kept packed.

ONNX Runtime never constant-folds a node of a custom domain whose kernel a library
registers: a ``qconvert::LutGather`` / ``Pow2Shift`` over constant codes would decode the
weight on every inference, and the convolution behind it would lose weight pre-packing,
Conv+BatchNorm fusion and the NCHWc layout. So each decode whose inputs are all
initializers moves to the function-only domain ``qconvert.decode``: the same op, the same
inputs and attributes, defined only by its model-local function body (the standard-ONNX
body of the op, ``qconvert/ops/<op>.py``). No runtime registers a kernel for that domain,
so ONNX Runtime inlines the body (with or without the native library) and constant-folds
it into a float initializer at session creation: the decoded weight is computed once, by
standard ops, from the packed codes stored in the file.

The body is stored once per op in the file, whatever the number of layers (a per-layer
inlined body would repeat ~40 nodes for every weight). Decodes whose inputs are computed
at run time stay ``qconvert`` ops and run on the native kernels.
"""

from __future__ import annotations

import onnx

from ..ops import DOMAIN, OPS

DECODE_DOMAIN = "qconvert.decode"
DECODE_DOMAIN_VERSION = 1
DECODE_OPS = ("LutGather", "Pow2Shift")


def is_weight_decode(node: onnx.NodeProto) -> bool:
    """A weight decode in either form: a ``qconvert`` kernel op or its foldable twin."""
    return node.domain in (DOMAIN, DECODE_DOMAIN) and node.op_type in DECODE_OPS


def decode_function(op_type: str, opset: int) -> onnx.FunctionProto:
    """The op's standard-ONNX function body, under the function-only domain."""
    function = OPS[op_type].function(opset)
    function.domain = DECODE_DOMAIN
    return function


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def fold_constant_decodes(model: onnx.ModelProto) -> list[str]:
    """Move every constant-input weight decode of ``model`` (in place) to the function-only
    domain, add that domain's function bodies and opset import, and drop the bodies of
    both domains that no node uses any more. Returns the names of the moved nodes.

    Idempotent; a model without constant decodes is left as it is.
    """
    constants = {i.name for i in model.graph.initializer}
    moved = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in DECODE_OPS
             and all(i in constants for i in n.input if i)]
    for node in moved:
        node.domain = DECODE_DOMAIN
    needed = {n.op_type for n in model.graph.node if n.domain == DECODE_DOMAIN}
    present = {f.name for f in model.functions if f.domain == DECODE_DOMAIN}
    opset = _default_opset(model)
    model.functions.extend(decode_function(op, opset) for op in sorted(needed - present))
    used = {(n.domain, n.op_type) for n in model.graph.node}
    kept = [f for f in model.functions
            if f.domain not in (DOMAIN, DECODE_DOMAIN) or (f.domain, f.name) in used]
    if len(kept) != len(model.functions):
        del model.functions[:]
        model.functions.extend(kept)
    if needed and all(o.domain != DECODE_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DECODE_DOMAIN, DECODE_DOMAIN_VERSION))
    return [n.name for n in moved]
