"""Exports a checkpoint and stores an input and the expected output next to it,
for custom_ops/build/qconvert_run_model (the C++ API check of the native ops).

    python custom_ops/tools/make_example.py CHECKPOINT OUT_DIR [--batch 4] [--seed 0]

OUT_DIR/model.onnx comes from `qconvert export`. OUT_DIR/input.qct is random
normal data of the model's input shape; OUT_DIR/expected.qct is the model's
first output computed by ONNX Runtime WITHOUT the native library, i.e. from
the model-local function bodies (standard ONNX ops), so the C++ run with the
native kernels is checked against an independent implementation of the spec.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def write_qct(path: Path, array: np.ndarray) -> None:
    """QCT1: magic, uint32 rank, int64 dims, float32 values (little-endian)."""
    array = np.ascontiguousarray(array, dtype="<f4")
    header = b"QCT1" + struct.pack("<I", array.ndim) + struct.pack(f"<{array.ndim}q", *array.shape)
    path.write_bytes(header + array.tobytes())


def qconvert_command() -> list[str]:
    beside = Path(sys.executable).parent / "qconvert"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("qconvert")
    if found is None:
        sys.exit("the qconvert command is not installed (pip install -e .)")
    return [found]


def make_example(checkpoint: Path, out: Path, batch: int = 4, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.onnx"
    subprocess.run(
        [*qconvert_command(), "export", str(checkpoint), "--out", str(model_path), "--force"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    model = onnx.load(str(model_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else batch for d in dims]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    write_qct(out / "input.qct", x)
    write_qct(out / "expected.qct", expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_example(args.checkpoint, args.out, args.batch, args.seed)
    print(f"wrote {args.out}/model.onnx, input.qct, expected.qct")


if __name__ == "__main__":
    main()
