"""What the teacher-forced segment check adds to a default ``qconvert validate`` run.

    python benchmarks/bench_segments.py [CHECKPOINT] [--rounds N]

Exports CHECKPOINT (default: models/checkpoints/resnet20-lsq-w4a4.pt) and runs the default
validation (models/data/digits_calib.npz resized, per-layer pass on the first 64 samples,
native runtime) in this process, alternately with and without the segment check, N rounds
interleaved; prints each side's fastest CPU time (process time, less sensitive than wall
time to other work on the machine) and wall time, and their ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qconvert import calib, validate  # noqa: E402
from qconvert.checkpoint import load_checkpoint  # noqa: E402
from qconvert.export.onnx_export import build_onnx  # noqa: E402
from qconvert.runtime import session  # noqa: E402
from qconvert.verdict import judge  # noqa: E402

DEFAULT = ROOT / "models" / "checkpoints" / "resnet20-lsq-w4a4.pt"


def run_once(ckpt, model, data, segments: bool) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one default validation."""
    checker = validate._SegmentChecker
    if not segments:
        validate._SegmentChecker = lambda *args: None  # the per-layer pass without it
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        judge(validate.validate(ckpt, model, data, lambda m: session(m, "native", announce=None),
                                per_layer=None))
        return time.process_time() - cpu, time.perf_counter() - wall
    finally:
        validate._SegmentChecker = checker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    model, _ = build_onnx(ckpt)
    data = calib.load_calibration(ROOT / "models" / "data" / "digits_calib.npz",
                                  ckpt.input.shape, resize=True)
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    run_once(ckpt, model, data, True)  # warm-up: caches, lazy imports
    for _ in range(args.rounds):
        for segments in (False, True):
            times[segments].append(run_once(ckpt, model, data, segments))
    best = {side: (min(t[0] for t in runs), min(t[1] for t in runs))
            for side, runs in times.items()}
    print(f"{args.checkpoint.name}, {args.rounds} rounds interleaved, fastest of each:")
    for side, label in ((False, "without the segment check"), (True, "with the segment check")):
        print(f"  {label:<27} CPU {best[side][0]:6.2f} s  wall {best[side][1]:6.2f} s")
    print(f"  ratio with / without        CPU {best[True][0] / best[False][0]:6.2f}    "
          f"wall {best[True][1] / best[False][1]:6.2f}")


if __name__ == "__main__":
    main()
