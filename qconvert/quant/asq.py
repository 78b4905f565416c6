"""ASQ: adaptive step size for activations (Zhou et al., arXiv 2504.17263).

A tiny adapter turns the quantizer's own input into a per-sample factor beta;
the effective step is ``s * beta``, used both to quantize and to dequantize.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer, grad_scale, lsq_grad_scale, round_ste

BETA_FLOOR = 1e-8


class StepAdapter(nn.Module):
    """Pool -> Linear(C, C//4) -> ReLU -> Linear(C//4, 1) -> ReLU: one factor per sample.

    The pooling averages every axis except the batch axis (0) and the feature axis, for
    any input rank, leaving [N, C]: the feature axis is 1 for a convolution's input
    ([N, C, L] or [N, C, H, W]) and the last one for a linear layer's ([N, C] or token
    sequences [N, T, C]). ASQ's adapter reads "the activations"; for a token sequence
    that is the mean token, as for an image it is the mean pixel. Dimension 0 is the
    sample: sequence-first layouts ([T, N, C]) get one factor per position instead.
    For C < 8 a single Linear(C, 1) -> ReLU.
    """

    def __init__(self, channels: int, feature_axis: int = 1) -> None:
        super().__init__()
        if feature_axis not in (1, -1):
            raise ValueError(f"feature_axis must be 1 (convolution) or -1 (linear), "
                             f"got {feature_axis}")
        self.feature_axis = feature_axis
        if channels >= 8:
            hidden = channels // 4
            self.net = nn.Sequential(
                nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.ReLU()
            )
        else:
            self.net = nn.Sequential(nn.Linear(channels, 1), nn.ReLU())
        last = self.net[-2]
        nn.init.normal_(last.weight, 0.0, 0.01)
        nn.init.constant_(last.bias, 1.0)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C]: the mean over every axis but the batch and the feature axis."""
        if x.dim() <= 2:
            return x
        if self.feature_axis == 1:
            return x.mean(dim=tuple(range(2, x.dim())))
        return x.mean(dim=tuple(range(1, x.dim() - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(x)
        return torch.clamp(self.net(pooled), min=BETA_FLOOR).reshape(-1)


class ASQQuantizer(Quantizer):
    """``s_a = s * beta(x)``; ``y = clamp(round(x / s_a), lo, hi) * s_a`` per sample.

    ``feature_axis``: 1 for a convolution's input, -1 for a linear layer's (see
    :class:`StepAdapter` for how the adapter pools each).
    """

    def __init__(self, bits: int, channels: int, signed: bool | None = None,
                 feature_axis: int = 1) -> None:
        super().__init__(bits, signed, is_weight=False)
        self.step = nn.Parameter(torch.ones(1))
        self.adapter = StepAdapter(channels, feature_axis)

    def init_from(self, x: torch.Tensor) -> None:
        qp = max(self.code_range[1], 1)
        self.step.copy_((2 * x.abs().mean() / qp**0.5).clamp_min(1e-8).reshape(1))

    def beta(self, x: torch.Tensor) -> torch.Tensor:
        """One factor per sample, shape [N]."""
        return self.adapter(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.code_range
        step = grad_scale(self.step, lsq_grad_scale(self.grad_numel(x), hi))
        return self.quantize_with(x, step, self.beta(x))

    def quantize_with(self, x: torch.Tensor, step: torch.Tensor,
                      beta: torch.Tensor) -> torch.Tensor:
        lo, hi = self.code_range
        s_a = (step * beta).view(-1, *([1] * (x.dim() - 1)))
        return round_ste(torch.clamp(x / s_a, lo, hi)) * s_a  # clamp first: see LSQQuantizer

    def levels(self) -> torch.Tensor:
        """Levels at beta = 1 (``s * k``); sample n's levels are these with step ``s * beta_n``."""
        lo, hi = self.code_range
        return self.step.detach() * torch.arange(lo, hi + 1, dtype=torch.float32)
