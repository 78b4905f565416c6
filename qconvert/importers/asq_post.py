"""Source ``asq-post``: the official ASQ / POST training code (ResNet-18 / -34 on ImageNet).

Its quantized ResNets wrap a torchvision ResNet: the stem conv and the classifier stay
float, and every block conv (``layer{i}.unit{j}.quant_convbn1|2`` and
``quant_identity_convbn``) quantizes its input activation (ASQ or LSQ, unsigned) and
its weight (LSQ or POST, per output channel) before its BatchNorm. The file records
neither the weight quantizer (LSQ and POST share the key ``quan_w_fn.s`` and its shape)
nor the POST base, so those come from options; the bit width and depth come from the
saved ``arch`` entry (``resnet18_4``) or ``--bits``. See docs/import.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..archs import build_architecture
from ..archs.tv_resnet import STAGE_BLOCKS
from ..errors import QConvertError
from ..quant import LayerSpec, QuantSpec, apply_layer_specs, quantized_layers
from ..quant.checks import first_parameter_problem
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

STEM, HEAD = "quant_init_block_convbn", "quant_output.linear"
# Source module of a block conv -> (target conv, target BatchNorm) inside the block.
ROLES = {"quant_convbn1": ("conv1", "bn1"), "quant_convbn2": ("conv2", "bn2"),
         "quant_identity_convbn": ("downsample.0", "downsample.1")}
BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
ARCH_ENTRY = re.compile(r"^resnet(\d+)_(\d+)$")
UNIT_KEY = re.compile(r"^layer(\d+)\.unit(\d+)\.")
STEP_FLOOR = float(torch.finfo(torch.float32).eps)  # the source clamps steps to this
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INPUT_SIZE = 224  # the source's 7x7 average pool needs a 7x7 final map
POST_BASES = {"2": 1, "sqrt2": 2}  # --post-base -> Pow2Shift root
LAYOUT_HINT = "this is not a checkpoint of the asq-post ResNet-18/34 models"


@dataclass(frozen=True)
class ConvSite:
    """One quantized block conv: its source module path and the target modules."""

    source: str  # e.g. layer2.unit1.quant_identity_convbn
    conv: str  # e.g. layer2.0.downsample.0
    bn: str


@dataclass(frozen=True)
class Recipe:
    depth: int
    bits: int
    act: str  # "asq" or "lsq"
    weight: str  # "lsq" or "post"
    root: int = 1  # POST base: 1 = 2, 2 = sqrt 2


def _layout_depth(path: Path, state: Mapping) -> int:
    units: dict[int, set[int]] = {}
    for key in state:
        match = UNIT_KEY.match(key)
        if match:
            units.setdefault(int(match[1]), set()).add(int(match[2]))
    if f"{STEM}.conv.weight" not in state or not units:
        raise QConvertError(f"{path}: no {STEM}.conv.weight or layer<i>.unit<j>.* keys; "
                            + LAYOUT_HINT)
    counts = tuple(len(units.get(i, ())) for i in range(1, 5))
    for depth, blocks in STAGE_BLOCKS.items():
        if counts == blocks and all(units[i] == set(range(1, n + 1))
                                    for i, n in enumerate(blocks, 1)) and len(units) == 4:
            return depth
    raise QConvertError(f"{path}: the keys hold units per stage {counts} (stages "
                        f"{sorted(units)}), neither ResNet-18 {STAGE_BLOCKS[18]} nor "
                        f"ResNet-34 {STAGE_BLOCKS[34]}; " + LAYOUT_HINT)


def _recipe(path: Path, state: Mapping, meta: Mapping, options: ImportOptions) -> Recipe:
    """Depth from the key layout, bits from 'arch' or --bits, the rest from options."""
    depth = _layout_depth(path, state)
    arch_bits = None
    if "arch" in meta:
        match = ARCH_ENTRY.match(str(meta["arch"]))
        if not match:
            raise QConvertError(f"{path}: arch entry {meta['arch']!r} is not "
                                "'resnet<depth>_<bits>' as the quantized training saves it")
        if int(match[1]) != depth:
            raise QConvertError(f"{path}: arch entry {meta['arch']!r} says ResNet-{match[1]}"
                                f" but the keys hold a ResNet-{depth}")
        arch_bits = int(match[2])
    if arch_bits is not None and options.bits is not None and options.bits != arch_bits:
        raise QConvertError(f"{path}: --bits {options.bits} contradicts the arch entry "
                            f"{meta['arch']!r}; drop --bits")
    bits = arch_bits if arch_bits is not None else options.bits
    if bits is None:
        raise QConvertError(f"{path}: no arch entry ('resnet18_4') records the bit width; "
                            "pass --bits")
    act = "asq" if any(".adapter." in k for k in state) else "lsq"
    if options.weights is None:
        raise QConvertError(f"{path}: the file does not say whether the weights are LSQ or "
                            "POST (both store quan_w_fn.s of the same shape); pass --weights "
                            "lsq or --weights post")
    if options.weights == "lsq":
        if options.post_base is not None:
            raise QConvertError("--post-base applies to --weights post only; drop it")
        return Recipe(depth, bits, act, "lsq")
    if options.post_base is None:
        raise QConvertError(f"{path}: the file does not record the POST base; pass "
                            "--post-base 2 (the shipped code) or --post-base sqrt2")
    return Recipe(depth, bits, act, "post", POST_BASES[options.post_base])


def _weight_kind(recipe: Recipe) -> str:
    """qconvert's weight quantizer: POST's 2^b + 1 levels are the "-wide" power kinds."""
    if recipe.weight == "lsq":
        return "lsq"
    return "pot-wide" if recipe.root == 1 else "post-wide"


def _layer_specs(model: nn.Module, recipe: Recipe) -> dict[str, LayerSpec]:
    spec = LayerSpec(weight=QuantSpec(_weight_kind(recipe), recipe.bits, per_channel=True),
                     act=QuantSpec(recipe.act, recipe.bits, signed=False))
    return {site.conv: spec for site in _sites(model)}


def _sites(model: nn.Module) -> list[ConvSite]:
    sites = []
    for i in range(1, 5):
        for j, block in enumerate(getattr(model, f"layer{i}")):
            for role, (conv, bn) in ROLES.items():
                if role == "quant_identity_convbn" and block.downsample is None:
                    continue
                sites.append(ConvSite(f"layer{i}.unit{j + 1}.{role}", f"layer{i}.{j}.{conv}",
                                      f"layer{i}.{j}.{bn}"))
    return sites


def _plain_map(model: nn.Module, act: str) -> dict[str, str]:
    """Source key -> target key for tensors copied as they are."""
    mapping = {f"{STEM}.conv.weight": "conv1.weight", f"{HEAD}.weight": "fc.weight",
               f"{HEAD}.bias": "fc.bias"}
    mapping.update({f"{STEM}.bn.{e}": f"bn1.{e}" for e in BN_ENTRIES})
    target_keys = model.state_dict().keys()
    for site in _sites(model):
        mapping[f"{site.source}.conv.weight"] = f"{site.conv}.weight"
        mapping.update({f"{site.source}.bn.{e}": f"{site.bn}.{e}" for e in BN_ENTRIES})
        if act == "asq":
            prefix = f"{site.conv}.act_quant.adapter."
            mapping.update({f"{site.source}.adapter.{k[len(prefix):]}": k
                            for k in target_keys if k.startswith(prefix)})
    return mapping


def _expected_keys(model: nn.Module, act: str) -> list[str]:
    keys = list(_plain_map(model, act))
    for site in _sites(model):
        keys += [f"{site.source}.{e}" for e in ("quan_w_fn.s", "quan_a_fn.s", "init_state")]
    return keys


def _build(path: Path, state: Mapping, recipe: Recipe) -> tuple[nn.Module, dict]:
    stem = state[f"{STEM}.conv.weight"]
    head = state.get(f"{HEAD}.weight")
    if not isinstance(stem, torch.Tensor) or stem.dim() != 4 or stem.shape[2:] != (7, 7):
        raise QConvertError(f"{path}: {STEM}.conv.weight is not a [width, channels, 7, 7] "
                            "tensor; " + LAYOUT_HINT)
    if not isinstance(head, torch.Tensor) or head.dim() != 2:
        raise QConvertError(f"{path}: {HEAD}.weight is missing or not a [classes, features]"
                            " tensor; " + LAYOUT_HINT)
    kwargs = {"in_channels": int(stem.shape[1]), "num_classes": int(head.shape[0]),
              "width": int(stem.shape[0])}
    check_declared_sizes(path, kwargs, LAYOUT_HINT)
    model = build_architecture(f"tv_resnet{recipe.depth}", kwargs)
    try:
        apply_layer_specs(model, _layer_specs(model, recipe))
    except ValueError as exc:
        raise QConvertError(f"{path}: cannot quantize at {recipe.bits} bits: {exc}") from exc
    return model, kwargs


def _forward_step(step: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """The step the source's forward divides and multiplies by where it scales the step's
    gradient with ``(s - s*g).detach() + s*g``: that sum can differ from s in the last bit."""
    scaled = step * grad_scale
    return (step - scaled) + scaled


def _weight_grad_scale(weight: torch.Tensor, top: int) -> float:
    return 1.0 / ((top * weight.numel() / weight.shape[0]) ** 0.5)


def _lsq_step(raw: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The source's forward first makes the stored step positive: |s|, at least eps."""
    return raw.abs().clamp(min=STEP_FLOOR), bool((raw <= 0).any())


def _weight_step(site: ConvSite, raw: torch.Tensor, weight: torch.Tensor, recipe: Recipe,
                 path: Path) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(qconvert's positive step, the source's signed forward step, was one not positive)."""
    raw = raw.reshape(-1)
    if recipe.weight == "lsq":
        step, fixed = _lsq_step(raw)
        if recipe.act == "asq":  # the ASQ weight quantizer scales the step's gradient
            step = _forward_step(step, _weight_grad_scale(weight, 2 ** (recipe.bits - 1) - 1))
        return step, step, fixed
    signed = _forward_step(raw, _weight_grad_scale(weight, 1))  # POST: clip at |1|
    if (signed == 0).any():
        raise QConvertError(f"{path}: {site.source}.quan_w_fn.s (POST alpha) is 0 in a "
                            "channel; the source divides by it")
    return signed.abs(), signed, bool((signed < 0).any())


def _source_level_order(bits: int, root: int) -> torch.Tensor:
    """The POST levels in the order the source's table lists them: it builds the values
    0, -+base^-1 .. -+base^-(K-1), -1, 1 as Python floats and deduplicates them through a
    set, so a distance tie goes to whichever level that set yields first."""
    base = 2.0 if root == 1 else 2.0 ** 0.5
    values = [0.0]
    for i in range(2 ** (bits - 1) - 1):
        values += [-base ** (-i - 1), base ** (-i - 1)]
    values += [-1.0, 1.0]
    return torch.tensor(list(set(values)), dtype=torch.float32)


def _tie_ranks(order: torch.Tensor) -> torch.Tensor:
    """Rank of each ascending level in the source's order."""
    ascending = order.sort().values
    return torch.tensor([int((order == v).nonzero()[0, 0]) for v in ascending])


def _source_weight(weight: torch.Tensor, step: torch.Tensor, recipe: Recipe,
                   order: torch.Tensor | None) -> torch.Tensor:
    """The source's quantized weight, restated from its math (argmin over its level table,
    first index wins; or LSQ's clamp-and-round)."""
    step = step.view(-1, *([1] * (weight.dim() - 1)))
    if order is None:
        lo, hi = -(2 ** (recipe.bits - 1)), 2 ** (recipe.bits - 1) - 1
        return torch.round(torch.clamp(weight / step, lo, hi)) * step
    v = torch.clamp(weight / step, -1, 1).reshape(weight.shape[0], -1)
    picked = torch.empty_like(v)
    for row in range(v.shape[0]):  # one channel at a time bounds the [L, n] distances
        distance = (v[row].unsqueeze(0) - order.unsqueeze(1)).abs()
        picked[row] = order[distance.min(dim=0).indices]
    return picked.view_as(weight) * step


def _convert_site(path: Path, state: Mapping, site: ConvSite, new: dict, recipe: Recipe,
                  order: torch.Tensor | None) -> tuple[torch.Tensor, list[str]]:
    """Write one block conv's quantizer tensors into ``new``; returns the source's signed
    forward weight step and the source keys whose steps were not positive."""
    init = source_tensor(path, state, f"{site.source}.init_state", (1,))
    if float(init) != 0.0:
        raise QConvertError(f"{path}: {site.source}.init_state is {float(init):g}: its "
                            "quantizers were never initialised (no forward pass ran); "
                            "import a checkpoint saved after training")
    weight = new[f"{site.conv}.weight"]
    raw_w = source_tensor(path, state, f"{site.source}.quan_w_fn.s",
                          (weight.shape[0], 1, 1, 1))
    step, signed, w_fixed = _weight_step(site, raw_w, weight, recipe, path)
    new[f"{site.conv}.weight_quant.{'step' if order is None else 'alpha'}"] = step
    raw_a = source_tensor(path, state, f"{site.source}.quan_a_fn.s", (1,))
    new[f"{site.conv}.act_quant.step"], a_fixed = _lsq_step(raw_a)
    for role in ("weight_quant", "act_quant"):
        new[f"{site.conv}.{role}.initialized"] = torch.tensor(True)
    if order is not None:
        new[f"{site.conv}.weight_quant.tie_rank"] = _tie_ranks(order)
    fixed = [f"{site.source}.quan_w_fn.s"] * w_fixed + [f"{site.source}.quan_a_fn.s"] * a_fixed
    return signed, fixed


def _fill(path: Path, state: Mapping, model: nn.Module, recipe: Recipe) -> list[str]:
    """Copy and convert every source tensor into ``model``; returns notes."""
    target = model.state_dict()
    new = dict(target)
    for src, dst in _plain_map(model, recipe.act).items():
        integer = dst.endswith("num_batches_tracked")
        new[dst] = source_tensor(path, state, src, tuple(target[dst].shape), integer).clone()
    order = (_source_level_order(recipe.bits, recipe.root) if recipe.weight == "post"
             else None)
    not_positive, signed_steps = [], {}
    for site in _sites(model):
        signed_steps[site.conv], fixed = _convert_site(path, state, site, new, recipe, order)
        not_positive += fixed
    model.load_state_dict(new, strict=True)
    _check_weights(path, model, recipe, signed_steps, order)
    if not not_positive:
        return []
    listed = ", ".join(not_positive[:4]) + (" ..." if len(not_positive) > 4 else "")
    return [f"made {len(not_positive)} non-positive step(s) positive as the source's forward "
            f"does (|s|; POST alpha by sign symmetry): {listed}"]


def _check_weights(path: Path, model: nn.Module, recipe: Recipe,
                   signed_steps: Mapping[str, torch.Tensor], order: torch.Tensor | None) -> None:
    """Every imported quantized weight equals the source's, bit for bit."""
    model.eval()
    with torch.no_grad():
        for name, layer in quantized_layers(model):
            ours = layer.weight_quant(layer.weight)
            theirs = _source_weight(layer.weight, signed_steps[name], recipe, order)
            if not torch.equal(ours, theirs):
                bad = int((ours != theirs).sum())
                raise QConvertError(f"{path}: layer {name}: {bad} quantized weights differ "
                                    "from the source's (a negative POST alpha on a rounding "
                                    "tie?); this file cannot be imported exactly")


def _training_record(path: Path, meta: Mapping, recipe: Recipe, options: ImportOptions,
                     digest: str) -> dict:
    record = {"imported_from": "asq-post", "source_file": path.name, "source_sha256": digest,
              "activations": recipe.act, "weights": recipe.weight, "bits": recipe.bits}
    if recipe.weight == "post":
        record["post_base"] = options.post_base
    for key in ("arch", "epoch", "best_epoch", "best_acc1"):
        value = meta.get(key)
        value = value if isinstance(value, str) else plain_number(value)
        if value is not None and not (isinstance(value, float) and not math.isfinite(value)):
            record[key] = value
    return record


def import_checkpoint(path: str | Path, options: ImportOptions) -> ImportResult:
    """Read an asq-post checkpoint; the model computes what the source's computes in eval."""
    from ..checkpoint import file_sha256

    path = Path(path)
    state, meta = state_and_meta(path, load_source(path), LAYOUT_HINT)
    recipe = _recipe(path, state, meta, options)
    model, kwargs = _build(path, state, recipe)
    check_key_sets(path, state, _expected_keys(model, recipe.act),
                   f"the {'ASQ' if recipe.act == 'asq' else 'LSQ'}-activation ResNet-"
                   f"{recipe.depth} layout needs exactly the keys it maps")
    notes = _fill(path, state, model, recipe)
    problem = first_parameter_problem(model)
    if problem:
        raise QConvertError(f"{path}: {problem}")
    model.qconvert_scheme = f"asq-post:{recipe.act}+{_weight_kind(recipe)}"
    weights = ("LSQ" if recipe.weight == "lsq" else
               f"POST base {options.post_base} (2^b + 1 levels, {recipe.bits + 1}-bit codes)")
    notes.insert(0, f"ResNet-{recipe.depth}, {len(_sites(model))} quantized convs at "
                    f"{recipe.bits} bits: {recipe.act.upper()} activations, {weights} "
                    "weights; stem conv and classifier float")
    return ImportResult(model=model.eval(), arch=f"tv_resnet{recipe.depth}", arch_kwargs=kwargs,
                        input_shape=(kwargs["in_channels"], INPUT_SIZE, INPUT_SIZE),
                        mean=IMAGENET_MEAN if kwargs["in_channels"] == 3 else (),
                        std=IMAGENET_STD if kwargs["in_channels"] == 3 else (),
                        training=_training_record(path, meta, recipe, options,
                                                  file_sha256(path)),
                        notes=notes)
