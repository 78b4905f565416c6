"""Integer mode's opt-in convolution kernels (docs/integer-mode.md): each
``[Clip ->] DequantizeLinear(codes) -> Conv -> [Relu ->] QuantizeLinear [-> Clip]`` of an
integer model becomes one qconvert node that gives the same codes as ONNX Runtime's
QLinearConv + Clip in one native kernel:

- a model without depthwise convolutions: every convolution becomes a ``QConvClamp``
  (docs/ops.md#qconvclamp), all or nothing: a QLinearConv left in the graph is run NHWC
  by ONNX Runtime, which then puts transposes between it and the NCHW custom nodes;
- a model with depthwise convolutions (MobileNet's blocks): those become
  ``QDepthwiseConvClamp`` nodes (docs/ops.md#qdepthwiseconvclamp), channels-last between
  two transposes that cancel against the ones ONNX Runtime puts around its own NHWC
  QLinearConv, and the other convolutions stay QDQ, on ORT's kernels (QConvClamp is slower
  than them on MobileNet's 1x1 convolutions). The ceiling Clip on a depthwise layer's
  input codes folds into the node.

A convolution that cannot be rewritten refuses the whole option, naming the layer and
the reason. What the model's structure decides is refused earlier, on the exact-mode
model (``check_qconv_clamp``), before integer mode calibrates.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ... import manifest
from ...errors import QConvertError
from ...graph import annotate_custom_op_shapes
from ...ops import DOMAIN, DOMAIN_VERSION, INTEGER_OPS, functions
from ...ops.qconv_clamp import MAX_KERNEL, MAX_STRIDE
from ...ops.qdepthwise_conv_clamp import TO_NCHW, TO_NHWC
from .edit import GraphEdit, node_attrs, prune
from .layout import channels_first_islands


@dataclass
class ConvChain:
    """One convolution and the nodes its qconvert node replaces, with its constants."""

    nodes: list[onnx.NodeProto]  # [input Clip,] Conv [, Relu], QuantizeLinear [, Clip]
    inputs: list[str]  # codes, int8 weights, int32 bias
    scale: np.ndarray  # ORT's multiplier, float32(x_scale * w_scale) / y_scale
    attrs: dict  # the node's attributes; "group" for a depthwise one

    @property
    def depthwise(self) -> bool:
        return "group" in self.attrs


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


def is_depthwise(attrs: dict, w_shape) -> bool:
    """One input and one output channel per group, more than one group (a weight shape
    not known, ``()``, is not)."""
    group = attrs.get("group", 1)
    return group > 1 and len(w_shape) == 4 and w_shape[0] == group and w_shape[1] == 1


def qconv_clamp_geometry(layer: str, attrs: dict, w_shape) -> dict:
    """What QConvClamp and QDepthwiseConvClamp compute, stated once: a 2-D, undilated
    convolution, ungrouped or depthwise, with explicit pads, strides and kernel within the
    native kernels' bounds. ``attrs``: the Conv node's attributes (the exact-mode and
    integer models' Conv nodes carry the same), ``w_shape``: the weight's shape. The
    node's geometry attributes, or a refusal."""
    group, kernel = attrs.get("group", 1), list(w_shape[2:])
    if group != 1 and not is_depthwise(attrs, w_shape):
        raise _refuse(layer, f"a grouped convolution (group={group}) that is not depthwise, "
                             "which neither QConvClamp nor QDepthwiseConvClamp computes")
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
    return {"strides": strides, "pads": pads} | ({"group": int(group)} if group != 1 else {})


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


def _input_ceiling(g: GraphEdit, codes: str, dq: onnx.NodeProto,
                   x_zp: int) -> tuple[str, int, list[onnx.NodeProto]]:
    """(codes, x_hi, nodes folded): the codes before a ceiling Clip that only this
    convolution reads, which then folds into the node's x_hi; else (codes, 255, [])."""
    clip = g.producers.get(codes)
    if clip is None or clip.op_type != "Clip" or _only_reader(g, codes) is not dq or \
            len(g.consumers.get(dq.output[0], [])) != 1:
        return codes, 255, []
    lo, hi = (_constant(g, clip.input[i]) if len(clip.input) > i and clip.input[i] else None
              for i in (1, 2))
    if hi is None or hi.dtype != np.uint8 or (lo is not None and int(lo) != 0) or \
            int(hi) < x_zp:
        return codes, 255, []
    return clip.input[0], int(hi), [clip]


def conv_chain(g: GraphEdit, layer: str, conv: onnx.NodeProto) -> ConvChain:
    """The qconvert node equivalent to one convolution, or a refusal naming the layer."""
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
    geometry = qconv_clamp_geometry(layer, node_attrs(conv), w[1].shape)
    chain, y_scale, (lo, hi, zp) = _requantized_output(g, layer, conv)
    x_scale = np.float32(_constant(g, x[0].input[1]).reshape(-1)[0])
    w_scale = w_scale.astype(np.float32).reshape(-1)
    scale = ((x_scale * w_scale) / y_scale).astype(np.float32)  # ORT's order, in float32
    if scale.size == 1:
        scale = np.repeat(scale, w[1].shape[0])
    x_zp = int(_constant(g, x[0].input[2]).reshape(-1)[0])
    attrs = {**geometry, "lo": lo, "hi": hi, "zero_point": zp, "x_zero_point": x_zp}
    codes, folded = x[0].input[0], []
    if "group" in geometry:
        codes, attrs["x_hi"], folded = _input_ceiling(g, codes, x[0], x_zp)
    return ConvChain([*folded, conv, *chain], [codes, w[0].input[0], b[0].input[0]], scale,
                     attrs)


def kernel_form(model: onnx.ModelProto, note: str = "") -> str:
    """How the integer model ``model``'s convolutions run, for summaries, ``note`` after
    the qconvert op's name; "" for QDQ convolutions only."""
    counts = Counter(n.op_type for n in model.graph.node if n.domain == DOMAIN and
                     n.op_type in INTEGER_OPS)
    if set(counts) == {"QConvClamp"}:
        return f"convolutions as qconvert QConvClamp{note}"
    if counts:
        return (f"{counts['QDepthwiseConvClamp']} depthwise convolutions as qconvert "
                f"QDepthwiseConvClamp{note}, the others QDQ")
    return ""


def _layer_names(model: onnx.ModelProto) -> dict[str, str]:
    """Compute node -> the PyTorch layer it computes (for messages)."""
    return {r.compute_node: r.name for r in manifest.read(model).layers}


def _convolutions(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if not convs:
        raise QConvertError("--conv-kernel qconvert: the model has no convolution to rewrite")
    return convs


def _rewritten(convs: list[onnx.NodeProto], weight_shape) -> list[onnx.NodeProto]:
    """The convolutions the option rewrites: the depthwise ones when there are any (the
    others stay on ORT's NHWC kernels), else all. ``weight_shape``: Conv -> its shape."""
    depthwise = [c for c in convs if is_depthwise(node_attrs(c), weight_shape(c))]
    return depthwise or convs


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
    shapes = {c.name: records[c.name].weight.shape if c.name in records else ()
              for c in _convolutions(model)}
    for conv in _rewritten(_convolutions(model), lambda c: shapes[c.name]):
        record = records.get(conv.name)
        if record is None:
            raise _refuse(conv.name or conv.output[0], "not a quantized layer, so integer "
                                                       "mode leaves it in float")
        quantizer = producers.get(conv.input[0])
        if quantizer is not None and quantizer.domain == DOMAIN and \
                quantizer.op_type == "AdaptiveStep":
            raise _per_sample_step(record.name)
        qconv_clamp_geometry(record.name, node_attrs(conv), record.weight.shape)


def with_qconv_clamp(model: onnx.ModelProto, with_functions: bool = True) -> onnx.ModelProto:
    """A copy of the integer model ``model`` whose convolutions are qconvert nodes (see
    above); a QConvertError naming the first layer that cannot be rewritten, and why."""
    man = manifest.read(model)
    if man.mode != "integer":
        raise QConvertError("--conv-kernel qconvert rewrites integer-mode models (--mode integer)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g, names = GraphEdit(out), _layer_names(out)
    chains = []
    for conv in _rewritten(_convolutions(out), lambda c: _weight_shape(g, c)):
        layer = names.get(conv.name, conv.name)
        if man.integer.get(layer, {}).get("act", {}).get("kind") == "asq":
            raise _per_sample_step(layer)
        chains.append(conv_chain(g, layer, conv))
    _replace(out, chains)
    if not any(chain.depthwise for chain in chains):  # every convolution NCHW
        channels_first_islands(out)
        _pool_codes_as_float(out)
    _use_op_set(out, with_functions, {n.op_type for n in out.graph.node if n.domain == DOMAIN})
    man.conv_kernel = "qconvert"
    manifest.write(out, man)
    annotate_custom_op_shapes(out)  # ORT turns a QLinearConv NHWC only on a known shape
    return out


def _weight_shape(g: GraphEdit, conv: onnx.NodeProto) -> tuple[int, ...]:
    """The shape of an integer model's convolution weight (behind its DequantizeLinear)."""
    node = g.producers.get(conv.input[1])
    value = conv.input[1] if node is None else node.input[0]
    return tuple(g.array(value).shape) if g.is_const(value) else ()


def _replace(model: onnx.ModelProto, chains: list[ConvChain]) -> None:
    """Each chain's last node becomes its qconvert node (between transposes to and from
    channels-last for a depthwise one); the others and the constants and DequantizeLinear
    nodes only they read go."""
    substitutes: dict[int, list[onnx.NodeProto]] = {}
    for chain in chains:
        conv = next(n for n in chain.nodes if n.op_type == "Conv")
        name = conv.name or conv.output[0]
        model.graph.initializer.append(numpy_helper.from_array(chain.scale, f"{name}/qcc_scale"))
        substitutes.update({id(n): [] for n in chain.nodes[:-1]})
        codes, (weights, bias), y = chain.inputs[0], chain.inputs[1:], chain.nodes[-1].output[0]
        if not chain.depthwise:
            substitutes[id(chain.nodes[-1])] = [helper.make_node(
                "QConvClamp", [codes, weights, bias, f"{name}/qcc_scale"], [y], domain=DOMAIN,
                name=name, **chain.attrs)]
            continue
        substitutes[id(chain.nodes[-1])] = [
            helper.make_node("Transpose", [codes], [f"{name}/nhwc_in"], name=f"{name}/to_nhwc",
                             perm=TO_NHWC),
            helper.make_node("QDepthwiseConvClamp", [f"{name}/nhwc_in", weights, bias,
                                                     f"{name}/qcc_scale"],
                             [f"{name}/nhwc_out"], domain=DOMAIN, name=name, **chain.attrs),
            helper.make_node("Transpose", [f"{name}/nhwc_out"], [y], name=f"{name}/to_nchw",
                             perm=TO_NCHW)]
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


def _use_op_set(model: onnx.ModelProto, with_functions: bool, ops: set[str]) -> None:
    """Import the op-set version that has the qconvert ``ops`` and carry their bodies."""
    imports = [o for o in model.opset_import if o.domain == DOMAIN]
    if imports:
        imports[0].version = DOMAIN_VERSION
    else:
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    if with_functions:
        opset = next(o.version for o in model.opset_import if o.domain == "")
        have = {f.name for f in model.functions}
        model.functions.extend(functions(opset, ops - have))
