"""QAT quantizers (LSQ, LCQ, ASQ, POT/POST), quantized layers and ``quantize_model``."""

from .asq import ASQQuantizer, StepAdapter
from .base import Quantizer
from .layers import QUANTIZED_LAYERS, QConv2d, QLinear, quantized_layers
from .lcq import LCQQuantizer
from .lsq import LSQQuantizer
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
    "quantized_layers",
    "ASQQuantizer", "LCQQuantizer", "LSQQuantizer", "LayerSpec", "PowerQuantizer", "QConv2d",
    "QLinear", "QUANTIZED_LAYERS", "QuantSpec", "Quantizer", "SCHEMES", "StepAdapter",
    "WidePowerQuantizer",
    "apply_layer_specs", "quantize_model", "scheme_layer_specs",
]
