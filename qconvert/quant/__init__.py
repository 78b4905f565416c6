"""QAT quantizers (LSQ, LCQ, ASQ, POT/POST), quantized layers and ``quantize_model``."""

from .asq import ASQQuantizer, StepAdapter
from .attention import SplitMultiheadAttention, split_attention
from .base import Quantizer
from .coverage import CoverageReport, LayerCoverage, layer_coverage
from .layers import (
    QUANTIZED_LAYERS,
    QConv1d,
    QConv2d,
    QConvTranspose2d,
    QLinear,
    quantized_layers,
)
from .lcq import LCQQuantizer
from .lsq import LSQQuantizer
from .minmax import MaxScaledWeightQuantizer, SampleMaxQuantizer
from .pot import PowerQuantizer, WidePowerQuantizer
from .schemes import (
    SCHEMES,
    LayerSpec,
    QuantSpec,
    apply_layer_specs,
    quantize_model,
    scheme_layer_specs,
)

__all__ = [
    "ASQQuantizer", "CoverageReport", "LCQQuantizer", "LSQQuantizer", "LayerCoverage",
    "LayerSpec", "MaxScaledWeightQuantizer", "PowerQuantizer", "QConv1d", "QConv2d",
    "QConvTranspose2d", "QLinear", "QUANTIZED_LAYERS", "QuantSpec", "Quantizer", "SCHEMES",
    "SampleMaxQuantizer", "SplitMultiheadAttention", "StepAdapter", "WidePowerQuantizer",
    "apply_layer_specs", "layer_coverage", "quantize_model", "quantized_layers",
    "scheme_layer_specs", "split_attention",
]
