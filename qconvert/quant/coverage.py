"""Which Conv/Linear-like layers a quantized model left float, or quantized by a rule, and why.

"Conv/Linear-like" means every layer that multiplies its input by a learned weight
matrix: all convolutions, Linear, Bilinear, recurrent layers and cells, attention.
Embedding tables are lookups, not products, and are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from torch import nn

from .layers import QUANTIZED_LAYERS, QUANTIZED_TWINS

CONV_LINEAR_LIKE = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.RNNBase,
                    nn.RNNCellBase, nn.MultiheadAttention)
UNSUPPORTED_SHARE_LIMIT = 0.5  # above this share of the parameters, quantize_model refuses

QUANTIZED, BY_RULE, FLOAT = "quantized", "rule", "float"


def quantized_twin(module: nn.Module) -> type[nn.Module] | None:
    """The quantized class for ``module``, or None when qconvert cannot quantize it.

    A subclass that overrides ``forward`` computes something of its own (weight
    standardisation, say), so it is not treated as its base class.
    """
    if isinstance(module, QUANTIZED_LAYERS):
        return None
    for float_class, twin in QUANTIZED_TWINS.items():
        if isinstance(module, float_class) and type(module).forward is float_class.forward:
            return twin
    return None


def _why_unsupported(module: nn.Module) -> str:
    kind = type(module).__name__
    for float_class in QUANTIZED_TWINS:
        if isinstance(module, float_class):
            return (f"{kind} overrides {float_class.__name__}.forward (its arithmetic is its "
                    "own)")
    return f"unsupported layer type {kind}"


@dataclass(frozen=True)
class LayerCoverage:
    name: str
    layer_type: str
    params: int
    status: str  # QUANTIZED, BY_RULE or FLOAT
    reason: str = ""


@dataclass
class CoverageReport:
    """Every Conv/Linear-like layer of a model with its status; :meth:`lines` prints the
    ones not quantized as the scheme asked."""

    layers: list[LayerCoverage] = field(default_factory=list)

    @property
    def exceptions(self) -> list[LayerCoverage]:
        """The layers left float or set by the first/last-layer rule."""
        return [layer for layer in self.layers if layer.status != QUANTIZED]

    @property
    def left_float(self) -> list[LayerCoverage]:
        return [layer for layer in self.layers if layer.status == FLOAT]

    def quantized_share(self) -> float:
        """Share of the Conv/Linear-like parameters in quantized layers."""
        total = sum(layer.params for layer in self.layers)
        done = sum(layer.params for layer in self.layers if layer.status != FLOAT)
        return done / total if total else 1.0

    def unsupported_majority(self) -> str | None:
        """A message when layers of unsupported types hold most of the parameters."""
        total = sum(layer.params for layer in self.layers)
        unsupported = [layer for layer in self.left_float
                       if not layer.reason.startswith("kept float")]
        share = sum(layer.params for layer in unsupported) / total if total else 0.0
        if share <= UNSUPPORTED_SHARE_LIMIT:
            return None
        names = ", ".join(f"{layer.name} ({layer.layer_type})" for layer in unsupported[:3])
        more = " ..." if len(unsupported) > 3 else ""
        return (f"layers qconvert cannot quantize hold {share:.0%} of the Conv/Linear-like "
                f"parameters and would stay float: {names}{more}")

    def lines(self) -> list[str]:
        quantized = sum(1 for layer in self.layers if layer.status != FLOAT)
        lines = [f"coverage: {quantized} of {len(self.layers)} Conv/Linear-like layers "
                 f"quantized ({self.quantized_share():.1%} of their parameters)"]
        width = max((len(layer.name) for layer in self.exceptions), default=0)
        for layer in self.exceptions:
            lines.append(f"  {layer.name:<{width}}  {layer.layer_type:<16} {layer.params:>9}  "
                         f"{layer.status}: {layer.reason}")
        return lines

    def to_dict(self) -> list[dict]:
        return [asdict(layer) for layer in self.layers]

    @classmethod
    def from_dict(cls, data: Iterable[Mapping]) -> CoverageReport:
        return cls([LayerCoverage(**dict(entry)) for entry in data])


def _rule_reason(spec) -> str:
    return (f"{spec.weight.kind} {spec.weight.bits}-bit weights, {spec.act.kind} "
            f"{spec.act.bits}-bit input by the first/last-layer rule")


def layer_coverage(model: nn.Module, specs: Mapping[str, object],
                   rule_layers: Iterable[str] = ()) -> CoverageReport:
    """The coverage of ``specs`` (layer name -> spec or None) on the float ``model``.

    Layers inside an unsplit ``nn.MultiheadAttention`` are reported with it.
    """
    rule_layers = set(rule_layers)
    entries: list[LayerCoverage] = []
    inside_attention: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, CONV_LINEAR_LIKE) or isinstance(module, QUANTIZED_LAYERS):
            continue
        if any(name.startswith(prefix + ".") for prefix in inside_attention):
            continue
        if isinstance(module, nn.MultiheadAttention):
            inside_attention.append(name)
        params = sum(p.numel() for p in module.parameters())
        kind = type(module).__name__
        spec = specs.get(name)
        if name in specs and spec is None:
            entry = LayerCoverage(name, kind, params, FLOAT, "kept float by an override")
        elif spec is None and quantized_twin(module) is not None:
            entry = LayerCoverage(name, kind, params, FLOAT, "not named in the layer specs")
        elif spec is None:
            entry = LayerCoverage(name, kind, params, FLOAT, _why_unsupported(module))
        elif name in rule_layers:
            entry = LayerCoverage(name, kind, params, BY_RULE, _rule_reason(spec))
        else:
            entry = LayerCoverage(name, kind, params, QUANTIZED)
        entries.append(entry)
    return CoverageReport(entries)
