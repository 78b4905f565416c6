"""Integer mode: the exact-mode model rewritten into the QDQ form ONNX Runtime fuses into
its u8 x s8 QLinearConv / QGemm kernels (docs/integer-mode.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from ... import manifest
from ...errors import QConvertError
from ...manifest import LayerRecord
from .activations import WIDE_ACT_STEPS, ActInfo, IntAct, int_act
from .conv_kernel import kernel_form
from .edit import GraphEdit, node_attrs, prune, stock_session
from .layout import channels_last_islands
from .requant import (
    CALIB_BATCH,
    Requant,
    calibrate,
    insert_requants,
    output_requant,
    residual_requants,
    skip_redundant_clips,
    skip_requantize_pairs,
)
from .weights import WeightInfo, int_weight

MIN_OUTER_BITS, MAX_OUTER_BITS = 2, 8
CALIB_SAMPLES = 256
RESIDUAL_DOMAINS = ("float", "quantized")
GRAPH_KEY = "#graph"  # manifest.integer entry for the whole graph (not a layer)


@dataclass
class LayerInfo:
    op: str  # Conv | Gemm, fused by ONNX Runtime with its DequantizeLinear inputs
    act: ActInfo
    weight: WeightInfo
    output: str  # requantized: onto the next quantizer's grid | calibrated: uint8 | float
    batchnorm_folded: bool
    lut_bytes: int = 0  # LCQ activation tables (float32 levels)
    int8_weight_bytes: int = 0


def _batchnorm_after(g: GraphEdit, value: str) -> onnx.NodeProto | None:
    readers = g.consumers.get(value, [])
    if len(readers) != 1 or readers[0].op_type != "BatchNormalization":
        return None
    bn = readers[0]
    return bn if all(g.is_const(i) for i in bn.input[1:5]) else None


def _scale_and_bias(g: GraphEdit, node: onnx.NodeProto, channels: int,
                    ) -> tuple[np.ndarray, np.ndarray | None, onnx.NodeProto | None]:
    """(per-channel factor, bias or None, the folded BatchNormalization): the layer's output
    is factor * (W x) + bias."""
    bias = (g.array(node.input[2]).astype(np.float64).reshape(-1)
            if len(node.input) > 2 and node.input[2] else None)
    bn = _batchnorm_after(g, node.output[0]) if node.op_type == "Conv" else None
    if bn is None:
        return np.ones(channels), bias, None
    gamma, beta, mean, var = (g.array(i).astype(np.float64).reshape(-1) for i in bn.input[1:5])
    eps = float(node_attrs(bn).get("epsilon", 1e-5))
    factor = gamma / np.sqrt(var.astype(np.float32) + np.float32(eps)).astype(np.float64)
    base = bias if bias is not None else 0.0
    return factor, (base - mean) * factor + beta, bn


def _rewrite_layer(g: GraphEdit, record: LayerRecord, node: onnx.NodeProto, outer: int,
                   acts: dict[str, IntAct], wide: str) -> tuple[LayerInfo, list[Requant], str]:
    """Point the layer's Conv / Gemm at int8 weights (BatchNorm folded) and its integer
    input; returns its info, the requantizations it needs, and its output value."""
    scope = record.name
    is_conv = node.op_type == "Conv"
    attrs = node_attrs(node)
    if not is_conv and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                        or attrs.get("beta", 1.0) != 1.0):
        raise QConvertError(f"layer {scope}: Gemm with transA/alpha/beta is not supported")
    if node.input[0] not in acts:
        acts[node.input[0]] = int_act(g, node.input[0], scope, outer, wide)
    act = acts[node.input[0]]
    transposed = not is_conv and not attrs.get("transB", 0)
    if transposed and g.array(record.weight.params).ndim == 2:
        raise QConvertError(f"layer {scope}: a per-channel table on an untransposed Gemm "
                            "weight is not supported; keep the exact mode")
    weight = int_weight(g, record.weight, outer, act.max_code)
    ints, steps = weight.ints, weight.steps
    if transposed:  # [in, out] -> [out, in]: the output channel on axis 0
        ints = ints.T.copy()
        steps = np.full(ints.shape[0], steps[0], np.float32)
        node.attribute.append(onnx.helper.make_attribute("transB", 1))
        for a in list(node.attribute):
            if a.name == "transB" and a.i == 0:
                node.attribute.remove(a)
    channels = ints.shape[0]
    factor, bias, bn = _scale_and_bias(g, node, channels)
    scale = steps.astype(np.float64) * factor
    flip = scale < 0
    ints = np.where(flip.reshape((-1,) + (1,) * (ints.ndim - 1)), -ints, ints).astype(np.int8)
    w_scale = np.abs(scale).astype(np.float32)
    final = bn.output[0] if bn is not None else node.output[0]
    if bn is not None:
        g.drop(bn)
    w_dq = g.node(node, "DequantizeLinear", [
        g.const(f"{scope}/int/weight", ints), g.const(f"{scope}/int/weight_scale", w_scale),
        g.const(f"{scope}/int/weight_zp", np.zeros(channels, np.int8))], axis=0)
    del node.input[1:]
    node.input.append(w_dq)
    per_sample = act.scale_value is not None
    if bias is not None and not per_sample:
        b_scale = (np.float32(act.scale) * w_scale).astype(np.float32)
        b_int = np.clip(np.round(bias / b_scale.astype(np.float64)), -2**31, 2**31 - 1)
        node.input.append(g.node(node, "DequantizeLinear", [
            g.const(f"{scope}/int/bias", b_int.astype(np.int32)),
            g.const(f"{scope}/int/bias_scale", b_scale),
            g.const(f"{scope}/int/bias_zp", np.zeros(channels, np.int32))], axis=0))
    requants: list[Requant] = []
    if per_sample:  # y = s_a[n] * (W codes) + bias: the integer part is requantized alone
        view = [-1, 1, 1, 1] if is_conv else [-1, 1]
        node.output[0] = f"{scope}/int/acc"
        requants.append(Requant(node.output[0]))
        s = g.node(node, "Reshape", [act.scale_value, g.const(
            f"{scope}/int/sample_view", np.array(view, np.int64))], after=True)
        y = g.node(node, "Mul", [node.output[0], s], after=True,
                   output=None if bias is not None else final)
        if bias is not None:
            shape = [1, -1, 1, 1] if is_conv else [1, -1]
            g.node(node, "Add", [y, g.const(f"{scope}/int/bias_float", bias.astype(
                np.float32).reshape(shape))], output=final, after=True)
        output = "calibrated"
    else:
        node.output[0] = final
        output = ""  # decided once every quantizer is known
    info = LayerInfo(node.op_type, act.info, weight.info, output, bn is not None,
                     act.info.lut_bytes, ints.size)
    return info, requants, final


def _residual_summary(model: onnx.ModelProto) -> dict[str, int]:
    """Residual additions by domain: 'quantized' when both inputs come from
    DequantizeLinear and the sum goes to QuantizeLinear (ONNX Runtime fuses it), else
    'float'."""
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    counts = {"quantized": 0, "float": 0}
    seen: set[tuple[str, ...]] = set()
    for n in model.graph.node:
        if n.op_type != "Add" or any(i not in producers for i in n.input) \
                or tuple(n.input) in seen:  # one sum per grid counts once
            continue
        seen.add(tuple(n.input))
        dq_in = all(producers[i].op_type == "DequantizeLinear" for i in n.input)
        after = readers.get(n.output[0], [])
        if [r.op_type for r in after] == ["Relu"]:  # folded into the requantization
            after = readers.get(after[0].output[0], [])
        q_out = [r.op_type for r in after] == ["QuantizeLinear"]
        counts["quantized" if dq_in and q_out else "float"] += 1
    return counts


def _calibration_inputs(man: manifest.Manifest, calib: np.ndarray | None) -> np.ndarray:
    if calib is not None:
        return np.ascontiguousarray(calib[:CALIB_SAMPLES], np.float32)
    # no data: normalised inputs are roughly standard normal
    rng = np.random.default_rng(0)
    return rng.standard_normal((64, *man.input_shape)).astype(np.float32)


def to_integer(model: onnx.ModelProto, outer_bits: int, *, wide_act_step: str = "sqrt",
               calib: np.ndarray | None = None, residual: str = "auto") -> onnx.ModelProto:
    """The integer-mode twin of an exact-mode qconvert model (a new ModelProto): every
    quantized Conv / Gemm reads uint8 activation codes and int8 per-channel weights through
    DequantizeLinear and writes QuantizeLinear'd outputs, the QDQ form ONNX Runtime runs as
    QLinearConv / QGemm.

    ``calib``: normalised model inputs [N, ...] (as the model takes them) to calibrate the
    outputs that no quantizer of the QAT model covers (residual branches, LCQ inputs);
    without it, standard-normal samples. ``wide_act_step`` picks the grid of an LSQ / ASQ
    activation wider than b': ``sqrt`` (step ratio sqrt(Qp_b / Qp_b'), LSQ's init rule) or
    ``range`` (ratio Qp_b / Qp_b', keeps the clip range). ``residual``: ``float`` keeps the
    residual stream in float as the QAT model does; ``quantized`` puts each sum on a uint8
    grid so ONNX Runtime fuses the addition (QLinearAdd); ``auto`` (default) takes
    ``quantized`` unless its top-1 agreement with the exact-mode model (bit-exact with
    PyTorch) on the calibration inputs is below the float form's.
    """
    if residual not in RESIDUAL_DOMAINS + ("auto",):
        raise QConvertError(f"residual {residual!r}: choose from auto, "
                            f"{', '.join(RESIDUAL_DOMAINS)}")
    if residual != "auto":
        return _to_integer(model, outer_bits, wide_act_step, calib, residual)
    quantized = _to_integer(model, outer_bits, wide_act_step, calib, "quantized")
    if not manifest.read(quantized).integer[GRAPH_KEY]["residual_adds"]["quantized"]:
        return quantized
    floating = _to_integer(model, outer_bits, wide_act_step, calib, "float")
    inputs = _calibration_inputs(manifest.read(model), calib)
    want = _top1(model, inputs)
    if (_top1(quantized, inputs) == want).mean() >= (_top1(floating, inputs) == want).mean():
        return quantized
    return floating


def _top1(model: onnx.ModelProto, inputs: np.ndarray) -> np.ndarray:
    sess = stock_session(model)
    return np.concatenate([sess.run(None, {manifest.INPUT_NAME: inputs[i:i + CALIB_BATCH]})[0]
                           .argmax(1) for i in range(0, len(inputs), CALIB_BATCH)])


def _to_integer(model: onnx.ModelProto, outer_bits: int, wide_act_step: str,
                calib: np.ndarray | None, residual: str) -> onnx.ModelProto:
    """to_integer with the residual domain fixed."""
    if residual not in RESIDUAL_DOMAINS:
        raise QConvertError(f"residual {residual!r}: choose from {RESIDUAL_DOMAINS}")
    if wide_act_step not in WIDE_ACT_STEPS:
        raise QConvertError(f"wide_act_step {wide_act_step!r}: choose from {WIDE_ACT_STEPS}")
    if not MIN_OUTER_BITS <= int(outer_bits) <= MAX_OUTER_BITS:
        raise QConvertError(f"outer bits {outer_bits} outside {MIN_OUTER_BITS}..{MAX_OUTER_BITS}"
                            " (ONNX Runtime's integer kernels take 8-bit operands at most)")
    outer = int(outer_bits)
    man = manifest.read(model)
    if man.mode != "exact":
        raise QConvertError(f"the model is already in {man.mode} mode; "
                            "rewrite the exact-mode export")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = GraphEdit(out)
    by_name = {n.name: n for n in out.graph.node}
    acts: dict[str, IntAct] = {}
    layers: dict[str, LayerInfo] = {}
    requants: list[Requant] = []
    finals: dict[str, str] = {}
    for record in man.layers:
        node = by_name[record.compute_node]
        kind = f"{len(record.weight.shape) - 2}-D Conv" if node.op_type == "Conv" else node.op_type
        if kind not in ("2-D Conv", "Gemm"):
            raise QConvertError(f"layer {record.name}: integer mode rewrites 2-D Conv and Gemm "
                                f"layers, not {kind}; keep the exact mode")
        layers[record.name], needed, finals[record.name] = _rewrite_layer(
            g, record, node, outer, acts, wide_act_step)
        requants.extend(needed)
    if not layers:
        raise QConvertError("the model has no quantized layer to rewrite")
    quantizers = {id(a.quantizer): a for a in acts.values()}
    graph_outputs = {o.name for o in out.graph.output}
    for name, info in layers.items():
        if not info.output:
            info.output, needed = output_requant(g, finals[name], quantizers, graph_outputs,
                                                  share=residual == "quantized")
            requants.extend(needed)
    if residual == "quantized":
        requants.extend(residual_requants(g, graph_outputs, quantizers))
    g.assemble()
    prune(out)
    calibrate(out, requants, _calibration_inputs(man, calib))
    insert_requants(out, requants)
    skip_requantize_pairs(out)
    skip_redundant_clips(out)
    prune(out)
    channels_last_islands(out)
    manifest.write(out, _integer_manifest(man, outer, layers, _residual_summary(out)))
    try:
        onnx.checker.check_model(out, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise QConvertError(f"integer model fails the ONNX checker: {exc}") from exc
    return out


def _integer_manifest(man: manifest.Manifest, outer: int, layers: dict[str, LayerInfo],
                      residual: dict[str, int]) -> manifest.Manifest:
    """The exact-mode manifest, updated: the compute node keeps its name (now reading
    DequantizeLinear inputs); the exact act / weight nodes are gone, so the teacher-forced
    op checks do not apply; act / out values are gone or requantized."""
    for record in man.layers:
        record.act_nodes, record.weight.nodes = [], []
        record.act_value = record.out_value = None
    man.mode, man.outer_bits = "integer", outer
    man.integer = {name: asdict(info) for name, info in layers.items()}
    man.integer[GRAPH_KEY] = {"residual_adds": residual}
    return man


def integer_details(model: onnx.ModelProto) -> dict[str, dict]:
    """Per-layer integer-mode record (empty for an exact-mode model)."""
    return {k: v for k, v in manifest.read(model).integer.items() if k != GRAPH_KEY}


def lut_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all level tables of an integer model, as stored (float32 entries)."""
    return sum(int(v["lut_bytes"]) for v in integer_details(model).values())


def integer_summary(model: onnx.ModelProto) -> str:
    """One line for the export summary: how many layers requantize straight onto the next
    quantizer's grid, how many through a calibrated uint8 output, and where the residual
    additions run."""
    man = manifest.read(model)
    details = integer_details(model)
    outputs = [d["output"] for d in details.values()]
    residual = man.integer.get(GRAPH_KEY, {}).get("residual_adds", {})
    kernels = kernel_form(model, " (they need the qconvert library, or run slower through "
                                 "their function bodies)")
    form = f"u8 x s8, {kernels}" if kernels else "u8 x s8 QDQ"
    return (f"integer mode b'={man.outer_bits}: {len(details)} layers as {form} "
            f"({outputs.count('requantized')} requantized onto the next quantizer's grid, "
            f"{outputs.count('calibrated')} through calibrated uint8, "
            f"{outputs.count('float')} float outputs); residual additions: "
            f"{residual.get('quantized', 0)} quantized, {residual.get('float', 0)} float")
