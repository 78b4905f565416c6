"""Integer / LUT deployment mode (docs/integer-mode.md): ConvInteger / MatMulInteger on
b'-bit codes with one float rescale per layer, a rewrite of the exact-mode model."""

from .rewrite import MAX_OUTER_BITS, MIN_OUTER_BITS, integer_details, lut_bytes, to_integer

__all__ = ["MAX_OUTER_BITS", "MIN_OUTER_BITS", "integer_details", "lut_bytes", "to_integer"]
