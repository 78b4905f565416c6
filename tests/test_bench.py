"""``qconvert bench``'s integer rows: the integer file (b' = 8) as a plain load, and the
same integer model with its convolutions as QConvClamp (``--conv-kernel qconvert``) when
the model admits it, else a note saying why. Small models, few samples, one timing round:
what is checked is which rows exist and what they compute, not their speed."""

from __future__ import annotations

from pathlib import Path

import pytest

import qconvert
from qconvert.bench import INTEGER, PLAIN, QCONV_CLAMP, run_bench
from qconvert.calib import synthetic
from qconvert.native import library_path

CHECKPOINTS = Path(__file__).resolve().parent.parent / "models" / "checkpoints"

pytestmark = pytest.mark.skipif(library_path() is None, reason="native library not built")


def _bench(name: str):
    path = CHECKPOINTS / name
    if not path.is_file():
        pytest.skip(f"no shipped {name}")
    ckpt = qconvert.load_checkpoint(path)
    return run_bench(ckpt, synthetic(16, ckpt.input.shape), rounds=1, batches=(1,),
                     log=lambda _: None)


def test_qconv_clamp_row_beside_the_integer_row():
    result = _bench("digits_cnn-lsq-w4a4.pt")
    rows = {c["name"]: c for c in result.candidates}
    names = list(rows)
    assert names.index(INTEGER) + 1 == names.index(QCONV_CLAMP) and PLAIN in rows
    assert not result.notes
    # the same codes as the standard integer file (bit for bit: test_integer_conv_kernel.py)
    assert rows[QCONV_CLAMP]["top1_agreement"] == rows[INTEGER]["top1_agreement"]
    assert set(rows[QCONV_CLAMP]["latency_ms"]) == {1}
    assert rows[QCONV_CLAMP]["file_bytes"] > 0


def test_note_instead_of_the_row_for_a_refused_model():
    """ASQ: integer mode rewrites it, QConvClamp cannot (its per-sample step)."""
    result = _bench("digits_cnn-asq-lsq-w2a2.pt")
    names = [c["name"] for c in result.candidates]
    assert INTEGER in names and QCONV_CLAMP not in names
    assert len(result.notes) == 1
    assert result.notes[0].startswith("no row for --conv-kernel qconvert: layer ")
    assert "ASQ's per-sample activation step" in result.notes[0]
