"""Input preprocessing from a checkpoint's input spec, the one path training and
validation share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def prepare_inputs(
    images: np.ndarray | torch.Tensor,
    shape: Sequence[int],
    mean: Sequence[float] = (),
    std: Sequence[float] = (),
) -> torch.Tensor:
    """Raw samples [N, C, H, W] (or [N, features]) -> model inputs of ``shape`` per sample.

    Images whose H, W differ from ``shape`` are resized bilinearly
    (align_corners=False); then ``(x - mean) / std`` per channel.
    """
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if len(shape) == 3 and x.dim() == 4 and tuple(x.shape[2:]) != tuple(shape[1:]):
        x = F.interpolate(x, size=tuple(shape[1:]), mode="bilinear", align_corners=False)
    if mean:
        view = (1, -1) + (1,) * (x.dim() - 2)
        x = (x - torch.tensor(mean, dtype=torch.float32).view(view)) / torch.tensor(
            std, dtype=torch.float32).view(view)
    return x.contiguous()
