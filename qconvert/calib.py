"""Calibration / validation data: .npz, .npy, an image folder, or synthetic samples.

Raw samples come back un-normalized; :func:`qconvert.preprocess.prepare_inputs`
resizes and normalizes them from the checkpoint's input spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import QConvertError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class CalibData:
    x: np.ndarray  # [N, ...] float32, raw scale
    y: np.ndarray | None  # [N] int64 labels, when known
    source: str


def _check(x: np.ndarray, y: np.ndarray | None, source: str, shape: tuple[int, ...],
           resize: bool = True) -> CalibData:
    if x.ndim == 0:
        raise QConvertError(f"{source}: holds a single number, not [N, ...] samples")
    if x.dtype.kind not in "fiu":
        raise QConvertError(f"{source}: samples have dtype {x.dtype}; numeric arrays are needed")
    if x.shape[0] == 0:
        raise QConvertError(f"{source}: holds no samples")
    if len(shape) == 3 and x.ndim == 3:  # [N, H, W] grayscale
        x = x[:, None]
    if x.ndim != len(shape) + 1 or (len(shape) == 3 and x.shape[1] != shape[0]):
        raise QConvertError(
            f"{source}: samples have shape {tuple(x.shape[1:])}, the model takes {tuple(shape)}; "
            "give [N, C, H, W] images with the model's channel count")
    if not resize and tuple(x.shape[1:]) != tuple(shape):
        raise QConvertError(
            f"{source}: samples have shape {tuple(x.shape[1:])}, the model takes "
            f"{tuple(shape)}; give samples of the model's shape, or pass --resize to resize "
            "them bilinearly")
    if len(shape) == 1 and x.shape[1] != shape[0]:
        raise QConvertError(f"{source}: samples have {x.shape[1]} features, the model takes "
                            f"{shape[0]}")
    if y is not None:
        y = np.asarray(y).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise QConvertError(f"{source}: {y.shape[0]} labels for {x.shape[0]} samples; "
                                "give one label per sample")
        if y.dtype.kind not in "iu":
            raise QConvertError(f"{source}: labels have dtype {y.dtype}; integer class ids needed")
        y = y.astype(np.int64)
    return CalibData(x.astype(np.float32), y, source)


def _load_array_file(path: Path, shape: tuple[int, ...], resize: bool) -> CalibData:
    # .npz members load lazily, so every read stays inside the try.
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            x, y = data, None
        else:
            with data:
                if "x" not in data.files:
                    raise QConvertError(
                        f"{path}: no array 'x' (found {', '.join(data.files) or 'none'}); "
                        "save samples as x= and optional labels as y=")
                x, y = data["x"], data["y"] if "y" in data.files else None
    except QConvertError:
        raise
    except Exception as exc:  # numpy raises ValueError, OSError, BadZipFile, EOFError, ...
        raise QConvertError(f"{path}: not a readable .npz/.npy file "
                            f"({type(exc).__name__}: {exc})") from exc
    return _check(x, y, str(path), shape, resize)


def _load_image_folder(folder: Path, shape: tuple[int, ...]) -> CalibData:
    """Images in class subfolders (labels = sorted subfolder index) or directly in ``folder``."""
    from PIL import Image, UnidentifiedImageError  # matplotlib's own dependency

    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    groups = [(i, sorted(c.iterdir())) for i, c in enumerate(classes)] or [(None,
                                                                            sorted(folder.iterdir()))]
    if len(shape) != 3:
        raise QConvertError(f"{folder}: an image folder needs a model that takes images")
    channels, height, width = shape
    images, labels = [], []
    for label, files in groups:
        for file in files:
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    img = img.convert("L" if channels == 1 else "RGB").resize((width, height),
                                                                              Image.BILINEAR)
                    array = np.asarray(img, np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as exc:
                raise QConvertError(f"{file}: unreadable image ({exc})") from exc
            images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise QConvertError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    y = None if labels[0] is None else np.array(labels)
    return _check(np.stack(images), y, str(folder), shape)


def synthetic(count: int, shape: tuple[int, ...], seed: int = 0,
              vocab_size: int | None = None) -> CalibData:
    """Uniform [0, 1) samples of the model's input shape (no labels); with ``vocab_size``,
    uniform int64 token ids in [0, vocab_size)."""
    if count < 1:
        raise QConvertError(f"--synthetic needs at least one sample, got {count}")
    rng = np.random.default_rng(seed)
    if vocab_size is not None:
        x = rng.integers(0, vocab_size, (count, *shape), dtype=np.int64)
    else:
        x = rng.random((count, *shape), dtype=np.float32)
    return CalibData(x, None, f"synthetic({count})")


def load_calibration(path: str | Path, shape: tuple[int, ...],
                     resize: bool = True) -> CalibData:
    """Samples from ``path``. Image folders are always resized to ``shape``; with
    ``resize=False`` (``qconvert validate`` without --resize) .npz/.npy samples of another
    shape are an error naming both shapes."""
    path = Path(path)
    if path.is_dir():
        return _load_image_folder(path, shape)
    if not path.is_file():
        raise QConvertError(f"{path}: no such calibration file or folder")
    if path.suffix not in (".npz", ".npy"):
        raise QConvertError(f"{path}: calibration data must be .npz, .npy or an image folder")
    return _load_array_file(path, shape, resize)
