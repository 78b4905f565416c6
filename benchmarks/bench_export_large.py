"""Export cost of a 25 M-parameter model: qconvert against a plain torch.onnx.export.

    python benchmarks/bench_export_large.py [--scheme lcq] [--size 224]

ResNet-50 (25.6 M parameters) at 224x224. qconvert exports an LCQ W4A4 checkpoint
(quantizers initialised by one training-mode batch); the baseline is
``torch.onnx.export`` (dynamo, dynamic batch) of the float ResNet-50. Each export runs
in a fresh process: wall time of the export call (qconvert: fold, export, check,
write; baseline: export and write) and the process's peak resident memory during it
(the peak counter is reset just before the export, and the resident size at that
point is subtracted, so model loading is not counted for either).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ARCH = "resnet50"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure(export) -> dict:
    """Run ``export()``; its wall time and peak RSS above the RSS before it, in MiB."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    started = time.perf_counter()
    export()
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    return {"seconds": seconds, "peak_mib": peak / 1024, "delta_mib": (peak - before) / 1024,
            "before_mib": before / 1024}


def make_checkpoint(path: Path, scheme: str, size: int) -> None:
    from qconvert.archs import build_architecture
    from qconvert.checkpoint import save_checkpoint
    from qconvert.quant import quantize_model

    torch.manual_seed(0)
    model = quantize_model(build_architecture(ARCH), scheme, 4, 4).train()
    with torch.no_grad():  # one batch initialises every quantizer
        model(torch.randn(2, 3, size, size))
    save_checkpoint(path, model.eval(), arch=ARCH, input_shape=(3, size, size))


def float_export(out: Path, size: int) -> dict:
    from qconvert.archs import build_architecture

    model = build_architecture(ARCH).eval()

    def export() -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(2, 3, size, size),), str(out), dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))

    return _measure(export)


def qconvert_export(checkpoint: Path, out: Path) -> dict:
    from qconvert.checkpoint import load_checkpoint
    from qconvert.export.onnx_export import export_checkpoint

    ckpt = load_checkpoint(checkpoint)
    return _measure(lambda: export_checkpoint(ckpt, out, force=True))


def _child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="lcq")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core each; the machine may be shared
    if args.child:
        kind, *rest = args.child
        result = (float_export(Path(rest[0]), args.size) if kind == "float"
                  else qconvert_export(Path(rest[0]), Path(rest[1])))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "resnet50.pt"
        make_checkpoint(checkpoint, args.scheme, args.size)
        plain = _child(["float", str(Path(tmp) / "float.onnx"), f"--size={args.size}"])
        ours = _child(["qconvert", str(checkpoint), str(Path(tmp) / "q.onnx")])
    print(f"ResNet-50 ({ARCH}, 25.6 M params) at {args.size}x{args.size}, "
          f"qconvert {args.scheme} W4A4 vs plain torch.onnx.export (dynamo) of the float model")
    print(f"{'':<28} {'float export':>13} {'qconvert':>10} {'ratio':>7}")
    for label, key, unit in (("export time", "seconds", "s"),
                             ("peak RSS above start", "delta_mib", "MiB"),
                             ("peak RSS of the process", "peak_mib", "MiB")):
        print(f"{label + ' (' + unit + ')':<28} {plain[key]:>13.1f} {ours[key]:>10.1f} "
              f"{ours[key] / plain[key]:>6.2f}x")


if __name__ == "__main__":
    main()
