"""Where an integer-mode file spends its time, against ONNX Runtime's own U8S8 model of the
same network: the node types of ORT's optimised graph (ORT_ENABLE_ALL, as a plain session
builds it) and ORT's profiler's kernel time per node type, one thread, batch 1. The
integer file is profiled as exported and, where the model admits it, with
``--conv-kernel qconvert``.

    python benchmarks/profile_integer_ort.py [TARGET ...] [--runs 200]

TARGET as in bench_integer_ort.py (a checkpoint path, or resnet18 / resnet20 / mobilenetv2
with random LSQ W4A4 parameters). Profiler times include its own per-node overhead: read
the shares and the differences between files, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from bench_integer_ort import checkpoint_and_samples, quantize_u8s8, save_as_exported

from qconvert import native
from qconvert.bench import export_float, float_model
from qconvert.errors import QConvertError
from qconvert.export.integer import to_integer, with_qconv_clamp
from qconvert.export.onnx_export import build_onnx
from qconvert.ops import DOMAIN

FUSED = {"QLinearConv", "QLinearAdd", "QGemm", "NhwcMaxPool", "Conv", "QConvClamp"}


def _options(path: Path) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if any(n.domain == DOMAIN for n in onnx.load(str(path)).graph.node):
        options.register_custom_ops_library(str(native.library_path()))
    return options


def optimized_ops(path: Path) -> Counter:
    options = _options(path)
    options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def kernel_times(path: Path, x: np.ndarray, runs: int) -> tuple[Counter, float]:
    """Microseconds per run by node type, and per run in total (session.run)."""
    options = _options(path)
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, {"input": x})
    trace = sess.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    per_op: Counter = Counter()
    total = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / runs
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            total += e["dur"] / runs
    return per_op, total


def files_for(target: str, tmp: Path) -> tuple[dict[str, Path], np.ndarray]:
    ckpt, samples = checkpoint_and_samples(target, "lsq", tmp)
    files = {"fp32": tmp / "fp32.onnx", "ort_u8s8": tmp / "u8s8.onnx",
             "integer": tmp / "integer.onnx"}
    export_float(float_model(ckpt), tuple(ckpt.input.shape), files["fp32"])
    quantize_u8s8(files["fp32"], files["ort_u8s8"], samples)
    exact, _ = build_onnx(ckpt)
    integer = to_integer(exact, 8, calib=samples)
    save_as_exported(integer, files["integer"])
    try:  # the --conv-kernel qconvert file, where the model admits it
        save_as_exported(with_qconv_clamp(integer), tmp / "integer_qcc.onnx")
        files["integer_qconv_clamp"] = tmp / "integer_qcc.onnx"
    except QConvertError as exc:
        print(f"   no integer_qconv_clamp file: {exc}", flush=True)
    return files, samples[:1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}; onnxruntime {ort.__version__}", flush=True)
    for target in args.targets or ["resnet20", "mobilenetv2"]:
        with tempfile.TemporaryDirectory() as tmp:
            files, x = files_for(target, Path(tmp))
            print(f"== {target}", flush=True)
            for name, path in files.items():
                ops = optimized_ops(path)
                between = {k: v for k, v in sorted(ops.items()) if k not in FUSED}
                per_op, total = kernel_times(path, x, args.runs)
                kernels = sum(per_op.values())
                shares = ", ".join(f"{k} {v:.0f} us ({100 * v / kernels:.0f} %)"
                                   for k, v in per_op.most_common())
                print(f"   {name}: fused {dict((k, ops[k]) for k in FUSED if ops[k])}, "
                      f"other nodes {between}\n      run {total:.0f} us, kernels "
                      f"{kernels:.0f} us: {shares}", flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
