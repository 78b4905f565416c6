"""What every quantizer shares: exact straight-through helpers, bit ranges, first-batch init.

Forward values must be bit-exact with the level tables, so the straight-through
estimators are autograd functions (identity forward) rather than the
``x + (y - x).detach()`` idiom, which can be off by one ulp.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

MIN_BITS, MAX_BITS = 2, 8
_PASS_UNINITIALISED = False  # see pass_uninitialised()


@contextlib.contextmanager
def pass_uninitialised() -> Iterator[None]:
    """Within this block an uninitialised quantizer in eval mode returns its input instead
    of raising: for a shape check on a model that has not been trained yet."""
    global _PASS_UNINITIALISED
    before, _PASS_UNINITIALISED = _PASS_UNINITIALISED, True
    try:
        yield
    finally:
        _PASS_UNINITIALISED = before


class _RoundSTE(torch.autograd.Function):
    """Half-to-even rounding forward, identity gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``scale`` (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _GradScale.apply(x, scale)


def check_bits(bits: int, low: int = MIN_BITS, high: int = MAX_BITS) -> int:
    if not isinstance(bits, int) or not low <= bits <= high:
        raise ValueError(f"bit width {bits!r} is outside {low}..{high}")
    return bits


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def abs_quantile(x: torch.Tensor, q: float, dim: int | None = None) -> torch.Tensor:
    """Quantile of |x| (over everything, or per slice along ``dim``), on at most 2^20 samples."""
    x = x.detach().abs()
    if dim is None:
        flat = x.reshape(-1)
        if flat.numel() > 1 << 20:
            flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[
                : 1 << 20]]
        return torch.quantile(flat.float(), q)
    return torch.quantile(x.transpose(0, dim).reshape(x.shape[dim], -1).float(), q, dim=1)


def limited_normalization(x: torch.Tensor,
                          enabled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Limited weight normalization: ((x - mean) / std, std) with the unbiased std; the
    quantized value is multiplied back by std and the mean is not added back. Disabled:
    (x, None)."""
    if not enabled:
        return x, None
    sigma = x.std()
    return (x - x.mean()) / sigma, sigma


class Quantizer(nn.Module):
    """Base: a bit width, a sign convention and a one-time init from the first batch.

    ``signed=None`` (activations only) decides the sign from the first batch: a
    quantizer whose input was ever negative there is signed. The decision and the
    init state live in buffers, so checkpoints carry them.
    """

    calls = 0  # forward passes since the last reset; validation checks every quantizer ran

    def __init__(self, bits: int, signed: bool | None, is_weight: bool = False) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.is_weight = is_weight
        if is_weight:
            signed = True
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed_flag", torch.tensor(bool(signed)))
        self._sign_from_data = signed is None

    @property
    def signed(self) -> bool:
        return bool(self.signed_flag)

    @property
    def code_range(self) -> tuple[int, int]:
        return int_range(self.bits, self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not bool(self.initialized):
            if not self.training and _PASS_UNINITIALISED:
                return x
            if not self.training:
                raise RuntimeError(
                    f"{type(self).__name__} was never initialised: run a training-mode "
                    "forward pass (or load a checkpoint) before evaluating"
                )
            with torch.no_grad():
                if self._sign_from_data:
                    self.signed_flag.fill_(bool((x < 0).any()))
                self.init_from(x.detach())
            self.initialized.fill_(True)
        return self.quantize(x)

    def init_from(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def levels(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The exact float32 values this quantizer can output: [L] or [C, L], ascending."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        sign = "auto" if self._sign_from_data and not bool(self.initialized) else self.signed
        return f"bits={self.bits}, signed={sign}"


    def grad_numel(self, x: torch.Tensor) -> int:
        """N of the gradient scales: a weight's elements, or an activation's features per sample."""
        if self.is_weight or x.dim() < 2:
            return max(1, x.numel())
        return max(1, x[0].numel())


def lsq_grad_scale(numel: int, qp: int) -> float:
    return 1.0 / math.sqrt(numel * max(qp, 1))
