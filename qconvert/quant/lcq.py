"""LCQ: learnable companding quantization (Yamamoto, CVPR 2021).

A learned piecewise-linear compressor ``f`` on [0, 1] (K uniform intervals,
slopes ``K * softmax(theta)``) maps the clipped input to a domain where it is
rounded uniformly; the expander ``f^-1`` maps the codes back. The output levels
``alpha * f^-1(j / S)`` form the level table.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer, abs_quantile, grad_scale, limited_normalization, round_ste


def compressor(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-interval slopes ``g_k = K t_k`` and offsets ``B_k = sum_{j<k} t_j``.

    ``t = softmax(theta)``.
    """
    t = torch.softmax(theta, dim=0)
    offsets = torch.cat([t.new_zeros(1), torch.cumsum(t, dim=0)[:-1]])
    return t * theta.numel(), offsets


def interval_starts(intervals: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``d_k = k / K`` (float32 unless asked), computed by division as the op specification
    does."""
    return torch.arange(intervals, dtype=dtype) / intervals


def compress(v: torch.Tensor, slopes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``f(v) = g_k (v - d_k) + B_k`` with ``k = min(floor(v K), K - 1)``, for v in [0, 1]."""
    intervals = slopes.numel()
    k = torch.floor(v * intervals).nan_to_num(0).long().clamp(0, intervals - 1)
    d = interval_starts(intervals, v.dtype).to(v.device)
    return slopes[k] * (v - d[k]) + offsets[k]


def expand(u: torch.Tensor, slopes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``f^-1(u) = d_k + (u - B_k) / g_k`` on the interval k whose image holds u."""
    intervals = slopes.numel()
    below = torch.searchsorted(offsets.detach(), u.detach().contiguous(), right=True)
    k = (below - 1).clamp(0, intervals - 1)
    d = interval_starts(intervals, u.dtype).to(u.device)
    return d[k] + (u - offsets[k]) / slopes[k]


class LCQQuantizer(Quantizer):
    """Companding quantizer; for weights with Limited Weight Normalization.

    Signed (weights): ``y = sign(x) alpha f^-1(round(S f(min(|x|/alpha, 1))) / S)``,
    S = 2^(b-1) - 1. Unsigned: v = clamp(x / alpha, 0, 1), S = 2^b - 1.
    Weights use ``W_q = sigma * Q((W - mu) / sigma)`` (the mean is not added back).

    Two options reproduce the public LCQ re-implementation (imported checkpoints):
    ``mirror`` (unsigned activations only) quantizes ``|x|`` on the unsigned levels and
    restores the sign; ``clip_exact`` outputs exactly ``+-alpha`` where ``|x| >= alpha``
    (``x >= alpha`` unsigned) instead of the top level ``alpha f^-1(1)``, which can
    differ from alpha in the last bits.
    """

    def __init__(
        self,
        bits: int,
        signed: bool | None = None,
        is_weight: bool = False,
        intervals: int = 16,
        normalize: bool = True,
        mirror: bool = False,
        clip_exact: bool = False,
    ) -> None:
        super().__init__(bits, signed, is_weight)
        if intervals < 1:
            raise ValueError(f"LCQ needs at least one interval, got {intervals}")
        if mirror and (is_weight or signed is not False):
            raise ValueError("LCQ mirror applies to unsigned activation quantizers only")
        self.normalize = normalize and is_weight
        self.mirror = mirror
        self.clip_exact = clip_exact
        self.alpha = nn.Parameter(torch.ones(1))
        self.theta = nn.Parameter(torch.zeros(intervals))

    @property
    def top_code(self) -> int:
        """S: the largest code (codes run 0..S in magnitude)."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def init_from(self, x: torch.Tensor) -> None:
        x, _ = limited_normalization(x, self.normalize)
        data = x if self.signed else x.clamp_min(0)
        self.alpha.copy_(abs_quantile(data, 0.99).clamp_min(1e-6).reshape(1))

    @property
    def symmetric(self) -> bool:
        """Levels of |x| times sign(x): signed, or mirrored unsigned."""
        return self.signed or self.mirror

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        x_hat, sigma = limited_normalization(x, self.normalize)
        # The reference scales alpha/theta gradients by sqrt(S / N).
        scale = (self.top_code / self.grad_numel(x)) ** 0.5
        alpha = grad_scale(self.alpha, scale)
        slopes, offsets = compressor(grad_scale(self.theta, scale))
        magnitude = x_hat.abs() if self.symmetric else x_hat
        if self.signed:
            v = torch.clamp(magnitude / alpha, max=1)
        else:
            v = torch.clamp(magnitude / alpha, 0, 1)
        v_const = v.detach()
        codes = torch.clamp(round_ste(compress(v_const, slopes, offsets) * self.top_code),
                            0, self.top_code)
        # STE for the input; adding (v - v_const), which is exactly 0, gives alpha its -v term.
        q = expand(codes / self.top_code, slopes, offsets) + (v - v_const)
        y = alpha * q
        if self.clip_exact:
            y = torch.where(magnitude.detach() >= alpha.detach(), alpha, y)
        if self.symmetric:
            y = y * torch.sign(x_hat)
        return y if sigma is None else sigma * y

    def compressor_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slopes, offsets) exactly as the forward pass computes them."""
        with torch.no_grad():
            return compressor(self.theta.detach())

    def magnitude_levels(self) -> torch.Tensor:
        """``alpha * f^-1(j / S)`` for j = 0..S: the expander table the CompandQuant op reads."""
        slopes, offsets = self.compressor_tables()
        j = torch.arange(self.top_code + 1, dtype=torch.float32)
        with torch.no_grad():
            return self.alpha.detach() * expand(j / self.top_code, slopes, offsets)

    def weight_sigma(self, w: torch.Tensor) -> torch.Tensor | None:
        return limited_normalization(w.detach(), self.normalize)[1]

    def _clip_is_extra_level(self) -> bool:
        """With ``clip_exact``, alpha is a value of its own unless the top level equals it."""
        return self.clip_exact and bool(self.magnitude_levels()[-1] != self.alpha.detach()[0])

    def levels(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """Output values, ascending (with an extra clip level, +-alpha sit at the ends).
        Weights need ``w`` for sigma: ``sigma * (+-mag)``."""
        mags = self.magnitude_levels()
        if self._clip_is_extra_level():
            mags = torch.cat([mags, self.alpha.detach().reshape(1)])
        if not self.signed:
            return mags
        signed = torch.cat([-mags.flip(0)[:-1], mags])
        if self.normalize:
            if w is None:
                raise ValueError("a normalised LCQ weight quantizer needs the weight "
                                 "for its levels")
            signed = self.weight_sigma(w) * signed
        return signed

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """Index of each weight's value in :meth:`levels` (code j in [-S, S] -> j + S)."""
        with torch.no_grad():
            x_hat, _ = limited_normalization(w.detach(), self.normalize)
            slopes, offsets = self.compressor_tables()
            v = torch.clamp(x_hat.abs() / self.alpha, max=1)
            codes = torch.clamp(torch.round(compress(v, slopes, offsets) * self.top_code),
                                0, self.top_code)
            top = self.top_code
            if self._clip_is_extra_level():  # the clip level +-alpha: codes +-(S + 1)
                top += 1
                codes = torch.where(x_hat.abs() >= self.alpha, top, codes)
            return (torch.sign(x_hat) * codes).long() + top
