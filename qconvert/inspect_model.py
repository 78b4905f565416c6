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

from . import manifest
from .manifest import INPUT_NAME, Manifest
from .ops import DOMAIN

COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger"}
# Integer compute nodes: the layer type they compute and their output's element type.
INTEGER_OPS = {"ConvInteger": "Conv", "MatMulInteger": "Gemm", "QConvClamp": "Conv",
               "QDepthwiseConvClamp": "Conv"}  # its channels-last output counts the same
INTEGER_OUTPUTS = {"ConvInteger": onnx.TensorProto.INT32, "MatMulInteger": onnx.TensorProto.INT32,
                   "QConvClamp": onnx.TensorProto.UINT8,
                   "QDepthwiseConvClamp": onnx.TensorProto.UINT8}


@dataclass
class LayerStorage:
    layer: str
    op: str  # the weight's decode op
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
    adapter_params: int
    macs: int | None  # None: not computed (inspect_model(..., macs=True) computes them)
    adapter_macs: int | None
    integer_macs: int | None = None  # integer mode: the quantized layers' u8 x s8 MACs
    metadata: dict = field(default_factory=dict)
    layers: list[LayerStorage] = field(default_factory=list)

    @property
    def adapter_param_ratio(self) -> float:
        return self.adapter_params / max(1, self.weight_params)

    @property
    def adapter_mac_ratio(self) -> float | None:
        if self.macs is None:
            return None
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


def _compute_shapes(model: onnx.ModelProto, values: dict[str, int],
                    input_shape: list[int]) -> dict[str, tuple[int, ...]]:
    """Shapes of the named values (name -> ONNX element type) for one sample, from one run
    on zeros."""
    from .runtime import session  # local: sizes need no runtime, only MACs do

    existing = {o.name for o in model.graph.output}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, elem_type, None)
                              for name, elem_type in values.items()
                              if name not in existing and name != INPUT_NAME)
    names = [name for name in values if name != INPUT_NAME]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    arrays = session(probe, announce=None).run(
        {INPUT_NAME: np.zeros((1, *input_shape), dtype)}, names)
    shapes = {name: tuple(v.shape) for name, v in zip(names, arrays, strict=True)}
    return shapes | {INPUT_NAME: (1, *input_shape)}


def _macs_values(node: onnx.NodeProto) -> dict[str, int]:
    """The values whose shapes give a compute node's MACs: its output, and for a
    ConvTranspose its input (each input element meets Cout/groups x kernel weights)."""
    if node.op_type == "ConvTranspose":
        return {node.input[0]: onnx.TensorProto.FLOAT}
    return {node.output[0]: INTEGER_OUTPUTS.get(node.op_type, onnx.TensorProto.FLOAT)}


def _macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]],
          weight_shape: list[int]) -> int:
    """MACs per sample. Conv: output elements x (Cin / groups) x kernel; ConvTranspose
    (weight [Cin, Cout / groups, *kernel]): input elements x (Cout / groups) x kernel."""
    op = INTEGER_OPS.get(node.op_type, node.op_type)
    if op in ("Conv", "ConvTranspose"):
        value = node.input[0] if op == "ConvTranspose" else node.output[0]
        return math.prod(shapes[value][1:]) * math.prod(weight_shape[1:])
    return math.prod(shapes[node.output[0]][1:]) * weight_shape[-1 if op == "MatMul" else 1]


def _storage(man: Manifest, inits: dict[str, onnx.TensorProto]) -> list[LayerStorage]:
    """Per quantized layer: its packed codes and tables (integer mode: its integer tables)."""
    layers = []
    for record in man.layers:
        weight = record.weight
        if record.name in man.integer:  # int8 weights, no table (LCQ levels: lut_bytes)
            code_bytes, table_bytes = man.integer[record.name]["int8_weight_bytes"], 0
        else:
            code_bytes = _initializer_bytes(inits[weight.codes])
            table_bytes = _initializer_bytes(inits[weight.params])
        layers.append(LayerStorage(record.name, weight.decode, weight.bits,
                                   math.prod(weight.shape), code_bytes, table_bytes))
    return layers


def _adapter_params(model: onnx.ModelProto, man: Manifest,
                    inits: dict[str, onnx.TensorProto]) -> tuple[int, list[onnx.NodeProto]]:
    """Parameters of the ASQ adapters' Conv / Gemm / MatMul nodes, and those nodes."""
    names = {n for record in man.layers for n in record.adapter_nodes}
    nodes = [n for n in model.graph.node if n.name in names and n.op_type in COMPUTE_OPS]
    params = sum(math.prod(inits[i].dims) for n in nodes for i in n.input[1:3] if i in inits)
    return params, nodes


def inspect_model(path: str | Path, macs: bool = False) -> Inspection:
    """Storage of an exported model; with ``macs``, also multiply-accumulates per sample
    (one run of the model on zeros)."""
    model = onnx.load(str(path))
    man = manifest.read(model)
    inits = {i.name: i for i in model.graph.initializer}
    layers = _storage(man, inits)
    stored = {n for r in man.layers for n in (r.weight.codes, r.weight.params)}
    other_bytes = sum(_initializer_bytes(i) for n, i in inits.items() if n not in stored)
    adapter_params, adapter_nodes = _adapter_params(model, man, inits)
    total_macs = adapter_macs = None
    if macs:
        total_macs, adapter_macs = _count_macs(model, man, layers, adapter_nodes, inits)
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
        adapter_params=adapter_params, macs=total_macs, adapter_macs=adapter_macs,
        integer_macs=(sum(layer.macs for layer in layers)
                      if macs and man.mode == "integer" else None),
        metadata=manifest.metadata(model), layers=layers,
    )


def _count_macs(model: onnx.ModelProto, man: Manifest, layers: list[LayerStorage],
                adapter_nodes: list[onnx.NodeProto],
                inits: dict[str, onnx.TensorProto]) -> tuple[int, int]:
    """(all MACs, adapter MACs) per sample; each layer's share goes into its storage row.
    In integer mode every quantized layer's MACs are integer (u8 x s8) MACs."""
    by_name = {n.name: n for n in model.graph.node}
    nodes = [by_name[r.compute_node] for r in man.layers] + adapter_nodes
    shapes = _compute_shapes(model, {name: elem for n in nodes
                                     for name, elem in _macs_values(n).items()},
                             man.input_shape)
    for record, layer in zip(man.layers, layers, strict=True):
        layer.macs = _macs(by_name[record.compute_node], shapes, record.weight.shape)
    adapter = sum(_macs(n, shapes, list(inits[n.input[1]].dims)) for n in adapter_nodes)
    return sum(layer.macs for layer in layers) + adapter, adapter


def _count_custom_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
