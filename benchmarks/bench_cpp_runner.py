"""The same exported file timed by the C++ runner and by a plain Python ONNX Runtime
session, in interleaved rounds: both load the file as a deployment would (default
session options, the qconvert library registered, one thread).

    .venv/bin/python benchmarks/bench_cpp_runner.py MODEL.onnx [--batch 1] [--rounds 5]

Prints the per-round medians and the ratio C++ / Python of their medians. A third
column times the Python session through an I/O binding (input and output OrtValues bound
once), which leaves out what ``session.run`` spends converting numpy arrays on each call:
the C++ runner has no such step, so C++ / bound Python is the like-for-like ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qconvert.native import ops_library_path

RUNNER = Path(__file__).resolve().parent.parent / "custom_ops" / "build" / "qconvert_run_model"


def cpp_median_ms(model: Path, runs: int, batch: int) -> float:
    out = subprocess.run([str(RUNNER), "--time", str(runs), str(model), str(ops_library_path()),
                          "--threads", "1", "--batch", str(batch)],
                         check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["median_ms"])


def median_ms(run, runs: int) -> float:
    for _ in range(10):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bound_run(session: ort.InferenceSession, x: np.ndarray):
    """``session`` run with its input and outputs bound once, as a C++ caller holds them."""
    binding = session.io_binding()
    binding.bind_ortvalue_input(session.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(x))
    for output in session.get_outputs():
        binding.bind_output(output.name)
    session.run_with_iobinding(binding)
    for output, value in zip(session.get_outputs(), binding.get_outputs(), strict=True):
        binding.bind_ortvalue_output(output.name, value)
    return lambda: session.run_with_iobinding(binding)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.register_custom_ops_library(str(ops_library_path()))
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    shape = [args.batch, *session.get_inputs()[0].shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    name = session.get_inputs()[0].name
    plain, bound = (lambda: session.run(None, {name: x})), bound_run(session, x)
    cpp, py, py_bound = [], [], []
    for round_ in range(args.rounds):
        cpp.append(cpp_median_ms(args.model, args.runs, args.batch))
        py.append(median_ms(plain, args.runs))
        py_bound.append(median_ms(bound, args.runs))
        print(f"round {round_}: C++ {cpp[-1]:.4f} ms  Python {py[-1]:.4f} ms  "
              f"Python bound {py_bound[-1]:.4f} ms", flush=True)
    cpp_ms, py_ms, bound_ms = (statistics.median(t) for t in (cpp, py, py_bound))
    print(f"median C++ {cpp_ms:.4f} ms, Python {py_ms:.4f} ms, Python bound {bound_ms:.4f} ms; "
          f"C++ / Python {cpp_ms / py_ms:.3f}, C++ / Python bound {cpp_ms / bound_ms:.3f}")


if __name__ == "__main__":
    main()
