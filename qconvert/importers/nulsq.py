"""Source ``nulsq``: the public LCQ re-implementation (pytorchcv PreResNet-20/-56 on CIFAR,
PreResNet-18/-34 and MobileNetV2 on ImageNet; LCQ or LSQ quantizers).

Every Conv2d and Linear of the pytorchcv model is replaced in place, so the float keys
keep pytorchcv's names, and each layer carries its quantizer parameters itself
(``x_threshold``/``x_theta``/``x_dst`` for LCQ activations, ``w_scale`` for LSQ weights,
``init_state``). The first convolution and the classifier use the source's MinMax
quantizer (no parameters). The file records neither bit widths, nor weight normalization,
nor the LSQ gradient-scale mode (which changes the step the forward divides by): those come
from the run's ``<model>.txt`` (``--run-params``) or options. See docs/import.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..archs import build_architecture
from ..errors import QConvertError
from ..quant import LayerSpec, QuantSpec, apply_layer_specs, quantized_layers
from ..quant.checks import first_parameter_problem
from ..quant.minmax import max_scaled
from .common import (
    ImportOptions,
    ImportResult,
    check_declared_sizes,
    check_key_sets,
    load_source,
    plain_number,
    source_tensor,
    state_and_meta,
)
from .run_params import class_name, read_run_params

LAYOUT_HINT = ("this is not a checkpoint of the nuLSQ PreResNet / MobileNetV2 models "
               "(pytorchcv layout)")
INTERVALS = 16  # the source's K
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
QUANTIZER_CLASSES = {"LCQ_quantizer": "lcq", "LSQ_quantizer": "lsq"}
UNSUPPORTED_CLASSES = ("Positive_nuLSQ_quantizer", "Symmetric_nuLSQ_quantizer",
                       "APoT_quantizer")
GRAD_SCALE_MODES = ("LSQ_grad_scale", "10_fac", "none")
WEIGHT_NORMS = {"LWN": "lwn", "WN": "lwn", "None": "none", "False": "none", "null": "none"}
MOBILENET_WIDTHS = (1.0, 0.75, 0.5, 0.25)  # pytorchcv's mobilenetv2_w1 .. _wd4


@dataclass(frozen=True)
class Layout:
    arch: str  # qconvert architecture
    source_model: tuple[str, ...]  # the source's --model names for it
    kwargs: dict
    first: str  # module path of the MinMax first layer
    input_size: int
    cifar: bool


@dataclass
class Recipe:
    """Everything the file does not record, resolved from options and the run file."""

    bits: int
    first_bits: int
    last_bits: int
    weight_norm: bool
    w_grad_scale: str  # GRAD_SCALE_MODES
    x_grad_scale: str
    weights: str = ""  # "lcq" / "lsq", from the key layout
    acts: str = ""


def _shape(state: Mapping, key: str) -> tuple[int, ...] | None:
    value = state.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _units(state: Mapping, stage: int) -> int:
    count = 0
    while any(k.startswith(f"features.stage{stage}.unit{count + 1}.") for k in state):
        count += 1
    return count


def _stage_units(state: Mapping) -> tuple[int, ...]:
    counts = []
    while _units(state, len(counts) + 1):
        counts.append(_units(state, len(counts) + 1))
    return tuple(counts)


def _layout(path: Path, state: Mapping) -> Layout:
    """The architecture from the key layout; widths and classes from the shapes."""
    head = _shape(state, "output.weight")
    units = _stage_units(state)
    cifar_stem = _shape(state, "features.init_block.weight")
    stem = _shape(state, "features.init_block.conv.weight")
    if head is None or (cifar_stem is None and stem is None):
        raise QConvertError(f"{path}: no features.init_block(.conv).weight or output.weight "
                            "key; " + LAYOUT_HINT)
    classes = head[0]
    if cifar_stem is not None and len(cifar_stem) == 4:
        depth = {(3, 3, 3): 20, (9, 9, 9): 56}.get(units)
        if depth is None:
            raise QConvertError(f"{path}: units per stage {units}: neither PreResNet-20 "
                                "(3, 3, 3) nor -56 (9, 9, 9); " + LAYOUT_HINT)
        kwargs = {"width": cifar_stem[0], "in_channels": cifar_stem[1], "num_classes": classes}
        _check_sizes(path, kwargs)
        return Layout(f"pytorchcv_preresnet{depth}_cifar",
                      (f"pytorchcv_preresnet{depth}_cifar10",
                       f"pytorchcv_preresnet{depth}_cifar100"),
                      kwargs, "features.init_block", 32, True)
    if stem is None or len(stem) != 4:
        raise QConvertError(f"{path}: features.init_block.conv.weight is not a conv weight; "
                            + LAYOUT_HINT)
    if "features.final_block.conv.weight" in state:
        if units != (1, 2, 3, 7, 4):
            raise QConvertError(f"{path}: units per stage {units}, MobileNetV2 has "
                                "(1, 2, 3, 7, 4); " + LAYOUT_HINT)
        _check_sizes(path, {"in_channels": stem[1], "num_classes": classes})
        kwargs = {"width_scale": _mobilenet_width(path, state, stem[1], classes),
                  "in_channels": stem[1], "num_classes": classes}
        return Layout("pytorchcv_mobilenetv2", ("pytorchcv_mobilenetv2",), kwargs,
                      "features.init_block.conv", 224, False)
    depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}.get(units)
    if depth is None or stem[2:] != (7, 7):
        raise QConvertError(f"{path}: units per stage {units} with a {stem[2:]} stem: "
                            "neither PreResNet-18 (2, 2, 2, 2) nor -34 (3, 4, 6, 3); "
                            + LAYOUT_HINT)
    kwargs = {"width": stem[0], "in_channels": stem[1], "num_classes": classes}
    _check_sizes(path, kwargs)
    return Layout(f"pytorchcv_preresnet{depth}", (f"pytorchcv_preresnet{depth}",), kwargs,
                  "features.init_block.conv", 224, False)


def _check_sizes(path: Path, kwargs: Mapping) -> None:
    check_declared_sizes(path, kwargs, LAYOUT_HINT)


def _mobilenet_width(path: Path, state: Mapping, in_channels: int, classes: int) -> float:
    for width in MOBILENET_WIDTHS:
        model = build_architecture("pytorchcv_mobilenetv2", {
            "width_scale": width, "in_channels": in_channels, "num_classes": classes})
        if all(_shape(state, k) == tuple(v.shape) for k, v in model.state_dict().items()):
            return width
    raise QConvertError(f"{path}: the MobileNetV2 shapes match none of pytorchcv's widths "
                        f"{MOBILENET_WIDTHS}; " + LAYOUT_HINT)


# ---- what the file does not say ---------------------------------------------------------

def _pick(path: Path, key: str, option: str, given, from_file, convert=lambda v: v):
    """The option, or the run file's value; both given and different is an error."""
    if from_file is not None:
        from_file = convert(from_file)
    if given is not None and from_file is not None and given != from_file:
        raise QConvertError(f"{path}: {option} {given} contradicts the run file's "
                            f"'{key}: {from_file}'; drop {option} or fix the run file")
    return given if given is not None else from_file


def _int_param(run_file: Path, key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise QConvertError(f"{run_file}: {key} is {text!r}, not an integer") from None


def _weight_norm_param(run_file: Path, text: str) -> str:
    if text not in WEIGHT_NORMS:
        raise QConvertError(f"{run_file}: weight_norm {text!r} is none of "
                            f"{', '.join(WEIGHT_NORMS)}")
    return WEIGHT_NORMS[text]


def _grad_mode_param(text: str) -> str:
    return text if text in ("LSQ_grad_scale", "10_fac") else "none"


def _recipe(path: Path, options: ImportOptions, layout: Layout,
            params: Mapping[str, str]) -> Recipe:
    run_file = options.run_params

    def file_value(key):
        return params.get(key)

    if params:
        _check_run_file(run_file, params, layout)
    bits = _pick(path, "num_bits", "--bits", options.bits, file_value("num_bits"),
                 lambda v: _int_param(run_file, "num_bits", v))
    first = _pick(path, "first_bits", "--first-last-bits", options.first_last_bits,
                  file_value("first_bits"), lambda v: _int_param(run_file, "first_bits", v))
    last = _pick(path, "last_bits", "--first-last-bits", options.first_last_bits,
                 file_value("last_bits"), lambda v: _int_param(run_file, "last_bits", v))
    norm = _pick(path, "weight_norm", "--weight-norm", options.weight_norm,
                 file_value("weight_norm"), lambda v: _weight_norm_param(run_file, v))
    w_mode = _pick(path, "w_grad_scale_mode", "--lsq-grad-scale", options.lsq_grad_scale,
                   file_value("w_grad_scale_mode"), _grad_mode_param)
    x_mode = _pick(path, "x_grad_scale_mode", "--lsq-grad-scale", options.lsq_grad_scale,
                   file_value("x_grad_scale_mode"), _grad_mode_param)
    for value, what in ((bits, "the bit width (num_bits): pass --bits"),
                        (first, "the first layer's bit width (first_bits): pass "
                                "--first-last-bits"),
                        (last, "the last layer's bit width (last_bits): pass "
                               "--first-last-bits"),
                        (norm, "weight normalization (weight_norm): pass --weight-norm lwn "
                               "or --weight-norm none")):
        if value is None:
            raise QConvertError(f"{path}: the file does not record {what}, or give the "
                                "run's <model>.txt with --run-params")
    for value, key in ((bits, "num_bits"), (first, "first_bits"), (last, "last_bits")):
        if not 2 <= value <= 8:
            raise QConvertError(f"{path}: {key} {value} is outside 2..8")
    return Recipe(bits, first, last, norm == "lwn", w_mode or "", x_mode or "")


def _check_run_file(run_file: Path, params: Mapping[str, str], layout: Layout) -> None:
    model = params.get("model")
    if model is not None and model not in layout.source_model:
        raise QConvertError(f"{run_file}: model {model} but the checkpoint's keys hold "
                            f"{' / '.join(layout.source_model)}; give the run file of this "
                            "checkpoint")
    for key in ("w_first_last_quantizer", "x_first_last_quantizer"):
        name = class_name(params.get(key, "None"))
        if name not in (None, "MinMax_quantizer"):
            raise QConvertError(f"{run_file}: {key} {name}: only the MinMax first and last "
                                "layers (what main.py sets) are supported")


def _resolve_quantizers(path: Path, state: Mapping, model: nn.Module, layout: Layout,
                        recipe: Recipe, params: Mapping[str, str]) -> None:
    """Weights / activations LCQ or LSQ, from the keys; the run file must agree."""
    inner = [name for name, _ in _float_layers(model) if not _is_first_last(name, layout)]
    kinds = {}
    for role, lcq_key, lsq_key in (("w", "w_threshold", "w_scale"),
                                   ("x", "x_threshold", "x_scale")):
        found = {name: "lcq" if f"{name}.{lcq_key}" in state else
                 "lsq" if f"{name}.{lsq_key}" in state else None for name in inner}
        first = found[inner[0]]
        odd = next((n for n in inner if found[n] != first), None)
        if first is None or odd is not None:
            bad = inner[0] if first is None else odd
            raise QConvertError(f"{path}: layer {bad} has no {lcq_key} (LCQ) or {lsq_key} "
                                f"(LSQ) key like the others; {LAYOUT_HINT}")
        _check_scale_shape(path, state, inner, role, first)
        kinds[role] = first
        key = f"{role}_quantizer"
        named = class_name(params.get(key, "None")) if key in params else None
        if named in UNSUPPORTED_CLASSES:
            raise QConvertError(f"{path}: {key} is {named}; only LCQ_quantizer and "
                                "LSQ_quantizer checkpoints are imported")
        if named is not None and QUANTIZER_CLASSES.get(named) != first:
            raise QConvertError(f"{path}: the run file's {key} {named} contradicts the keys "
                                f"(layer {inner[0]} holds {first.upper()} parameters)")
    recipe.weights, recipe.acts = kinds["w"], kinds["x"]
    if "lsq" in kinds.values():
        missing = [m for m, mode in (("w", recipe.w_grad_scale), ("x", recipe.x_grad_scale))
                   if not mode and kinds[m] == "lsq"]
        if missing:
            raise QConvertError(f"{path}: LSQ layers: the file does not record "
                                f"{missing[0]}_grad_scale_mode, which sets the step the "
                                "forward uses; pass --lsq-grad-scale LSQ_grad_scale, 10_fac "
                                "or none, or give the run's <model>.txt with --run-params")
    _check_bits_layout(path, state, inner, recipe)


def _check_scale_shape(path: Path, state: Mapping, inner: list[str], role: str,
                       kind: str) -> None:
    if kind != "lsq":
        return
    shape = _shape(state, f"{inner[0]}.{role}_scale")
    if shape != (1,):
        raise QConvertError(f"{path}: {inner[0]}.{role}_scale has shape {shape}: a nuLSQ "
                            "(non-uniform) step table, not LSQ's one step; only LCQ and LSQ "
                            "checkpoints are imported")


def _check_bits_layout(path: Path, state: Mapping, inner: list[str], recipe: Recipe) -> None:
    """2-bit LCQ weights are the source's uniform ternary case: no w_theta / w_dst."""
    if recipe.weights != "lcq":
        return
    has_theta = f"{inner[0]}.w_theta" in state
    if recipe.bits == 2 and has_theta:
        raise QConvertError(f"{path}: {inner[0]}.w_theta exists, but 2-bit LCQ weights have "
                            "none (the source's uniform 2-bit case); the bit width is not 2: "
                            "fix --bits or num_bits")
    if recipe.bits != 2 and not has_theta:
        raise QConvertError(f"{path}: {inner[0]}.w_theta is missing, as only in 2-bit LCQ "
                            f"checkpoints, but the bit width is {recipe.bits}: fix --bits or "
                            "num_bits")


# ---- layers and keys --------------------------------------------------------------------

def _float_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _is_first_last(name: str, layout: Layout) -> bool:
    return name in (layout.first, "output")


def _quantizer_keys(name: str, layout: Layout, recipe: Recipe) -> list[str]:
    keys = [f"{name}.init_state"]
    if _is_first_last(name, layout):
        return keys
    if recipe.weights == "lcq":
        keys += [f"{name}.w_threshold"]
        if recipe.bits > 2:
            keys += [f"{name}.w_theta", f"{name}.w_dst"]
    else:
        keys += [f"{name}.w_scale"]
    keys += ([f"{name}.x_threshold", f"{name}.x_theta", f"{name}.x_dst"]
             if recipe.acts == "lcq" else [f"{name}.x_scale"])
    return keys


def _layer_specs(model: nn.Module, layout: Layout, recipe: Recipe) -> dict[str, LayerSpec]:
    specs = {}
    for name, _ in _float_layers(model):
        if _is_first_last(name, layout):
            first = name == layout.first
            bits = recipe.first_bits if first else recipe.last_bits
            specs[name] = LayerSpec(weight=QuantSpec("max-scaled", bits),
                                    act=QuantSpec("sample-max", bits, signed=first))
            continue
        if recipe.weights == "lcq":
            weight = QuantSpec("lcq", recipe.bits, normalize=recipe.weight_norm,
                               clip_exact=True)
        else:
            weight = QuantSpec("lsq", recipe.bits, normalize=recipe.weight_norm)
        act = (QuantSpec("lcq", recipe.bits, signed=False, mirror=True, clip_exact=True)
               if recipe.acts == "lcq" else QuantSpec("lsq", recipe.bits, signed=False))
        specs[name] = LayerSpec(weight=weight, act=act)
    return specs


# ---- conversion -------------------------------------------------------------------------

def _init_state(path: Path, state: Mapping, name: str) -> None:
    key = f"{name}.init_state"
    value = state[key]
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or value.dtype != torch.bool:
        raise QConvertError(f"{path}: {key} is not the 0-dim bool tensor the source stores")
    if not bool(value):
        raise QConvertError(f"{path}: {key} is False: layer {name}'s quantizers were never "
                            "initialised (the source initialises them on its first batch "
                            "and would re-initialise them at evaluation); import a "
                            "checkpoint saved after training started")


def _positive(path: Path, key: str, value: torch.Tensor, what: str) -> torch.Tensor:
    if not bool((value > 0).all()):
        raise QConvertError(f"{path}: {key} ({what}) is {float(value.min()):g}, not positive; "
                            "the source asserts it is > 0 and cannot evaluate this file")
    return value


def _grad_scaled(step: torch.Tensor, mode: str, numel: int, top: int) -> torch.Tensor:
    """The step the source's LSQ forward divides by: ``(s - s*g) + s*g`` with g by mode
    (``1 / sqrt(N * Qp)``, 10, or 1), each operation in float32 as the source does."""
    if mode == "LSQ_grad_scale":
        g = 1.0 / torch.sqrt(numel * torch.tensor([float(top)]))
    elif mode == "10_fac":
        g = torch.tensor(10.0)
    else:
        g = torch.tensor(1.0)
    scaled = step * g
    return (step - scaled) + scaled


def _lcq_params(path: Path, state: Mapping, name: str, role: str,
                with_theta: bool) -> dict[str, torch.Tensor]:
    alpha = _positive(path, f"{name}.{role}_threshold",
                      source_tensor(path, state, f"{name}.{role}_threshold", (1,)),
                      "LCQ clip alpha")
    if not with_theta:
        return {"alpha": alpha.clone(), "theta": torch.zeros(INTERVALS)}
    theta = source_tensor(path, state, f"{name}.{role}_theta", (INTERVALS,))
    dst = source_tensor(path, state, f"{name}.{role}_dst", (INTERVALS,))
    if not torch.equal(dst, torch.arange(INTERVALS) / INTERVALS):
        raise QConvertError(f"{path}: {name}.{role}_dst is not k/16 for k = 0..15, the "
                            "frozen interval starts of the source")
    return {"alpha": alpha.clone(), "theta": theta.clone()}


def _fill_layer(path: Path, state: Mapping, name: str, layer: nn.Module, new: dict,
                layout: Layout, recipe: Recipe) -> None:
    _init_state(path, state, name)
    for role in ("weight_quant", "act_quant"):
        new[f"{name}.{role}.initialized"] = torch.tensor(True)
    new[f"{name}.act_quant.signed_flag"] = torch.tensor(name == layout.first)
    if _is_first_last(name, layout):
        if bool(layer.weight.detach().max() == 0):
            raise QConvertError(f"{path}: {name}.weight has maximum 0; the source's MinMax "
                                "quantizer divides by it")
        return
    top_w, top_x = 2 ** (recipe.bits - 1) - 1, 2**recipe.bits - 1
    if recipe.weights == "lcq":
        for k, v in _lcq_params(path, state, name, "w", recipe.bits > 2).items():
            new[f"{name}.weight_quant.{k}"] = v
    else:
        raw = _positive(path, f"{name}.w_scale", source_tensor(path, state, f"{name}.w_scale",
                                                               (1,)), "LSQ step")
        new[f"{name}.weight_quant.step"] = _grad_scaled(raw, recipe.w_grad_scale,
                                                        layer.weight.numel(), top_w)
    if recipe.acts == "lcq":
        for k, v in _lcq_params(path, state, name, "x", True).items():
            new[f"{name}.act_quant.{k}"] = v
    else:
        raw = _positive(path, f"{name}.x_scale", source_tensor(path, state, f"{name}.x_scale",
                                                               (1,)), "LSQ step")
        channels = layer.weight.shape[1] * getattr(layer, "groups", 1)
        new[f"{name}.act_quant.step"] = _grad_scaled(raw, recipe.x_grad_scale, channels, top_x)


def _fill(path: Path, state: Mapping, model: nn.Module, layout: Layout, recipe: Recipe) -> None:
    target = model.state_dict()
    new = dict(target)
    for key in _float_keys(model):
        integer = key.endswith("num_batches_tracked")
        new[key] = source_tensor(path, state, key, tuple(target[key].shape), integer).clone()
    model.load_state_dict(new, strict=True)  # float weights first: the checks below read them
    layers = dict(quantized_layers(model))
    for name, layer in layers.items():
        _fill_layer(path, state, name, layer, new, layout, recipe)
    model.load_state_dict(new, strict=True)
    _check_weights(path, model, recipe)


def _float_keys(model: nn.Module) -> list[str]:
    """The keys the float pytorchcv model has (quantized-layer weight/bias, BatchNorm)."""
    keys = []
    for key in model.state_dict():
        leaf = key.rsplit(".", 1)[-1]
        if ".weight_quant." in key or ".act_quant." in key:
            continue
        if leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            keys.append(key)
    return keys


def _expected_keys(model: nn.Module, layout: Layout, recipe: Recipe) -> list[str]:
    keys = _float_keys(model)
    for name, _ in quantized_layers(model):
        keys += _quantizer_keys(name, layout, recipe)
    return keys


# ---- the source's quantized weights, restated, to check the import bit for bit ----------

def _source_lcq(w: torch.Tensor, alpha: torch.Tensor, theta: torch.Tensor | None,
                bits: int) -> torch.Tensor:
    """The source's LCQ weight forward (on the normalized weight)."""
    top = 2 ** (bits - 1) - 1
    inside = (w.abs() < alpha).float()
    if theta is None:  # 2 bits: round(|w| / alpha), ternary
        return torch.sign(w) * alpha * (torch.round(w.abs() / alpha) * inside + (1 - inside))
    t = torch.softmax(theta, dim=0)
    gamma = t / (1 / INTERVALS)
    beta = torch.cat([torch.zeros(1), torch.cumsum(t, dim=0)[:INTERVALS - 1]])
    dst = (1 / INTERVALS) * torch.arange(INTERVALS)
    v = w.abs() / alpha
    idx = torch.searchsorted(dst, v, right=True)
    y = gamma[idx - 1] * (v - dst[idx - 1]) + beta[idx - 1]
    y_q = torch.round(y * top) / top
    idx_q = torch.searchsorted(beta, y_q, right=True)
    z = (y_q - beta[idx_q - 1]) / gamma[idx_q - 1] + dst[idx_q - 1]
    return torch.sign(w) * alpha * (z * inside + (1 - inside))


def _source_weight(layer: nn.Module, first_last: bool, recipe: Recipe,
                   bits: int) -> torch.Tensor:
    w = layer.weight.detach()
    if first_last:
        return max_scaled(w, w.max(), 2 ** (bits - 1) - 1)
    mean, std = w.mean(), w.std()
    w_hat = w.add(-mean).div(std) if recipe.weight_norm else w
    q = layer.weight_quant
    if recipe.weights == "lcq":
        theta = q.theta.detach() if bits > 2 else None
        y = _source_lcq(w_hat, q.alpha.detach(), theta, bits)
    else:  # literally: clamp, round, the straight-through sum, times the step
        s = q.step.detach()
        x = torch.clamp(w_hat / s, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        y = s * ((torch.round(x) - x) + x)
    return y.mul(std) if recipe.weight_norm else y


def _check_weights(path: Path, model: nn.Module, recipe: Recipe) -> None:
    """Every imported quantized weight equals the source's, bit for bit."""
    model.eval()
    with torch.no_grad():
        for name, layer in quantized_layers(model):
            first_last = layer.layer_spec.weight.kind == "max-scaled"
            ours = layer.weight_quant(layer.weight)
            theirs = _source_weight(layer, first_last, recipe, layer.weight_quant.bits)
            if not torch.equal(ours, theirs):
                bad = int((ours != theirs).sum())
                raise QConvertError(f"{path}: layer {name}: {bad} quantized weights differ "
                                    "from the source's; this file cannot be imported exactly")


# ---- fixed MinMax ranges (--minmax calibrated) ------------------------------------------

def _minmax_mode(options: ImportOptions) -> str:
    mode = options.minmax or "dynamic"
    if mode == "calibrated" and options.calib is None:
        raise QConvertError("--minmax calibrated needs --calib DATA to take the ranges on")
    if mode == "dynamic" and options.calib is not None:
        raise QConvertError("--calib is used with --minmax calibrated only; drop it or add "
                            "--minmax calibrated")
    return mode


CALIB_BATCH = 64


def _calibrated_minmax(path: Path, model: nn.Module, layout: Layout, recipe: Recipe,
                       options: ImportOptions, mean, std) -> list[str]:
    """Replace the first and last layers' per-sample quantizers by fixed 8-bit uniform
    ones: ``m`` = the maximum of the layer's input over all of ``--calib`` (what the
    source computes for one batch holding that data), step ``m / Q``, clamped to the code
    range (signed for the first layer, unsigned for the last)."""
    from ..calib import load_calibration
    from ..preprocess import prepare_inputs
    from ..quant import LSQQuantizer

    shape = (layout.kwargs["in_channels"], layout.input_size, layout.input_size)
    data = load_calibration(options.calib, shape)
    x = prepare_inputs(data.x, shape, mean, std)
    names = (layout.first, "output")
    peaks = {name: torch.tensor(-math.inf) for name in names}

    def hook(name):
        def record(_module, args):
            peaks[name] = torch.maximum(peaks[name], args[0].detach().max())
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], CALIB_BATCH):
                model(x[start:start + CALIB_BATCH])
    finally:
        for handle in handles:
            handle.remove()
    notes = []
    for name in names:
        first = name == layout.first
        bits = recipe.first_bits if first else recipe.last_bits
        top = 2 ** (bits - 1) - 1 if first else 2**bits - 1
        peak = float(peaks[name])
        if not (math.isfinite(peak) and peak > 0):
            raise QConvertError(f"{options.calib}: the input of layer {name} has maximum "
                                f"{peak:g} over the calibration data; no range fits: give "
                                "other --calib data or the default per-sample quantizers")
        layer = model.get_submodule(name)
        act = LSQQuantizer(bits, signed=first)
        act.step.data.fill_(float(torch.tensor(peak) / top))
        act.initialized.fill_(True)
        layer.act_quant = act
        layer.layer_spec = LayerSpec(weight=layer.layer_spec.weight,
                                     act=QuantSpec("lsq", bits, signed=first))
        model.qconvert_specs[name] = layer.layer_spec
        notes.append(f"layer {name}: fixed range max {peak:.6g} over {x.shape[0]} "
                     f"calibration samples, step {float(act.step):.6g}")
    return notes


def _training_record(path: Path, meta: Mapping, recipe: Recipe, layout: Layout,
                     options: ImportOptions, digest: str) -> dict:
    record = {"imported_from": "nulsq", "source_file": path.name, "source_sha256": digest,
              "weights": recipe.weights, "activations": recipe.acts, "bits": recipe.bits,
              "first_bits": recipe.first_bits, "last_bits": recipe.last_bits,
              "weight_norm": "lwn" if recipe.weight_norm else "none",
              "first_last": ("fixed ranges from calibration data"
                             if _minmax_mode(options) == "calibrated"
                             else "per-sample max (batch size 1)")}
    if "lsq" in (recipe.weights, recipe.acts):
        record["lsq_grad_scale"] = {"w": recipe.w_grad_scale, "x": recipe.x_grad_scale}
    if options.run_params is not None:
        record["run_params"] = options.run_params.name
    for key in ("epoch", "best_acc", "acc"):
        value = plain_number(meta.get(key))
        if value is not None and not (isinstance(value, float) and not math.isfinite(value)):
            record[key] = value
    return record


def import_checkpoint(path: str | Path, options: ImportOptions) -> ImportResult:
    """Read a nuLSQ checkpoint; the model computes what the source's model computes in eval
    at batch size 1."""
    from ..checkpoint import file_sha256

    path = Path(path)
    _minmax_mode(options)
    state, meta = state_and_meta(path, load_source(path), LAYOUT_HINT)
    layout = _layout(path, state)
    params = read_run_params(options.run_params) if options.run_params else {}
    recipe = _recipe(path, options, layout, params)
    model = build_architecture(layout.arch, layout.kwargs)
    _resolve_quantizers(path, state, model, layout, recipe, params)
    try:
        apply_layer_specs(model, _layer_specs(model, layout, recipe))
    except ValueError as exc:
        raise QConvertError(f"{path}: cannot quantize: {exc}") from exc
    check_key_sets(path, state, _expected_keys(model, layout, recipe),
                   f"the {recipe.weights.upper()}-weight / {recipe.acts.upper()}-activation "
                   f"{layout.arch} layout needs exactly the keys it maps")
    _fill(path, state, model, layout, recipe)
    problem = first_parameter_problem(model)
    if problem:
        raise QConvertError(f"{path}: {problem}")
    model.qconvert_scheme = f"nulsq:{recipe.acts}+{recipe.weights}"
    count = len(quantized_layers(model))
    calibrated = _minmax_mode(options) == "calibrated"
    first_last = ("fixed ranges from --calib (not the source's per-batch maximum)"
                  if calibrated else "per sample (the source's batch-size-1 result)")
    notes = [f"{layout.arch} {layout.kwargs}: {count} quantized layers, inner ones at "
             f"{recipe.bits} bits ({recipe.acts.upper()} activations, {recipe.weights.upper()}"
             f" weights{', weight-normalized' if recipe.weight_norm else ''}); first / last "
             f"layer MinMax at {recipe.first_bits} / {recipe.last_bits} bits, {first_last}"]
    mean, std = (CIFAR_MEAN, CIFAR_STD) if layout.cifar else (IMAGENET_MEAN, IMAGENET_STD)
    channels = layout.kwargs["in_channels"]
    mean, std = (mean, std) if channels == 3 else ((), ())
    if calibrated:
        notes += _calibrated_minmax(path, model, layout, recipe, options, mean, std)
    return ImportResult(model=model.eval(), arch=layout.arch, arch_kwargs=layout.kwargs,
                        input_shape=(channels, layout.input_size, layout.input_size),
                        mean=mean, std=std,
                        training=_training_record(path, meta, recipe, layout, options,
                                                  file_sha256(path)),
                        notes=notes)
