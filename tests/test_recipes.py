"""The training recipes (models/train.py) and the checkpoints they shipped."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from qconvert import load_checkpoint

pytest.importorskip("sklearn")

from models.data import CALIB_PATH, load_calib, load_split  # noqa: E402
from models.train import (  # noqa: E402
    ARCH_KWARGS,
    ARCHS,
    CHECKPOINT_DIR,
    RECIPES,
    Schedule,
    checkpoint_name,
    count_correct,
    float_checkpoint_name,
    shift_augment,
    train_recipe,
)

SHIPPED = sorted(CHECKPOINT_DIR.glob("*.pt"))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Shared by the smoke tests, so the tiny float model is pretrained once."""
    return tmp_path_factory.mktemp("recipes")


@pytest.fixture(scope="module")
def small_split():
    """400 training images (enough to beat chance after one epoch), the full test split."""
    split = load_split()
    return replace(split, x_train=split.x_train[:400], y_train=split.y_train[:400])


def test_split_is_fixed_stratified_and_raw():
    split = load_split()
    assert split.x_train.shape == (1437, 1, 8, 8) and split.x_test.shape == (360, 1, 8, 8)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int64
    assert split.x_train.min() >= 0.0 and split.x_train.max() <= 1.0
    assert np.bincount(split.y_test).min() >= 35  # stratified: 35-37 of each digit
    again = load_split()
    assert np.array_equal(split.x_test, again.x_test) and np.array_equal(split.y_test, again.y_test)


def test_shift_augment_moves_at_most_one_pixel():
    x = torch.zeros(16, 1, 8, 8)
    x[:, 0, 4, 4] = 1.0
    out = shift_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    rows, cols = torch.nonzero(out[:, 0], as_tuple=True)[1:]
    assert ((rows - 4).abs() <= 1).all() and ((cols - 4).abs() <= 1).all()


@pytest.mark.parametrize("scheme,bits", [("lcq", 4), ("asq-post", 4)])
def test_recipe_smoke(workdir: Path, small_split, scheme: str, bits: int, one_thread):
    path = train_recipe("digits_cnn", scheme, bits, bits, split=small_split, out_dir=workdir,
                        pretrain=Schedule(6, 1e-2, batch_size=32),
                        finetune=Schedule(1, 5e-4, batch_size=32))
    assert path.name == checkpoint_name("digits_cnn", scheme, bits, bits)
    ckpt = load_checkpoint(path)
    assert ckpt.scheme == scheme and ckpt.arch_kwargs == ARCH_KWARGS
    assert ckpt.input.shape == ARCHS["digits_cnn"].input_shape
    assert ckpt.input.mean == small_split.mean and ckpt.input.std == small_split.std
    correct = count_correct(ckpt.model, small_split.x_test, small_split.y_test, ckpt.input.shape,
                            ckpt.input.mean, ckpt.input.std)
    assert correct / len(small_split.y_test) > 0.3  # chance is 0.1
    assert correct == ckpt.training["test_correct"]
    assert load_checkpoint(workdir / float_checkpoint_name("digits_cnn")).scheme == "float"


def test_every_recipe_is_shipped():
    missing = [checkpoint_name(*r) for r in RECIPES if not (CHECKPOINT_DIR / checkpoint_name(*r))
               .is_file()]
    assert not missing
    assert CALIB_PATH.is_file()


def test_calibration_file_is_the_raw_test_split():
    x, y = load_calib()
    split = load_split()
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (360, 1, 8, 8)
    assert np.array_equal(x, split.x_test) and np.array_equal(y, split.y_test)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_checkpoint_reaches_its_recorded_accuracy(path: Path, one_thread):
    ckpt = load_checkpoint(path)
    x, y = load_calib()
    correct = count_correct(ckpt.model, x, y, ckpt.input.shape, ckpt.input.mean, ckpt.input.std)
    record = ckpt.training
    assert record["test_samples"] == len(y)
    assert abs(correct - record["test_correct"]) <= 1
    if ckpt.scheme != "float":
        # The project's bar: every QAT model within 2 points of its float model.
        assert record["qat_acc"] >= record["float_acc"] - 2.0
