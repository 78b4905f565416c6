"""The qconvert checkpoint: one ``.pt`` that rebuilds a quantized model without running code.

Everything is plain data (strings, numbers, lists, dicts, tensors), so loading
uses ``torch.load(weights_only=True)``. Only ``allow_pickle=True`` loads a
whole pickled module, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .archs import build_architecture
from .errors import QConvertError
from .quant import LayerSpec, apply_layer_specs
from .quant.checks import first_parameter_problem

FORMAT_NAME = "qconvert-checkpoint"
FORMAT_VERSION = 1


@dataclass
class InputSpec:
    """Shape of one sample (C, H, W or features) and per-channel normalization."""

    shape: tuple[int, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "mean": list(self.mean), "std": list(self.std)}


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
) -> Path:
    """Save a model made by ``quantize_model`` (``arch``: built-in name or ``module:callable``)."""
    specs = getattr(model, "qconvert_specs", None)
    if specs is None:
        raise QConvertError("the model was not quantized with qconvert.quant.quantize_model")
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "arch": {"name": arch, "kwargs": dict(arch_kwargs or {})},
        "scheme": getattr(model, "qconvert_scheme", "custom"),
        "layers": {name: None if s is None else s.to_dict() for name, s in specs.items()},
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "input": InputSpec(tuple(input_shape), tuple(mean), tuple(std)).to_dict(),
        "training": dict(training or {}),
    }
    path = Path(path)
    torch.save(payload, path)
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_payload(path: Path, allow_pickle: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if not allow_pickle and "weights_only" in str(exc):
            raise QConvertError(
                f"{path}: holds pickled Python objects, which run code when loaded; "
                "re-save it with qconvert.save_checkpoint, or pass --allow-pickle if you "
                "trust it") from exc
        raise QConvertError(f"{path}: not a PyTorch checkpoint ({exc.__class__.__name__}); "
                            "give a file written by qconvert.save_checkpoint") from exc
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
    payload = _read_payload(path, allow_pickle)
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
    input_spec = InputSpec(tuple(spec["shape"]), tuple(spec.get("mean", ())),
                           tuple(spec.get("std", ())))
    return Checkpoint(model=model.eval(), arch=f"pickled:{type(model).__qualname__}",
                      arch_kwargs={}, scheme=getattr(model, "qconvert_scheme", "custom"),
                      layer_specs=dict(specs), input=input_spec, sha256=file_sha256(path),
                      path=path)


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
        apply_layer_specs(model, specs)
    except (ValueError, TypeError, AttributeError) as exc:
        raise QConvertError(f"{path}: cannot rebuild the quantized model: {exc}") from exc
    model.qconvert_scheme = payload.get("scheme", "custom")
    mismatch = _state_dict_mismatch(model, state)
    if mismatch:
        raise QConvertError(f"{path}: state dict does not fit architecture "
                            f"{arch['name']!r}: {mismatch}")
    model.load_state_dict(state, strict=True)
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
        input=InputSpec(tuple(spec["shape"]), tuple(spec.get("mean", ())),
                        tuple(spec.get("std", ()))),
        training=dict(payload.get("training", {})),
        sha256=file_sha256(path),
        path=path,
    )
