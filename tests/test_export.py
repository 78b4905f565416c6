"""qconvert export: ops per scheme, checker, functions, packed codes, metadata, dynamic batch,
parity on every runtime, opsets, atomic writes and storage against the ideal size."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from importlib.metadata import version

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import qconvert
from qconvert import manifest, native
from qconvert.checkpoint import load_checkpoint
from qconvert.errors import QConvertError
from qconvert.export import onnx_export
from qconvert.manifest import LayerRecord
from qconvert.ops import DECODE_DOMAIN, DOMAIN_VERSION
from qconvert.ops.packing import unpack_codes_np
from qconvert.quant import LCQQuantizer, LSQQuantizer, PowerQuantizer
from qconvert.runtime import session

from .conftest import (
    ALL_KEYS,
    BOUNDARY_KEYS,
    DIGITS_KEYS,
    EXPECTED_OPS,
    assert_one_line_error,
    ceil_bytes,
    invoke,
    quantized_layers,
    rel_close,
)

HAVE_NATIVE = native.library_path() is not None
NO_NATIVE = pytest.mark.skipif(not HAVE_NATIVE, reason="native library not built")


def parity_params():
    """key x runtime; native skipped without the library. End-to-end parity is not asserted
    for the rounding-tie fixtures (BOUNDARY_REASON): their drift is asserted to be drift,
    with exact ops, by test_validate.py::test_lsq_boundary_case_is_drift_not_an_op_error."""
    params = []
    for key in ALL_KEYS:
        for runtime in ("native", "function", "reference"):
            if key in BOUNDARY_KEYS and runtime != "reference":
                continue
            marks = [NO_NATIVE] if runtime == "native" else []
            params.append(pytest.param(key, runtime, marks=marks, id=f"{key}-{runtime}"))
    return params


def keys_without_boundary(keys):
    """See parity_params: the rounding-tie fixtures are checked for drift elsewhere."""
    return [k for k in keys if k not in BOUNDARY_KEYS]


DOMAIN = "qconvert"
ACT_OPS = {"UniformQuant", "CompandQuant", "AdaptiveStep"}
DECODE_OPS = {"LutGather", "Pow2Shift"}
MIXED_OPS = ACT_OPS | DECODE_OPS


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """qconvert ops, constant weight decodes (function-only domain) included."""
    return [n for n in model.graph.node if n.domain in (DOMAIN, DECODE_DOMAIN)]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def layer_records(model: onnx.ModelProto) -> dict[str, LayerRecord]:
    return {record.name: record for record in manifest.read(model).layers}


_OUTPUTS: dict = {}


def run_outputs(zoo, key: str, runtime: str, batch: int = 6, opset: int = 20):
    """(torch output, ONNX output) on one fixed batch, cached per key/runtime/opset."""
    slot = (key, runtime, batch, opset)
    if slot not in _OUTPUTS:
        case = zoo.case(key)
        x = case.inputs(batch, seed=7)
        sess = session(zoo.onnx_path(key, opset), runtime, announce=None)
        _OUTPUTS[slot] = case.torch_out(x), sess.run({"input": x})[0]
    return _OUTPUTS[slot]


# ---------------------------------------------------------------- graph content


@pytest.mark.parametrize("key", ALL_KEYS)
def test_graph_has_expected_qconvert_ops(zoo, key):
    case = zoo.case(key)
    model = zoo.onnx_model(key)
    nodes = custom_nodes(model)
    assert {n.op_type for n in nodes} == EXPECTED_OPS[case.scheme]
    assert all(n.op_type in MIXED_OPS for n in nodes)

    layers = quantized_layers(case.model)
    inner = layers[1:-1]  # first conv / last linear are LSQ-8 in every scheme
    counts = Counter(n.op_type for n in nodes)
    # one weight decode per quantized layer, one activation op per inner layer (a quantizer
    # the exporter merged with an identical twin has none of its own)
    unmerged = {name for name, record in layer_records(model).items() if not record.merged}
    assert counts["LutGather"] + counts["Pow2Shift"] == len(layers)
    assert counts["CompandQuant"] + counts["AdaptiveStep"] == (
        len(unmerged & {name for name, _ in inner})
        if case.scheme in ("lcq", "asq-lsq", "asq-post") else 0)
    assert sum(counts[op] for op in ACT_OPS) == len(unmerged)
    records = layer_records(model)
    for name, layer in layers:  # every activation op has the bits of its layer's quantizer
        for node in (n for n in nodes if n.name in records[name].act_nodes):
            assert attrs(node)["bits"] == layer.act_quant.bits

    for node in nodes:
        a = attrs(node)
        if node.op_type == "Pow2Shift":
            assert a["root"] == (1 if case.scheme == "pot" else 2)
            assert a["bits"] == 4
        if node.op_type in ACT_OPS - {"UniformQuant"}:
            assert a["bits"] == 4


def test_lsq_activations_are_one_uniform_quant_op(zoo):
    case = zoo.case("digits-lsq")
    model = zoo.onnx_model("digits-lsq")
    by_name = {n.name: n for n in model.graph.node}
    records = layer_records(model)
    for name, layer in quantized_layers(case.model):
        nodes = [by_name[n] for n in records[name].act_nodes]
        assert [(n.domain, n.op_type) for n in nodes] == [(DOMAIN, "UniformQuant")], name
        assert attrs(nodes[0]) == {"bits": layer.act_quant.bits,
                                   "signed": int(layer.act_quant.signed)}
        # the step is an initializer holding the QAT step exactly
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        step = layer.act_quant.step.detach().numpy()
        assert any(i in inits and np.array_equal(inits[i].reshape(-1), step)
                   for i in nodes[0].input)
    assert {n.op_type for n in custom_nodes(model)} == {"UniformQuant", "LutGather"}


@pytest.mark.parametrize("key", ALL_KEYS)
def test_checker_and_model_local_functions(zoo, key):
    model = zoo.onnx_model(key)
    onnx.checker.check_model(model, full_check=True)
    used = {(n.domain, n.op_type) for n in custom_nodes(model)}
    assert {(f.domain, f.name) for f in model.functions} == used
    assert len(model.functions) == len(used)
    opset = default_opset(model)
    assert opset == 20
    assert {(o.domain, o.version) for o in model.opset_import} >= {("qconvert", DOMAIN_VERSION)}
    for function in model.functions:
        fn_opsets = {o.domain: o.version for o in function.opset_import}
        assert fn_opsets.get("", fn_opsets.get("ai.onnx")) == opset, function.name


def test_no_functions_export(zoo, calib_npz):
    model = zoo.onnx_model("digits-mixed", functions=False)
    # the constant weight decodes keep theirs: it is their only definition
    assert {f.domain for f in model.functions} == {DECODE_DOMAIN}
    assert {n.op_type for n in custom_nodes(model)} == MIXED_OPS
    # without bodies the function runtime must refuse with a clear error ...
    with pytest.raises(QConvertError, match="no function body"):
        session(model, "function", announce=None)
    path = zoo.onnx_path("digits-mixed", functions=False)
    ckpt = zoo.case("digits-mixed").path
    result = invoke(["validate", ckpt, path, "--calib", calib_npz, "--runtime", "function"])
    assert_one_line_error(result)
    # ... and the native library, when built, runs it with parity
    if HAVE_NATIVE:
        case = zoo.case("digits-mixed")
        x = case.inputs(5)
        got = session(model, "native", announce=None).run({"input": x})[0]
        ok, diff, bound = rel_close(got, case.torch_out(x))
        assert ok, (diff, bound)


# ---------------------------------------------------------------- weights


def _weight_decodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Decode node by the name of its codes initializer."""
    return {n.input[0]: n for n in custom_nodes(model) if n.op_type in DECODE_OPS}


@pytest.mark.parametrize("key", ALL_KEYS)
def test_no_fp32_copy_of_quantized_weights(zoo, key):
    case = zoo.case(key)
    model = zoo.onnx_model(key)
    weights = {name: layer.weight.detach().numpy() for name, layer in quantized_layers(case.model)}
    with torch.no_grad():
        qweights = {name: layer.weight_quant(layer.weight).numpy()
                    for name, layer in quantized_layers(case.model)}
    sizes = {w.size for w in weights.values() if w.size > 64}
    float_inits = [i for i in model.graph.initializer
                   if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                      onnx.TensorProto.FLOAT16)]
    for init in float_inits:
        array = numpy_helper.to_array(init).reshape(-1)
        # ASQ adapters are float by design and per-channel vectors (BN, biases, level
        # tables) may coincide in size with a small weight; any other float matrix the size
        # of a weight is suspicious
        if ".adapter." not in init.name and len(init.dims) >= 2:
            assert array.size not in sizes, f"{init.name} has as many elements as a weight"
        for name in weights:
            for kind, ref in (("float", weights[name]), ("quantized", qweights[name])):
                if array.size == ref.size:
                    same = np.array_equal(np.sort(array), np.sort(ref.reshape(-1)))
                    assert not same, f"{init.name} holds the {kind} weight of {name}"


def _decode_lut(codes: np.ndarray, table: np.ndarray, shape) -> np.ndarray:
    if table.ndim == 1:
        return table[codes].reshape(shape)
    channel = np.arange(codes.size) // (codes.size // shape[0])
    return table[channel, codes].reshape(shape)


def _decode_pow2(codes: np.ndarray, alpha: np.ndarray, bits: int, root: int, shape):
    """Independent decode following docs/ops.md (Pow2Shift)."""
    top = 2 ** (bits - 1) - 1
    sign = codes >> (bits - 1)
    m = codes & top
    e = top - m
    if root == 1:
        mag = np.ldexp(np.float32(1), -e).astype(np.float32)
    else:
        r = np.float32(math.sqrt(0.5))
        mag = np.ldexp(np.where(e % 2 == 1, r, np.float32(1)), -(e // 2)).astype(np.float32)
    channel = (np.arange(codes.size) // (codes.size // shape[0]) if alpha.size > 1
               else np.zeros(codes.size, np.int64))
    y = np.where(m == 0, np.float32(0), alpha[channel] * mag).astype(np.float32)
    return np.where(sign == 1, -y, y).reshape(shape)


@pytest.mark.parametrize("key", ALL_KEYS + ["digits-mixed"])
def test_packed_codes_match_qat_encode(zoo, key):
    case = zoo.case(key)
    model = zoo.onnx_model(key)
    inits = {i.name: i for i in model.graph.initializer}
    decodes = _weight_decodes(model)
    layers = quantized_layers(case.model)
    assert len(decodes) == len(layers)
    for name, layer in layers:
        q, w = layer.weight_quant, layer.weight.detach()
        codes_init = inits[layer_records(model)[name].weight.codes]
        node = decodes[codes_init.name]
        a = attrs(node)
        assert list(a["shape"]) == list(w.shape)
        assert a["bits"] == q.bits
        assert codes_init.data_type == onnx.TensorProto.UINT8
        assert list(codes_init.dims) == [ceil_bytes(w.numel(), q.bits)]
        codes = unpack_codes_np(numpy_helper.to_array(codes_init), q.bits, w.numel())
        index = q.encode(w).reshape(-1).numpy()
        with torch.no_grad():
            want = q(w).numpy()
        second = numpy_helper.to_array(inits[node.input[1]])
        if isinstance(q, PowerQuantizer):
            assert node.op_type == "Pow2Shift"
            signed = index - q.top_code
            expected = ((signed < 0).astype(np.int64) << (q.bits - 1)) | np.abs(signed)
            np.testing.assert_array_equal(codes, expected)
            decoded = _decode_pow2(codes, second, q.bits, a["root"], w.shape)
        else:
            assert isinstance(q, LSQQuantizer | LCQQuantizer)
            assert node.op_type == "LutGather"
            np.testing.assert_array_equal(codes, index)
            decoded = _decode_lut(codes, second, w.shape)
        np.testing.assert_array_equal(decoded, want)


# ---------------------------------------------------------------- metadata


@pytest.mark.parametrize("key", ALL_KEYS)
def test_metadata(zoo, key):
    case = zoo.case(key)
    model = zoo.onnx_model(key)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["qconvert_version"] == version("qconvert") == qconvert.__version__
    assert meta["qconvert_scheme"] == case.scheme
    digest = hashlib.sha256(case.path.read_bytes()).hexdigest()
    assert meta["qconvert_checkpoint_sha256"] == digest
    assert json.loads(meta["qconvert_input"]) == {"shape": list(case.shape), "mean": [0.5],
                                                  "std": [0.25]}
    records = layer_records(model)
    layers = quantized_layers(case.model)
    assert list(records) == [name for name, _ in layers]
    kinds = {name: (r.weight_kind, r.weight_bits, r.act_kind, r.act_bits)
             for name, r in records.items()}
    for name, layer in layers:
        spec = layer.layer_spec
        assert kinds[name] == (spec.weight.kind, layer.weight_quant.bits, spec.act.kind,
                               layer.act_quant.bits)
    first, *_, last = layers
    assert kinds[first[0]][:2] == ("lsq", 8) and kinds[last[0]][2:] == ("lsq", 8)
    produced = {o for n in model.graph.node for o in n.output} | {"output"}
    by_name = {n.name: n for n in model.graph.node}
    for record in records.values():  # every name the manifest gives is in the graph
        assert {record.act_value, record.out_value} - {None} <= produced
        assert record.weight.codes in {i.name for i in model.graph.initializer}
        assert manifest.weight_value(record.name) in by_name[record.compute_node].input
        assert all(n in by_name for n in record.act_nodes + record.weight.nodes)


# ---------------------------------------------------------------- running


@pytest.mark.parametrize("key", keys_without_boundary(DIGITS_KEYS))
def test_dynamic_batch(zoo, key):
    case = zoo.case(key)
    model = zoo.onnx_model(key)
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    sessions = [session(model, rt, announce=None)
                for rt in ("function", "native") if rt != "native" or HAVE_NATIVE]
    for batch in (1, 3, 32):
        x = case.inputs(batch, seed=batch)
        want = case.torch_out(x)
        for sess in sessions:
            got = sess.run({"input": x})[0]
            assert got.shape == (batch, 10)
            ok, diff, bound = rel_close(got, want)
            assert ok, (sess.runtime, batch, diff, bound)


@pytest.mark.parametrize(("key", "runtime"), parity_params())
def test_output_parity(zoo, key, runtime):
    want, got = run_outputs(zoo, key, runtime)
    assert np.isfinite(want).all()
    ok, diff, bound = rel_close(got, want)
    assert ok, f"max diff {diff} > {bound}"
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


def test_parity_against_reloaded_checkpoint(zoo):
    """The exported model matches the checkpoint as load_checkpoint rebuilds it, too."""
    case = zoo.case("digits-lcq")
    x = case.inputs(6, seed=7)
    with torch.no_grad():
        reloaded = load_checkpoint(case.path).model(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(reloaded, case.torch_out(x))


@pytest.mark.parametrize("key", keys_without_boundary(ALL_KEYS))
def test_function_and_reference_runtimes_agree(zoo, key):
    _, function = run_outputs(zoo, key, "function")
    _, reference = run_outputs(zoo, key, "reference")
    ok, diff, bound = rel_close(function, reference)
    assert ok, (diff, bound)
    np.testing.assert_array_equal(function.argmax(1), reference.argmax(1))


# ---------------------------------------------------------------- opsets


@pytest.mark.parametrize("opset", [18, 19, 20, 21, 22])
def test_opsets_export_and_run(zoo, opset):
    model = zoo.onnx_model("digits-mixed", opset=opset)
    onnx.checker.check_model(model, full_check=True)
    assert default_opset(model) == opset
    assert {f.name for f in model.functions} == MIXED_OPS
    for function in model.functions:
        fn_opsets = {o.domain: o.version for o in function.opset_import}
        assert fn_opsets.get("", fn_opsets.get("ai.onnx")) == opset
    runtimes = ["function", "reference"] + (["native"] if HAVE_NATIVE else [])
    for runtime in runtimes:
        want, got = run_outputs(zoo, "digits-mixed", runtime, opset=opset)
        ok, diff, bound = rel_close(got, want)
        assert ok, (runtime, diff, bound)
        np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


@pytest.mark.parametrize("opset", [17, 23])
def test_opset_out_of_range_is_rejected(zoo, tmp_path, opset):
    out = tmp_path / "m.onnx"
    result = invoke(["export", zoo.case("digits-lsq").path, "--out", out, "--opset", opset])
    line = assert_one_line_error(result)
    assert "opset" in line and "18" in line and "22" in line
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- atomic writes


def test_existing_output_without_force_is_untouched(zoo, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious bytes")
    result = invoke(["export", zoo.case("digits-lsq").path, "--out", out])
    line = assert_one_line_error(result)
    assert "--force" in line
    assert out.read_bytes() == b"precious bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.fixture
def fast_build(zoo, monkeypatch):
    """Replace the slow torch export with the session's cached result for digits-lsq."""
    model = zoo.onnx_model("digits-lsq")
    ckpt = load_checkpoint(zoo.case("digits-lsq").path)
    from qconvert.export.deploy import to_deploy

    _, layers = to_deploy(ckpt.model)
    monkeypatch.setattr(onnx_export, "build_onnx", lambda *a, **k: (model, layers))
    return model


def test_force_replaces_existing_output(zoo, tmp_path, fast_build):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    result = invoke(["export", zoo.case("digits-lsq").path, "--out", out, "--force"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == fast_build.SerializeToString()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert f"wrote {out}" in result.stdout


def test_failing_torch_export_leaves_nothing(zoo, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(torch.onnx, "export", boom)
    out = tmp_path / "m.onnx"
    result = invoke(["export", zoo.case("digits-lsq").path, "--out", out])
    line = assert_one_line_error(result)
    assert "simulated exporter failure" in line
    assert list(tmp_path.iterdir()) == []


def test_failing_write_keeps_old_file_and_no_temp(zoo, tmp_path, monkeypatch):
    model = zoo.onnx_model("digits-lsq")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(onnx_export.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        onnx_export.write_atomically(model, out, force=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_missing_output_directory_is_a_one_line_error(zoo, tmp_path, fast_build):
    out = tmp_path / "no" / "such" / "m.onnx"
    result = invoke(["export", zoo.case("digits-lsq").path, "--out", out])
    assert "directory" in assert_one_line_error(result)
    assert not (tmp_path / "no").exists()


def test_output_path_is_a_directory(zoo, tmp_path, fast_build):
    out = tmp_path / "outdir"
    out.mkdir()
    result = invoke(["export", zoo.case("digits-lsq").path, "--out", out, "--force"])
    assert_one_line_error(result)
    assert out.is_dir() and list(out.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["outdir"]


# ---------------------------------------------------------------- storage


def _inspect_json(path) -> dict:
    result = invoke(["inspect", "--json", path])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("key", ALL_KEYS)
def test_weight_storage_close_to_ideal(zoo, key):
    case = zoo.case(key)
    path = zoo.onnx_path(key)
    info = _inspect_json(path)
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    decodes = _weight_decodes(model)
    layers = quantized_layers(case.model)
    by_params = {(layer["params"], layer["bits"]) for layer in info["layers"]}
    decode_inputs, ideal_weights = set(), 0
    for name, layer in layers:
        numel, bits = layer.weight.numel(), layer.weight_quant.bits
        assert (numel, bits) in by_params
        node = decodes[layer_records(model)[name].weight.codes]
        code_bytes = inits[node.input[0]].nbytes
        table_bytes = inits[node.input[1]].nbytes
        ideal = ceil_bytes(numel, bits) + table_bytes
        assert code_bytes + table_bytes <= 1.10 * ideal, name
        decode_inputs.update(node.input)
        ideal_weights += numel * bits
    for entry in info["layers"]:  # the same bound on inspect's own per-layer numbers
        ideal = ceil_bytes(entry["params"], entry["bits"]) + entry["table_bytes"]
        assert entry["code_bytes"] == ceil_bytes(entry["params"], entry["bits"])
        assert entry["code_bytes"] + entry["table_bytes"] <= 1.10 * ideal
    other = sum(a.nbytes for n, a in inits.items() if n not in decode_inputs)
    tables = sum(inits[n].nbytes for node in decodes.values() for n in node.input[1:])
    assert info["ideal_bytes"] == math.ceil(ideal_weights / 8) + tables + other
    weight_params = sum(layer.weight.numel() for _, layer in layers)
    assert info["fp32_bytes"] == 4 * weight_params + other
    assert info["file_bytes"] == path.stat().st_size
    assert info["file_bytes"] < info["fp32_bytes"]


@pytest.mark.parametrize("key", ALL_KEYS)
def test_file_size_within_64k_of_ideal(zoo, key):
    """Fixed overhead (graph, function bodies, manifest) within 64 KiB; the shape records
    of the custom ops' outputs (tests/test_custom_op_shapes.py) are counted apart, and
    must stay a name and a shape each."""
    info = _inspect_json(zoo.onnx_path(key))
    records = zoo.onnx_model(key).graph.value_info
    record_bytes = sum(v.ByteSize() for v in records)
    assert record_bytes <= 100 * len(records)
    overhead = info["file_bytes"] - record_bytes - info["ideal_bytes"]
    assert overhead <= 64 * 1024, overhead


def test_no_exporter_annotations_left(zoo):
    model = zoo.onnx_model("digits-lsq")
    assert not [p.key for n in model.graph.node for p in n.metadata_props]
    assert not [p.key for p in model.graph.metadata_props if p.key.startswith("pkg.torch")]
