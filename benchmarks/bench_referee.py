"""Every shipped checkpoint against its float64 referee, through the real CLI.

    python benchmarks/bench_referee.py [CHECKPOINT ...] [--runtime native|function|reference]

Default checkpoints: every models/checkpoints/*.pt except the *-float ones. Each is
exported with ``qconvert export`` and checked with ``qconvert validate --calib
models/data/digits_calib.npz --resize --json`` at default thresholds; the table shows, per
checkpoint, max / mean |diff| to the float64 referee for PyTorch float32 (default and
reference convolutions) and for the ONNX model, the ONNX mean over the larger PyTorch
mean, top-1 disagreements with the referee, the op-level mismatches (per-layer pass on
the first 64 samples), the segment check's closest call (the largest teacher-forced
mean |ONNX - referee| of a value between quantizers over what the check allows), the
verdict and exit code validate printed, and validate's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qconvert.verdict import MEAN_FACTOR, SEGMENT_FLOOR

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "models" / "data" / "digits_calib.npz"
CLI = [sys.executable, "-c", "import sys; sys.argv[0] = 'qconvert'; "
       "from qconvert.cli import main; main()"]


def qconvert(*args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=ROOT)


def measure(ckpt: Path, workdir: Path, runtime: str | None) -> dict:
    model = workdir / f"{ckpt.stem}.onnx"
    exported = qconvert("export", str(ckpt), "--out", str(model), "--force")
    if exported.returncode:
        raise SystemExit(f"export of {ckpt} failed: {exported.stderr.strip()}")
    args = ["validate", str(ckpt), str(model), "--calib", str(CALIB), "--resize", "--json"]
    if runtime:
        args += ["--runtime", runtime]
    start = time.perf_counter()
    result = qconvert(*args)
    seconds = time.perf_counter() - start
    if result.returncode not in (0, 1, 3):
        raise SystemExit(f"validate of {ckpt} exited {result.returncode}: "
                         f"{result.stderr.strip()}")
    report = json.loads(result.stdout)
    report["exit_code"], report["seconds"] = result.returncode, seconds
    return report


def _pair(d: dict) -> str:
    return f"{d['max_abs_diff']:.3g} / {d['mean_abs_diff']:.2g}"


def closest_segment(r: dict) -> str:
    """The segment nearest its bound: ONNX mean |diff| over the allowed mean |diff|."""
    def used(seg: dict) -> float:
        allowed = MEAN_FACTOR * seg["torch_mean_diff"] + SEGMENT_FLOOR * seg["max_abs_value"]
        return seg["onnx_mean_diff"] / allowed if allowed else 0.0
    return f"{max(map(used, r['segments']), default=0.0):.2f}"


def row(name: str, r: dict) -> str:
    ref = r["referee"]
    variant = next(v for k, v in ref.items() if k.startswith("torch ("))
    mismatches = sum(layer["op_mismatches"] + layer["weight_mismatches"]
                     for layer in r["layers"])
    envelope = max(ref["torch"]["mean_abs_diff"], variant["mean_abs_diff"])
    ratio = ref["onnx"]["mean_abs_diff"] / envelope if envelope else float("nan")
    disagreements = "/".join(str(d["top1_disagreements"])
                             for d in (ref["torch"], variant, ref["onnx"]))
    return (f"| {name} | {_pair(ref['torch'])} | {_pair(variant)} | {_pair(ref['onnx'])} | "
            f"{ratio:.2f} | {disagreements} | {mismatches} | {closest_segment(r)} | "
            f"{r['verdict']} (exit {r['exit_code']}) | {r['seconds']:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument("--runtime", choices=["native", "function", "reference"])
    args = parser.parse_args()
    ckpts = args.checkpoints or sorted(p for p in (ROOT / "models" / "checkpoints").glob("*.pt")
                                       if not p.stem.endswith("-float"))
    print("| checkpoint | PyTorch fp32 vs fp64, max / mean | PyTorch fp32 (reference convs) "
          "vs fp64 | ONNX vs fp64 | ONNX mean / float32 envelope | top-1 disagreements "
          "(fp32 / ref. convs / ONNX) | op mismatches | segments: closest / allowed | "
          "`qconvert validate` | time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in ckpts:
            print(row(ckpt.stem, measure(ckpt, Path(tmp), args.runtime)), flush=True)


if __name__ == "__main__":
    main()
