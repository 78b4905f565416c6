"""Regenerate docs/benchmarks.md: `qconvert bench` on every shipped checkpoint and on an
ImageNet-shaped ResNet-18 with random QAT parameters.

    .venv/bin/python benchmarks/run_all.py [--rounds 20] [--skip-resnet18]

Everything runs on one intra-op thread; each table's ratios come from one run in
which the candidates are timed in interleaved rounds.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import tempfile
from pathlib import Path

import onnxruntime
import torch

from qconvert import load_checkpoint, save_checkpoint
from qconvert.archs import build_architecture
from qconvert.bench import run_bench
from qconvert.bench_report import format_markdown, plot
from qconvert.calib import load_calibration, synthetic
from qconvert.quant import quantize_model

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "models" / "checkpoints"
CALIB = ROOT / "models" / "data" / "digits_calib.npz"
OUT = ROOT / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return (f"{cpu}, {cores} cores, Linux {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, onnxruntime "
            f"{onnxruntime.__version__}; {datetime.date.today()}")


def random_resnet18(path: Path, scheme: str = "lsq") -> Path:
    """ResNet-18 at 224x224 under ``scheme`` W4A4 with quantizers initialised on random
    data."""
    torch.manual_seed(0)
    model = quantize_model(build_architecture("resnet18"), scheme, 4, 4)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 224, 224))
    model.eval()
    return save_checkpoint(path, model, arch="resnet18", input_shape=(3, 224, 224),
                           training={"note": "random QAT parameters, for speed and size only"})


def section(title: str, ckpt_path: Path, data, rounds: int, plot_path: Path | None) -> str:
    print(f"== {title}", flush=True)
    result = run_bench(load_checkpoint(ckpt_path), data, threads=1, rounds=rounds,
                       log=lambda m: print("  " + m, flush=True))
    if plot_path:
        plot(result, str(plot_path))
    return f"### {title}\n\n{format_markdown(result)}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--skip-resnet18", action="store_true")
    parser.add_argument("--resnet18-schemes", nargs="+", default=["lsq", "lcq"],
                        help="quantization schemes of the ImageNet-shaped ResNet-18 rows")
    parser.add_argument("--out", type=Path, default=OUT,
                        help="where to write (the summary sections are edited by hand)")
    args = parser.parse_args()
    parts = [
        "# Benchmarks\n",
        "Produced by `.venv/bin/python benchmarks/run_all.py` (each section is one "
        "`qconvert bench CKPT --calib models/data/digits_calib.npz --threads 1` run).\n",
        f"Machine: {machine()}. Absolute times are this machine's; read the ratios.\n",
        "Rows: the exported file loaded plainly in ONNX Runtime with the native library "
        "registered (what a C++ user gets), the same file in qconvert's session (plus "
        "session-time NCHWc splice of the quantizers), stock ONNX Runtime running the "
        "function bodies, FP32 ONNX, int8 QDQ and PyTorch eager.\n",
        "Columns: latency median relative to the FP32 ONNX model in ONNX Runtime (same "
        "threads, interleaved rounds), median and p90 in ms, file size relative to the ideal "
        "packed size (params x bits / 8 + tables, biases, BatchNorm, scales) and to the FP32 "
        "file, and top-1 agreement with the PyTorch QAT model on the calibration split.\n",
    ]
    for ckpt in sorted(CHECKPOINTS.glob("*.pt")):
        if "float" in ckpt.name:
            continue
        ckpt_obj = load_checkpoint(ckpt)
        data = load_calibration(CALIB, ckpt_obj.input.shape)
        image = ROOT / "docs" / "img" / f"bench-{ckpt.stem}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        parts.append(section(ckpt.stem, ckpt, data, args.rounds,
                             image if ckpt.stem.startswith("resnet20-lcq") else None))
    if not args.skip_resnet18:
        with tempfile.TemporaryDirectory() as tmp:
            for scheme in args.resnet18_schemes:
                path = random_resnet18(Path(tmp) / f"resnet18-{scheme}-w4a4.pt", scheme)
                image = "bench-resnet18.png" if scheme == "lsq" else f"bench-resnet18-{scheme}.png"
                parts.append(section(f"resnet18 (224x224, random {scheme.upper()} W4A4 "
                                     "parameters)", path, synthetic(64, (3, 224, 224)),
                                     max(3, args.rounds // 5), ROOT / "docs" / "img" / image))
    args.out.write_text("\n".join(parts))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
