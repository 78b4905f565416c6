"""Integer mode's opt-in convolution kernel (docs/integer-mode.md): every
``DequantizeLinear(codes) -> Conv -> [Relu ->] QuantizeLinear [-> Clip]`` of an integer
model becomes one qconvert ``QConvClamp`` (docs/ops.md#qconvclamp), which gives the same
codes as ONNX Runtime's QLinearConv + Clip in one native kernel.

All or nothing: a QLinearConv left in the graph is run NHWC by ONNX Runtime, which then
puts transposes between it and the NCHW custom nodes, so a convolution that cannot be
rewritten refuses the whole option, naming the layer and the reason. What the model's
structure decides is refused earlier, on the exact-mode model (``check_qconv_clamp``),
before integer mode calibrates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ... import manifest
from ...errors import QConvertError
from ...ops import DOMAIN, DOMAIN_VERSION, functions
from ...ops.qconv_clamp import MAX_KERNEL, MAX_STRIDE
from .edit import GraphEdit, node_attrs, prune


@dataclass
class ConvChain:
    """One convolution and the nodes QConvClamp replaces, with its constants."""

    nodes: list[onnx.NodeProto]  # Conv [, Relu], QuantizeLinear [, Clip]
    inputs: list[str]  # codes, int8 weights, int32 bias
    scale: np.ndarray  # ORT's multiplier, float32(x_scale * w_scale) / y_scale
    attrs: dict  # QConvClamp's attributes


def _constant(g: GraphEdit, name: str) -> np.ndarray | None:
    return g.array(name) if g.is_const(name) else None


def _only_reader(g: GraphEdit, value: str) -> onnx.NodeProto | None:
    readers = g.consumers.get(value, [])
    outputs = {o.name for o in g.model.graph.output}
    return readers[0] if len(readers) == 1 and value not in outputs else None


def _dequantized(g: GraphEdit, value: str,
                 dtype) -> tuple[onnx.NodeProto, np.ndarray | None] | None:
    """The DequantizeLinear producing ``value`` and its stored input when that is a
    constant of ``dtype`` (None: computed), or None when ``value`` is not dequantized."""
    node = g.producers.get(value)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    stored = _constant(g, node.input[0])
    return node, stored if stored is not None and stored.dtype == dtype else None


def _per_tensor(g: GraphEdit, node: onnx.NodeProto, index: int) -> bool:
    """``node``'s input ``index`` is a constant with one element."""
    value = _constant(g, node.input[index]) if len(node.input) > index else None
    return value is not None and value.size == 1


def _refuse(layer: str, why: str) -> QConvertError:
    return QConvertError(f"--conv-kernel qconvert: layer {layer}: {why}; export without "
                         "--conv-kernel (the standard QDQ convolutions)")


def qconv_clamp_geometry(layer: str, attrs: dict, kernel: list[int]) -> dict:
    """What QConvClamp computes, stated once: a 2-D, ungrouped, undilated convolution with
    explicit pads, strides and kernel within the native kernel's bounds. ``attrs``: the
    Conv node's attributes (the exact-mode and integer models' Conv nodes carry the same),
    ``kernel``: the weight's spatial shape. Its QConvClamp attributes, or a refusal."""
    if attrs.get("group", 1) != 1:
        raise _refuse(layer, f"a grouped convolution (group={attrs['group']}), which "
                             "QConvClamp does not compute")
    if any(d != 1 for d in attrs.get("dilations", [1])):
        raise _refuse(layer, "a dilated convolution, which QConvClamp does not compute")
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise _refuse(layer, "auto_pad is set; QConvClamp takes explicit pads")
    if len(kernel) != 2:
        raise _refuse(layer, f"a {len(kernel)}-D convolution; QConvClamp is 2-D")
    strides = [int(s) for s in attrs.get("strides", [1, 1])]
    pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    kernel = [int(k) for k in kernel]
    if max(strides) > MAX_STRIDE or max(kernel) > MAX_KERNEL or any(
            p >= k for p, k in zip(pads, kernel * 2, strict=True)):
        raise _refuse(layer, f"strides {strides}, kernel {kernel}, pads {pads} outside "
                             f"QConvClamp's bounds (strides <= {MAX_STRIDE}, kernel <= "
                             f"{MAX_KERNEL}, pads below the kernel)")
    return {"strides": strides, "pads": pads}


def _per_sample_step(layer: str) -> QConvertError:
    return _refuse(layer, "its input is ASQ-quantized, and ASQ's per-sample activation step "
                          "cannot be folded into QConvClamp's per-channel constant multiplier")


def _requantized_output(g: GraphEdit, layer: str, conv: onnx.NodeProto):
    """The chain after the Conv: ([Relu,] QuantizeLinear [, Clip]) and (lo, hi, zero point)."""
    chain, after = [], _only_reader(g, conv.output[0])
    relu = after is not None and after.op_type == "Relu"
    if relu:
        chain.append(after)
        after = _only_reader(g, after.output[0])
    if after is None or after.op_type != "QuantizeLinear":
        raise _refuse(layer, "its output is not requantized to uint8 by one QuantizeLinear "
                             "(a float output)")
    chain.append(after)
    y_scale, y_zp = _constant(g, after.input[1]), _constant(g, after.input[2])
    if y_scale is None or y_scale.size != 1 or y_zp is None or y_zp.dtype != np.uint8 or \
            y_zp.size != 1:
        raise _refuse(layer, "its output grid is not a constant per-tensor uint8 one")
    zp = int(y_zp.reshape(-1)[0])
    lo, hi = (zp if relu else 0), 255
    clip = _only_reader(g, after.output[0])
    if clip is not None and clip.op_type == "Clip":
        c_lo, c_hi = (_constant(g, clip.input[i]) if len(clip.input) > i else None for i in (1, 2))
        if c_lo is not None and c_hi is not None:
            lo, hi = max(lo, int(c_lo)), min(hi, int(c_hi))
            chain.append(clip)
    return chain, np.float32(y_scale.reshape(-1)[0]), (lo, hi, zp)


def conv_chain(g: GraphEdit, layer: str, conv: onnx.NodeProto) -> ConvChain:
    """The QConvClamp equivalent of one convolution, or a refusal naming the layer."""
    x = _dequantized(g, conv.input[0], np.uint8)
    w = _dequantized(g, conv.input[1], np.int8) if len(conv.input) > 1 else None
    b = _dequantized(g, conv.input[2], np.int32) if len(conv.input) > 2 and conv.input[2] else None
    if x is None or not all(_per_tensor(g, x[0], i) for i in (1, 2)):
        raise _refuse(layer, "its input is not uint8 codes with a constant per-tensor scale "
                             "and zero point")
    if w is None or w[1] is None:
        raise _refuse(layer, "its weights are not constant int8 codes")
    if b is None or b[1] is None:
        raise _refuse(layer, "it has no constant int32 bias")
    w_scale = _constant(g, w[0].input[1])
    if w_scale is None or w_scale.size not in (1, w[1].shape[0]):
        raise _refuse(layer, "its weight scale is not constant, per tensor or per channel")
    w_zp = _constant(g, w[0].input[2]) if len(w[0].input) > 2 else None
    if w_zp is not None and np.any(w_zp != 0):
        raise _refuse(layer, "its weight zero point is not 0")
    geometry = qconv_clamp_geometry(layer, node_attrs(conv), list(w[1].shape[2:]))
    chain, y_scale, (lo, hi, zp) = _requantized_output(g, layer, conv)
    x_scale = np.float32(_constant(g, x[0].input[1]).reshape(-1)[0])
    w_scale = w_scale.astype(np.float32).reshape(-1)
    scale = ((x_scale * w_scale) / y_scale).astype(np.float32)  # ORT's order, in float32
    if scale.size == 1:
        scale = np.repeat(scale, w[1].shape[0])
    x_zp = int(_constant(g, x[0].input[2]).reshape(-1)[0])
    return ConvChain([conv, *chain], [x[0].input[0], w[0].input[0], b[0].input[0]], scale,
                     {**geometry, "lo": lo, "hi": hi, "zero_point": zp, "x_zero_point": x_zp})


def _layer_names(model: onnx.ModelProto) -> dict[str, str]:
    """Compute node -> the PyTorch layer it computes (for messages)."""
    return {r.compute_node: r.name for r in manifest.read(model).layers}


def _convolutions(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if not convs:
        raise QConvertError("--conv-kernel qconvert: the model has no convolution to rewrite")
    return convs


def check_qconv_clamp(model: onnx.ModelProto) -> None:
    """Refuse, from the exact-mode model ``model`` alone, what with_qconv_clamp would refuse
    for the model's structure (geometry, ASQ's per-sample steps, convolutions integer mode
    leaves in float): the export calls it before integer mode's calibration, so such a
    refusal costs the user seconds, not the calibration's minutes. What depends on the
    rewritten graph (how an output is requantized) is still checked by the rewrite."""
    man = manifest.read(model)
    if man.mode != "exact":
        raise QConvertError(f"check_qconv_clamp reads the exact-mode model, not {man.mode}")
    records = {r.compute_node: r for r in man.layers}
    producers = {o: n for n in model.graph.node for o in n.output}
    for conv in _convolutions(model):
        record = records.get(conv.name)
        if record is None:
            raise _refuse(conv.name or conv.output[0], "not a quantized layer, so integer "
                                                       "mode leaves it in float")
        quantizer = producers.get(conv.input[0])
        if quantizer is not None and quantizer.domain == DOMAIN and \
                quantizer.op_type == "AdaptiveStep":
            raise _per_sample_step(record.name)
        qconv_clamp_geometry(record.name, node_attrs(conv), record.weight.shape[2:])


def with_qconv_clamp(model: onnx.ModelProto, with_functions: bool = True) -> onnx.ModelProto:
    """A copy of the integer model ``model`` whose convolutions are all QConvClamp nodes;
    a QConvertError naming the first layer that cannot be rewritten, and why."""
    man = manifest.read(model)
    if man.mode != "integer":
        raise QConvertError("--conv-kernel qconvert rewrites integer-mode models (--mode integer)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g, names = GraphEdit(out), _layer_names(out)
    chains = []
    for conv in _convolutions(out):
        layer = names.get(conv.name, conv.name)
        if man.integer.get(layer, {}).get("act", {}).get("kind") == "asq":
            raise _per_sample_step(layer)
        chains.append(conv_chain(g, layer, conv))
    _replace(out, chains)
    _pool_codes_as_float(out)
    _use_op_set(out, with_functions)
    man.conv_kernel = "qconvert"
    manifest.write(out, man)
    return out


def _replace(model: onnx.ModelProto, chains: list[ConvChain]) -> None:
    """Each chain's last node becomes its QConvClamp; the others and the constants and
    DequantizeLinear nodes only they read go."""
    substitutes: dict[int, list[onnx.NodeProto]] = {}
    for chain in chains:
        conv = chain.nodes[0]
        name = conv.name or conv.output[0]
        model.graph.initializer.append(numpy_helper.from_array(chain.scale, f"{name}/qcc_scale"))
        substitutes.update({id(n): [] for n in chain.nodes[:-1]})
        substitutes[id(chain.nodes[-1])] = [helper.make_node(
            "QConvClamp", [*chain.inputs, f"{name}/qcc_scale"], [chain.nodes[-1].output[0]],
            domain=DOMAIN, name=name, **chain.attrs)]
    _substitute(model, substitutes)


def _substitute(model: onnx.ModelProto, substitutes: dict[int, list[onnx.NodeProto]]) -> None:
    """Put each node whose id is a key of ``substitutes`` by its nodes (none: dropped),
    in place, then prune what nothing reads any more."""
    nodes = [new for node in model.graph.node for new in substitutes.get(id(node), [node])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    prune(model)


def _reads_codes(g: GraphEdit, value: str) -> bool:
    """``value`` holds uint8 codes: a QConvClamp's or a uint8 QuantizeLinear's output, or
    that through a Clip or a MaxPool."""
    node = g.producers.get(value)
    if node is None:
        return False
    if node.op_type == "QConvClamp":
        return True
    if node.op_type == "QuantizeLinear":  # without a zero point, uint8
        if len(node.input) < 3 or not node.input[2]:
            return True
        zero_point = _constant(g, node.input[2])
        return zero_point is not None and zero_point.dtype == np.uint8
    return node.op_type in ("Clip", "MaxPool") and _reads_codes(g, node.input[0])


def _same_grid(g: GraphEdit, dq: onnx.NodeProto, q: onnx.NodeProto) -> bool:
    """DequantizeLinear ``dq`` and QuantizeLinear ``q`` use one constant grid, so that
    ``q`` gives back the codes ``dq`` read (ONNX Runtime drops such pairs around a pool)."""
    return len(dq.input) == len(q.input) and all(
        g.is_const(a) and g.is_const(b) and np.array_equal(g.array(a), g.array(b))
        for a, b in zip(dq.input[1:], q.input[1:], strict=True))


def _pooled_codes(g: GraphEdit, pool: onnx.NodeProto) -> tuple[str, str, list] | None:
    """(codes in, codes out, nodes replaced) when ``pool`` is a MaxPool of uint8 codes:
    on the codes themselves, or between a DequantizeLinear and a QuantizeLinear of one grid."""
    if pool.op_type != "MaxPool" or len(pool.output) != 1:
        return None
    if _reads_codes(g, pool.input[0]):
        return pool.input[0], pool.output[0], [pool]
    dq, readers = g.producers.get(pool.input[0]), g.consumers.get(pool.output[0], [])
    if dq is None or dq.op_type != "DequantizeLinear" or len(readers) != 1 or \
            len(g.consumers.get(dq.output[0], [])) != 1 or not _reads_codes(g, dq.input[0]):
        return None
    q = readers[0]
    if q.op_type != "QuantizeLinear" or not _same_grid(g, dq, q):
        return None
    return dq.input[0], q.output[0], [dq, pool, q]


def _pool_codes_as_float(model: onnx.ModelProto) -> None:
    """Each MaxPool of uint8 codes pools them in float between two Casts. Next to
    QConvClamp the codes stay NCHW, where ONNX Runtime's uint8 MaxPool is a generic loop
    many times slower than its float one (docs/integer-mode.md); in the standard file its
    NHWC transformer gives the pool a fast NHWC kernel instead. The maximum commutes with
    the exact casts, so the codes are the same."""
    g = GraphEdit(model)
    substitutes: dict[int, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        found = _pooled_codes(g, node)
        if found is None:
            continue
        codes_in, codes_out, nodes = found
        name = node.name or node.output[0]
        pool = onnx.NodeProto()
        pool.CopyFrom(node)
        del pool.input[:], pool.output[:]
        pool.input.append(f"{name}/float_in")
        pool.output.append(f"{name}/float_out")
        substitutes.update({id(n): [] for n in nodes[:-1]})
        substitutes[id(nodes[-1])] = [
            helper.make_node("Cast", [codes_in], [pool.input[0]], name=f"{name}/to_float",
                             to=onnx.TensorProto.FLOAT),
            pool,
            helper.make_node("Cast", [pool.output[0]], [codes_out], name=f"{name}/to_codes",
                             to=onnx.TensorProto.UINT8)]
    _substitute(model, substitutes)


def _use_op_set(model: onnx.ModelProto, with_functions: bool) -> None:
    """Import the op-set version that has QConvClamp and carry its function body."""
    imports = [o for o in model.opset_import if o.domain == DOMAIN]
    if imports:
        imports[0].version = DOMAIN_VERSION
    else:
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    if with_functions:
        opset = next(o.version for o in model.opset_import if o.domain == "")
        model.functions.extend(functions(opset, {"QConvClamp"}))
