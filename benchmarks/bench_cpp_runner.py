"""The same exported file timed by the C++ runner and by a plain Python ONNX Runtime
session, in interleaved rounds: both load the file as a deployment would (default
session options, the qconvert library registered, one thread).

    .venv/bin/python benchmarks/bench_cpp_runner.py MODEL.onnx [--batch 1] [--rounds 5]

Prints the per-round medians and the ratio C++ / Python of their medians.
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


def python_median_ms(session: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    name = session.get_inputs()[0].name
    for _ in range(10):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
    cpp, py = [], []
    for round_ in range(args.rounds):
        cpp.append(cpp_median_ms(args.model, args.runs, args.batch))
        py.append(python_median_ms(session, x, args.runs))
        print(f"round {round_}: C++ {cpp[-1]:.4f} ms  Python {py[-1]:.4f} ms", flush=True)
    ratio = statistics.median(cpp) / statistics.median(py)
    print(f"median C++ {statistics.median(cpp):.4f} ms, Python {statistics.median(py):.4f} ms, "
          f"C++ / Python {ratio:.3f}")


if __name__ == "__main__":
    main()
