"""Integer mode (docs/integer-mode.md): uint8 activation codes and int8 per-channel weights
in the QDQ form ONNX Runtime fuses into QLinearConv / QGemm, a rewrite of the exact-mode
model."""

from .conv_kernel import check_qconv_clamp, kernel_form, with_qconv_clamp
from .rewrite import (
    MAX_OUTER_BITS,
    MIN_OUTER_BITS,
    integer_details,
    integer_summary,
    lut_bytes,
    to_integer,
)

__all__ = ["MAX_OUTER_BITS", "MIN_OUTER_BITS", "check_qconv_clamp", "integer_details",
           "integer_summary", "kernel_form", "lut_bytes", "to_integer", "with_qconv_clamp"]
