"""Max-scaled uniform quantizers without parameters: the public LCQ re-implementation's
MinMax quantizer (its 8-bit first and last layers), for imported checkpoints.

That quantizer scales by the tensor's maximum ``m`` (not max |x|) and does not clamp:
``x_q = round(x / m * Q) / Q * m`` in that float32 order, and it returns
``(x_q - x) + x`` (its straight-through sum, which can differ from ``x_q`` in the last
bit). ``Q`` is ``2^(b-1) - 1`` (signed) or ``2^b - 1`` (unsigned); values below ``-m``
get codes below ``-Q``.

- Activations: :class:`SampleMaxQuantizer` takes ``m`` per sample, which is what the
  source computes at batch size 1 (its batched evaluation takes one maximum over the
  whole batch). Deploys as one ``SampleMaxQuant`` op.
- Weights: :class:`MaxScaledWeightQuantizer` computes the same on the constant weight;
  deploys as a ``LutGather`` table of the distinct values.
"""

from __future__ import annotations

import torch

from .base import Quantizer

MAX_TABLE = 256  # LutGather entries at 8-bit codes


def max_scaled(x: torch.Tensor, m: torch.Tensor, top: int) -> torch.Tensor:
    """``((round(x / m * Q) / Q * m) - x) + x``; 0 where ``m == 0`` (the source divides by
    zero there and gets NaN)."""
    y = ((torch.round((x / m) * top) / top) * m - x) + x
    return torch.where(m == 0, torch.zeros_like(y), y)


def top_code(bits: int, signed: bool) -> int:
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


class _StraightThrough(torch.autograd.Function):
    """Forward ``q`` as computed, gradient straight to ``x`` (the source's estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class SampleMaxQuantizer(Quantizer):
    """Activation: each sample scaled by its own maximum, ``Q`` from ``bits`` / ``signed``."""

    def __init__(self, bits: int, signed: bool | None = None) -> None:
        if signed is None:
            raise ValueError("the sample-max quantizer needs an explicit sign (its Q)")
        super().__init__(bits, signed)

    @property
    def top_code(self) -> int:
        return top_code(self.bits, self.signed)

    def init_from(self, x: torch.Tensor) -> None:
        """Nothing to learn."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.numel() == 0:
            return x
        flat = x.detach().reshape(x.shape[0], -1)
        m = flat.amax(dim=1, keepdim=True)
        q = max_scaled(flat, m, self.top_code).reshape(x.shape)
        return _StraightThrough.apply(x, q)

    def levels(self) -> torch.Tensor:
        raise NotImplementedError("a sample-max quantizer's levels depend on each sample")


class MaxScaledWeightQuantizer(Quantizer):
    """Weight: ``m = max(W)`` over the whole tensor, ``Q = 2^(b-1) - 1``, no clamp."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits, signed=True, is_weight=True)

    @property
    def top_code(self) -> int:
        return top_code(self.bits, True)

    def init_from(self, w: torch.Tensor) -> None:
        """Nothing to learn."""

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        q = max_scaled(w.detach(), w.detach().max(), self.top_code)
        return _StraightThrough.apply(w, q)

    def _values(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return max_scaled(w.detach(), w.detach().max(), self.top_code)

    def levels(self, w: torch.Tensor) -> torch.Tensor:
        """The distinct values, ascending: ``[L]``, or ``[C, L]`` (rows padded with their
        last value) when the tensor has more than 256; ValueError when a row has more."""
        values = self._values(w)
        table = torch.unique(values)
        if table.numel() <= MAX_TABLE:
            return table
        rows = [torch.unique(r) for r in values.reshape(values.shape[0], -1)]
        width = max(r.numel() for r in rows)
        if width > MAX_TABLE:
            raise ValueError(f"max-scaled weight has {width} distinct values in one row; "
                             f"8-bit codes hold {MAX_TABLE}")
        return torch.stack([torch.cat([r, r[-1:].expand(width - r.numel())]) for r in rows])

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """Index of each weight's value in :meth:`levels` (in its row's table if 2-D)."""
        values, table = self._values(w), self.levels(w)
        if table.dim() == 1:
            return torch.searchsorted(table, values.reshape(-1)).reshape(values.shape)
        flat = values.reshape(values.shape[0], -1).contiguous()
        return torch.searchsorted(table.contiguous(), flat).reshape(values.shape)
