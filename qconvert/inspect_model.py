"""What an exported model holds: ops, per-layer bits and storage, size against the ideal
packed size and FP32, MACs and weight bits, and the ASQ adapters' overhead."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .export.onnx_export import INPUT_NAME
from .ops import DOMAIN

DECODE_OPS = {"LutGather": "table", "Pow2Shift": "alpha"}
COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger"}
# Integer mode (qconvert.export.integer): int32 outputs; the weight reaches the op through
# Cast (and Transpose for MatMulInteger) from the LutGather decode of shape [C, K].
INTEGER_OPS = {"ConvInteger": "Conv", "MatMulInteger": "Gemm"}
WEIGHT_PASS_THROUGH = {"Cast", "Transpose"}


@dataclass
class LayerStorage:
    weight: str  # the decode node's output
    op: str
    bits: int
    params: int
    code_bytes: int
    table_bytes: int
    macs: int = 0


@dataclass
class Inspection:
    file_bytes: int
    ideal_bytes: int
    fp32_bytes: int
    custom_ops: dict[str, int]
    weight_params: int
    weight_bits: int  # sum of params x bits
    lut_bytes: int
    macs: int
    adapter_params: int
    adapter_macs: int
    metadata: dict = field(default_factory=dict)
    layers: list[LayerStorage] = field(default_factory=list)

    @property
    def adapter_param_ratio(self) -> float:
        return self.adapter_params / max(1, self.weight_params)

    @property
    def adapter_mac_ratio(self) -> float:
        return self.adapter_macs / max(1, self.macs - self.adapter_macs)

    def to_json(self) -> str:
        data = asdict(self)
        data["quantized_params"] = self.weight_params  # the quantized weights' params
        data["adapter_param_ratio"] = self.adapter_param_ratio
        data["adapter_mac_ratio"] = self.adapter_mac_ratio
        data["size_vs_ideal"] = self.file_bytes / max(1, self.ideal_bytes)
        data["size_vs_fp32"] = self.file_bytes / max(1, self.fp32_bytes)
        return json.dumps(data, indent=2)


def _initializer_bytes(init: onnx.TensorProto) -> int:
    return numpy_helper.to_array(init).nbytes


def _compute_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Output shapes of Conv/Gemm/MatMul for one sample, from one run on zeros."""
    from .runtime import session  # local: inspect works without a runtime for sizes

    nodes = [n for n in model.graph.node if n.op_type in COMPUTE_OPS]
    outputs = [n.output[0] for n in nodes]
    if not outputs:
        return {}
    existing = {o.name for o in model.graph.output}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(
            n.output[0], onnx.TensorProto.INT32 if n.op_type in INTEGER_OPS
            else onnx.TensorProto.FLOAT, None)
        for n in nodes if n.output[0] not in existing)
    shape = json.loads(_meta(model).get("qconvert_input", '{"shape": []}'))["shape"]
    sess = session(probe, announce=None)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    values = sess.run({INPUT_NAME: np.zeros((1, *shape), dtype)}, outputs)
    return {name: tuple(v.shape) for name, v in zip(outputs, values, strict=True)}


def _meta(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _macs(node: onnx.NodeProto, out_shape: tuple[int, ...], weight_shape) -> int:
    op = INTEGER_OPS.get(node.op_type, node.op_type)
    if op == "Conv":  # out elements x (Cin / groups) x kH x kW
        return math.prod(out_shape[1:]) * math.prod(weight_shape[1:])
    return math.prod(out_shape[1:]) * weight_shape[-1 if op == "MatMul" else 1]


def inspect_model(path: str | Path) -> Inspection:
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    layers, decoded_inputs = [], set()
    by_codes: dict[str, LayerStorage] = {}  # integer-mode POST decodes its codes twice
    by_weight: dict[str, LayerStorage] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type in DECODE_OPS:
            table_bytes = _initializer_bytes(inits[node.input[1]])
            if node.input[0] in by_codes:
                layer = by_codes[node.input[0]]
                layer.table_bytes += table_bytes
            else:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                layer = LayerStorage(node.output[0], node.op_type, attrs["bits"],
                                     math.prod(attrs["shape"]),
                                     _initializer_bytes(inits[node.input[0]]), table_bytes)
                layers.append(layer)
                by_codes[node.input[0]] = layer
            by_weight[node.output[0]] = layer
            decoded_inputs.update(node.input)
    other_bytes = sum(_initializer_bytes(i) for n, i in inits.items() if n not in decoded_inputs)
    shapes = _compute_shapes(model)
    macs = adapter_macs = adapter_params = 0
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        weight = node.input[1]
        while weight in producers and producers[weight].op_type in WEIGHT_PASS_THROUGH:
            weight = producers[weight].input[0]  # integer mode: back to the decode
        decoded = weight in producers and any(a.name == "shape"
                                              for a in producers[weight].attribute)
        if weight not in inits and not decoded:
            continue  # two activations (attention scores): no weight, not counted
        weight_shape = (tuple(inits[weight].dims) if weight in inits
                        else tuple(a.ints for a in producers[weight].attribute
                                   if a.name == "shape")[0])
        node_macs = _macs(node, shapes[node.output[0]], weight_shape)
        macs += node_macs
        if weight in by_weight:
            by_weight[weight].macs += node_macs
        elif "adapter" in weight:
            adapter_macs += node_macs
            adapter_params += math.prod(weight_shape) + (
                math.prod(inits[node.input[2]].dims) if len(node.input) > 2 else 0)
    weight_params = sum(layer.params for layer in layers)
    table_bytes = sum(layer.table_bytes for layer in layers)
    return Inspection(
        file_bytes=Path(path).stat().st_size,
        ideal_bytes=math.ceil(sum(layer.params * layer.bits for layer in layers) / 8)
        + table_bytes + other_bytes,
        fp32_bytes=4 * weight_params + other_bytes,
        custom_ops=_count_custom_ops(model),
        weight_params=weight_params,
        weight_bits=sum(layer.params * layer.bits for layer in layers),
        lut_bytes=table_bytes + sum(_initializer_bytes(inits[n.input[4]]) for n in model.graph.node
                                    if n.op_type == "CompandQuant" and n.input[4] in inits),
        macs=macs, adapter_params=adapter_params, adapter_macs=adapter_macs,
        metadata=_meta(model), layers=layers,
    )


def _count_custom_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
