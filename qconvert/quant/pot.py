"""POT / POST weights: power-of-two and power-of-sqrt(2) levels under a strict b-bit budget.

One sign bit and M = 2^(b-1) - 1 magnitude codes plus zero: code m >= 1 means
``base^-(M - m)``, so the largest magnitude is 1 and the smallest ``base^-(M-1)``.
(The public ASQ/POST code has 2^b + 1 levels, one too many for b bits; qconvert
keeps the strict budget.)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .base import Quantizer, abs_quantile, grad_scale, lsq_grad_scale

SQRT_HALF = np.float32(math.sqrt(0.5))


def magnitude_table(bits: int, root: int, dtype: type = np.float32) -> torch.Tensor:
    """``mag[e]`` for exponents e = 0..M-1: 2^-e (root 1) or 2^-(e//2) * (e odd ? sqrt(1/2) : 1).

    Built by exact power-of-two scaling of float32 constants, as the native
    kernel does with a shift, so every implementation gets the same bits.
    """
    if root not in (1, 2):
        raise ValueError(f"root must be 1 (base 2) or 2 (base sqrt 2), got {root}")
    top = 2 ** (bits - 1) - 1
    e = np.arange(top)
    if root == 1:
        mags = np.ldexp(dtype(1), -e)
    else:  # float64 (the validation referee): sqrt(1/2) to double precision
        mags = np.ldexp(np.where(e % 2 == 1, dtype(math.sqrt(0.5)), dtype(1)), -(e // 2))
    return torch.from_numpy(mags.astype(dtype))


def magnitude_levels(bits: int, root: int, dtype: type = np.float32) -> torch.Tensor:
    """Magnitude by code m = 0..M, ascending: 0, base^-(M-1), ..., 1."""
    table = magnitude_table(bits, root, dtype)
    return torch.cat([torch.zeros(1, dtype=table.dtype), table.flip(0)])


def nearest_code(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest ascending level; ties go to the even index (half-to-even)."""
    mids = (levels[:-1] + levels[1:]) / 2
    below = torch.searchsorted(mids, v.contiguous())  # midpoints strictly below v
    tie = below < mids.numel()
    tie = tie & (v == mids[below.clamp(max=mids.numel() - 1)])
    return torch.where(tie & (below % 2 == 1), below + 1, below)


class PowerQuantizer(Quantizer):
    """``W_q = alpha * sign(w_hat) * nearest_level(min(|w_hat| / alpha, 1))``.

    ``root`` 1 gives POT (base 2), 2 gives POST (base sqrt 2). ``w_hat`` is the
    weight, or ``(w - mu) / sigma`` with ``normalize``. ``channels`` > 0 makes
    alpha per output channel.
    """

    def __init__(self, bits: int, root: int, channels: int = 0, normalize: bool = False) -> None:
        super().__init__(bits, signed=True, is_weight=True)
        self.root = root
        self.channels = channels
        self.normalize = normalize
        self.alpha = nn.Parameter(torch.ones(channels if channels else 1))
        self.register_buffer("magnitudes", magnitude_levels(bits, root), persistent=False)

    @property
    def top_code(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def _normalized(self, w: torch.Tensor) -> torch.Tensor:
        return (w - w.mean()) / w.std() if self.normalize else w

    def _alpha_view(self, alpha: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return alpha.view(-1, *([1] * (w.dim() - 1))) if self.channels else alpha

    def init_from(self, w: torch.Tensor) -> None:
        if self.normalize:
            self.alpha.fill_(3.0)
        elif self.channels:
            self.alpha.copy_(abs_quantile(w, 0.99, dim=0).clamp_min(1e-8))
        else:
            self.alpha.copy_(abs_quantile(w, 0.99).clamp_min(1e-8).reshape(1))

    def _magnitude_codes(self, v: torch.Tensor) -> torch.Tensor:
        return nearest_code(v.detach().nan_to_num(0.0), self.magnitudes)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        w_hat = self._normalized(w)
        scale = lsq_grad_scale(self.grad_numel(w), self.top_code)
        alpha = self._alpha_view(grad_scale(self.alpha, scale), w)
        v = torch.clamp(w_hat.abs() / alpha, max=1)
        v_const = v.detach()
        # STE for the weight; adding (v - v_const), exactly 0, gives alpha its -v term.
        q = self.magnitudes[self._magnitude_codes(v_const)] + (v - v_const)
        return alpha * q * torch.sign(w_hat)

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """Index of each weight's value in :meth:`levels`: signed code m*sign + M."""
        with torch.no_grad():
            w_hat = self._normalized(w.detach())
            v = torch.clamp(w_hat.abs() / self._alpha_view(self.alpha.detach(), w), max=1)
            return (torch.sign(w_hat) * self._magnitude_codes(v)).long() + self.top_code

    def levels(self) -> torch.Tensor:
        """Ascending values ``alpha * (+-magnitude)``: [2M + 1], or [C, 2M + 1] per channel."""
        alpha = self.alpha.detach()
        positive = (alpha.view(-1, 1) if self.channels else alpha) * self.magnitudes
        return torch.cat([-positive.flip(-1)[..., :-1], positive], dim=-1)
