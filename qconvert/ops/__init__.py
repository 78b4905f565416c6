"""The qconvert op set. Each op lives in one module: schema, function body, numpy
reference, torch custom op and exporter translation (spec: docs/ops.md)."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import onnx
from onnx.reference.op_run import OpRun

from . import (
    adaptive_step,
    compand_quant,
    lut_gather,
    pow2_shift,
    qconv_clamp,
    qdepthwise_conv_clamp,
    sample_max_quant,
    uniform_quant,
)
from ._builder import (
    DECODE_DOMAIN,
    DECODE_DOMAIN_VERSION,
    DOMAIN,
    DOMAIN_VERSION,
    MAX_OPSET,
    MIN_OPSET,
    SUPPORTED_DOMAIN_VERSIONS,
    register,
)

OPS: dict[str, ModuleType] = {
    m.NAME: m for m in (uniform_quant, compand_quant, adaptive_step, lut_gather, pow2_shift,
                        sample_max_quant, qconv_clamp, qdepthwise_conv_clamp)
}

# Activation quantizers (elementwise, per-tensor or per-sample parameters) and weight decodes.
ACTIVATION_OPS = ("UniformQuant", "CompandQuant", "AdaptiveStep")
# Activation quantizers that reduce over each sample (not elementwise: no layout rewrites).
SAMPLE_REDUCING_OPS = ("SampleMaxQuant",)
DECODE_OPS = ("LutGather", "Pow2Shift")
# Integer-mode operators over uint8 codes (not quantizers: no float activations in or out).
INTEGER_OPS = ("QConvClamp", "QDepthwiseConvClamp")

for _module in OPS.values():
    register(_module.schema())


def functions(opset: int, names: set[str] | None = None) -> list[onnx.FunctionProto]:
    """Model-local function bodies for the ops in ``names`` (all ops when None)."""
    return [m.function(opset) for name, m in OPS.items() if names is None or name in names]


def translation_table() -> dict:
    """torch op -> onnxscript translation, for torch.onnx.export's custom_translation_table."""
    return {m.TORCH_OP: m.translate for m in OPS.values()}


def _op_run_class(module: ModuleType, domain: str = DOMAIN) -> type[OpRun]:
    """An onnx.reference OpRun that evaluates the op with its numpy reference."""
    attributes = module.ATTRIBUTES
    defaults = getattr(module, "DEFAULTS", {})

    def _run(self, *inputs, **attrs):
        values = {name: attrs.get(name, getattr(self, name, defaults.get(name)))
                  for name in attributes}
        values = {k: v for k, v in values.items() if v is not None}
        values = {k: [int(i) for i in v] if np.ndim(v) else int(v) for k, v in values.items()}
        return (module.reference(*inputs, **values),)

    return type(module.NAME, (OpRun,), {"op_domain": domain, "_run": _run})


# The reference runtime evaluates every qconvert op, and the weight decodes in their
# function-only domain, with the numpy references.
REFERENCE_OPS: list[type[OpRun]] = [_op_run_class(m) for m in OPS.values()] + [
    _op_run_class(OPS[name], DECODE_DOMAIN) for name in DECODE_OPS]

__all__ = ["ACTIVATION_OPS", "DECODE_DOMAIN", "DECODE_DOMAIN_VERSION", "DECODE_OPS", "DOMAIN",
           "DOMAIN_VERSION", "INTEGER_OPS", "MAX_OPSET", "MIN_OPSET", "OPS", "REFERENCE_OPS",
           "SAMPLE_REDUCING_OPS", "SUPPORTED_DOMAIN_VERSIONS", "functions", "translation_table"]
