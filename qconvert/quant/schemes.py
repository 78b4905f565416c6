"""Layer specs, schemes and ``quantize_model``: which quantizer goes where.

A :class:`LayerSpec` names a layer's weight and activation quantizers; it is
plain data, saved in checkpoints and used to rebuild the model on load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

from torch import nn

from .asq import ASQQuantizer
from .attention import SplitMultiheadAttention, split_attention
from .base import Quantizer, check_bits
from .coverage import layer_coverage, quantized_twin
from .lcq import LCQQuantizer
from .lsq import LSQQuantizer
from .minmax import MaxScaledWeightQuantizer, SampleMaxQuantizer
from .pot import PowerQuantizer, WidePowerQuantizer

# "max-scaled" and "sample-max": the public LCQ code's MinMax layers (imported checkpoints).
WEIGHT_KINDS = ("lsq", "lcq", "pot", "post", "pot-wide", "post-wide", "max-scaled")
ACT_KINDS = ("lsq", "lcq", "asq", "sample-max")


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer. ``signed=None`` (activations) takes the sign from the first batch."""

    kind: str
    bits: int
    signed: bool | None = None
    per_channel: bool = False
    normalize: bool = False
    intervals: int = 16
    mirror: bool = False  # LCQ activations: unsigned levels on |x|, sign restored
    clip_exact: bool = False  # LCQ: |x| >= alpha gives exactly alpha

    def __post_init__(self) -> None:
        check_bits(self.bits)


@dataclass(frozen=True)
class LayerSpec:
    weight: QuantSpec
    act: QuantSpec

    def to_dict(self) -> dict:
        return {"weight": asdict(self.weight), "act": asdict(self.act)}

    @classmethod
    def from_dict(cls, data: Mapping) -> LayerSpec:
        return cls(weight=QuantSpec(**data["weight"]), act=QuantSpec(**data["act"]))


@dataclass(frozen=True)
class Scheme:
    """A named recipe: weight and activation quantizer kinds for the inner layers."""

    weight: str
    act: str
    weight_options: dict = field(default_factory=dict)


SCHEMES: dict[str, Scheme] = {
    "lsq": Scheme(weight="lsq", act="lsq"),
    "lcq": Scheme(weight="lcq", act="lcq", weight_options={"normalize": True}),
    "asq-lsq": Scheme(weight="lsq", act="asq"),  # ASQ paper, scheme 1
    "asq-post": Scheme(weight="post", act="asq"),  # ASQ paper, scheme 2
    "pot": Scheme(weight="pot", act="lsq"),
    "post": Scheme(weight="post", act="lsq"),
}


def make_weight_quantizer(spec: QuantSpec, out_channels: int) -> Quantizer:
    channels = out_channels if spec.per_channel else 0
    if spec.kind == "lsq":
        return LSQQuantizer(spec.bits, is_weight=True, channels=channels,
                            normalize=spec.normalize)
    if spec.kind == "lcq":
        if spec.per_channel:
            raise ValueError("LCQ weights are per tensor; per_channel is not supported")
        return LCQQuantizer(spec.bits, is_weight=True, intervals=spec.intervals,
                            normalize=spec.normalize, clip_exact=spec.clip_exact)
    if spec.kind == "max-scaled":
        return MaxScaledWeightQuantizer(spec.bits)
    if spec.kind in ("pot", "post"):
        root = 1 if spec.kind == "pot" else 2
        return PowerQuantizer(spec.bits, root, channels=channels, normalize=spec.normalize)
    if spec.kind in ("pot-wide", "post-wide"):  # 2^b + 1 levels, as imported checkpoints
        root = 1 if spec.kind == "pot-wide" else 2
        return WidePowerQuantizer(spec.bits, root, channels=channels, normalize=spec.normalize)
    raise ValueError(f"unknown weight quantizer {spec.kind!r}; choose from {WEIGHT_KINDS}")


def make_act_quantizer(spec: QuantSpec, in_channels: int, feature_axis: int = 1) -> Quantizer:
    """``feature_axis``: where the input's features are (1: convolution, -1: linear)."""
    if spec.kind == "lsq":
        return LSQQuantizer(spec.bits, signed=spec.signed)
    if spec.kind == "lcq":
        return LCQQuantizer(spec.bits, signed=spec.signed, intervals=spec.intervals,
                            mirror=spec.mirror, clip_exact=spec.clip_exact)
    if spec.kind == "sample-max":
        return SampleMaxQuantizer(spec.bits, signed=spec.signed)
    if spec.kind == "asq":
        return ASQQuantizer(spec.bits, in_channels, signed=spec.signed, feature_axis=feature_axis)
    raise ValueError(f"unknown activation quantizer {spec.kind!r}; choose from {ACT_KINDS}")


def quantize_layer(layer: nn.Module, spec: LayerSpec) -> nn.Module:
    """The quantized twin of a Conv1d, Conv2d, ConvTranspose2d or Linear, sharing its
    float weights. A per-channel weight quantizer is per row of the weight (dim 0)."""
    twin = quantized_twin(layer)
    if twin is None:
        raise TypeError(f"cannot quantize {type(layer).__name__}: only Conv1d, Conv2d, "
                        "ConvTranspose2d and Linear")
    wq = make_weight_quantizer(spec.weight, layer.weight.shape[0])
    if isinstance(layer, nn.Linear):
        aq = make_act_quantizer(spec.act, layer.in_features, feature_axis=-1)
    else:
        aq = make_act_quantizer(spec.act, layer.in_channels, feature_axis=1)
    return twin.from_float(layer, aq, wq)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the layers ``quantize_model`` can quantize, in registration order
    (attention projections once :func:`split_attention` has run)."""
    return [name for name, m in model.named_modules() if quantized_twin(m) is not None]


def scheme_layer_specs(
    model: nn.Module,
    scheme: str,
    weight_bits: int,
    act_bits: int,
    first_last_bits: int | None = 8,
    per_channel: bool = False,
    overrides: Mapping[str, Mapping | None] | None = None,
) -> dict[str, LayerSpec | None]:
    """Resolve a scheme to one spec per layer (None leaves a layer in float).

    The first and last quantizable layers (registration order; a first attention's query,
    key and value projections together) get uniform LSQ at
    ``first_last_bits``, the first with a signed input quantizer, as in the
    papers' setups; ``first_last_bits=None`` treats them like the others.
    ``overrides`` maps a layer name to None (keep float) or to a dict with
    optional ``weight`` / ``act`` dicts of :class:`QuantSpec` fields. Attention is split
    into its projections first (in place; see :func:`split_attention`).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    recipe = SCHEMES[scheme]
    split_attention(model)
    names = quantizable_layers(model)
    first_group = _first_layers(model, names)
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(names)
    if unknown:
        raise ValueError(f"overrides name layers the model does not have: {sorted(unknown)}")
    specs: dict[str, LayerSpec | None] = {}
    for name in names:
        spec = LayerSpec(
            weight=QuantSpec(recipe.weight, weight_bits, per_channel=per_channel,
                             **recipe.weight_options),
            act=QuantSpec(recipe.act, act_bits),
        )
        is_first, is_last = name in first_group, name == names[-1]
        if first_last_bits is not None and (is_first or is_last):
            spec = LayerSpec(
                weight=QuantSpec("lsq", first_last_bits, per_channel=per_channel),
                act=QuantSpec("lsq", first_last_bits, signed=True if is_first else None),
            )
        if name in overrides:
            spec = _apply_override(spec, overrides[name])
        specs[name] = spec
    return specs


def _apply_override(spec: LayerSpec, override: Mapping | None) -> LayerSpec | None:
    if override is None:
        return None
    unknown = set(override) - {"weight", "act"}
    if unknown:
        raise ValueError(f"override keys must be 'weight' and/or 'act', got {sorted(unknown)}")
    return LayerSpec(
        weight=replace(spec.weight, **override.get("weight", {})),
        act=replace(spec.act, **override.get("act", {})),
    )


def first_last_rule_layers(model: nn.Module, first_last_bits: int | None,
                           overrides: Mapping[str, Mapping | None] | None = None) -> set[str]:
    """The layers the first/last-layer rule sets (none when ``first_last_bits`` is None or
    an override names them)."""
    names = quantizable_layers(model)
    if first_last_bits is None or not names:
        return set()
    return (_first_layers(model, names) | {names[-1]}) - set(overrides or {})


def _first_layers(model: nn.Module, names: list[str]) -> set[str]:
    """The first layer; when that is an attention's query projection, also its key and
    value projections, which read the same input."""
    if not names:
        return set()
    parent_name, _, child = names[0].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, SplitMultiheadAttention) and child == "q_proj":
        prefix = f"{parent_name}." if parent_name else ""
        return {prefix + p for p in ("q_proj", "k_proj", "v_proj")}
    return {names[0]}


def apply_layer_specs(model: nn.Module, specs: Mapping[str, LayerSpec | None]) -> nn.Module:
    """Replace each named layer by its quantized twin, in place; returns the model.

    Attention is split into its projections first, as :func:`scheme_layer_specs` does.
    """
    split_attention(model)
    for name, spec in specs.items():
        if spec is None:
            continue
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            quantized = quantize_layer(getattr(parent, child), spec)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"layer {name}: {exc}") from exc
        quantized.layer_spec = spec
        setattr(parent, child, quantized)
    model.qconvert_specs = dict(specs)
    return model


def quantize_model(
    model: nn.Module,
    scheme: str,
    weight_bits: int = 4,
    act_bits: int = 4,
    first_last_bits: int | None = 8,
    per_channel: bool = False,
    overrides: Mapping[str, Mapping | None] | None = None,
    allow_unsupported: bool = False,
) -> nn.Module:
    """Turn every Conv1d / Conv2d / ConvTranspose2d / Linear of ``model``, and the four
    projections of every ``nn.MultiheadAttention``, into quantized twins (in place).

    Schemes: ``lsq``, ``lcq``, ``asq-lsq``, ``asq-post``, ``pot``, ``post``.
    Quantizers initialise from the first training-mode batch. The model's
    ``qconvert_coverage`` (a :class:`CoverageReport`) lists every Conv/Linear-like layer
    left float or set by the first/last-layer rule, and why. Layers of unsupported types
    (e.g. ``nn.LSTM``, ``nn.Conv3d``) stay float; when they hold most of the
    Conv/Linear-like parameters this raises, unless ``allow_unsupported``.
    """
    specs = scheme_layer_specs(model, scheme, weight_bits, act_bits, first_last_bits,
                               per_channel, overrides)
    coverage = layer_coverage(model, specs,
                              first_last_rule_layers(model, first_last_bits, overrides))
    problem = coverage.unsupported_majority()
    if problem and not allow_unsupported:
        raise ValueError(f"{problem}; pass allow_unsupported=True to quantize the rest anyway")
    model = apply_layer_specs(model, specs)
    model.qconvert_scheme = scheme
    model.qconvert_coverage = coverage
    return model
