"""Export time of qconvert against a plain torch.onnx.export of the same float architecture.

    python benchmarks/bench_export.py CHECKPOINT [CHECKPOINT ...]

Both exports run in this process, one after the other, with the same settings
(dynamo exporter, dynamic batch), so the ratio is measured side by side.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from qconvert.archs import build_architecture
from qconvert.checkpoint import load_checkpoint
from qconvert.export.onnx_export import export_checkpoint


def plain_export_seconds(arch: str, kwargs: dict, shape: tuple[int, ...], out: Path) -> float:
    model = build_architecture(arch, kwargs).eval()
    started = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, *shape),), str(out), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    return time.perf_counter() - started


def qconvert_export_seconds(path: Path, out: Path) -> float:
    started = time.perf_counter()
    export_checkpoint(load_checkpoint(path), out, force=True)
    return time.perf_counter() - started


def main(paths: list[str]) -> None:
    print(f"{'checkpoint':<40} {'float export s':>15} {'qconvert s':>11} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for path in map(Path, paths):
            ckpt = load_checkpoint(path)
            plain = plain_export_seconds(ckpt.arch, ckpt.arch_kwargs, ckpt.input.shape,
                                         Path(tmp) / "float.onnx")
            ours = qconvert_export_seconds(path, Path(tmp) / "q.onnx")
            print(f"{path.name:<40} {plain:>15.2f} {ours:>11.2f} {ours / plain:>5.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
