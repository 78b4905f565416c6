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

    def shift_codes(self, index: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Pow2Shift codes (sign << (bits - 1) | m) for :meth:`encode` indices, and their width."""
        signed_code = index - self.top_code  # in [-M, M]
        return (signed_code < 0).long() << (self.bits - 1) | signed_code.abs(), self.bits

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


class WidePowerQuantizer(PowerQuantizer):
    """POT / POST weights with 2^b + 1 levels, the set of the public ASQ/POST code.

    Zero and K = 2^(b-1) magnitudes ``base^0 .. base^-(K-1)``, each with both signs:
    one level more than b bits hold, so the deploy form stores Pow2Shift codes at
    b + 1 bits (magnitude code ``m = k + K - 1`` for magnitude index k >= 1, whose
    exponent ``2^b - 1 - m = K - k`` is the same). The level is the nearest to
    ``clamp(w_hat / alpha, -1, 1)`` by exact distance; a tie goes to the level with
    the lower ``tie_rank`` (one rank per signed level, ascending; by default the
    smaller magnitude wins). Importers set the ranks to reproduce a source's tie order.
    """

    def __init__(self, bits: int, root: int, channels: int = 0, normalize: bool = False) -> None:
        if not isinstance(bits, int) or not 2 <= bits <= 7:
            raise ValueError(f"bit width {bits!r} is outside 2..7 (2^b + 1 levels need b + 1 "
                             "<= 8 code bits)")
        super().__init__(bits, root, channels, normalize)
        table = magnitude_table(bits + 1, root)[: self.top_code]
        self.magnitudes = torch.cat([torch.zeros(1), table.flip(0)])
        ranks = torch.arange(-self.top_code, self.top_code + 1).abs()
        self.register_buffer("tie_rank", ranks)

    @property
    def top_code(self) -> int:
        return 2 ** (self.bits - 1)

    @property
    def code_bits(self) -> int:
        return self.bits + 1

    def _unit_levels(self) -> torch.Tensor:
        return torch.cat([-self.magnitudes.flip(0)[:-1], self.magnitudes])

    def _nearest_index(self, v: torch.Tensor) -> torch.Tensor:
        """Index into the signed unit levels; distances to both neighbours are exact in
        float32 (adjacent levels are within a factor 2), so only true ties need the ranks."""
        levels = self._unit_levels()
        upper = torch.searchsorted(levels, v.contiguous()).clamp(1, levels.numel() - 1)
        lower = upper - 1
        d_lower, d_upper = v - levels[lower], levels[upper] - v
        ranks = self.tie_rank.to(upper.device)
        prefer_lower = (d_lower < d_upper) | ((d_lower == d_upper) & (ranks[lower] < ranks[upper]))
        return torch.where(prefer_lower, lower, upper)

    def _unit_values(self, w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self._normalized(w) / self._alpha_view(alpha, w), -1, 1)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        scale = lsq_grad_scale(self.grad_numel(w), self.top_code)
        alpha = grad_scale(self.alpha, scale)
        v = self._unit_values(w, alpha)
        v_const = v.detach()
        q = self._unit_levels()[self._nearest_index(v_const.nan_to_num(0.0))] + (v - v_const)
        return self._alpha_view(alpha, w) * q

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """Index of each weight's value in :meth:`levels` (0 .. 2K)."""
        with torch.no_grad():
            return self._nearest_index(self._unit_values(w.detach(), self.alpha.detach()))

    def shift_codes(self, index: torch.Tensor) -> tuple[torch.Tensor, int]:
        k = index - self.top_code  # signed magnitude index in [-K, K]
        m = torch.where(k != 0, k.abs() + self.top_code - 1, torch.zeros_like(k))
        return (k < 0).long() << self.bits | m, self.code_bits
