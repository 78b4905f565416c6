"""Deploy form -> ONNX: torch.onnx (dynamo) with the qconvert translations, then the
model-local function bodies, metadata, a full checker pass and an atomic write."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .. import __version__, manifest
from ..checkpoint import Checkpoint
from ..errors import QConvertError
from ..graph import annotate_custom_op_shapes, layer_scope_outputs, scope_nodes
from ..manifest import INPUT_NAME, OUTPUT_NAME, LayerRecord, Manifest, WeightRecord
from ..ops import DOMAIN, DOMAIN_VERSION, MAX_OPSET, MIN_OPSET, OPS, functions, translation_table
from ..quant import quantized_layers
from .deploy import DeployedLayer, to_deploy
from .integer import check_qconv_clamp, to_integer, with_qconv_clamp
from .weight_decode import fold_constant_decodes, is_weight_decode

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class ExportResult:
    path: Path
    model: onnx.ModelProto
    layers: list[DeployedLayer]
    file_bytes: int


@contextlib.contextmanager
def _torch_logs_silenced():
    """torch.export logs through handlers bound to the real stderr (``E1127 ... is
    unsupported``); qconvert reports the failure itself, in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def quiet_exporter():
    """The exporters are chatty (warnings, progress prints, log lines, graph dumps on
    failure); qconvert shows its own summary and a one-line error."""
    with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
          contextlib.redirect_stderr(io.StringIO()), _torch_logs_silenced()):
        warnings.simplefilter("ignore")
        yield


def _torch_export(deploy: torch.nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1)
    with quiet_exporter():
        try:
            program = torch.onnx.export(
                deploy, (example,), dynamo=True, opset_version=opset,
                custom_translation_table=translation_table(),
                dynamic_shapes=({0: batch},), input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; name the model part
            detail = " ".join(str(exc).split())[:300]
            raise QConvertError(
                f"torch.onnx cannot export this model ({type(exc).__name__}: {detail}); "
                "only static graphs of supported layers export faithfully"
            ) from exc
    model = program.model_proto
    # torch.onnx imports the since-version of the first qconvert node it meets, which can
    # be older than what later nodes use (CompandQuant's version-3 attributes).
    for opset_id in model.opset_import:
        if opset_id.domain == DOMAIN:
            opset_id.version = DOMAIN_VERSION
    return model


def output_leaves(out) -> list[tuple[str, object]]:
    """A model output's leaves in torch.export's order, each with its path (``['boxes'][2]``),
    without the ``None`` leaves the exporter drops."""
    flat, _ = torch.utils._pytree.tree_flatten_with_path(out)
    return [(torch.utils._pytree.keystr(path) or "output", leaf) for path, leaf in flat
            if leaf is not None]


def _structure_problem(out) -> str | None:
    """Why the exporter cannot give this output structure as ONNX outputs, if it cannot."""
    leaves = output_leaves(out)
    if not leaves:
        return f"the model returns no tensor ({type(out).__name__} {str(out)[:40]})"
    for path, leaf in leaves:
        which = "the output" if path == "output" else f"output {path}"
        if not isinstance(leaf, torch.Tensor):
            return (f"{which} is a {type(leaf).__name__} ({str(leaf)[:40]}), not a tensor; "
                    "ONNX outputs are tensors: return it as a tensor or leave it out")
        if leaf.is_complex():
            return (f"{which} is complex ({leaf.dtype}), which ONNX Runtime cannot return; "
                    "return its real and imaginary parts as two tensors")
    return None


def check_exportable(model: torch.nn.Module, example: torch.Tensor) -> None:
    """Refuse, in one line, what torch.onnx would fail on with a long dump or export wrongly:
    outputs that are not tensors (nested tuples, lists and dicts of tensors are fine), and
    a quantized layer that runs more or fewer than once per forward (the manifest records
    one call of each)."""
    calls = {name: 0 for name, _ in quantized_layers(model)}
    handles = [layer.register_forward_hook(
        lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, layer in quantized_layers(model)]
    try:
        with torch.no_grad():
            out = model.eval()(example)
    except Exception as exc:  # user code: name it, in one line
        detail = " ".join(str(exc).split())[:200]
        raise QConvertError(f"the model does not run on a batch of its input shape "
                            f"({type(exc).__name__}: {detail})") from exc
    finally:
        for handle in handles:
            handle.remove()
    problem = _structure_problem(out)
    if problem:
        raise QConvertError(problem)
    for name, count in calls.items():
        if count > 1:
            raise QConvertError(
                f"quantized layer {name} runs {count} times in one forward (a module shared "
                "between branches or levels); the export records one call per layer: give "
                "each call its own module (copy its weights)")


def rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new


def _name_layer_values(model: onnx.ModelProto,
                       layers: list[DeployedLayer]) -> dict[str, dict[str, str]]:
    """Give each layer's quantized input, decoded weight and output the manifest's names
    (a graph output keeps its name), and return the names per layer and part.

    A scope's last outgoing value is its result; earlier ones are values the
    exporter shares between modules (e.g. one ReduceMean feeding two adapters).
    A quantizer merged with an identical twin has no value of its own.
    """
    graph_outputs = {o.name for o in model.graph.output}
    names: dict[str, dict[str, str]] = {}
    for layer in layers:
        names[layer.name] = {}
        for part, scope, name in (
                ("act", f"{layer.name}.act", manifest.act_value(layer.name)),
                ("weight", f"{layer.name}.weight", manifest.weight_value(layer.name)),
                ("out", layer.name, manifest.out_value(layer.name))):
            values = layer_scope_outputs(model.graph, scope)
            if not values:
                continue
            if values[-1] not in graph_outputs:
                rename_value(model.graph, values[-1], name)
            names[layer.name][part] = name if values[-1] not in graph_outputs else values[-1]
    return names


def _weight_record(model: onnx.ModelProto, layer: DeployedLayer) -> WeightRecord:
    nodes = scope_nodes(model.graph, f"{layer.name}.weight")
    (decode,) = [n for n in nodes if is_weight_decode(n)]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in decode.attribute}
    return WeightRecord(decode.op_type, decode.input[0], decode.input[1], int(attrs["bits"]),
                        list(attrs["shape"]), int(attrs.get("root", 0)), [n.name for n in nodes])


def _layer_record(model: onnx.ModelProto, layer: DeployedLayer,
                  values: dict[str, str]) -> LayerRecord:
    """Where the layer's parts sit in the graph: its compute node, its weight decode, the
    nodes of its activation quantizer (without the ASQ adapter, which validation runs
    apart) and its named values."""
    if "weight" not in values:
        raise QConvertError(
            f"quantized layer {layer.name} does not reach any output of the model (the "
            "exporter dropped it): return a result that depends on it, or remove the layer")
    nodes = scope_nodes(model.graph, layer.name)
    weight = {values["weight"]} | {n.output[0] for n in nodes  # Linear on [N, T, C]: MatMul(x, W^T)
                                   if n.op_type == "Transpose" and n.input[0] == values["weight"]}
    (compute,) = [n for n in nodes if n.op_type in COMPUTE_OPS and weight & set(n.input)]
    adapter = f"{layer.name}.act.adapter"
    return LayerRecord(
        name=layer.name, weight_kind=layer.weight_kind, weight_bits=layer.weight_bits,
        act_kind=layer.act_kind, act_bits=layer.act_bits, compute_node=compute.name,
        weight=_weight_record(model, layer),
        act_nodes=[n.name for n in scope_nodes(model.graph, f"{layer.name}.act",
                                               exclude=(adapter,))],
        adapter_nodes=[n.name for n in scope_nodes(model.graph, adapter)],
        act_value=values.get("act"), out_value=values.get("out"),
    )


def _strip_exporter_annotations(model: onnx.ModelProto) -> None:
    """Drop what only the exporter needs (stack traces, scopes, shape annotations, attributes
    equal to their defaults): on a small model these would outweigh the packed weights.
    Runtimes infer the shapes of standard ops themselves; annotate_custom_op_shapes then
    records the few they cannot."""
    del model.graph.metadata_props[:]
    del model.graph.value_info[:]
    opset = next(o.version for o in model.opset_import if o.domain == "")
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        if node.domain in ("", "ai.onnx"):
            _drop_default_attributes(node, opset)


def _drop_default_attributes(node: onnx.NodeProto, opset: int) -> None:
    defaults = onnx.defs.get_schema(node.op_type, opset).attributes
    keep = [a for a in node.attribute
            if not (a.name in defaults and defaults[a.name].default_value.name
                    and defaults[a.name].default_value == a)]
    del node.attribute[:]
    node.attribute.extend(keep)


def _manifest(ckpt: Checkpoint, records: list[LayerRecord]) -> Manifest:
    return Manifest(version=__version__, scheme=ckpt.scheme, arch=ckpt.arch,
                    checkpoint_sha256=ckpt.sha256, input=ckpt.input.to_dict(), layers=records)


def used_ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node if n.domain == DOMAIN}


def build_onnx(ckpt: Checkpoint, opset: int = 20, with_functions: bool = True,
               progress=None) -> tuple[onnx.ModelProto, list[DeployedLayer]]:
    """The exported ModelProto (checked) and its layers; nothing is written."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise QConvertError(f"opset {opset} is outside the range the qconvert ops allow "
                            f"({MIN_OPSET}..{MAX_OPSET}); pick one in range with --opset")
    example = torch.zeros((2, *ckpt.input.shape), dtype=ckpt.input.torch_dtype)  # ids: 0
    check_exportable(ckpt.model, example)
    deploy, layers = to_deploy(ckpt.model, progress=progress)
    model = _torch_export(deploy, example, opset)
    values = _name_layer_values(model, layers)
    for index, node in enumerate(model.graph.node):  # short names, recorded below
        node.name = f"n{index}"
    records = [_layer_record(model, layer, values[layer.name])  # reads the scopes
               for layer in layers]
    _strip_exporter_annotations(model)
    fold_constant_decodes(model)  # constant weights: standard ONNX that runtimes fold at load
    if with_functions:
        model.functions.extend(functions(opset, used_ops(model)))
    manifest.write(model, _manifest(ckpt, records))
    model.producer_name, model.producer_version = "qconvert", __version__
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise QConvertError(f"exported model fails the ONNX checker: {exc}") from exc
    assert used_ops(model) <= set(OPS)
    return model, layers


def check_output_path(out: Path, force: bool) -> None:
    if out.is_dir():
        raise QConvertError(f"{out} is a directory; give a file path for the model")
    if out.exists() and not force:
        raise QConvertError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise QConvertError(f"{out.parent}: no such directory for the output model")


def write_atomically(model: onnx.ModelProto, out: Path, force: bool) -> int:
    """Write next to ``out`` and rename on success: never a half-written or clobbered file."""
    check_output_path(out, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what a plain open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out.stat().st_size


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it
    os.umask(mask)
    return mask


OuterBits = int | Callable[[onnx.ModelProto], int] | None


def export_checkpoint(ckpt: Checkpoint, out: str | Path, opset: int = 20,
                      with_functions: bool = True, force: bool = False,
                      outer_bits: OuterBits = None, integer_calib: np.ndarray | None = None,
                      progress=None, conv_kernel: str = "standard") -> ExportResult:
    """Checkpoint -> ONNX file: the one entry point of the CLI, bench and benchmarks.

    ``outer_bits`` asks for integer mode (docs/integer-mode.md): a b' in 2..8, or a
    function that picks b' given the exact-mode model (the CLI's ``--outer-bits auto``);
    ``integer_calib`` (normalised model inputs) calibrates the integer model's requantized
    outputs that no QAT quantizer covers. ``conv_kernel="qconvert"`` (integer mode) writes
    every convolution as one QConvClamp, or refuses naming the layer that cannot be.
    """
    out = Path(out)
    check_output_path(out, force)  # fail before the slow part
    model, layers = build_onnx(ckpt, opset, with_functions, progress)
    if outer_bits is not None:
        if conv_kernel == "qconvert":
            check_qconv_clamp(model)  # before b' is measured and the integer model calibrated
        bits = outer_bits(model) if callable(outer_bits) else outer_bits
        model = to_integer(model, bits, calib=integer_calib)
        if conv_kernel == "qconvert":
            model = with_qconv_clamp(model, with_functions)
    elif conv_kernel != "standard":
        raise QConvertError(f"conv_kernel {conv_kernel!r} applies to integer mode only")
    size = write_exported(model, out, force)
    return ExportResult(out, model, layers, size)


def write_exported(model: onnx.ModelProto, out: Path, force: bool = False) -> int:
    """Write ``model`` as the export does (its custom ops' output shapes recorded); its
    size in bytes."""
    annotate_custom_op_shapes(model)
    return write_atomically(model, out, force)
