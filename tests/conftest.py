"""Shared fixtures for the export / validate / inspect / CLI tests.

Small QAT checkpoints are trained for a few SGD steps (so every learned parameter,
e.g. LCQ's theta, has moved off its initial value), saved with ``save_checkpoint``
and exported once per session. Everything is built lazily: a test run that only
needs one checkpoint trains and exports only that one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from qconvert.archs import build_architecture
from qconvert.checkpoint import save_checkpoint
from qconvert.cli import main
from qconvert.quant import quantize_model

SCHEMES = ("lsq", "lcq", "asq-lsq", "asq-post", "pot", "post")
MEAN, STD = (0.5,), (0.25,)
ARCH_KWARGS = {"in_channels": 1}
SHAPES = {"digits_cnn": (1, 8, 8), "resnet20": (1, 16, 16), "mobilenetv2_small": (1, 16, 16)}

# One layer of every kind, so one model carries all four qconvert ops.
MIXED_OVERRIDES = {
    "features.3": {"weight": {"kind": "lcq", "normalize": True}, "act": {"kind": "lcq"}},
    "features.7": {"weight": {"kind": "post"}, "act": {"kind": "asq"}},
}


@dataclass(frozen=True)
class CaseSpec:
    arch: str
    scheme: str
    overrides: dict | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return SHAPES[self.arch]


CASES: dict[str, CaseSpec] = {f"digits-{s}": CaseSpec("digits_cnn", s) for s in SCHEMES}
CASES["resnet20-lcq"] = CaseSpec("resnet20", "lcq")
CASES["mobilenet-asq-post"] = CaseSpec("mobilenetv2_small", "asq-post")
CASES["digits-mixed"] = CaseSpec("digits_cnn", "lsq", MIXED_OVERRIDES)

# Known finding (see BOUNDARY_REASON): on these keys, ONNX Runtime's float Conv/BN arithmetic
# differs from PyTorch's by ~1 ulp exactly where a downstream LSQ input sits on a rounding
# tie (x / s = k + 0.5), so codes flip and the end-to-end output parity check fails.
BOUNDARY_KEYS = {"digits-lsq"}
BOUNDARY_REASON = (
    "FINDING: LSQ weights x LSQ activations put conv outputs on a lattice; in digits-lsq one "
    "channel's lattice points sit on the next quantizer's rounding ties (x/s = k + 0.5 within "
    "2e-7), so ORT's Conv/BN (plus its ConvBnFusion) float noise flips codes -> output diff "
    ">> 1e-4 x max|out| and argmax disagreements on the ORT runtimes although every op is "
    "exact (teacher-forced op check: 0 mismatches)")
DIGITS_KEYS = [f"digits-{s}" for s in SCHEMES]
BIG_KEYS = ["resnet20-lcq", "mobilenet-asq-post"]
ALL_KEYS = DIGITS_KEYS + BIG_KEYS  # one per scheme on digits, plus the two larger nets

# The ops each scheme must produce. First conv and last linear are LSQ-8 (LutGather weights).
EXPECTED_OPS = {
    # The first and last layers are LSQ at 8 bits in every scheme: UniformQuant + LutGather.
    "lsq": {"UniformQuant", "LutGather"},
    "lcq": {"UniformQuant", "CompandQuant", "LutGather"},
    "asq-lsq": {"UniformQuant", "AdaptiveStep", "LutGather"},
    "asq-post": {"UniformQuant", "AdaptiveStep", "Pow2Shift", "LutGather"},
    "pot": {"UniformQuant", "Pow2Shift", "LutGather"},
    "post": {"UniformQuant", "Pow2Shift", "LutGather"},
}


@dataclass
class Case:
    key: str
    spec: CaseSpec
    path: Path
    model: torch.nn.Module  # the trained QAT model, eval mode
    onnx_paths: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape

    @property
    def scheme(self) -> str:
        return self.spec.scheme

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def inputs(self, batch: int, seed: int = 0) -> np.ndarray:
        """Normalized model inputs (what the ONNX graph takes), float32."""
        raw = np.random.default_rng(seed).random((batch, *self.shape), dtype=np.float32)
        return ((raw - MEAN[0]) / STD[0]).astype(np.float32)

    def torch_out(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(x)).numpy()


def train_case(spec: CaseSpec, steps: int = 3, batch: int = 8, seed: int = 0) -> torch.nn.Module:
    """build -> quantize -> a training-mode forward (initialises quantizers) and a few SGD
    steps on random data, so parameters and BN statistics move off their init."""
    torch.manual_seed(seed)
    model = build_architecture(spec.arch, ARCH_KWARGS)
    quantize_model(model, spec.scheme, 4, 4, overrides=spec.overrides)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    model.train()
    for _ in range(steps):
        x = (torch.rand(batch, *spec.shape, generator=gen) - MEAN[0]) / STD[0]
        y = torch.randint(0, 10, (batch,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


PROGRESS_LABELS = {"validating", "folding layers"}


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """Test tensors are tiny: one intra-op thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(args: list[str], **kwargs):
    """Run the qconvert CLI in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def assert_one_line_error(result, code: int = 2) -> str:
    """Exit ``code``, a clean exit (no escaped exception), one 'error:' line on stderr."""
    detail = f"exit {result.exit_code}, exception {result.exception!r}\nstderr: {result.stderr}"
    assert isinstance(result.exception, SystemExit) or result.exception is None, detail
    assert result.exit_code == code, detail
    # click's progress bars print their label once on a non-terminal; that is not an error line
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and line.strip() not in PROGRESS_LABELS]
    assert len(lines) == 1, detail
    assert lines[0].startswith("error: "), detail
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    return lines[0]


class Zoo:
    """Lazily trained checkpoints and their exports, cached for the session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cases: dict[str, Case] = {}

    def case(self, key: str) -> Case:
        if key not in self.cases:
            spec = CASES[key]
            small = spec.arch != "digits_cnn"  # LCQ on ResNet-20 trains slowly on 2 cores
            model = train_case(spec, steps=2 if small else 3, batch=4 if small else 8)
            path = self.root / f"{key}.pt"
            save_checkpoint(path, model, arch=spec.arch, arch_kwargs=ARCH_KWARGS,
                            input_shape=spec.shape, mean=MEAN, std=STD,
                            training={"key": key})
            self.cases[key] = Case(key, spec, path, model)
        return self.cases[key]

    def onnx_path(self, key: str, opset: int = 20, functions: bool = True) -> Path:
        case = self.case(key)
        slot = (opset, functions)
        if slot not in case.onnx_paths:
            out = self.root / f"{key}-op{opset}{'' if functions else '-nofn'}.onnx"
            args = ["export", case.path, "--out", out, "--opset", opset]
            if not functions:
                args.append("--no-functions")
            result = invoke(args)
            assert result.exit_code == 0, (result.output, result.exception)
            case.onnx_paths[slot] = out
        return case.onnx_paths[slot]

    def onnx_model(self, key: str, opset: int = 20, functions: bool = True) -> onnx.ModelProto:
        return onnx.load(str(self.onnx_path(key, opset, functions)))


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def calib_npz(tmp_path_factory) -> Path:
    """48 samples x float32 [N, 1, 8, 8] in [0, 1] with int64 labels."""
    rng = np.random.default_rng(1234)
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=rng.random((48, 1, 8, 8), dtype=np.float32),
             y=rng.integers(0, 10, 48).astype(np.int64))
    return path


def quantized_layers(model: torch.nn.Module):
    from qconvert.quant import QConv2d, QLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, QConv2d | QLinear)]


def rel_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> tuple[bool, float, float]:
    bound = rel * float(np.abs(want).max())
    diff = float(np.abs(got.astype(np.float64) - want).max())
    return diff <= bound, diff, bound


def ceil_bytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)
