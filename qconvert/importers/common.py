"""What every importer shares: safe loading, key bookkeeping, tensor checks, the result."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import read_torch_file
from ..errors import QConvertError

DATA_PARALLEL_PREFIX = "module."


@dataclass(frozen=True)
class ImportOptions:
    """What a source file may not record; ``None``: not given on the command line."""

    bits: int | None = None
    weights: str | None = None  # asq-post: "lsq" or "post"
    post_base: str | None = None  # asq-post: "2" or "sqrt2"
    run_params: Path | None = None  # nulsq: the run's <model>.txt
    first_last_bits: int | None = None  # nulsq: the MinMax first / last layers' width
    weight_norm: str | None = None  # nulsq: "lwn" or "none"
    lsq_grad_scale: str | None = None  # nulsq: "LSQ_grad_scale", "10_fac" or "none"
    minmax: str | None = None  # nulsq: "dynamic" (per sample, default) or "calibrated"
    calib: Path | None = None  # nulsq with minmax "calibrated": the data to take ranges on


@dataclass
class ImportResult:
    """A quantized model ready for ``save_checkpoint``, and what the import did."""

    model: nn.Module
    arch: str
    arch_kwargs: dict
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    training: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # one line each, for the user


def load_source(path: Path) -> object:
    """``torch.load`` with ``weights_only``: tensors and plain data only, never code."""
    if not path.is_file():
        raise QConvertError(f"{path}: no such checkpoint file")
    return read_torch_file(
        path, "import reads tensors and plain data only: save the dict with a state_dict, "
        "not a module", "give the file the training script saved")


def strip_data_parallel(path: Path, state: Mapping[str, object]) -> dict[str, object]:
    """Drop the ``module.`` prefix DataParallel adds, when every key has it."""
    prefixed = [k.startswith(DATA_PARALLEL_PREFIX) for k in state]
    if not any(prefixed):
        return dict(state)
    if not all(prefixed):
        odd = next(k for k, p in zip(state, prefixed, strict=True) if not p)
        raise QConvertError(f"{path}: some keys start with '{DATA_PARALLEL_PREFIX}' and some "
                            f"do not (e.g. {odd}); the state dict mixes two models")
    return {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state.items()}


def state_and_meta(path: Path, payload: object, hint: str) -> tuple[dict, dict]:
    """The state dict of a saved training dict (or a bare state dict) and its other
    entries, without a DataParallel ``module.`` prefix."""
    if not isinstance(payload, Mapping):
        raise QConvertError(f"{path}: holds a {type(payload).__name__}, not the dict the "
                            "training script saves; " + hint)
    if "state_dict" in payload:
        state, meta = payload["state_dict"], {k: v for k, v in payload.items()
                                              if k != "state_dict"}
    else:
        state, meta = payload, {}
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise QConvertError(f"{path}: 'state_dict' is not a mapping of names to tensors")
    return strip_data_parallel(path, state), meta


def check_key_sets(path: Path, found: Iterable[str], expected: Iterable[str], hint: str) -> None:
    """Every source key is mapped and none is left over."""
    found, expected = set(found), list(expected)
    missing = [k for k in expected if k not in found]
    extra = sorted(found - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise QConvertError(f"{path}: key {missing[0]}{more} is missing; {hint}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise QConvertError(f"{path}: unexpected key {extra[0]}{more}, which no layer of "
                            f"the import maps; {hint}")


def source_tensor(path: Path, state: Mapping[str, object], key: str,
                  shape: tuple[int, ...], integer: bool = False) -> torch.Tensor:
    """``state[key]`` if it is a tensor of ``shape`` and the right dtype (float32, or any
    integer dtype with ``integer``), finite; else a one-line error naming the key."""
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise QConvertError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != tuple(shape):
        raise QConvertError(f"{path}: {key} has shape {tuple(value.shape)}, the layout "
                            f"needs {tuple(shape)}")
    if integer:
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise QConvertError(f"{path}: {key} has dtype {value.dtype}, expected an integer")
        return value.to(torch.int64)
    if value.dtype != torch.float32:
        raise QConvertError(f"{path}: {key} has dtype {value.dtype}, expected torch.float32")
    if not torch.isfinite(value).all():
        raise QConvertError(f"{path}: {key} holds NaN or Inf")
    return value


# Bounds on what a source's shapes may declare before a model of that size is built: a
# tampered file (a stride-0 tensor claims any shape at no storage cost) must not make the
# import allocate gigabytes.
SIZE_LIMITS = {"width": 2048, "num_classes": 32768, "in_channels": 64}


def check_declared_sizes(path: Path, kwargs: Mapping, hint: str) -> None:
    """Architecture sizes read from shapes are within :data:`SIZE_LIMITS`."""
    for key, limit in SIZE_LIMITS.items():
        if key in kwargs and not 1 <= kwargs[key] <= limit:
            raise QConvertError(f"{path}: the shapes declare {key} {kwargs[key]}, outside "
                                f"1..{limit}; {hint}")


def plain_number(value: object) -> float | int | None:
    """A saved scalar (Python number or one-element tensor) as a number, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return None
