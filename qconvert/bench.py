"""``qconvert bench``: the exported model against what users would otherwise deploy.

Every candidate runs in this one process with the same thread setting, and the
latency rounds interleave the candidates (A, B, C, A, B, C, ...) so that load from
elsewhere on a shared machine hits them alike: ratios are measured side by side.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from .archs import build_architecture
from .calib import CalibData
from .checkpoint import Checkpoint
from .export.onnx_export import export_checkpoint
from .inspect_model import inspect_model
from .native import library_path
from .preprocess import prepare_inputs
from .runtime import session

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class Candidate:
    name: str
    run: Runner
    file_bytes: int | None
    latency_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    top1_agreement: float | None = None


@dataclass
class BenchResult:
    checkpoint: str
    threads: int
    ideal_bytes: int
    candidates: list[dict]
    export_seconds: float
    float_export_seconds: float
    validate_samples_per_s: float
    bare_samples_per_s: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def float_model(ckpt: Checkpoint) -> torch.nn.Module:
    """The same architecture in float, carrying the QAT model's latent float weights."""
    model = build_architecture(ckpt.arch, ckpt.arch_kwargs)
    qat_state = ckpt.model.state_dict()
    model.load_state_dict({k: v for k, v in qat_state.items() if k in model.state_dict()})
    return model.eval()


def export_float(model: torch.nn.Module, shape: tuple[int, ...], out: Path) -> float:
    started = time.perf_counter()
    with _quiet():
        torch.onnx.export(model, (torch.zeros(2, *shape),), str(out), dynamo=True,
                          external_data=False,
                          input_names=["input"], output_names=["output"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    return time.perf_counter() - started


def quantize_int8(fp32_path: Path, out: Path, samples: np.ndarray) -> None:
    """The baseline users reach for: static int8 QDQ, calibrated on the same data."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": samples[i:i + 16]} for i in range(0, len(samples), 16)])

        def get_next(self):
            return next(self.batches, None)

    with _quiet():
        quantize_static(str(fp32_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def _ort_runner(path_or_model, runtime: str, threads: int) -> Runner:
    sess = session(path_or_model, runtime, threads=threads, announce=None)
    name = sess.input_names[0]
    return lambda x: sess.run({name: x})[0]


def _torch_runner(model: torch.nn.Module) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()
    return run


def measure_latency(candidates: list[Candidate], x: np.ndarray, rounds: int) -> None:
    """Median and p90 per candidate over ``rounds`` interleaved rounds (so all see the same
    machine load). Each timed run follows an untimed run of the same candidate: steady-state
    latency, not the cold caches left by whichever candidate ran before (PyTorch eager above
    all, which evicts a small ONNX model's weights and buffers).
    """
    for c in candidates:  # warm-up: first-run allocations, pre-packing
        c.run(x)
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    for _ in range(rounds):
        for c in candidates:
            c.run(x)
            started = time.perf_counter()
            c.run(x)
            times[c.name].append((time.perf_counter() - started) * 1e3)
    for c in candidates:
        c.latency_ms[len(x)] = {"median": float(np.median(times[c.name])),
                                "p90": float(np.percentile(times[c.name], 90))}


def _agreement(reference: np.ndarray, other: np.ndarray) -> float:
    return float((reference.argmax(1) == other.argmax(1)).mean())


def _validation_throughput(ckpt: Checkpoint, onnx_path: Path, inputs: np.ndarray,
                           data: CalibData, runtime: str, threads: int) -> tuple[float, float]:
    """Samples/s of ``validate`` and of bare inference of both models on the same batches."""
    from .validate import validate

    sess = session(onnx_path, runtime, threads=threads, announce=None)
    model = onnx.load(str(onnx_path))
    started = time.perf_counter()
    validate(ckpt, model, data, lambda m: session(m, runtime, threads=threads, announce=None))
    validate_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(0, len(inputs), 64):
        batch = inputs[i:i + 64]
        with torch.no_grad():
            ckpt.model(torch.from_numpy(batch))
        sess.run({sess.input_names[0]: batch})
    bare_s = time.perf_counter() - started
    return len(inputs) / validate_s, len(inputs) / bare_s


def run_bench(ckpt: Checkpoint, data: CalibData, threads: int = 1, rounds: int = 30,
              batches: tuple[int, ...] = (1, 32), log=print) -> BenchResult:
    torch.set_num_threads(threads)
    inputs = prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean,
                            ckpt.input.std).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32_path, int8_path, q_path = tmp / "fp32.onnx", tmp / "int8.onnx", tmp / "q.onnx"
        log("exporting: float architecture, then qconvert")
        float_seconds = export_float(float_model(ckpt), ckpt.input.shape, fp32_path)
        started = time.perf_counter()
        export_checkpoint(ckpt, q_path)
        export_seconds = time.perf_counter() - started
        log("calibrating the int8 QDQ baseline")
        quantize_int8(fp32_path, int8_path, inputs[:256])
        candidates = []
        notes = []
        if library_path() is not None:
            candidates.append(Candidate("qconvert native", _ort_runner(q_path, "native", threads),
                                        q_path.stat().st_size))
        else:
            notes.append("native library not built (make ops): no native row")
        candidates += [
            Candidate("qconvert function", _ort_runner(q_path, "function", threads),
                      q_path.stat().st_size),
            Candidate("FP32 ONNX (ORT)", _ort_runner(fp32_path, "function", threads),
                      fp32_path.stat().st_size),
            Candidate("int8 QDQ (ORT)", _ort_runner(int8_path, "function", threads),
                      int8_path.stat().st_size),
            Candidate("PyTorch eager QAT", _torch_runner(ckpt.model), None),
        ]
        reference = _torch_runner(ckpt.model)(inputs)
        for c in candidates:
            c.top1_agreement = _agreement(reference, c.run(inputs))
        for batch in batches:
            log(f"latency at batch {batch}: {rounds} interleaved rounds")
            x = np.ascontiguousarray(np.resize(inputs, (batch, *inputs.shape[1:])))
            measure_latency(candidates, x, rounds)
        runtime = "native" if library_path() is not None else "function"
        log("validation throughput")
        validate_rate, bare_rate = _validation_throughput(ckpt, q_path, inputs, data, runtime,
                                                          threads)
        ideal = inspect_model(q_path).ideal_bytes
    return BenchResult(
        checkpoint=str(ckpt.path), threads=threads, ideal_bytes=ideal,
        candidates=[{"name": c.name, "file_bytes": c.file_bytes, "latency_ms": c.latency_ms,
                     "top1_agreement": c.top1_agreement} for c in candidates],
        export_seconds=export_seconds, float_export_seconds=float_seconds,
        validate_samples_per_s=validate_rate, bare_samples_per_s=bare_rate, notes=notes,
    )


def format_table(result: BenchResult) -> str:
    rows = result.candidates
    fp32 = next(r for r in rows if r["name"].startswith("FP32"))
    batches = sorted(fp32["latency_ms"], key=int)
    head = (f"{'model':<20}" + "".join(f" {'b' + str(b) + ' ms':>9} {'xFP32':>6}" for b in batches)
            + f" {'bytes':>10} {'xideal':>7} {'xFP32':>6} {'top-1 agr.':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = ""
        for b in batches:
            median = r["latency_ms"][b]["median"]
            cells += f" {median:>9.3f} {median / fp32['latency_ms'][b]['median']:>6.2f}"
        size = r["file_bytes"]
        size_cells = f" {'-':>10} {'-':>7} {'-':>6}"
        if size:
            size_cells = (f" {size:>10} {size / result.ideal_bytes:>7.2f} "
                          f"{size / fp32['file_bytes']:>6.3f}")
        lines.append(f"{r['name']:<20}{cells}{size_cells} {r['top1_agreement']:>10.2%}")
    lines.append(f"export: qconvert {result.export_seconds:.1f} s vs float torch.onnx.export "
                 f"{result.float_export_seconds:.1f} s = "
                 f"{result.export_seconds / result.float_export_seconds:.2f}x")
    lines.append(f"validation: {result.validate_samples_per_s:.0f} samples/s vs bare inference "
                 f"of both models {result.bare_samples_per_s:.0f} samples/s = "
                 f"{result.bare_samples_per_s / result.validate_samples_per_s:.2f}x overhead")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def format_markdown(result: BenchResult) -> str:
    """The same table as markdown, ratios first, with the project's targets marked."""
    rows = result.candidates
    fp32 = next(r for r in rows if r["name"].startswith("FP32"))
    eager = next(r for r in rows if r["name"].startswith("PyTorch"))
    batches = sorted(fp32["latency_ms"], key=int)
    head = ("| model | " + " | ".join(f"b{b} x FP32 | b{b} ms (p90)" for b in batches)
            + " | file x ideal | file x FP32 | top-1 agreement |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = []
        for b in batches:
            lat = r["latency_ms"][b]
            cells += [f"{lat['median'] / fp32['latency_ms'][b]['median']:.2f}",
                      f"{lat['median']:.2f} ({lat['p90']:.2f})"]
        size = r["file_bytes"]
        sizes = ([f"{size / result.ideal_bytes:.2f}", f"{size / fp32['file_bytes']:.3f}"]
                 if size else ["-", "-"])
        lines.append(f"| {r['name']} | " + " | ".join(cells + sizes)
                     + f" | {r['top1_agreement']:.2%} |")
    native = next((r for r in rows if r["name"] == "qconvert native"), None)
    if native:
        b1 = batches[0]
        speedup = eager["latency_ms"][b1]["median"] / native["latency_ms"][b1]["median"]
        lines.append("")
        lines.append(f"- qconvert native vs PyTorch eager QAT at batch {b1}: "
                     f"{speedup:.1f}x faster (target >= 3x: {'met' if speedup >= 3 else 'MISSED'})")
        for b in batches:
            ratio = native["latency_ms"][b]["median"] / fp32["latency_ms"][b]["median"]
            lines.append(f"- native latency at batch {b}: {ratio:.2f}x FP32 "
                         f"(target <= 1.10x: {'met' if ratio <= 1.10 else 'MISSED'})")
        size_ratio = native["file_bytes"] / result.ideal_bytes
        lines.append(f"- file {native['file_bytes']} B = {size_ratio:.2f}x ideal packed "
                     f"({result.ideal_bytes} B; target <= 1.10x: "
                     f"{'met' if size_ratio <= 1.10 else 'MISSED'}), "
                     f"{native['file_bytes'] / fp32['file_bytes']:.3f}x the FP32 file")
    lines.append(f"- export: {result.export_seconds:.1f} s vs {result.float_export_seconds:.1f} s "
                 f"for torch.onnx.export of the float model "
                 f"({result.export_seconds / result.float_export_seconds:.2f}x)")
    lines.append(f"- validation: {result.validate_samples_per_s:.0f} samples/s; bare inference "
                 f"of both models {result.bare_samples_per_s:.0f} samples/s")
    lines += [f"- note: {n}" for n in result.notes]
    return "\n".join(lines)


def plot(result: BenchResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.candidates
    names = [r["name"] for r in rows]
    batches = sorted(rows[0]["latency_ms"], key=int)
    fig, (ax_lat, ax_size) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        ax_lat.barh(np.arange(len(rows)) + i * width, [r["latency_ms"][b]["median"] for r in rows],
                    height=width, label=f"batch {b}")
    ax_lat.set_yticks(np.arange(len(rows)) + width * (len(batches) - 1) / 2, names)
    ax_lat.set_xscale("log")
    ax_lat.set_xlabel(f"median latency, ms ({result.threads} thread(s), this machine)")
    ax_lat.legend()
    sized = [r for r in rows if r["file_bytes"]]
    ax_size.barh([r["name"] for r in sized], [r["file_bytes"] / 1024 for r in sized],
                 color="tab:green")
    ax_size.axvline(result.ideal_bytes / 1024, color="black", linestyle="--",
                    label="ideal packed size")
    ax_size.set_xlabel("file size, KiB")
    ax_size.legend()
    fig.suptitle(f"qconvert bench: {Path(result.checkpoint).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
