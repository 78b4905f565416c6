"""The qconvert checkpoint: one ``.pt`` that rebuilds a quantized model without running code.

Everything is plain data (strings, numbers, lists, dicts, tensors), so loading
uses ``torch.load(weights_only=True)``. Only ``allow_pickle=True`` loads a
whole pickled module, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .archs import build_architecture
from .errors import QConvertError
from .quant import (
    CoverageReport,
    LayerSpec,
    apply_layer_specs,
    layer_coverage,
    split_attention,
)
from .quant.base import pass_uninitialised
from .quant.checks import first_parameter_problem

FORMAT_NAME = "qconvert-checkpoint"
FORMAT_VERSION = 1


INPUT_DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}


@dataclass
class InputSpec:
    """Shape of one sample (C, H, W or features, or T token ids), per-channel normalization,
    and the element type: ``float32``, or ``int64`` / ``int32`` token ids below
    ``vocab_size``."""

    shape: tuple[int, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    dtype: str = "float32"
    vocab_size: int | None = None

    @property
    def is_integer(self) -> bool:
        return self.dtype != "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return INPUT_DTYPES[self.dtype]

    def to_dict(self) -> dict:
        data = {"shape": list(self.shape), "mean": list(self.mean), "std": list(self.std)}
        if self.is_integer:
            data.update(dtype=self.dtype, vocab_size=self.vocab_size)
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> InputSpec:
        dtype = data.get("dtype", "float32")
        if dtype not in INPUT_DTYPES:
            raise ValueError(f"input dtype {dtype!r} is not one of {', '.join(INPUT_DTYPES)}")
        vocab = data.get("vocab_size")
        return cls(tuple(int(n) for n in data["shape"]), tuple(data.get("mean", ())),
                   tuple(data.get("std", ())), dtype, None if vocab is None else int(vocab))


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode plus everything saved beside it."""

    model: nn.Module
    arch: str
    arch_kwargs: dict
    scheme: str
    layer_specs: dict[str, LayerSpec | None]
    input: InputSpec
    training: dict = field(default_factory=dict)
    sha256: str = ""
    path: Path | None = None
    coverage: CoverageReport | None = None


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    arch: str,
    arch_kwargs: Mapping | None = None,
    input_shape: Sequence[int],
    mean: Sequence[float] = (),
    std: Sequence[float] = (),
    training: Mapping | None = None,
    input_dtype: str = "float32",
    vocab_size: int | None = None,
) -> Path:
    """Save a model made by ``quantize_model`` (``arch``: built-in name or ``module:callable``).

    ``input_shape`` is one sample's shape, without the batch dimension; the model is run
    once on a batch of zeros of that shape, and a shape it cannot take is refused here.
    Token-id models give ``input_dtype="int64"``; ``vocab_size`` (the ids' upper bound,
    exclusive) defaults to the first ``nn.Embedding``'s ``num_embeddings``.
    """
    specs = getattr(model, "qconvert_specs", None)
    if specs is None:
        raise QConvertError("the model was not quantized with qconvert.quant.quantize_model")
    spec = _input_spec(model, input_shape, mean, std, input_dtype, vocab_size)
    _check_input_shape(model, spec)
    state = model.state_dict()
    coverage = getattr(model, "qconvert_coverage", None)
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "arch": {"name": arch, "kwargs": dict(arch_kwargs or {})},
        "scheme": getattr(model, "qconvert_scheme", "custom"),
        "layers": {name: None if s is None else s.to_dict() for name, s in specs.items()},
        "state_dict": {k: v.detach().clone() for k, v in state.items()},
        # per-module versions that _load_from_state_dict implementations read
        "state_metadata": {k: dict(v) for k, v in getattr(state, "_metadata", {}).items()},
        "input": spec.to_dict(),
        "training": dict(training or {}),
    }
    if coverage is not None:
        payload["coverage"] = coverage.to_dict()
    path = Path(path)
    torch.save(payload, path)
    return path


def _input_spec(model: nn.Module, shape: Sequence[int], mean: Sequence[float],
                std: Sequence[float], dtype: str, vocab_size: int | None) -> InputSpec:
    if dtype not in INPUT_DTYPES:
        raise QConvertError(f"input_dtype {dtype!r} is not supported; use one of "
                            f"{', '.join(INPUT_DTYPES)}")
    if dtype == "float32":
        return InputSpec(tuple(shape), tuple(mean), tuple(std))
    if mean or std:
        raise QConvertError("token-id inputs take no mean / std normalization; leave them out")
    if vocab_size is None:
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if embedding is None:
            raise QConvertError(f"input_dtype {dtype} needs vocab_size= (the model has no "
                                "nn.Embedding to take it from)")
        vocab_size = embedding.num_embeddings
    return InputSpec(tuple(shape), (), (), dtype, int(vocab_size))


def _check_input_shape(model: nn.Module, spec: InputSpec) -> None:
    """Run the model once on two zero samples of ``spec``; refuse a shape it cannot take."""
    example = torch.zeros((2, *spec.shape), dtype=spec.torch_dtype)
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad(), pass_uninitialised():
            model.eval()(example)
    except Exception as exc:  # the model may raise anything on a wrong shape
        detail = " ".join(str(exc).split())[:200]
        raise QConvertError(
            f"the model cannot take input_shape {tuple(spec.shape)} ({type(exc).__name__}: "
            f"{detail}); give the shape of one sample, without the batch dimension") from exc
    finally:
        for module, training in modes:
            module.training = training


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_torch_file(path: Path, pickled_fix: str, foreign_fix: str,
                    allow_pickle: bool = False) -> object:
    """``torch.load`` (tensors and plain data only unless ``allow_pickle``), every failure a
    one-line error; ``pickled_fix`` / ``foreign_fix`` say what to do about a file holding
    pickled objects / one torch cannot read as a checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if not allow_pickle and ("weights_only" in str(exc) or "Weights only" in str(exc)):
            raise QConvertError(f"{path}: holds pickled Python objects, which run code when "
                                f"loaded; {pickled_fix}") from exc
        raise QConvertError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}); "
                            f"{foreign_fix}") from exc
    except Exception as exc:  # torch.load raises many types on foreign or broken files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QConvertError(
            f"{path}: not a readable PyTorch checkpoint ({first_line}); "
            "check the file is complete and was written by torch.save"
        ) from exc


def load_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """Rebuild the quantized model in eval mode. Raises :class:`QConvertError` on bad input."""
    path = Path(path)
    if not path.is_file():
        raise QConvertError(f"{path}: no such checkpoint file")
    payload = read_torch_file(
        path, "re-save it with qconvert.save_checkpoint, or pass --allow-pickle if you trust it",
        "give a file written by qconvert.save_checkpoint", allow_pickle)
    if isinstance(payload, nn.Module):
        return _from_pickled_module(path, payload)
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT_NAME:
        raise QConvertError(
            f"{path}: not a qconvert checkpoint (no format '{FORMAT_NAME}'); "
            "save models with qconvert.save_checkpoint"
        )
    if payload.get("version") != FORMAT_VERSION:
        raise QConvertError(
            f"{path}: checkpoint format version {payload.get('version')!r} is not supported "
            f"(this qconvert reads version {FORMAT_VERSION}); upgrade qconvert"
        )
    return _build(path, payload)


def _from_pickled_module(path: Path, model: nn.Module) -> Checkpoint:
    """A whole module saved with torch.save (loaded only with allow_pickle): it must come
    from quantize_model and say its input shape in ``model.qconvert_input``."""
    specs = getattr(model, "qconvert_specs", None)
    spec = getattr(model, "qconvert_input", None)
    if specs is None or spec is None:
        raise QConvertError(
            f"{path}: a pickled module without qconvert_specs / qconvert_input; quantize it "
            "with qconvert.quant.quantize_model and save it with qconvert.save_checkpoint")
    problem = first_parameter_problem(model)
    if problem:
        raise QConvertError(f"{path}: {problem}")
    input_spec = _read_input_spec(path, spec)
    return Checkpoint(model=model.eval(), arch=f"pickled:{type(model).__qualname__}",
                      arch_kwargs={}, scheme=getattr(model, "qconvert_scheme", "custom"),
                      layer_specs=dict(specs), input=input_spec, sha256=file_sha256(path),
                      path=path, coverage=getattr(model, "qconvert_coverage", None))


def _layer_specs(path: Path, layers: Mapping) -> dict[str, LayerSpec | None]:
    specs = {}
    for name, spec in layers.items():
        try:
            specs[name] = None if spec is None else LayerSpec.from_dict(spec)
        except (ValueError, TypeError, KeyError) as exc:
            raise QConvertError(f"{path}: layer {name}: bad quantizer spec ({exc}); "
                                "re-save the checkpoint with qconvert.save_checkpoint") from exc
    return specs


def _state_dict_mismatch(model: nn.Module, state: Mapping) -> str | None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")]
                 if missing else []) + ([f"unexpected {', '.join(extra[:3])}" +
                                         (" ..." if len(extra) > 3 else "")] if extra else [])
        return "; ".join(parts)
    for key, value in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or got.shape != value.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return f"{key} has shape {shape}, the architecture needs {tuple(value.shape)}"
    return None


def _build(path: Path, payload: Mapping) -> Checkpoint:
    try:
        arch, layers, state = payload["arch"], payload["layers"], payload["state_dict"]
        spec = payload["input"]
    except KeyError as exc:
        raise QConvertError(f"{path}: checkpoint lacks the entry {exc}; "
                            "re-save it with qconvert.save_checkpoint") from exc
    try:
        model = build_architecture(arch["name"], arch.get("kwargs"))
    except (ValueError, TypeError) as exc:
        raise QConvertError(f"{path}: {exc}") from exc
    specs = _layer_specs(path, layers)
    try:
        coverage = _coverage(payload, model, specs)
        apply_layer_specs(model, specs)
    except (ValueError, TypeError, AttributeError) as exc:
        raise QConvertError(f"{path}: cannot rebuild the quantized model: {exc}") from exc
    model.qconvert_scheme = payload.get("scheme", "custom")
    mismatch = _state_dict_mismatch(model, state)
    if mismatch:
        raise QConvertError(f"{path}: state dict does not fit architecture "
                            f"{arch['name']!r}: {mismatch}")
    model.load_state_dict(_with_metadata(state, payload.get("state_metadata")), strict=True)
    problem = first_parameter_problem(model)
    if problem:
        raise QConvertError(f"{path}: {problem}")
    model.eval()
    return Checkpoint(
        model=model,
        arch=arch["name"],
        arch_kwargs=dict(arch.get("kwargs") or {}),
        scheme=model.qconvert_scheme,
        layer_specs=specs,
        input=_read_input_spec(path, spec),
        training=dict(payload.get("training", {})),
        sha256=file_sha256(path),
        path=path,
        coverage=coverage,
    )


def _read_input_spec(path: Path, spec: Mapping) -> InputSpec:
    try:
        return InputSpec.from_dict(spec)
    except (ValueError, TypeError, KeyError) as exc:
        raise QConvertError(f"{path}: bad input spec ({exc}); re-save the checkpoint with "
                            "qconvert.save_checkpoint") from exc


def _coverage(payload: Mapping, model: nn.Module, specs: Mapping) -> CoverageReport:
    """The saved coverage; for checkpoints saved without it, worked out again (the
    first/last-layer rule is then not told apart from the scheme)."""
    if payload.get("coverage") is not None:
        return CoverageReport.from_dict(payload["coverage"])
    split_attention(model)
    return layer_coverage(model, specs)


def _with_metadata(state: Mapping, metadata: Mapping | None) -> Mapping:
    """The state dict with its per-module ``_metadata`` (versions) restored, as
    ``nn.Module.state_dict`` returns it."""
    state = OrderedDict(state)
    if metadata is not None:
        state._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())
    return state
