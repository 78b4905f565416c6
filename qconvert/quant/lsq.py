"""LSQ: uniform quantizer with a learned step (Esser et al., ICLR 2020)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer, grad_scale, limited_normalization, lsq_grad_scale, round_ste


class LSQQuantizer(Quantizer):
    """``y = s * clamp(round(x / s), lo, hi)``; per tensor, or per output channel (weights).

    ``channels`` > 0 makes the step per output channel (dim 0 of a weight).
    ``normalize`` (weights): limited weight normalization as LCQ's,
    ``W_q = sigma * Q((W - mu) / sigma)``, the mean not added back.
    """

    def __init__(
        self, bits: int, signed: bool | None = None, is_weight: bool = False, channels: int = 0,
        normalize: bool = False,
    ) -> None:
        super().__init__(bits, signed, is_weight)
        if normalize and not is_weight:
            raise ValueError("LSQ weight normalization applies to weights only")
        self.channels = channels
        self.normalize = normalize
        self.step = nn.Parameter(torch.ones(channels if channels else 1))

    def _step_view(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels:
            return self.step.view(-1, *([1] * (x.dim() - 1)))
        return self.step

    def init_from(self, x: torch.Tensor) -> None:
        x, _ = limited_normalization(x, self.normalize)
        qp = max(self.code_range[1], 1)
        if self.channels:
            mean_abs = x.abs().reshape(self.channels, -1).mean(dim=1)
        else:
            mean_abs = x.abs().mean().reshape(1)
        self.step.copy_((2 * mean_abs / qp**0.5).clamp_min(1e-8))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        x, sigma = limited_normalization(x, self.normalize)
        lo, hi = self.code_range
        scale = lsq_grad_scale(self.grad_numel(x), hi)
        s = grad_scale(self._step_view(x), scale)
        # Clamp before rounding: the same values, but x within half a step beyond the
        # range gets the "outside" gradients (0 for x, lo / hi for s) as in the paper.
        y = round_ste(torch.clamp(x / s, lo, hi)) * s
        return y if sigma is None else y * sigma

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """Index of each element's value in :meth:`levels` (in its channel's row if per channel)."""
        lo, hi = self.code_range
        w, _ = limited_normalization(w.detach(), self.normalize)
        return (torch.clamp(torch.round(w / self._step_view(w).detach()), lo, hi) - lo).long()

    def levels(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """``s * k`` (a row per channel); with ``normalize``, times the weight's sigma, for
        which ``w`` is needed."""
        lo, hi = self.code_range
        k = torch.arange(lo, hi + 1, dtype=torch.float32)
        step = self.step.detach()
        table = step.view(-1, 1) * k if self.channels else step * k
        if not self.normalize:
            return table
        if w is None:
            raise ValueError("a normalised LSQ weight quantizer needs the weight for its levels")
        return table * limited_normalization(w.detach(), self.normalize)[1]
