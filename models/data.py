"""The digits split every recipe trains and evaluates on.

scikit-learn's bundled 8x8 digits (1,797 images, pixel values 0..16), split
once with a fixed seed, stratified 80/20. Images are raw pixels / 16 in
[0, 1], shape [N, 1, 8, 8]; resizing and normalization happen later, in
``qconvert.preprocess.prepare_inputs``, from each checkpoint's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLIT_SEED = 0
TEST_FRACTION = 0.2
CALIB_PATH = Path(__file__).resolve().parent / "data" / "digits_calib.npz"


@dataclass(frozen=True)
class DigitsSplit:
    x_train: np.ndarray  # float32 [N, 1, 8, 8] in [0, 1]
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def mean(self) -> tuple[float]:
        """Per-channel mean of the train split (one channel)."""
        return (float(self.x_train.mean(dtype=np.float64)),)

    @property
    def std(self) -> tuple[float]:
        return (float(self.x_train.std(dtype=np.float64)),)


def load_split(seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> DigitsSplit:
    """The fixed, stratified train/test split of scikit-learn's digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0))[:, None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return DigitsSplit(x_train, y_train, x_test, y_test)


def save_calib(split: DigitsSplit, path: Path = CALIB_PATH) -> Path:
    """Write the held-out split as ``x`` (raw / 16, not normalized or resized) and ``y``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=split.x_test.astype(np.float32), y=split.y_test.astype(np.int64))
    return path


def load_calib(path: Path = CALIB_PATH) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["x"], data["y"]
