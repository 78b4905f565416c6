"""``qconvert import --from nulsq``: fixtures in the public LCQ re-implementation's exact
layout (tests/fixtures/make_nulsq.py).

Expected logits come from ``source_forward`` below: a re-statement of that code's eval
forward at batch size 1 (its LCQ core with the clip to exactly alpha and the mirrored
sign, its 2-bit uniform case, its LSQ with the gradient-scale trick and the
straight-through sums, its MinMax quantizer, weight normalization, and pytorchcv's
wiring), written from the source's math and independent of qconvert's quantizers and
architectures.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from qconvert.checkpoint import load_checkpoint
from qconvert.cli import main
from tests.fixtures.make_nulsq import STANDARD, FixtureSpec, run_params_text, write_fixture

K = 16


# ---- the source's eval forward, restated ------------------------------------------------

def _grad_scaled(s: torch.Tensor, mode: str, numel: int, qp: int) -> torch.Tensor:
    if mode == "LSQ_grad_scale":
        g = 1.0 / torch.sqrt(numel * torch.tensor([qp], dtype=torch.float))
    elif mode == "10_fac":
        g = torch.tensor(10.0)
    else:
        g = torch.tensor(1.0)
    bw = s * g
    return (s - bw).detach() + bw


def _lcq_core(x: torch.Tensor, alpha: torch.Tensor, theta: torch.Tensor, s: int):
    middle = (torch.abs(x) < alpha).float()
    t = torch.softmax(theta, dim=0)
    gamma = t / (1 / K)
    beta = torch.cat([torch.tensor([0.0]), torch.cumsum(t, dim=0)[:K - 1]])
    dst = (1 / K) * torch.arange(K)
    x_tmp = torch.abs(x) / alpha
    idx = torch.searchsorted(dst, x_tmp, right=True)
    y = gamma[idx - 1] * (x_tmp - dst[idx - 1]) + beta[idx - 1]
    qp = torch.tensor([float(s)])
    y_q = torch.round(y * qp) / qp
    idx_q = torch.searchsorted(beta, y_q, right=True)
    z = (y_q - beta[idx_q - 1]) / gamma[idx_q - 1] + dst[idx_q - 1]
    return torch.sign(x) * alpha * (z * middle + (1 - middle))


def _ternary(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    middle = (torch.abs(x) < alpha).float()
    return torch.sign(x) * alpha * (torch.round(torch.abs(x) / alpha) * middle + (1 - middle))


def _lsq(x: torch.Tensor, scale: torch.Tensor, qn: int, qp: int, mode: str, numel: int):
    scale = _grad_scaled(scale, mode, numel, qp)
    x = x / scale
    x = torch.min(torch.max(x, -torch.tensor([float(qn)])), torch.tensor([float(qp)]))
    y = (torch.round(x) - x).detach() + x
    return scale * y


def _minmax(x: torch.Tensor, qp: int) -> torch.Tensor:
    m = x.max()
    x_q = x.div(m).mul(torch.tensor([float(qp)])).round().div(qp).mul(m)
    return (x_q - x).detach() + x


def _q_layer(st: dict, spec: FixtureSpec, name: str, x: torch.Tensor, role: str,
             **conv) -> torch.Tensor:
    """A quantized Conv2d / Linear of the source: role 'first', 'last' or 'inner'."""
    w = st[f"{name}.weight"]
    bias = st.get(f"{name}.bias")
    if role == "first":
        x, wq = _minmax(x, 127), _minmax(w, 127)
    elif role == "last":
        x, wq = _minmax(x, 255), _minmax(w, 127)
    else:
        b = spec.bits
        if spec.acts == "lcq":
            x = _lcq_core(x, st[f"{name}.x_threshold"], st[f"{name}.x_theta"], 2**b - 1)
        else:
            x = _lsq(x, st[f"{name}.x_scale"], 0, 2**b - 1, spec.grad_scale, x.shape[1])
        norm = spec.weight_norm in ("LWN", "WN")
        mean, std = w.mean(), w.std()
        w_hat = w.add(-mean).div(std) if norm else w
        if spec.weights == "lcq":
            alpha = st[f"{name}.w_threshold"]
            wq = (_ternary(w_hat, alpha) if b == 2 else
                  _lcq_core(w_hat, alpha, st[f"{name}.w_theta"], 2 ** (b - 1) - 1))
        else:
            wq = _lsq(w_hat, st[f"{name}.w_scale"], 2 ** (b - 1), 2 ** (b - 1) - 1,
                      spec.grad_scale, w.numel())
        wq = wq.mul(std) if norm else wq
    if w.dim() == 2:
        return F.linear(x, wq, bias)
    return F.conv2d(x, wq, bias, **conv)


def _bn(st: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, st[f"{name}.running_mean"], st[f"{name}.running_var"],
                        st[f"{name}.weight"], st[f"{name}.bias"], False, 0.0, 1e-5)


def _units(st: dict, stage: int) -> int:
    n = 0
    while any(k.startswith(f"features.stage{stage}.unit{n + 1}.") for k in st):
        n += 1
    return n


def _preres_stages(st: dict, spec: FixtureSpec, x: torch.Tensor, stages: int) -> torch.Tensor:
    for i in range(stages):
        for j in range(_units(st, i + 1)):
            u = f"features.stage{i + 1}.unit{j + 1}"
            stride = 2 if j == 0 and i != 0 else 1
            pre = F.relu(_bn(st, f"{u}.body.conv1.bn", x))
            h = _q_layer(st, spec, f"{u}.body.conv1.conv", pre, "inner", stride=stride,
                         padding=1)
            h = F.relu(_bn(st, f"{u}.body.conv2.bn", h))
            h = _q_layer(st, spec, f"{u}.body.conv2.conv", h, "inner", padding=1)
            if f"{u}.identity_conv.weight" in st:
                x = _q_layer(st, spec, f"{u}.identity_conv", pre, "inner", stride=stride)
            x = h + x
    return x


def _mobilenet(st: dict, spec: FixtureSpec, x: torch.Tensor) -> torch.Tensor:
    x = _q_layer(st, spec, "features.init_block.conv", x, "first", stride=2, padding=1)
    x = F.relu6(_bn(st, "features.init_block.bn", x))
    for i in range(5):
        for j in range(_units(st, i + 1)):
            u = f"features.stage{i + 1}.unit{j + 1}"
            stride = 2 if j == 0 and i != 0 else 1
            h = F.relu6(_bn(st, f"{u}.conv1.bn", _q_layer(st, spec, f"{u}.conv1.conv", x,
                                                          "inner")))
            mid = st[f"{u}.conv2.conv.weight"].shape[0]
            h = F.relu6(_bn(st, f"{u}.conv2.bn", _q_layer(
                st, spec, f"{u}.conv2.conv", h, "inner", stride=stride, padding=1, groups=mid)))
            h = _bn(st, f"{u}.conv3.bn", _q_layer(st, spec, f"{u}.conv3.conv", h, "inner"))
            x = h + x if h.shape == x.shape and stride == 1 else h
    x = F.relu6(_bn(st, "features.final_block.bn",
                    _q_layer(st, spec, "features.final_block.conv", x, "inner")))
    x = F.avg_pool2d(x, 7, stride=1)
    return _q_layer(st, spec, "output", x, "last").view(1, -1)


def _one_sample(st: dict, spec: FixtureSpec, x: torch.Tensor) -> torch.Tensor:
    if spec.arch == "mbv2":
        return _mobilenet(st, spec, x)
    if spec.arch.startswith("cifar"):
        x = _q_layer(st, spec, "features.init_block", x, "first", padding=1)
        x = _preres_stages(st, spec, x, 3)
        pool = 8
    else:
        x = _q_layer(st, spec, "features.init_block.conv", x, "first", stride=2, padding=3)
        x = F.max_pool2d(F.relu(_bn(st, "features.init_block.bn", x)), 3, 2, 1)
        x = _preres_stages(st, spec, x, 4)
        pool = 7
    x = F.avg_pool2d(F.relu(_bn(st, "features.post_activ.bn", x)), pool, stride=1)
    return _q_layer(st, spec, "output", x.view(1, -1), "last")


def source_forward(path: Path, spec: FixtureSpec, x: torch.Tensor) -> torch.Tensor:
    """The source's eval logits, one sample at a time (its MinMax takes the batch max)."""
    payload = torch.load(path, weights_only=True)
    st = payload.get("state_dict", payload)
    st = {k.removeprefix("module."): v for k, v in st.items()}
    with torch.no_grad():
        return torch.cat([_one_sample(st, spec, x[n:n + 1]) for n in range(x.shape[0])])


# ---- helpers ----------------------------------------------------------------------------

def run_import(args: list[str]):
    return CliRunner().invoke(main, ["import", "--from", "nulsq", *args])


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    out = tmp_path_factory.mktemp("nulsq")
    return {key: (out / f"{key}.pth", write_fixture(spec, out / f"{key}.pth"))
            for key, spec in STANDARD.items()}


def _inputs(spec: FixtureSpec, count: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, spec.input_size, spec.input_size, generator=g)


def _imported(fixtures, key: str, tmp_path: Path) -> Path:
    path, run_file = fixtures[key]
    out = tmp_path / f"{key}.pt"
    result = run_import([str(path), "--run-params", str(run_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


# ---- the imported model computes what the source computes -------------------------------

@pytest.mark.parametrize("key", list(STANDARD))
def test_imported_model_matches_the_source(fixtures, key, tmp_path):
    spec = STANDARD[key]
    ckpt = load_checkpoint(_imported(fixtures, key, tmp_path))
    x = _inputs(spec, 3 if spec.input_size == 32 else 2)
    with torch.no_grad():
        ours = ckpt.model.eval()(x)
    theirs = source_forward(fixtures[key][0], spec, x)
    assert torch.isfinite(theirs).all()
    scale = float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) <= 1e-5 * scale, (ours, theirs)
    record = ckpt.training
    assert record["imported_from"] == "nulsq" and record["bits"] == spec.bits
    assert tuple(ckpt.input.shape) == (3, spec.input_size, spec.input_size)


def test_batch_of_one_is_what_the_source_computes_and_batches_are_per_sample(fixtures,
                                                                              tmp_path):
    """The source's MinMax layers take one maximum over the whole batch; the import takes
    each sample's, so a sample's logits do not depend on its batch mates (a batch-wide
    maximum would change them by whole quantization steps)."""
    spec = STANDARD["cifar20_lcq_4bit_lwn"]
    model = load_checkpoint(_imported(fixtures, "cifar20_lcq_4bit_lwn", tmp_path)).model.eval()
    x = _inputs(spec, 4)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[n:n + 1]) for n in range(4)])
    # equal up to the float convolutions' batch-size-dependent summation order
    assert float((together - alone).abs().max()) <= 1e-5 * float(alone.abs().max())


def test_options_instead_of_the_run_file(fixtures, tmp_path):
    path, run_file = fixtures["cifar56_lsq_3bit_none"]
    out = tmp_path / "opts.pt"
    result = run_import([str(path), "--bits", "3", "--first-last-bits", "8", "--weight-norm",
                         "none", "--lsq-grad-scale", "LSQ_grad_scale", "--out", str(out)])
    assert result.exit_code == 0, result.output
    via_file = load_checkpoint(_imported(fixtures, "cifar56_lsq_3bit_none", tmp_path))
    via_opts = load_checkpoint(out)
    for key, value in via_file.model.state_dict().items():
        assert torch.equal(value, via_opts.model.state_dict()[key]), key


@pytest.mark.parametrize("key", ["cifar20_lcq_4bit_lwn", "cifar56_lsq_3bit_none"])
def test_export_and_validate_pass(fixtures, key, tmp_path):
    ckpt = _imported(fixtures, key, tmp_path)
    onnx_path = tmp_path / f"{key}.onnx"
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(ckpt), "--out", str(onnx_path)])
    assert result.exit_code == 0, result.output
    assert "SampleMaxQuant x2" in result.output
    report = tmp_path / "report.json"
    result = runner.invoke(main, ["validate", str(ckpt), str(onnx_path), "--synthetic", "4",
                                  "--per-layer", "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    data = json.loads(report.read_text())
    assert data["top1_agreement"] == 1.0
    assert all(r["op_mismatches"] == 0 and r["weight_mismatches"] == 0 for r in data["layers"])


# ---- refusals: exit 2 and one line ------------------------------------------------------

def _edited(fixtures, tmp_path: Path, key: str, edit) -> Path:
    payload = torch.load(fixtures[key][0], weights_only=True)
    edit(payload.get("state_dict", payload))
    path = tmp_path / "edited.pth"
    torch.save(payload, path)
    return path


def _refused(args: list[str], *fragments: str) -> None:
    result = run_import(args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


L1 = "features.stage1.unit1.body.conv1.conv"
L_DP = "module." + L1


def _set(key: str, value):
    return lambda st: st.__setitem__(key, value)


REFUSALS = {
    "theta-shape": ("cifar20_lcq_4bit_lwn", _set(f"{L1}.x_theta", torch.zeros(15)),
                    [f"{L1}.x_theta has shape (15,)"]),
    "init-false": ("cifar20_lcq_4bit_lwn", _set(f"{L1}.init_state", torch.tensor(False)),
                   [f"{L1}.init_state is False", "never initialised"]),
    "init-not-bool": ("cifar20_lcq_4bit_lwn", _set(f"{L1}.init_state", torch.ones(1)),
                      [f"{L1}.init_state is not the 0-dim bool"]),
    "negative-alpha": ("cifar20_lcq_4bit_lwn", _set(f"{L1}.x_threshold", torch.tensor([-1.0])),
                       [f"{L1}.x_threshold", "not positive", "asserts"]),
    "nan-scale": ("cifar56_lsq_3bit_none", _set(f"{L1}.w_scale", torch.tensor([float("nan")])),
                  [f"{L1}.w_scale holds NaN"]),
    "zero-scale": ("cifar56_lsq_3bit_none", _set(f"{L1}.x_scale", torch.tensor([0.0])),
                   [f"{L1}.x_scale", "not positive"]),
    "dst": ("cifar20_lcq_4bit_lwn", _set(f"{L1}.w_dst", torch.arange(16) / 15),
            [f"{L1}.w_dst is not k/16"]),
    "extra-key": ("cifar20_lcq_4bit_lwn", _set(f"{L1}.x_bitscale", torch.ones(1)),
                  [f"unexpected key {L1}.x_bitscale"]),
    "missing-key": ("cifar20_lcq_4bit_lwn", lambda st: st.pop(f"{L1}.x_dst"),
                    [f"key {L1}.x_dst is missing"]),
    "nulsq-steps": ("cifar56_lsq_3bit_none", _set(f"{L1}.x_scale", torch.ones(7)),
                    ["x_scale has shape (7,)", "nuLSQ"]),
    "float16": ("cifar20_lcq_4bit_lwn", _set(f"{L1}.weight", torch.zeros(4, 4, 3, 3,
                                                                         dtype=torch.half)),
                [f"{L1}.weight has dtype torch.float16"]),
    "first-max-zero": ("cifar20_lcq_4bit_lwn", _set("features.init_block.weight",
                                                    -torch.arange(108.0).view(4, 3, 3, 3)),
                       ["features.init_block.weight has maximum 0"]),
    "huge-declared-width": ("cifar20_lcq_4bit_lwn", _set(
        "features.init_block.weight", torch.zeros(1).expand(100000, 3, 3, 3)),
        ["declare width 100000"]),
    "mixed-prefix": ("cifar20_lcq_2bit_lwn_dp", lambda st: st.__setitem__(
        "features.extra", torch.ones(1)), ["some keys start with 'module.'"]),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_of_tampered_files(fixtures, tmp_path, name):
    key, edit, fragments = REFUSALS[name]
    path = _edited(fixtures, tmp_path, key, edit)
    _refused([str(path), "--run-params", str(fixtures[key][1]), "--out",
              str(tmp_path / "x.pt")], *fragments)


def test_refuses_truncated_pickled_and_foreign_files(fixtures, tmp_path):
    data = fixtures["cifar20_lcq_4bit_lwn"][0].read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    out = str(tmp_path / "x.pt")
    _refused([str(truncated), "--bits", "4", "--out", out], "truncated.pth")
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": torch.nn.Linear(2, 2)}, pickled)
    _refused([str(pickled), "--bits", "4", "--out", out], "tensors and plain data only")
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"layer1.unit1.quant_convbn1.conv.weight": torch.ones(1)}},
               foreign)
    _refused([str(foreign), "--bits", "4", "--out", out], "not a checkpoint of the nuLSQ")


def test_refuses_missing_and_contradictory_information(fixtures, tmp_path):
    path, run_file = fixtures["cifar20_lcq_4bit_lwn"]
    out = str(tmp_path / "x.pt")
    _refused([str(path), "--out", out], "num_bits", "--bits")
    _refused([str(path), "--bits", "4", "--out", out], "first_bits", "--first-last-bits")
    _refused([str(path), "--bits", "4", "--first-last-bits", "8", "--out", out],
             "weight_norm", "--weight-norm")
    _refused([str(path), "--run-params", str(run_file), "--bits", "3", "--out", out],
             "--bits 3 contradicts", "num_bits: 4")
    _refused([str(path), "--run-params", str(run_file), "--weight-norm", "none", "--out", out],
             "--weight-norm none contradicts", "weight_norm: lwn")
    _refused([str(path), "--bits", "2", "--first-last-bits", "8", "--weight-norm", "lwn",
              "--out", out], "w_theta exists", "not 2")
    two_bit = fixtures["cifar20_lcq_2bit_lwn_dp"][0]
    _refused([str(two_bit), "--bits", "4", "--first-last-bits", "8", "--weight-norm", "lwn",
              "--out", out], "w_theta is missing", "2-bit")
    _refused([str(path), "--run-params", str(run_file), "--weights", "lsq", "--out", out],
             "--weights does not apply to --from nulsq")
    lsq = fixtures["cifar56_lsq_3bit_none"][0]
    _refused([str(lsq), "--bits", "3", "--first-last-bits", "8", "--weight-norm", "none",
              "--out", out], "grad_scale_mode", "--lsq-grad-scale")


def _run_file(tmp_path: Path, spec: FixtureSpec, **changes: str) -> Path:
    text = run_params_text(spec)
    for key, value in changes.items():
        text = re.sub(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.M)
    path = tmp_path / "edited.txt"
    path.write_text(text)
    return path


def test_refuses_run_files_that_contradict_the_checkpoint(fixtures, tmp_path):
    path = fixtures["cifar20_lcq_4bit_lwn"][0]
    spec = STANDARD["cifar20_lcq_4bit_lwn"]
    out = str(tmp_path / "x.pt")
    cases = {"model": ("pytorchcv_preresnet18", "model pytorchcv_preresnet18"),
             "w_quantizer": ("<class 'src.quantizer.uniform.lsq.LSQ_quantizer'>",
                             "w_quantizer LSQ_quantizer contradicts"),
             "x_quantizer": ("<class 'src.quantizer.nonuniform.nulsq.Positive_nuLSQ_quantizer'>",
                             "Positive_nuLSQ_quantizer"),
             "num_bits": ("four", "num_bits is 'four'"),
             "weight_norm": ("BN", "weight_norm 'BN'")}
    for key, (value, fragment) in cases.items():
        _refused([str(path), "--run-params", str(_run_file(tmp_path, spec, **{key: value})),
                  "--out", out], fragment)
    duplicated = tmp_path / "dup.txt"
    duplicated.write_text(run_params_text(spec) + "num_bits: 4\n")
    _refused([str(path), "--run-params", str(duplicated), "--out", out], "num_bits given twice")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00" * 10)
    _refused([str(path), "--run-params", str(binary), "--out", out], "binary.txt")


# ---- fixed MinMax ranges ----------------------------------------------------------------

def test_calibrated_minmax_takes_fixed_ranges_from_calib(fixtures, tmp_path):
    import numpy as np

    from qconvert.quant import LSQQuantizer

    path, run_file = fixtures["cifar20_lcq_4bit_lwn"]
    images = np.random.default_rng(0).random((6, 3, 32, 32), dtype=np.float32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=images)
    out = tmp_path / "fixed.pt"
    result = run_import([str(path), "--run-params", str(run_file), "--minmax", "calibrated",
                         "--calib", str(calib), "--out", str(out)])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out)
    first = ckpt.model.features.init_block.act_quant
    last = ckpt.model.output.act_quant
    assert isinstance(first, LSQQuantizer) and first.signed and first.bits == 8
    assert isinstance(last, LSQQuantizer) and not last.signed and last.bits == 8
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    peak = ((torch.from_numpy(images) - mean) / std).max()
    assert torch.equal(first.step, (peak / 127).reshape(1))
    assert ckpt.training["first_last"] == "fixed ranges from calibration data"
    with torch.no_grad():  # the inner layers are untouched: logits stay close to the source
        x = _inputs(STANDARD["cifar20_lcq_4bit_lwn"], 2)
        assert torch.isfinite(ckpt.model.eval()(x)).all()
    result = CliRunner().invoke(main, ["export", str(out), "--out", str(tmp_path / "i.onnx"),
                                       "--mode", "integer"])
    assert result.exit_code == 2  # LCQ's mirror / clip have no integer form: refused
    assert "integer mode does not support CompandQuant's mirror / clip" in result.output
    _refused([str(path), "--run-params", str(run_file), "--minmax", "calibrated", "--out",
              str(tmp_path / "y.pt")], "--minmax calibrated needs --calib")
    _refused([str(path), "--run-params", str(run_file), "--calib", str(calib), "--out",
              str(tmp_path / "y.pt")], "--calib is used with --minmax calibrated only")
