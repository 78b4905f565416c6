"""Native-session graph rewrites: constant weight decodes folded once and the NCHWc splice
(qconvert.nchwc). Both must leave every output bit-identical to the plain native session,
and must not hide errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qconvert.checkpoint import load_checkpoint
from qconvert.export.onnx_export import build_onnx
from qconvert.native import library_path
from qconvert.nchwc import _placeholders
from qconvert.runtime import Session, fold_weight_decodes

CHECKPOINTS = Path(__file__).resolve().parent.parent / "models" / "checkpoints"
pytestmark = pytest.mark.skipif(library_path() is None, reason="native library not built")


def _shipped(name: str):
    path = CHECKPOINTS / f"{name}.pt"
    if not path.is_file():
        pytest.skip(f"{path.name} not shipped")
    return load_checkpoint(path)


def _resnet20(scheme: str):
    return _shipped(f"resnet20-{scheme}")


def _sessions(model: onnx.ModelProto) -> tuple[Session, Session]:
    return (Session(model, "native", threads=1),
            Session(model, "native", threads=1, rewrite=False))


@pytest.mark.parametrize("scheme", ["lcq-w4a4", "lsq-w4a4", "asq-lsq-w2a2"])
def test_spliced_session_is_bit_identical(scheme):
    ckpt = _resnet20(scheme)
    model, _ = build_onnx(ckpt)
    spliced, plain = _sessions(model)
    assert spliced.spliced and not plain.spliced
    _, saved = _placeholders(fold_weight_decodes(model))
    readers = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    conv_inputs = {n.output[0] for n in model.graph.node
                   if n.output[0].endswith("/act_q") and readers.get(n.output[0]) == {"Conv"}}
    assert {unit[-1].output[0] for unit in saved.values()} == conv_inputs  # all but the fc's
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.standard_normal((batch, *ckpt.input.shape)).astype(np.float32)
        np.testing.assert_array_equal(spliced.run({"input": x})[0], plain.run({"input": x})[0])
    # intermediate values asked for by name still come out in NCHW and agree too
    names = ["layers.0.conv2/act_q", "layers.3.shortcut.0/act_q"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names)
    spliced, plain = _sessions(probe)
    got, want = spliced.run({"input": x}, names), plain.run({"input": x}, names)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_every_conv_quantizer_gets_a_distinct_stand_in():
    """ResNet-20 LCQ: 20 CompandQuant and the first layer's 8-bit UniformQuant feed
    convolutions (the classifier's UniformQuant feeds a Gemm); a downsampling block
    quantizes its input twice (conv1 and the shortcut), which must not collapse into one."""
    model = fold_weight_decodes(build_onnx(_resnet20("lcq-w4a4"))[0])
    quantizers = [n for n in model.graph.node if n.op_type == "CompandQuant"]
    stand_in, saved = _placeholders(model)
    assert len(saved) == len(quantizers) + 1
    pools = [n for n in stand_in.graph.node if n.op_type == "MaxPool"]
    by_input: dict[str, list] = {}
    for pool in pools:
        by_input.setdefault(pool.input[0], []).append(
            sorted((a.name, onnx.helper.get_attribute_value(a)) for a in pool.attribute))
    shared = [v for v in by_input.values() if len(v) > 1]
    assert shared and all(len({repr(a) for a in v}) == len(v) for v in shared)
    left = {n.op_type for n in stand_in.graph.node}
    assert "CompandQuant" not in left and "UniformQuant" in left  # the classifier's stays


def test_quantizer_before_a_linear_layer_is_not_spliced():
    exact, _ = build_onnx(_shipped("digits_cnn-lcq-w4a4"))
    _, saved = _placeholders(exact)
    spliced = {unit[-1].output[0] for unit in saved.values()}
    assert "classifier/act_q" not in spliced  # a 2-D input: no NCHWc, no MaxPool stand-in
    assert {"features.0/act_q", "features.3/act_q", "features.7/act_q"} <= spliced


def test_bad_quantizer_parameters_still_fail_with_the_node_name():
    """A broken CompandQuant (levels table of the wrong size) must reach the user as the
    kernel's error, not be hidden by the splice."""
    model, _ = build_onnx(_resnet20("lcq-w4a4"))
    levels = next(i for i in model.graph.initializer if i.name == "layers.0.conv2.act.levels")
    levels.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(levels)[:-1], levels.name))
    with pytest.raises(Exception, match="layers.0.conv2|levels"):
        Session(model, "native", threads=1).run(
            {"input": np.zeros((1, 1, 16, 16), np.float32)})


def test_lsq_quantizers_are_spliced_as_uniform_quant():
    """ResNet-20 LSQ: every UniformQuant in front of a convolution runs on the blocked
    tensor; extreme inputs give the same bits as the plain session."""
    ckpt = _resnet20("lsq-w4a4")
    model = build_onnx(ckpt)[0]
    _, saved = _placeholders(model)
    assert saved and all([n.op_type for n in unit] == ["UniformQuant"] for unit in saved.values())
    x = np.random.default_rng(1).standard_normal((3, *ckpt.input.shape)).astype(np.float32)
    x.reshape(-1)[:6] = [np.nan, np.inf, -np.inf, 1e30, -1e30, 1e-45]
    fast, plain = _sessions(model)
    assert fast.spliced
    np.testing.assert_array_equal(fast.run({"input": x})[0], plain.run({"input": x})[0])
