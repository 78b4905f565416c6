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
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Raw samples [N, C, H, W] (or [N, features]) -> model inputs of ``shape`` per sample.

    Images whose H, W differ from ``shape`` are resized bilinearly
    (align_corners=False); then ``(x - mean) / std`` per channel. With ``vocab_size``
    (token-id models) the samples are ids: int64, checked to lie in [0, vocab_size).
    """
    if vocab_size is not None:
        return token_ids(images, vocab_size)
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if len(shape) == 3 and x.dim() == 4 and tuple(x.shape[2:]) != tuple(shape[1:]):
        x = F.interpolate(x, size=tuple(shape[1:]), mode="bilinear", align_corners=False)
    if mean:
        view = (1, -1) + (1,) * (x.dim() - 2)
        x = (x - torch.tensor(mean, dtype=torch.float32).view(view)) / torch.tensor(
            std, dtype=torch.float32).view(view)
    return x.contiguous()


def token_ids(samples: np.ndarray | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Integer-valued samples as int64 ids; a one-line error for anything else."""
    from .errors import QConvertError

    ids = np.asarray(samples)
    if ids.dtype.kind == "f" and not np.array_equal(ids, np.round(ids)):
        raise QConvertError("the model takes token ids, the data holds fractional values; "
                            "give integer ids")
    if ids.dtype.kind not in "fiu":
        raise QConvertError(f"token ids have dtype {ids.dtype}; give integer ids")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise QConvertError(f"token ids span {ids.min():g}..{ids.max():g}, the model's "
                            f"vocabulary is 0..{vocab_size - 1}; give ids in range")
    return torch.as_tensor(ids.astype(np.int64))
