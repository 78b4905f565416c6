"""Example architectures sized for CPU, and the registry checkpoints name them by."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

from torch import nn

from .dense import conv_autoencoder, lraspp_mobilenetv3_small
from .digits_cnn import DigitsCNN
from .mobilenetv2 import mobilenetv2_small
from .pytorchcv import mobilenetv2, preresnet18, preresnet20_cifar, preresnet34, preresnet56_cifar
from .resnet import resnet18, resnet20, resnet50
from .retinanet import retinanet_resnet18_fpn
from .tv_resnet import tv_resnet18, tv_resnet34

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "resnet20": resnet20,
    "mobilenetv2_small": mobilenetv2_small,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "tv_resnet18": tv_resnet18,  # torchvision layout, for imported checkpoints
    "tv_resnet34": tv_resnet34,
    "lraspp_mobilenetv3_small": lraspp_mobilenetv3_small,  # segmentation, [N, classes, H, W]
    "conv_autoencoder": conv_autoencoder,  # reconstruction, [N, C, H, W]
    "retinanet_resnet18_fpn": retinanet_resnet18_fpn,  # detector network part, per level
    # pytorchcv layouts, for checkpoints of the public LCQ re-implementation
    "pytorchcv_preresnet20_cifar": preresnet20_cifar,
    "pytorchcv_preresnet56_cifar": preresnet56_cifar,
    "pytorchcv_preresnet18": preresnet18,
    "pytorchcv_preresnet34": preresnet34,
    "pytorchcv_mobilenetv2": mobilenetv2,
}


def resolve_builder(name: str) -> Callable[..., nn.Module]:
    """A built-in name, or ``module:callable`` (imports user code)."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(
            f"unknown architecture {name!r}: use one of {', '.join(ARCHITECTURES)} "
            "or a 'module:callable' import path"
        )
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # user code may raise anything while importing
        raise ValueError(f"architecture import path {name!r} does not import: {exc}") from exc
    if not callable(builder):
        raise ValueError(f"architecture import path {name!r} is not callable")
    return builder


def build_architecture(name: str, kwargs: Mapping | None = None) -> nn.Module:
    return resolve_builder(name)(**dict(kwargs or {}))


__all__ = ["ARCHITECTURES", "DigitsCNN", "build_architecture", "mobilenetv2_small", "resnet18",
           "resnet20", "resnet50"]
