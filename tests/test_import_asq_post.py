"""``qconvert import --from asq-post``: fixtures in the public ASQ/POST code's exact layout.

Expected logits come from ``source_forward`` below: a re-statement of that code's eval
forward (its quantizers' arithmetic, its level table and tie order, its block wiring),
written from the source's documented math and independent of qconvert's quantizers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from qconvert.checkpoint import load_checkpoint
from qconvert.cli import main
from tests.fixtures.make_asq_post import STANDARD, FixtureSpec, make_checkpoint, write_fixture

EPS32 = float(torch.finfo(torch.float32).eps)
STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
OPTIONS = {
    "r18_asq_post2_4bit_dp": ["--weights", "post", "--post-base", "2"],
    "r18_asq_postsqrt2_3bit": ["--weights", "post", "--post-base", "sqrt2"],
    "r34_asq_lsq_4bit": ["--weights", "lsq"],
    "r18_lsq_lsq_2bit_noarch": ["--weights", "lsq", "--bits", "2"],
}


# ---- the source's eval forward, restated ------------------------------------------------

def _bn(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, state[prefix + "running_mean"], state[prefix + "running_var"],
                        state[prefix + "weight"], state[prefix + "bias"], False, 0.0, 1e-5)


def _grad_scaled(s: torch.Tensor, g: float) -> torch.Tensor:
    return (s - s * g).detach() + s * g  # the source's value-preserving(?) gradient trick


def _post_table(bits: int, base: float) -> torch.Tensor:
    values = [0.0]
    for i in range(2 ** (bits - 1) - 1):
        values += [-base ** (-i - 1), base ** (-i - 1)]
    return torch.Tensor(list(set(values + [-1.0, 1.0])))


def _source_weight(state: dict, p: str, spec: FixtureSpec) -> torch.Tensor:
    w, s = state[p + "conv.weight"], state[p + "quan_w_fn.s"]
    per_channel = w.numel() / w.shape[0]
    if spec.weights == "post":
        alpha = _grad_scaled(s, 1.0 / per_channel ** 0.5)
        v = (w / alpha).clamp(-1, 1).reshape(-1)
        table = _post_table(spec.bits, spec.base)
        idx = (v.unsqueeze(0) - table.unsqueeze(1)).abs().min(dim=0)[1]
        return table[idx].view(w.shape) * alpha
    qn, qp = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    s = s.abs().clamp(min=EPS32)
    if spec.act == "asq":  # the ASQ weight quantizer's forward uses the scaled-step trick
        s = _grad_scaled(s, 1.0 / (qp * per_channel) ** 0.5)
    x = torch.clamp(w / s, qn, qp)
    return ((x.round() - x).detach() + x) * s


def _source_act(state: dict, p: str, spec: FixtureSpec, x: torch.Tensor) -> torch.Tensor:
    s = state[p + "quan_a_fn.s"].abs().clamp(min=EPS32)
    if spec.act == "asq":
        h = F.adaptive_avg_pool2d(x, 1).view(x.shape[0], -1)
        if p + "adapter.net.2.weight" in state:
            h = F.relu(F.linear(h, state[p + "adapter.net.0.weight"],
                                state[p + "adapter.net.0.bias"]))
            h = F.relu(F.linear(h, state[p + "adapter.net.2.weight"],
                                state[p + "adapter.net.2.bias"]))
        else:
            h = F.relu(F.linear(h, state[p + "adapter.net.0.weight"],
                                state[p + "adapter.net.0.bias"]))
        s = s * torch.clamp(h, min=1e-8).view(-1, 1, 1, 1)
    return torch.clamp(x / s, 0, 2 ** spec.bits - 1).round() * s


def _qconv(state, p, spec, x, stride, padding):
    y = F.conv2d(_source_act(state, p, spec, x), _source_weight(state, p, spec), None,
                 stride, padding)
    return _bn(state, p + "bn.", y)


def source_forward(state: dict, spec: FixtureSpec, x: torch.Tensor) -> torch.Tensor:
    x = _bn(state, "quant_init_block_convbn.bn.",
            F.conv2d(x, state["quant_init_block_convbn.conv.weight"], None, 2, 3))
    x = F.relu(F.max_pool2d(x, 3, 2, 1))
    for i, blocks in enumerate(STAGES[spec.depth], 1):
        for j in range(1, blocks + 1):
            p = f"layer{i}.unit{j}."
            stride = 2 if (i > 1 and j == 1) else 1
            identity = x
            if p + "quant_identity_convbn.conv.weight" in state:
                identity = _qconv(state, p + "quant_identity_convbn.", spec, x, stride, 0)
            out = F.relu(_qconv(state, p + "quant_convbn1.", spec, x, stride, 1))
            out = _qconv(state, p + "quant_convbn2.", spec, out, 1, 1)
            x = F.relu(out + identity)
    x = F.avg_pool2d(x, 7, 1).view(x.shape[0], -1)
    return F.linear(x, state["quant_output.linear.weight"], state["quant_output.linear.bias"])


# ---- helpers -----------------------------------------------------------------------------

def run_cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def run_import(src: Path, out: Path, *options) -> tuple[int, str, str]:
    return run_cli("import", "--from", "asq-post", src, "--out", out, *options)


def assert_refused(code: int, stderr: str, *phrases: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def inputs(n: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every standard fixture written and imported once: name -> (source, qconvert)."""
    root = tmp_path_factory.mktemp("asq_post")
    done = {}
    for name, spec in STANDARD.items():
        src = write_fixture(root / f"{name}.pth.tar", spec)
        out = root / f"{name}.pt"
        code, stdout, stderr = run_import(src, out, *OPTIONS[name])
        assert code == 0, stderr
        done[name] = (src, out)
    return done


def source_state(src: Path) -> dict:
    state = torch.load(src, weights_only=True)["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


# ---- semantics ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(STANDARD))
def test_imported_logits_match_the_source_forward(imported, name):
    src, out = imported[name]
    spec = STANDARD[name]
    x = inputs()
    with torch.no_grad():
        expected = source_forward(source_state(src), spec, x)
        got = load_checkpoint(out).model(x)
    scale = expected.abs().max()
    assert scale > 0.1  # a live network, not one that collapsed to zeros
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(scale)), (
        float((got - expected).abs().max() / scale))
    assert expected.argmax(1).tolist() == got.argmax(1).tolist()


@pytest.mark.parametrize("name", list(STANDARD))
def test_imported_checkpoint_records_its_origin(imported, name):
    src, out = imported[name]
    ckpt = load_checkpoint(out)
    spec = STANDARD[name]
    assert ckpt.arch == f"tv_resnet{spec.depth}"
    assert ckpt.arch_kwargs == {"in_channels": 3, "num_classes": spec.classes,
                                "width": spec.width}
    assert ckpt.input.shape == (3, 224, 224)
    assert ckpt.input.mean == (0.485, 0.456, 0.406)
    assert ckpt.training["imported_from"] == "asq-post"
    assert ckpt.training["bits"] == spec.bits and ckpt.training["epoch"] == 90
    assert ckpt.training["best_acc1"] == pytest.approx(70.25)
    kinds = {s.weight.kind for s in ckpt.layer_specs.values() if s is not None}
    expected_kind = {"lsq": "lsq", "post": "pot-wide" if spec.base == 2.0 else "post-wide"}
    assert kinds == {expected_kind[spec.weights]}
    # first conv and classifier stay float
    assert set(ckpt.layer_specs) == {n for n, m in ckpt.model.named_modules()
                                     if isinstance(m, torch.nn.Conv2d)} - {"conv1"}


ROLE_OF = {"conv1": "quant_convbn1", "conv2": "quant_convbn2",
           "downsample.0": "quant_identity_convbn"}


def weight_pairs(src: Path, out: Path, spec: FixtureSpec):
    """(source key prefix, source's quantized weight, imported quantized weight) per conv."""
    state = source_state(src)
    for name, layer in load_checkpoint(out).model.named_modules():
        if hasattr(layer, "weight_quant"):
            stage, block, conv = name.split(".", 2)
            p = f"{stage}.unit{int(block) + 1}.{ROLE_OF[conv]}."
            with torch.no_grad():
                yield p, _source_weight(state, p, spec), layer.weight_quant(layer.weight)


@pytest.mark.parametrize("name", list(STANDARD))
def test_imported_weights_equal_the_source_weights_bit_for_bit(imported, name):
    src, out = imported[name]
    pairs = list(weight_pairs(src, out, STANDARD[name]))
    assert len(pairs) == {18: 19, 34: 35}[STANDARD[name].depth]
    for p, expected, got in pairs:
        assert torch.equal(got, expected), p


def test_post_ties_follow_the_source_table_order(imported):
    """The 4-bit base-2 fixture has weights exactly on midpoints (both signs): the source's
    order there is not simply 'toward zero' (qconvert's default rank), so the imported
    ranks matter (the weights themselves are compared in the test above)."""
    src, out = imported["r18_asq_post2_4bit_dp"]
    spec = STANDARD["r18_asq_post2_4bit_dp"]
    state = source_state(src)
    mags = sorted(set(_post_table(spec.bits, spec.base).abs().tolist()))
    mids = torch.tensor([(a + b) / 2 for a, b in zip(mags[:-1], mags[1:], strict=True)])
    ties = differs_from_toward_zero = 0
    for p, expected, _ in weight_pairs(src, out, spec):
        w = state[p + "conv.weight"]
        alpha = _grad_scaled(state[p + "quan_w_fn.s"], 1 / (w[0].numel()) ** 0.5)
        v = (w / alpha).clamp(-1, 1)
        on_tie = torch.isin(v.abs(), mids)
        ties += int(on_tie.sum())
        smaller = torch.tensor([max(m for m in mags if m < a) for a in v.abs()[on_tie].tolist()])
        toward_zero = torch.sign(v[on_tie]) * smaller * alpha.expand_as(v)[on_tie]
        differs_from_toward_zero += int((expected[on_tie] != toward_zero).sum())
    assert ties >= 20
    assert differs_from_toward_zero > 0


def test_negative_steps_are_made_positive_and_reported(tmp_path):
    spec = FixtureSpec(18, 3, "asq", "lsq", seed=5)
    saved = make_checkpoint(spec)
    state = saved["state_dict"]
    state["layer2.unit1.quant_convbn1.quan_a_fn.s"] = -state[
        "layer2.unit1.quant_convbn1.quan_a_fn.s"]
    state["layer3.unit2.quant_convbn2.quan_w_fn.s"][1] *= -1
    torch.save(saved, tmp_path / "neg.pth.tar")
    code, stdout, stderr = run_import(tmp_path / "neg.pth.tar", tmp_path / "neg.pt",
                                      "--weights", "lsq")
    assert code == 0, stderr
    assert "made 2 non-positive step(s) positive" in stdout
    assert "layer2.unit1.quant_convbn1.quan_a_fn.s" in stdout
    x = inputs(2)
    with torch.no_grad():
        expected = source_forward(state, spec, x)
        got = load_checkpoint(tmp_path / "neg.pt").model(x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


# ---- export + validate -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["r18_asq_post2_4bit_dp", "r18_lsq_lsq_2bit_noarch"])
def test_export_and_validate(imported, tmp_path, name):
    _, ckpt = imported[name]
    onnx_path = tmp_path / "m.onnx"
    code, _, stderr = run_cli("export", ckpt, "--out", onnx_path)
    assert code == 0, stderr
    report_path = tmp_path / "r.json"
    run_cli("validate", ckpt, onnx_path, "--synthetic", 6, "--runtime", "function",
            "--per-layer", "--report", report_path)
    report = json.loads(report_path.read_text())
    assert report["top1_agreement"] == 1.0
    layers = report["layers"]
    assert len(layers) == 19
    assert all(r["op_mismatches"] == 0 and r["weight_mismatches"] == 0 for r in layers)
    assert all(r["op_elements"] > 0 for r in layers if not r.get("merged"))
    if STANDARD[name].weights == "post":  # 2^4 + 1 levels need 5-bit Pow2Shift codes
        shifts = [n for n in onnx.load(str(onnx_path)).graph.node if n.op_type == "Pow2Shift"]
        assert len(shifts) == 19
        for node in shifts:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["bits"] == 5 and attrs["root"] == 1


# ---- refusals: exit 2, one line ----------------------------------------------------------

def _saved(spec: FixtureSpec | None = None) -> dict:
    return make_checkpoint(spec or FixtureSpec(18, 4, "asq", "post"))


def _write(tmp_path: Path, saved) -> Path:
    path = tmp_path / "src.pth.tar"
    torch.save(saved, path)
    return path


POST = ("--weights", "post", "--post-base", "2")


def assert_post_import_refused(tmp_path: Path, saved, *phrases: str) -> None:
    """Importing ``saved`` as POST weights fails with one line holding every phrase."""
    code, _, stderr = run_import(_write(tmp_path, saved), tmp_path / "o.pt", *POST)
    assert_refused(code, stderr, *phrases)


def test_refuses_truncated_file(tmp_path):
    src = write_fixture(tmp_path / "full.pth.tar", FixtureSpec())
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    assert_refused(*run_import(cut, tmp_path / "o.pt", *POST)[::2],
                   "not a readable PyTorch checkpoint")


def test_refuses_pickled_objects(tmp_path):
    saved = _saved()
    saved["extra"] = torch.nn.ReLU()
    assert_post_import_refused(tmp_path, saved,
                               "pickled Python objects")


def test_refuses_a_different_layout(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = _write(tmp_path, {"state_dict": net.state_dict(), "arch": "resnet18_4"})
    assert_refused(*run_import(path, tmp_path / "o.pt", *POST)[::2],
                   "quant_init_block_convbn.conv.weight", "not a checkpoint of the asq-post")


def test_refuses_a_qconvert_checkpoint(imported, tmp_path):
    _, ours = imported["r18_lsq_lsq_2bit_noarch"]
    assert_refused(*run_import(ours, tmp_path / "o.pt", *POST)[::2], "not a checkpoint")


def test_refuses_tampered_shape(tmp_path):
    saved = _saved()
    saved["state_dict"]["layer2.unit2.quant_convbn1.quan_w_fn.s"] = torch.ones(8, 1, 1, 2)
    assert_post_import_refused(tmp_path, saved,
                               "layer2.unit2.quant_convbn1.quan_w_fn.s has shape (8, 1, 1, 2)",
                               "(8, 1, 1, 1)")


def test_refuses_a_declared_size_no_model_should_allocate(tmp_path):
    """A stride-0 tensor claims a huge stem width at no storage cost."""
    saved = _saved()
    saved["state_dict"]["quant_init_block_convbn.conv.weight"] = torch.zeros(1).expand(
        100000, 3, 7, 7)
    assert_post_import_refused(tmp_path, saved,
                               "declare width 100000")


def test_refuses_tampered_dtype(tmp_path):
    saved = _saved()
    key = "layer1.unit1.quant_convbn2.conv.weight"
    saved["state_dict"][key] = saved["state_dict"][key].double()
    assert_post_import_refused(tmp_path, saved,
                               key, "torch.float64")


def test_refuses_missing_key(tmp_path):
    saved = _saved()
    del saved["state_dict"]["layer3.unit1.quant_identity_convbn.bn.running_var"]
    assert_post_import_refused(tmp_path, saved,
                               "key layer3.unit1.quant_identity_convbn.bn.running_var is missing")


def test_refuses_leftover_key(tmp_path):
    saved = _saved()
    saved["state_dict"]["layer1.unit1.quant_convbn1.conv.bias"] = torch.zeros(4)
    assert_post_import_refused(tmp_path, saved,
                               "unexpected key layer1.unit1.quant_convbn1.conv.bias")


def test_refuses_adapter_missing_in_one_layer(tmp_path):
    saved = _saved()
    for k in [k for k in saved["state_dict"] if k.startswith("layer4.unit2.quant_convbn2.adapt")]:
        del saved["state_dict"][k]
    assert_post_import_refused(tmp_path, saved,
                               "layer4.unit2.quant_convbn2.adapter.net.0", "is missing")


def test_refuses_uninitialised_quantizers(tmp_path):
    saved = _saved()
    saved["state_dict"]["layer1.unit2.quant_convbn1.init_state"] = torch.ones(1)
    assert_post_import_refused(tmp_path, saved,
                               "layer1.unit2.quant_convbn1.init_state is 1", "never initialised")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_refuses_non_finite_step(tmp_path, value):
    saved = _saved()
    saved["state_dict"]["layer2.unit1.quant_convbn2.quan_a_fn.s"] = torch.tensor([value])
    assert_post_import_refused(tmp_path, saved,
                               "layer2.unit1.quant_convbn2.quan_a_fn.s holds NaN or Inf")


def test_refuses_zero_post_alpha(tmp_path):
    saved = _saved()
    saved["state_dict"]["layer2.unit1.quant_convbn2.quan_w_fn.s"][3] = 0.0
    assert_post_import_refused(tmp_path, saved,
                               "layer2.unit1.quant_convbn2.quan_w_fn.s (POST alpha) is 0")


def test_refuses_mixed_data_parallel_prefix(tmp_path):
    saved = _saved()
    state = saved["state_dict"]
    saved["state_dict"] = {("module." + k if "layer1" in k else k): v for k, v in state.items()}
    assert_post_import_refused(tmp_path, saved,
                               "some keys start with 'module.'")


def test_refuses_depth_contradicting_arch_entry(tmp_path):
    saved = _saved()
    saved["arch"] = "resnet34_4"
    assert_post_import_refused(tmp_path, saved,
                               "'resnet34_4' says ResNet-34 but the keys hold a ResNet-18")


def test_refuses_units_of_neither_depth(tmp_path):
    saved = _saved()
    for k in [k for k in saved["state_dict"] if k.startswith("layer2.unit2.")]:
        del saved["state_dict"][k]
    assert_post_import_refused(tmp_path, saved,
                               "units per stage (2, 1, 2, 2)")


def test_refuses_bits_contradicting_arch_entry(tmp_path):
    path = _write(tmp_path, _saved())
    assert_refused(*run_import(path, tmp_path / "o.pt", *POST, "--bits", "3")[::2],
                   "--bits 3 contradicts the arch entry 'resnet18_4'")


def test_refuses_missing_bits(tmp_path):
    saved = _saved()
    del saved["arch"]
    assert_post_import_refused(tmp_path, saved,
                               "records the bit width", "--bits")


def test_refuses_unparsable_arch_entry(tmp_path):
    saved = _saved()
    saved["arch"] = "resnet18"
    assert_post_import_refused(tmp_path, saved,
                               "arch entry 'resnet18'")


def test_refuses_missing_weights_option(tmp_path):
    path = _write(tmp_path, _saved())
    assert_refused(*run_import(path, tmp_path / "o.pt")[::2],
                   "LSQ or POST", "--weights")


def test_refuses_missing_post_base(tmp_path):
    path = _write(tmp_path, _saved())
    assert_refused(*run_import(path, tmp_path / "o.pt", "--weights", "post")[::2],
                   "POST base", "--post-base")


def test_refuses_post_base_with_lsq_weights(tmp_path):
    path = _write(tmp_path, _saved(FixtureSpec(18, 4, "asq", "lsq")))
    assert_refused(*run_import(path, tmp_path / "o.pt", "--weights", "lsq", "--post-base",
                               "2")[::2], "--post-base applies to --weights post only")


def test_refuses_post_at_8_bits(tmp_path):
    saved = _saved()
    saved["arch"] = "resnet18_8"
    assert_post_import_refused(tmp_path, saved,
                               "cannot quantize at 8 bits", "2..7")


def test_refuses_a_non_dict_file(tmp_path):
    path = _write(tmp_path, [torch.zeros(2)])
    assert_refused(*run_import(path, tmp_path / "o.pt", *POST)[::2], "holds a list")


def test_refuses_existing_output_without_force(tmp_path):
    path = _write(tmp_path, _saved())
    (tmp_path / "o.pt").write_bytes(b"x")
    assert_refused(*run_import(path, tmp_path / "o.pt", *POST)[::2], "--force")


def test_refuses_missing_file(tmp_path):
    assert_refused(*run_import(tmp_path / "nope.pth.tar", tmp_path / "o.pt", *POST)[::2],
                   "no such checkpoint file")


def test_refuses_unsupported_bit_width(tmp_path):
    saved = _saved(FixtureSpec(18, 4, "lsq", "lsq"))
    del saved["arch"]
    assert_refused(*run_import(_write(tmp_path, saved), tmp_path / "o.pt", "--weights", "lsq",
                               "--bits", "9")[::2], "cannot quantize at 9 bits", "2..8")


def test_command_offers_every_registered_source():
    from qconvert.importers import SOURCES

    command = main.commands["import"]
    choices = next(p.type.choices for p in command.params if p.name == "source")
    assert sorted(choices) == sorted(SOURCES)
    code, stdout, _ = run_cli("import", "--help")
    assert code == 0 and "--post-base" in stdout and "--weights" in stdout


def test_negative_post_alpha_off_ties_imports_exactly(tmp_path):
    """Channel 1 holds no planted ties: a negative alpha there gives the source's weights
    with abs(alpha), reported."""
    spec = FixtureSpec(18, 4, "asq", "post", seed=6)
    saved = make_checkpoint(spec)
    state = saved["state_dict"]
    state["layer3.unit1.quant_convbn1.quan_w_fn.s"][1] *= -1
    torch.save(saved, tmp_path / "neg.pth.tar")
    code, stdout, stderr = run_import(tmp_path / "neg.pth.tar", tmp_path / "neg.pt", *POST)
    assert code == 0, stderr
    assert "made 1 non-positive step(s) positive" in stdout
    x = inputs(2)
    with torch.no_grad():
        expected = source_forward(state, spec, x)
        got = load_checkpoint(tmp_path / "neg.pt").model(x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_negative_post_alpha_on_an_asymmetric_tie_is_refused(tmp_path):
    """Channel 0 holds weights on every midpoint; at 4 bits the source's table sends +0.75
    and -0.75 (times alpha) to levels of different magnitude, so a negative alpha there
    cannot be expressed with abs(alpha): the bit-for-bit weight check refuses the file."""
    saved = make_checkpoint(FixtureSpec(18, 4, "asq", "post", seed=6))
    saved["state_dict"]["layer3.unit1.quant_convbn1.quan_w_fn.s"][0] *= -1
    assert_post_import_refused(tmp_path, saved,
                               "layer layer3.0.conv1", "differ from the source's",
                               "cannot be imported")


@pytest.mark.parametrize(("name", "params"), [("tv_resnet18", 11_689_512),
                                              ("tv_resnet34", 21_797_672)])
def test_builtin_architectures_have_torchvision_sizes(name, params):
    from qconvert.archs import build_architecture

    model = build_architecture(name)
    assert sum(p.numel() for p in model.parameters()) == params  # torchvision's counts
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
