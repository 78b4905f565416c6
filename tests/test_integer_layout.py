"""Integer files' float islands under ONNX Runtime's layout pass: LCQ's CompandQuant
written between transposes to channels-last and back, so that ORT cancels the transposes it
puts around its NHWC QLinearConvs.

Expectations: the LSQ twin of the same network (islands of standard ops only), whose
optimized graph ORT already leaves with no transposes but the input's and the output's;
and the file with the islands unwrapped, whose outputs must not change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qconvert
from qconvert import manifest
from qconvert.calib import load_calibration
from qconvert.export.integer import to_integer, with_qconv_clamp
from qconvert.export.integer.layout import channels_first_islands
from qconvert.export.onnx_export import build_onnx
from qconvert.graph import annotate_custom_op_shapes
from qconvert.native import library_path, register
from qconvert.preprocess import prepare_inputs

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "models" / "checkpoints"
CALIB = ROOT / "models" / "data" / "digits_calib.npz"

pytestmark = pytest.mark.skipif(library_path() is None, reason="native library not built")


def _integer(name: str) -> tuple[np.ndarray, onnx.ModelProto]:
    path = CHECKPOINTS / name
    if not path.is_file():
        pytest.skip(f"no shipped {name}")
    ckpt = qconvert.load_checkpoint(path)
    data = load_calibration(CALIB, ckpt.input.shape)
    x = prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean, ckpt.input.std).numpy()
    exact, _ = build_onnx(ckpt)
    return x, to_integer(exact, 8, calib=x)


def plain_session(model: onnx.ModelProto, tmp_path: Path, library: bool = True):
    """A plain session on the file as the export writes it (custom ops' output shapes
    recorded), and the node types of its optimized graph (ORT_ENABLE_ALL)."""
    written = onnx.ModelProto()
    written.CopyFrom(model)
    annotate_custom_op_shapes(written)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    if library:
        register(options)
    sess = ort.InferenceSession(written.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    return sess, [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def _run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {manifest.INPUT_NAME: x})[0]


def test_lcq_islands_leave_no_transposes_beside_them(tmp_path):
    x, lcq = _integer("resnet20-lcq-w4a4.pt")
    _, lsq = _integer("resnet20-lsq-w4a4.pt")
    islands = sum(n.op_type == "CompandQuant" for n in lcq.graph.node)
    wrapped = [n for n in lcq.graph.node if n.op_type == "Transpose"]
    assert islands == 20 and len(wrapped) == 2 * islands
    sess, ops = plain_session(lcq, tmp_path)
    assert ops.count("CompandQuant") == islands
    assert ops.count("Transpose") == plain_session(lsq, tmp_path)[1].count("Transpose") == 2
    unwrapped = onnx.ModelProto()
    unwrapped.CopyFrom(lcq)
    channels_first_islands(unwrapped)
    assert not any(n.op_type == "Transpose" for n in unwrapped.graph.node)
    plain, plain_ops = plain_session(unwrapped, tmp_path)
    assert plain_ops.count("Transpose") == 2 + 2 * islands  # what the wrapping saves
    want = _run(plain, x)
    np.testing.assert_array_equal(_run(sess, x), want)
    np.testing.assert_array_equal(_run(plain_session(lcq, tmp_path, library=False)[0], x), want)


def test_qconv_clamp_files_keep_islands_channels_first(tmp_path):
    """Beside QConvClamp the codes stay NCHW, so wrapped islands would keep their
    transposes: the rewrite unwraps them, and the outputs stay the standard file's."""
    x, lcq = _integer("digits_cnn-lcq-w4a4.pt")
    model = with_qconv_clamp(lcq)
    assert any(n.op_type == "Transpose" for n in lcq.graph.node)
    assert not any(n.op_type == "Transpose" for n in model.graph.node)
    np.testing.assert_array_equal(_run(plain_session(model, tmp_path)[0], x),
                                  _run(plain_session(lcq, tmp_path)[0], x))
