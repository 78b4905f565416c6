"""Integer mode's outer bit width b', chosen by measurement: the smallest b' whose integer
model keeps the wanted top-1 agreement with the PyTorch QAT model (``--outer-bits auto``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import onnx

from .errors import QConvertError
from .export.integer import to_integer
from .preprocess import prepare_inputs
from .runtime import session
from .validate import validate


def choose_outer_bits(exact_model: onnx.ModelProto, ckpt, data, min_agreement: float,
                      candidates: Iterable[int] = range(4, 9),
                      make_session: Callable | None = None,
                      batch_size: int = 64) -> tuple[int, dict[int, float]]:
    """The smallest b' whose integer model's top-1 agreement with the PyTorch QAT model on
    ``data`` reaches ``min_agreement``, and the agreements measured (ascending b', stopping
    at the first that passes). Raises QConvertError when none does."""
    if make_session is None:
        def make_session(m):
            return session(m, announce=None)
    agreements: dict[int, float] = {}
    calib = prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean, ckpt.input.std).numpy()
    for bits in sorted(set(int(b) for b in candidates)):
        report = validate(ckpt, to_integer(exact_model, bits, calib=calib), data, make_session,
                          batch_size=batch_size, per_layer=False)
        agreements[bits] = report.top1_agreement
        if report.top1_agreement >= min_agreement:
            return bits, agreements
    best = max(agreements, key=lambda b: (agreements[b], -b)) if agreements else None
    detail = ", ".join(f"{b} bits {a:.2%}" for b, a in agreements.items())
    raise QConvertError(
        f"no outer bit width reaches top-1 agreement {min_agreement:.2%} ({detail}); "
        f"lower --min-agreement, pick --outer-bits {best}, or keep the exact mode")
