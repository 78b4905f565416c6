"""``qconvert bench``: the exported model against what users would otherwise deploy.

Every candidate runs in this one process with the same thread setting, and the
latency rounds interleave the candidates (A, B, C, A, B, C, ...) so that load from
elsewhere on a shared machine hits them alike: ratios are measured side by side.

The exported file is timed twice: as a plain ``onnxruntime.InferenceSession`` with the
native library registered (what a C++, C# or Java user gets) and as qconvert's session,
which also rewrites the graph at load (the NCHWc splice of qconvert/nchwc.py, a
session-time optimization only). Integer mode (b' = 8) is timed as a plain load, with and
without ``--conv-kernel qconvert`` (the same integer model, its convolutions rewritten).
Tables and plots: ``bench_report``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .archs import build_architecture
from .calib import CalibData
from .checkpoint import Checkpoint
from .errors import QConvertError
from .export.integer import with_qconv_clamp
from .export.onnx_export import export_checkpoint, quiet_exporter, write_exported
from .inspect_model import inspect_model
from .native import QUIET_LOGS, library_path, register
from .preprocess import prepare_inputs
from .runtime import session

Runner = Callable[[np.ndarray], np.ndarray]
# Row names (bench_report finds rows by them).
PLAIN = "plain load (ORT + library)"
SESSION = "qconvert session"
INTEGER = "integer b'=8 (plain load)"
QCONV_CLAMP = "integer b'=8 --conv-kernel qconvert"  # that file, plain load
STOCK = "stock ORT (function bodies)"
FP32 = "FP32 ONNX (ORT)"
EAGER = "PyTorch eager QAT"


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
    arch: str
    threads: int
    ideal_bytes: int
    candidates: list[dict]
    export_seconds: float
    float_export_seconds: float
    validate_samples_per_s: float
    bare_samples_per_s: float
    onnxruntime: str = ort.__version__
    load_average: list[float] = field(default_factory=list)  # 1-min, before / after timing
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def float_model(ckpt: Checkpoint) -> torch.nn.Module:
    """The same architecture in float, carrying the QAT model's latent float weights."""
    model = build_architecture(ckpt.arch, ckpt.arch_kwargs)
    qat_state = ckpt.model.state_dict()
    model.load_state_dict({k: v for k, v in qat_state.items() if k in model.state_dict()})
    return model.eval()


def export_float(model: torch.nn.Module, shape: tuple[int, ...], out: Path) -> float:
    started = time.perf_counter()
    with quiet_exporter():
        torch.onnx.export(model, (torch.zeros(2, *shape),), str(out), dynamo=True,
                          external_data=False,
                          input_names=["input"], output_names=["output"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    return time.perf_counter() - started


def quantize_int8(fp32_path: Path, out: Path, samples: np.ndarray, fast: bool = True) -> None:
    """ONNX Runtime's own static int8 QDQ model, calibrated on the same data. ``fast``:
    U8S8 (uint8 activations, int8 per-channel weights), the form ORT fuses on x86;
    otherwise S8S8 per-tensor, quantize_static's signed form, which it does not fuse."""
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

    with quiet_exporter():
        quantize_static(str(fp32_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8 if fast else QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=fast)


def plain_session(path: Path | str, threads: int, library: bool = True) -> ort.InferenceSession:
    """The file as ONNX Runtime loads it for any user: default optimizations, the native
    library registered (``library``), no qconvert code in between."""
    options = ort.SessionOptions()
    options.log_severity_level = QUIET_LOGS
    if threads:
        options.intra_op_num_threads = threads
    if library:
        register(options)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _plain_runner(path: Path, threads: int) -> Runner:
    sess = plain_session(path, threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


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


def _export_integer(ckpt: Checkpoint, calib: np.ndarray, int_path: Path,
                    qcc_path: Path) -> list[str]:
    """The integer file (b' = 8) and its ``--conv-kernel qconvert`` twin, rewritten from
    the same integer model (one calibration); notes for the files a model does not admit."""
    try:
        integer = export_checkpoint(ckpt, int_path, outer_bits=8, integer_calib=calib).model
    except QConvertError as exc:  # a model integer mode does not rewrite: no row
        return [f"no integer-mode row: {exc}"]
    try:
        write_exported(with_qconv_clamp(integer), qcc_path)
    except QConvertError as exc:
        return [f"no row for {exc}"]  # the refusal names the option
    return []


def run_bench(ckpt: Checkpoint, data: CalibData, threads: int = 1, rounds: int = 30,
              batches: tuple[int, ...] = (1, 32), log=print) -> BenchResult:
    torch.set_num_threads(threads)
    inputs = prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean,
                            ckpt.input.std).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32_path, q_path = tmp / "fp32.onnx", tmp / "q.onnx"
        u8s8_path, s8s8_path, int_path = tmp / "u8s8.onnx", tmp / "s8s8.onnx", tmp / "int.onnx"
        qcc_path = tmp / "int_qconv_clamp.onnx"
        log("exporting: float architecture, then qconvert")
        float_seconds = export_float(float_model(ckpt), ckpt.input.shape, fp32_path)
        started = time.perf_counter()
        export_checkpoint(ckpt, q_path)
        export_seconds = time.perf_counter() - started
        log("calibrating the int8 baselines and qconvert's integer mode")
        quantize_int8(fp32_path, u8s8_path, inputs[:256])
        quantize_int8(fp32_path, s8s8_path, inputs[:256], fast=False)
        notes = _export_integer(ckpt, inputs[:256], int_path, qcc_path)
        candidates = []
        q_bytes = q_path.stat().st_size
        if library_path() is not None:
            candidates += [Candidate(PLAIN, _plain_runner(q_path, threads), q_bytes),
                           Candidate(SESSION, _ort_runner(q_path, "native", threads), q_bytes),
                           *[Candidate(name, _plain_runner(path, threads), path.stat().st_size)
                             for name, path in ((INTEGER, int_path), (QCONV_CLAMP, qcc_path))
                             if path.exists()]]
        else:
            notes.append("native library not built (make ops): no plain-load or session row")
        candidates += [
            Candidate(STOCK, _ort_runner(q_path, "function", threads), q_bytes),
            Candidate(FP32, _ort_runner(fp32_path, "function", threads),
                      fp32_path.stat().st_size),
            Candidate("int8 U8S8 QDQ (ORT)",
                      _ort_runner(u8s8_path, "function", threads), u8s8_path.stat().st_size),
            Candidate("int8 S8S8 QDQ (ORT, unfused)",
                      _ort_runner(s8s8_path, "function", threads), s8s8_path.stat().st_size),
            Candidate(EAGER, _torch_runner(ckpt.model), None),
        ]
        reference = _torch_runner(ckpt.model)(inputs)
        for c in candidates:
            c.top1_agreement = _agreement(reference, c.run(inputs))
        load = [os.getloadavg()[0]]
        for batch in batches:
            log(f"latency at batch {batch}: {rounds} interleaved rounds")
            x = np.ascontiguousarray(np.resize(inputs, (batch, *inputs.shape[1:])))
            measure_latency(candidates, x, rounds)
        load.append(os.getloadavg()[0])
        runtime = "native" if library_path() is not None else "function"
        log("validation throughput")
        validate_rate, bare_rate = _validation_throughput(ckpt, q_path, inputs, data, runtime,
                                                          threads)
        ideal = inspect_model(q_path).ideal_bytes
    return BenchResult(
        checkpoint=str(ckpt.path), arch=ckpt.arch, threads=threads, ideal_bytes=ideal,
        candidates=[{"name": c.name, "file_bytes": c.file_bytes, "latency_ms": c.latency_ms,
                     "top1_agreement": c.top1_agreement} for c in candidates],
        export_seconds=export_seconds, float_export_seconds=float_seconds,
        validate_samples_per_s=validate_rate, bare_samples_per_s=bare_rate,
        load_average=load, notes=notes,
    )
