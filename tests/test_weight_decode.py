"""Constant weight decodes in the function-only domain (qconvert/export/weight_decode.py):
ONNX Runtime folds them at load, with or without the native library, into exactly the
weights the numpy references decode, and a plainly loaded export computes what
qconvert's session computes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qconvert import manifest, native
from qconvert.export.weight_decode import decode_function, fold_constant_decodes
from qconvert.ops import DECODE_DOMAIN, DOMAIN, functions, lut_gather, pow2_shift
from qconvert.ops.packing import pack_codes
from qconvert.runtime import fold_weight_decodes, session

from .conftest import invoke

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in (ROOT / "models" / "checkpoints").glob("*.pt")
                 if not p.stem.endswith("-float"))
# 5 x 3 x 3 x 3 = 135 codes: at 3, 5, 6 and 7 bits codes straddle bytes and the stream
# ends inside a byte.
WEIGHT_SHAPE = [5, 3, 3, 3]
LIBRARY = [False] + ([True] if native.library_path() is not None else [])


def _lut_case(bits: int, per_channel: bool, rng) -> tuple[list, dict, np.ndarray]:
    levels = min(1 << bits, 1 + bits * 3)  # a table shorter than 2^bits from 4 bits on
    codes = rng.integers(0, levels, math.prod(WEIGHT_SHAPE))
    codes[:levels] = np.arange(levels)  # every level used
    table = rng.standard_normal((WEIGHT_SHAPE[0], levels) if per_channel else levels)
    inputs = [pack_codes(codes, bits), table.astype(np.float32)]
    attrs = {"bits": bits, "shape": WEIGHT_SHAPE}
    return inputs, attrs, lut_gather.reference(*inputs, **attrs)


def _pow2_case(bits: int, per_channel: bool, root: int, rng) -> tuple[list, dict, np.ndarray]:
    codes = rng.integers(0, 1 << bits, math.prod(WEIGHT_SHAPE))
    patterns = np.arange(1 << bits)[: codes.size]  # all of them up to 7 bits
    codes[: patterns.size] = patterns
    half = 1 << (bits - 1)
    codes[-4:] = [0, half, half - 1, 2 * half - 1]  # +0.0, -0.0, the largest of each sign
    alpha = rng.uniform(0.1, 2.0, WEIGHT_SHAPE[0] if per_channel else 1).astype(np.float32)
    inputs = [pack_codes(codes, bits), alpha]
    attrs = {"bits": bits, "root": root, "shape": WEIGHT_SHAPE}
    return inputs, attrs, pow2_shift.reference(*inputs, **attrs)


def _cases():
    for bits in range(1, 9):
        for per_channel in (False, True):
            yield pytest.param("LutGather", bits, per_channel, 1,
                               id=f"lut-{bits}b-{'channel' if per_channel else 'tensor'}")
    for bits in range(2, 9):
        for per_channel in (False, True):
            for root in (1, 2):
                yield pytest.param("Pow2Shift", bits, per_channel, root,
                                   id=f"pow2-{bits}b-root{root}-"
                                      f"{'channel' if per_channel else 'tensor'}")


def _conv_model(op: str, inputs: list[np.ndarray], attrs: dict) -> onnx.ModelProto:
    """X -> Conv(weight = op(constant codes, constant table)) -> Y, as export writes it
    before the decode is moved (a qconvert-domain node with its function body)."""
    names = ["codes", "param"]
    decode = helper.make_node(op, names, ["W"], domain=DOMAIN, name="decode", **attrs)
    conv = helper.make_node("Conv", ["X", "W"], ["Y"], name="conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [decode, conv], "decode",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, WEIGHT_SHAPE[0], 6, 6])],
        [numpy_helper.from_array(a, n) for n, a in zip(names, inputs, strict=True)])
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
        functions=functions(20, {op}), ir_version=10)


def _options(library: bool, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
             optimized: Path | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.graph_optimization_level = level
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    if library:
        native.register(options)
    return options


def _bits(array: np.ndarray) -> bytes:
    """Exact bytes: -0.0 and 0.0 differ."""
    return np.ascontiguousarray(array, np.float32).tobytes()


@pytest.mark.parametrize("library", LIBRARY, ids=lambda lib: "library" if lib else "stock")
@pytest.mark.parametrize(("op", "bits", "per_channel", "root"), list(_cases()))
def test_constant_decode_folds_into_the_reference_weight(op, bits, per_channel, root, library,
                                                         tmp_path):
    rng = np.random.default_rng(bits * 10 + per_channel + root * 100)
    inputs, attrs, want = (_lut_case(bits, per_channel, rng) if op == "LutGather"
                           else _pow2_case(bits, per_channel, root, rng))
    model = _conv_model(op, inputs, attrs)
    assert fold_constant_decodes(model) == ["decode"]
    assert model.graph.node[0].domain == DECODE_DOMAIN
    assert {f.domain for f in model.functions} == {DECODE_DOMAIN}
    onnx.checker.check_model(model, full_check=True)
    # Constant folding is a basic-level pass: at the extended level the graph ORT keeps is
    # the Conv alone, reading the decoded weight as an initializer.
    optimized_path = tmp_path / "optimized.onnx"
    ort.InferenceSession(model.SerializeToString(),
                         _options(library, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                  optimized_path), providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(optimized_path))
    assert [n.op_type for n in optimized.graph.node] == ["Conv"]
    weights = {i.name: numpy_helper.to_array(i) for i in optimized.graph.initializer}
    assert _bits(weights[optimized.graph.node[0].input[1]]) == _bits(want)


@pytest.mark.parametrize("library", LIBRARY, ids=lambda lib: "library" if lib else "stock")
def test_folded_conv_at_full_optimization_matches_a_float_weight(library):
    """At ORT's default level the folded model computes what the same Conv with the
    reference weight stored in float computes."""
    rng = np.random.default_rng(7)
    inputs, attrs, want = _pow2_case(5, True, 2, rng)
    model = _conv_model("Pow2Shift", inputs, attrs)
    fold_constant_decodes(model)
    plain = helper.make_model(helper.make_graph(
        [model.graph.node[1]], "float", list(model.graph.input), list(model.graph.output),
        [numpy_helper.from_array(want, "W")]), opset_imports=[helper.make_opsetid("", 20)],
        ir_version=10)
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    got, expected = (ort.InferenceSession(m.SerializeToString(), _options(library),
                                          providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
                     for m in (model, plain))
    assert _bits(got) == _bits(expected)


def test_a_decode_of_computed_inputs_stays_a_kernel_op():
    inputs, attrs, _ = _lut_case(4, False, np.random.default_rng(0))
    model = _conv_model("LutGather", inputs, attrs)
    codes = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info("codes", TensorProto.UINT8,
                                                           list(codes.dims)))
    del model.graph.initializer[0]
    assert fold_constant_decodes(model) == []
    assert model.graph.node[0].domain == DOMAIN
    assert [f.name for f in model.functions] == ["LutGather"]


def _decode_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in ("LutGather", "Pow2Shift")]


@pytest.mark.parametrize("functions_too", [True, False], ids=["functions", "no-functions"])
def test_export_writes_every_weight_decode_foldable(zoo, functions_too):
    model = zoo.onnx_model("digits-mixed", functions=functions_too)  # all four ops
    decodes = _decode_nodes(model)
    assert decodes and all(n.domain == DECODE_DOMAIN for n in decodes)
    assert {f.name for f in model.functions if f.domain == DECODE_DOMAIN} == {
        "LutGather", "Pow2Shift"}
    kernel_ops = {f.name for f in model.functions if f.domain == DOMAIN}
    assert kernel_ops == ({"UniformQuant", "CompandQuant", "AdaptiveStep"} if functions_too
                          else set())
    by_name = {n.name: n for n in model.graph.node}
    for record in manifest.read(model).layers:  # validate's weight check runs these nodes
        assert [by_name[n].domain for n in record.weight.nodes] == [DECODE_DOMAIN]


@pytest.mark.parametrize("library", LIBRARY, ids=lambda lib: "library" if lib else "stock")
def test_plain_load_of_an_export_has_no_decode_left(zoo, library, tmp_path):
    path = zoo.onnx_path("digits-mixed")
    optimized = tmp_path / "optimized.onnx"
    ort.InferenceSession(str(path), _options(library, optimized=optimized),
                         providers=["CPUExecutionProvider"])
    graph = onnx.load(str(optimized)).graph
    decodes = _decode_nodes(zoo.onnx_model("digits-mixed"))
    read = {i for n in graph.node for i in n.input}
    assert not [n for n in graph.node if n.domain == DECODE_DOMAIN or n.op_type in (
        "LutGather", "Pow2Shift")]
    assert not {i for n in decodes for i in n.input} & read  # nothing reads packed codes
    initializers = {i.name for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type in ("Conv", "FusedConv", "Gemm", "FusedGemm")]
    assert len(convs) >= len(decodes) and all(n.input[1] in initializers for n in convs)


def test_files_exported_before_fold_the_same_way(zoo):
    """A file whose constant decodes are qconvert kernel ops (as exports were written
    before) gets the same graph as a new export in a native session."""
    new = zoo.onnx_model("digits-mixed")
    old = onnx.ModelProto()
    old.CopyFrom(new)
    for node in _decode_nodes(old):
        node.domain = DOMAIN
    del old.functions[:]
    old.functions.extend(functions(20))
    folded = fold_weight_decodes(old)
    assert [(n.domain, n.op_type, list(n.input)) for n in folded.graph.node] == [
        (n.domain, n.op_type, list(n.input)) for n in new.graph.node]
    assert fold_weight_decodes(new) is new


def _plain_session(path: Path) -> ort.InferenceSession:
    """What a C++ or plain-Python user gets: ORT with the library registered, nothing else."""
    return ort.InferenceSession(str(path), _options(True), providers=["CPUExecutionProvider"])


@pytest.mark.skipif(native.library_path() is None, reason="native library not built")
@pytest.mark.parametrize("ckpt", SHIPPED, ids=lambda p: p.stem)
def test_plain_load_is_bit_identical_to_the_qconvert_session(ckpt, tmp_path):
    out = tmp_path / "model.onnx"
    result = invoke(["export", ckpt, "--out", out])
    assert result.exit_code == 0, result.output
    plain = _plain_session(out)
    name = plain.get_inputs()[0].name
    shape = [d if isinstance(d, int) else 4 for d in plain.get_inputs()[0].shape]
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    ours = session(out, "native", threads=1, announce=None)
    assert _bits(plain.run(None, {name: x})[0]) == _bits(ours.run({name: x})[0])


def _run_decode_at_inference(op: str, inputs: list[np.ndarray], attrs: dict):
    """The decode-domain body run on graph inputs (nothing to fold), in stock ORT."""
    names = ["codes", "param"]
    node = helper.make_node(op, names, ["W"], domain=DECODE_DOMAIN, name="decode", **attrs)
    graph = helper.make_graph([node], "decode", [
        helper.make_tensor_value_info(n, TensorProto.UINT8 if a.dtype == np.uint8
                                      else TensorProto.FLOAT, list(a.shape))
        for n, a in zip(names, inputs, strict=True)],
        [helper.make_tensor_value_info("W", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 20), helper.make_opsetid(DECODE_DOMAIN, 1)],
        functions=[decode_function(op, 20)], ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), _options(False),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, dict(zip(names, inputs, strict=True)))[0]


@pytest.mark.parametrize(("op", "bits", "per_channel", "root"),
                         [("LutGather", 8, False, 1), ("LutGather", 3, True, 1),
                          ("Pow2Shift", 5, True, 2), ("Pow2Shift", 8, False, 1)])
def test_onnx_reference_evaluator_runs_the_decode_body(op, bits, per_channel, root):
    """The reference runtime (onnx.reference) evaluates the same body."""
    rng = np.random.default_rng(bits)
    inputs, attrs, want = (_lut_case(bits, per_channel, rng) if op == "LutGather"
                           else _pow2_case(bits, per_channel, root, rng))
    model = _conv_model(op, inputs, attrs)
    fold_constant_decodes(model)
    del model.graph.node[1], model.graph.input[:], model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, WEIGHT_SHAPE))
    got = ReferenceEvaluator(model).run(None, {})[0]
    assert _bits(got) == _bits(want)


def test_decode_body_at_inference_matches_the_reference():
    rng = np.random.default_rng(5)
    for inputs, attrs, want in (_lut_case(5, True, rng), _pow2_case(7, False, 2, rng)):
        op = "Pow2Shift" if "root" in attrs else "LutGather"
        assert _bits(_run_decode_at_inference(op, inputs, attrs)) == _bits(want)


def _bad_decodes():
    rng = np.random.default_rng(9)
    (codes, table), attrs, _ = _lut_case(3, True, rng)
    yield "codes-short", "LutGather", [codes[:-1], table], attrs
    yield "code-outside-table", "LutGather", [codes, table[:, :2]], attrs
    yield "table-wider-than-bits", "LutGather", [codes, np.ones((5, 9), np.float32)], attrs
    yield "table-rows-not-channels", "LutGather", [codes, table[:4]], attrs
    yield "bits-9", "LutGather", [codes, table], {**attrs, "bits": 9}
    (codes, alpha), attrs, _ = _pow2_case(4, True, 1, rng)
    yield "alpha-three", "Pow2Shift", [codes, alpha[:3]], attrs
    yield "root-3", "Pow2Shift", [codes, alpha], {**attrs, "root": 3}
    yield "pow2-codes-short", "Pow2Shift", [codes[:-1], alpha], attrs


@pytest.mark.parametrize(("op", "inputs", "attrs"),
                         [pytest.param(*case[1:], id=case[0]) for case in _bad_decodes()])
def test_decode_body_refuses_what_the_op_refuses(op, inputs, attrs):
    with pytest.raises(Exception, match="rejects|out of (data )?bounds|index"):
        _run_decode_at_inference(op, inputs, attrs)
