"""What an exported model contains: the one statement of the contract between
``qconvert export`` and everything that reads its files (integer mode, the runtime's
rewrites, validate, inspect, bench).

An exported model is a standard ONNX file with

- one graph input named ``input`` and one graph output named ``output``;
- per quantized layer ``L``: its quantized input ``L/act_q``, its decoded weight
  ``L/weight`` and its output ``L/out`` as value names (a value that is a graph output
  keeps the graph output's name; a quantizer the exporter merged with an identical twin
  has no value of its own);
- ``value_info`` with the type and shape of every qconvert op's output that is not a graph
  output (runtimes cannot infer through a custom op; see ``annotate_custom_op_shapes``);
- metadata (``metadata_props``) under the keys of :class:`Key`; ``qconvert_layers`` holds
  one :class:`LayerRecord` per quantized layer as JSON.

Readers call :func:`read`; nothing outside this module parses value names or metadata.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields, is_dataclass

import onnx

from .errors import QConvertError

INPUT_NAME, OUTPUT_NAME = "input", "output"
FORMAT = "2"  # 2: typed layer records (qconvert 0.2); files without the key are older


class Key:
    """Metadata keys of an exported model."""

    FORMAT = "qconvert_format"
    VERSION = "qconvert_version"
    SCHEME = "qconvert_scheme"
    ARCH = "qconvert_arch"
    CHECKPOINT_SHA256 = "qconvert_checkpoint_sha256"
    INPUT = "qconvert_input"
    LAYERS = "qconvert_layers"
    MODE = "qconvert_mode"  # "integer" for integer mode; absent for the exact mode
    OUTER_BITS = "qconvert_outer_bits"
    INTEGER = "qconvert_integer"  # integer mode: per-layer grids, scales and errors
    # Integer mode: "qconvert" when the convolutions are QConvClamp nodes, which run fast
    # only with the qconvert library (without it, through their function bodies when the
    # file carries them); absent for the standard QDQ convolutions.
    CONV_KERNEL = "qconvert_conv_kernel"


def act_value(layer: str) -> str:
    """The layer's quantized input."""
    return f"{layer}/act_q"


def weight_value(layer: str) -> str:
    """The layer's decoded weight, as its Conv / Gemm reads it."""
    return f"{layer}/weight"


def out_value(layer: str) -> str:
    """The layer's output."""
    return f"{layer}/out"


@dataclass
class WeightRecord:
    """How a layer's weight is stored: packed codes decoded by ``decode``."""

    decode: str  # the op that decodes it: LutGather (level table) or Pow2Shift (alpha)
    codes: str  # initializer: packed codes (docs/ops.md)
    params: str  # initializer: level table [L] / [C, L] (LutGather) or alpha [1] / [C]
    bits: int
    shape: list[int]
    root: int = 0  # Pow2Shift: 1 for powers of two, 2 for powers of sqrt(2)
    nodes: list[str] = field(default_factory=list)  # the nodes computing it from the codes


@dataclass
class LayerRecord:
    name: str  # the PyTorch module path
    weight_kind: str
    weight_bits: int
    act_kind: str
    act_bits: int
    compute_node: str  # the Conv / Gemm / MatMul node
    weight: WeightRecord
    act_nodes: list[str] = field(default_factory=list)  # the activation quantizer alone
    adapter_nodes: list[str] = field(default_factory=list)  # ASQ's step adapter
    act_value: str | None = None
    out_value: str | None = None

    @property
    def merged(self) -> bool:
        """The exporter shares an identical twin quantizer's nodes with this layer."""
        return not self.act_nodes

    @classmethod
    def from_dict(cls, data: dict) -> LayerRecord:
        return cls(**{**data, "weight": WeightRecord(**data["weight"])})


@dataclass
class Manifest:
    version: str
    scheme: str
    arch: str
    checkpoint_sha256: str
    input: dict  # shape (without the batch), mean, std
    layers: list[LayerRecord]
    mode: str = "exact"
    outer_bits: int | None = None
    integer: dict = field(default_factory=dict)  # integer mode: per-layer details
    conv_kernel: str = "standard"  # integer mode: "qconvert" for QConvClamp convolutions

    @property
    def needs_library(self) -> bool:
        """Its convolutions are qconvert ops: without the library they run only through
        their function bodies, if the file carries them."""
        return self.conv_kernel != "standard"

    @property
    def input_shape(self) -> list[int]:
        return list(self.input.get("shape", []))

    def layer(self, name: str) -> LayerRecord:
        return next(record for record in self.layers if record.name == name)

    def metadata(self) -> dict[str, str]:
        meta = {
            Key.FORMAT: FORMAT,
            Key.VERSION: self.version,
            Key.SCHEME: self.scheme,
            Key.ARCH: self.arch,
            Key.CHECKPOINT_SHA256: self.checkpoint_sha256,
            Key.INPUT: json.dumps(self.input),
            Key.LAYERS: json.dumps([_without_defaults(r) for r in self.layers],
                                   separators=(",", ":")),
        }
        if self.mode != "exact":
            meta[Key.MODE] = self.mode
            meta[Key.OUTER_BITS] = str(self.outer_bits)
            meta[Key.INTEGER] = json.dumps(self.integer, separators=(",", ":"))
        if self.conv_kernel != "standard":
            meta[Key.CONV_KERNEL] = self.conv_kernel
        return meta


def _without_defaults(record) -> dict:
    """A record as a dict without the fields that hold their default (empty lists, unset
    values): small models carry one record per layer, and file size is part of the product."""
    out = {}
    for f in fields(record):
        value = getattr(record, f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if value != default:
            out[f.name] = _without_defaults(value) if is_dataclass(value) else value
    return out


def write(model: onnx.ModelProto, manifest: Manifest) -> None:
    """Replace ``model``'s qconvert metadata with ``manifest`` (other keys are kept)."""
    others = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith("qconvert_")]
    del model.metadata_props[:]
    for key, value in [*others, *manifest.metadata().items()]:
        model.metadata_props.add(key=key, value=value)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def has_manifest(model: onnx.ModelProto) -> bool:
    return Key.FORMAT in metadata(model)


def read(model: onnx.ModelProto) -> Manifest:
    """The manifest of a qconvert export; a one-line error for any other file."""
    meta = metadata(model)
    if Key.FORMAT not in meta:
        older = Key.LAYERS in meta
        raise QConvertError(
            "the model was exported by an older qconvert and lacks the layer records this "
            "version reads; re-export it with qconvert export" if older else
            "the model carries no qconvert metadata; is it a qconvert export? "
            "(export the checkpoint with qconvert export)")
    if meta[Key.FORMAT] != FORMAT:
        raise QConvertError(f"the model's qconvert records are format {meta[Key.FORMAT]}; this "
                            f"qconvert reads format {FORMAT}: re-export it or upgrade qconvert")
    try:
        return Manifest(
            version=meta[Key.VERSION], scheme=meta[Key.SCHEME], arch=meta[Key.ARCH],
            checkpoint_sha256=meta[Key.CHECKPOINT_SHA256], input=json.loads(meta[Key.INPUT]),
            layers=[LayerRecord.from_dict(r) for r in json.loads(meta[Key.LAYERS])],
            mode=meta.get(Key.MODE, "exact"),
            outer_bits=int(meta[Key.OUTER_BITS]) if Key.OUTER_BITS in meta else None,
            integer=json.loads(meta.get(Key.INTEGER, "{}")),
            conv_kernel=meta.get(Key.CONV_KERNEL, "standard"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise QConvertError(f"the model's qconvert records are damaged ({type(exc).__name__}: "
                            f"{exc}); re-export it with qconvert export") from exc
