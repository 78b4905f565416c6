"""Model-level latency of an exported quantized model against its FP32 twin.

    .venv/bin/python benchmarks/bench_model_latency.py CHECKPOINT.pt EXPORTED.onnx \\
        [--batches 1 32] [--reps 40 15] [--threads 1] [--profile]

The FP32 model is rebuilt from the checkpoint and exported to a temporary file. The
exported file runs two ways: ``plain``, a plain ``onnxruntime.InferenceSession`` of the
file with the native library registered (what a C++, C# or Java user gets: the constant
weight decodes fold at load), and ``session``, what ``qconvert.runtime.session`` and
``qconvert bench`` run (the same file plus a session-time rewrite: the activation
quantizers kept in ORT's NCHWc layout by qconvert.nchwc). The sessions
run interleaved, so all see the same machine state: fp32, plain, session and
plain-ort-cpu (a plain session of ``export --optimize-for cpu``'s file) with ORT's default
optimizations, and fp32 and plain again with the NCHWc layout transformer
disabled. Printed: median and minimum latency with their ratios to fp32 (on a busy shared
machine the minimum shows the undisturbed cost), and the machine's load average. ``--clock cpu``
times this thread's CPU time instead of wall time (one intra-op thread runs in the calling
thread), which other processes on the machine disturb far less.

``--lib OTHER.so`` (repeatable) adds a plain session using another build of the
library, interleaved with the rest: the way to compare two builds on a busy
machine. ``--profile`` adds, per batch size, ORT's per-node kernel times for the plain
session: per op type, the sum over nodes of each node's median time (medians,
not means: the machine may be shared).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qconvert import native  # noqa: E402
from qconvert.bench import export_float, float_model  # noqa: E402
from qconvert.checkpoint import load_checkpoint  # noqa: E402
from qconvert.optimized_file import optimize_for_cpu  # noqa: E402
from qconvert.runtime import session  # noqa: E402


def session_options(
    native_ops: bool,
    nchwc: bool,
    threads: int,
    profile_prefix: str | None = None,
    library: Path | None = None,
) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not nchwc:
        so.add_session_config_entry("optimization.disable_specified_optimizers", "NchwcTransformer")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if library is not None:
        so.register_custom_ops_library(str(library))
    elif native_ops:
        native.register(so)
    return so


def make_session(model: bytes, *args, **kwargs) -> ort.InferenceSession:
    return ort.InferenceSession(model, session_options(*args, **kwargs),
                                providers=["CPUExecutionProvider"])


def input_for(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else batch for d in inp.shape]
    shape[0] = batch
    return {inp.name: np.random.default_rng(0).random(shape, dtype=np.float32)}


def latency_table(sessions: dict[str, Callable], batch: int, reps: int,
                  shape: list[int], clock: Callable[[], float] = time.perf_counter) -> None:
    x = np.random.default_rng(0).random([batch, *shape[1:]], dtype=np.float32)
    for run in sessions.values():  # warm-up: arena growth, pre-packing
        run(x)
        run(x)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    load = os.getloadavg()[0]
    for rep in range(reps):
        for k in order if rep % 2 == 0 else reversed(order):
            start = clock()
            sessions[k](x)
            times[k].append(clock() - start)
    base, fastest = statistics.median(times["fp32"]), min(times["fp32"])
    kind = "cpu" if clock is time.thread_time else "wall"
    print(f"batch {batch}, {reps} interleaved runs ({kind} time): median, ratio; minimum, ratio "
          f"(load average {load:.2f} -> {os.getloadavg()[0]:.2f})")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"  {k:>16} {med * 1e3:9.3f} ms  {med / base:5.2f}x  "
              f"{min(v) * 1e3:9.3f} ms  {min(v) / fastest:5.2f}x")


def runner(sess: ort.InferenceSession) -> Callable:
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def profile_table(model: bytes, batch: int, reps: int, threads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sess = make_session(model, True, True, threads, os.path.join(tmp, "prof"))
        feeds = input_for(sess, batch)
        warm = 3
        for _ in range(warm + reps):
            sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]].append(e["dur"])
            op_of[e["name"]] = e["args"]["op_name"]
    sums: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for node, durs in per_node.items():
        sums[op_of[node]] += statistics.median(durs[warm:] or durs)
        counts[op_of[node]] += 1
    print(f"batch {batch}, plain session kernel times (sum of per-node medians of {reps} runs)")
    for op, us in sorted(sums.items(), key=lambda kv: -kv[1]):
        print(f"  {op:>14} {us / 1e3:8.3f} ms  ({counts[op]} nodes)")
    print(f"  {'total':>14} {sum(sums.values()) / 1e3:8.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("onnx_model", type=Path)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--reps",
        type=int,
        nargs="+",
        default=[40, 15],
        help="runs per batch size (one value, or one per batch size)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this thread's CPU time (one intra-op thread runs in the calling thread), "
        "robust to other processes on a shared machine",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--lib",
        type=Path,
        action="append",
        default=[],
        help="another build of libqconvert_ops.so: adds a q session with it, "
        "interleaved with the others (repeatable)",
    )
    parser.add_argument(
        "--skip-nonchwc",
        action="store_true",
        help="leave out the two sessions without the NCHWc transformer",
    )
    args = parser.parse_args()
    reps = args.reps * len(args.batches) if len(args.reps) == 1 else args.reps
    if len(reps) != len(args.batches):
        parser.error("--reps needs one value or one per --batches value")
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures the calling thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if native.library_path() is None:
        sys.exit("libqconvert_ops.so not built: run `make ops`")

    ckpt = load_checkpoint(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        export_float(float_model(ckpt), ckpt.input.shape, fp32_path)
        fp32 = fp32_path.read_bytes()
    q = args.onnx_model.read_bytes()
    print(
        f"onnxruntime {ort.__version__}, {args.threads} intra-op thread(s), "
        f"library {native.library_path()}"
    )
    ours = session(args.onnx_model, "native", threads=args.threads, announce=None)
    input_name = ours.input_names[0]
    sessions = {
        "fp32": runner(make_session(fp32, False, True, args.threads)),
        "plain": runner(make_session(q, True, True, args.threads)),
        "session": lambda x: ours.run({input_name: x}),
        "plain-ort-cpu": runner(make_session(
            optimize_for_cpu(onnx.load(str(args.onnx_model))).SerializeToString(), True, True,
            args.threads)),
    }
    for lib in args.lib:
        sessions[f"plain[{lib.name}]"] = runner(
            make_session(q, True, True, args.threads, library=lib))
    if not args.skip_nonchwc:
        sessions["fp32-nonchwc"] = runner(make_session(fp32, False, False, args.threads))
        sessions["plain-nonchwc"] = runner(make_session(q, True, False, args.threads))
    shape = [1, *ckpt.input.shape]
    for batch, n in zip(args.batches, reps, strict=True):
        latency_table(sessions, batch, n, shape, clock)
    if args.profile:
        for batch, n in zip(args.batches, reps, strict=True):
            profile_table(q, batch, n, args.threads)


if __name__ == "__main__":
    main()
