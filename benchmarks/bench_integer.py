"""Integer / LUT mode against exact mode and FP32 ONNX Runtime, side by side.

    python benchmarks/bench_integer.py [CHECKPOINT ...] [--bits 6 8] [--rounds 30]
                                       [--threads 1] [--markdown] [--micro]

Default checkpoints: every models/checkpoints/*.pt except the *-float* ones. For each
checkpoint and outer bit width b': top-1 agreement with the PyTorch QAT model and the
accuracy change on the labelled calibration split (models/data/digits_calib.npz), LUT
bytes, file bytes, and latency at batch 1 and 32. "noise floor" is the QAT model's top-1
agreement with itself under input noise of 2^-10 x the input's std (``noise_floor``): how
much agreement any tiny perturbation costs that model, the yardstick for integer mode's.
All candidates of one checkpoint (FP32 ORT, exact mode, integer mode at each b') run in
this process with the same thread count and the timing rounds interleave them (A, B, C, A,
B, C, ...), so ratios are side by side; each latency is the median over the rounds. Exact
and integer mode use the native runtime when the library is built, else the function
runtime.

``--micro`` adds single-op timings, float Conv against ConvInteger (+ the Cast and Mul of
the rescale) on a few layer shapes, to show where integer kernels win on this CPU.

b' = 10 is not measured: ConvInteger / MatMulInteger take 8-bit operands only (int16
would be needed), so integer mode stops at 8 bits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qconvert.bench import Candidate, export_float, float_model, measure_latency  # noqa: E402
from qconvert.calib import load_calibration  # noqa: E402
from qconvert.checkpoint import load_checkpoint  # noqa: E402
from qconvert.export.integer import lut_bytes, to_integer  # noqa: E402
from qconvert.export.onnx_export import build_onnx  # noqa: E402
from qconvert.preprocess import prepare_inputs  # noqa: E402
from qconvert.runtime import default_runtime, session  # noqa: E402
from qconvert.validate import validate  # noqa: E402

CALIB = ROOT / "models" / "data" / "digits_calib.npz"
NOISE_REL, NOISE_SEEDS = 2.0**-10, 5


def noise_floor(model, inputs: torch.Tensor) -> float:
    """Mean top-1 agreement of the QAT model with itself when Gaussian noise of std
    ``NOISE_REL`` x the input's std is added to its input (``NOISE_SEEDS`` draws): the
    agreement a perturbation far below the b'-bit grid's resolution already costs. A 4-bit
    network's hard thresholds turn such perturbations into whole-level flips that grow with
    depth, so integer mode cannot agree better than this on average."""
    with torch.no_grad():
        want = model(inputs).argmax(1)
        agreements = []
        for seed in range(NOISE_SEEDS):
            noise = torch.randn(inputs.shape, generator=torch.Generator().manual_seed(seed))
            got = model(inputs + NOISE_REL * inputs.std() * noise).argmax(1)
            agreements.append((got == want).double().mean().item())
    return float(np.mean(agreements))


def _runner(model: onnx.ModelProto, runtime: str, threads: int):
    sess = session(model, runtime, threads=threads, announce=None)
    name = sess.input_names[0]
    return lambda x: sess.run({name: x})[0]


def bench_checkpoint(path: Path, bits: list[int], rounds: int, threads: int,
                     log) -> list[dict]:
    ckpt = load_checkpoint(path)
    data = load_calibration(CALIB, ckpt.input.shape)
    runtime = default_runtime()
    log(f"{path.name}: exporting (exact, FP32, integer {bits}) on runtime {runtime}")
    exact, _ = build_onnx(ckpt)
    models = {f"exact ({runtime})": exact}
    for b in bits:
        models[f"integer b'={b} ({runtime})"] = to_integer(exact, b)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        export_float(float_model(ckpt), ckpt.input.shape, fp32_path)
        fp32 = onnx.load(str(fp32_path))
    candidates = [Candidate("FP32 ORT", _runner(fp32, "function", threads),
                            len(fp32.SerializeToString()))]
    for name, model in models.items():
        candidates.append(Candidate(name, _runner(model, runtime, threads),
                                    len(model.SerializeToString())))
    fidelity = {}
    for name, model in models.items():
        report = validate(ckpt, model, data,
                          lambda m: session(m, runtime, threads=threads, announce=None))
        delta = (None if report.torch_accuracy is None
                 else report.onnx_accuracy - report.torch_accuracy)
        fidelity[name] = (report.top1_agreement, delta, lut_bytes(model))
    inputs = prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean, ckpt.input.std)
    floor = noise_floor(ckpt.model, inputs)
    inputs = inputs.numpy()
    for batch in (1, 32):
        log(f"  latency at batch {batch}: {rounds} interleaved rounds")
        x = np.ascontiguousarray(np.resize(inputs, (batch, *inputs.shape[1:])))
        measure_latency(candidates, x, rounds)
    base = candidates[0].latency_ms
    for c in candidates:
        agreement, delta, luts = fidelity.get(c.name, (None, None, None))
        rows.append({
            "checkpoint": path.stem, "model": c.name, "top-1 agr.": agreement,
            "noise floor": floor,
            "acc. delta": delta, "LUT B": luts, "file B": c.file_bytes,
            "b1 ms": c.latency_ms[1]["median"],
            "b1 xFP32": c.latency_ms[1]["median"] / base[1]["median"],
            "b32 ms": c.latency_ms[32]["median"],
            "b32 xFP32": c.latency_ms[32]["median"] / base[32]["median"],
        })
    return rows


# ------------------------------------------------------------------ single-op timing


def _op_session(nodes, inputs, inits, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "op", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def micro(rounds: int, threads: int) -> list[dict]:
    """Float Conv vs u8 ConvInteger + Cast + Mul (integer mode's layer) per shape."""
    rng = np.random.default_rng(0)
    shapes = [  # (batch, C_in, C_out, H=W, kernel)
        (1, 16, 16, 16, 3), (1, 64, 64, 8, 3), (1, 64, 64, 32, 3), (1, 128, 128, 16, 3),
        (1, 256, 256, 14, 3), (1, 256, 256, 14, 1), (32, 16, 16, 16, 3), (32, 64, 64, 8, 3),
        (32, 128, 128, 16, 3),
    ]
    rows = []
    for n, cin, cout, hw, k in shapes:
        pads = [k // 2] * 4
        w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
        w_u8 = rng.integers(1, 256, (cout, cin, k, k)).astype(np.uint8)
        x = rng.random((n, cin, hw, hw)).astype(np.float32)
        x_u8 = rng.integers(0, 256, x.shape).astype(np.uint8)
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
        conv = _op_session([helper.make_node("Conv", ["x", "w"], ["y"], pads=pads)],
                           [x_info], [numpy_helper.from_array(w, "w")], threads)
        q_info = helper.make_tensor_value_info("x", TensorProto.UINT8, None)
        integer = _op_session([
            helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["acc"], pads=pads),
            helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["accf", "s"], ["y"])],
            [q_info], [numpy_helper.from_array(w_u8, "w"),
                       numpy_helper.from_array(np.array(0, np.uint8), "xz"),
                       numpy_helper.from_array(np.array(128, np.uint8), "wz"),
                       numpy_helper.from_array(np.full((1, cout, 1, 1), 1e-3, np.float32),
                                               "s")], threads)
        quant = _op_session([  # the activation quantization integer mode adds in front
            helper.make_node("QuantizeLinear", ["x", "qs", "xz"], ["q"]),
            helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT)],
            [x_info], [numpy_helper.from_array(np.array(0.01, np.float32), "qs"),
                       numpy_helper.from_array(np.array(0, np.uint8), "xz")], threads)
        runs = {"Conv float": (conv, x), "ConvInteger+rescale": (integer, x_u8),
                "QuantizeLinear": (quant, x)}
        for sess, feed in runs.values():
            sess.run(None, {"x": feed})
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (sess, feed) in runs.items():
                started = time.perf_counter()
                sess.run(None, {"x": feed})
                times[name].append((time.perf_counter() - started) * 1e3)
        med = {name: float(np.median(t)) for name, t in times.items()}
        rows.append({"shape": f"N{n} {cin}->{cout} {hw}x{hw} k{k}",
                     "Conv ms": med["Conv float"], "ConvInteger ms": med["ConvInteger+rescale"],
                     "+quantize ms": med["QuantizeLinear"],
                     "int/float": (med["ConvInteger+rescale"] + med["QuantizeLinear"])
                     / med["Conv float"]})
    return rows


# ------------------------------------------------------------------ output


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("top-1 agr.", "noise floor"):
        return f"{value:.2%}"
    if key == "acc. delta":
        return f"{value * 100:+.2f} pp"
    if key.endswith("xFP32") or key == "int/float":
        return f"{value:.2f}x"
    return _cell(value)


def table(rows: list[dict], markdown: bool) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[_fmt(k, r[k]) for k in keys] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument("--bits", type=int, nargs="+", default=[6, 8])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--micro", action="store_true",
                        help="also time float Conv against ConvInteger on layer shapes")
    args = parser.parse_args(argv)
    paths = args.checkpoints or sorted(p for p in (ROOT / "models" / "checkpoints").glob("*.pt")
                                       if "-float" not in p.name)
    if 10 in args.bits:
        parser.error("b' = 10 needs int16 operands; ConvInteger / MatMulInteger take 8-bit only")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows = []
    for path in paths:
        rows += bench_checkpoint(path, args.bits, args.rounds, args.threads, log)
    if not paths:
        log("no checkpoints given or found in models/checkpoints/")
    print(table(rows, args.markdown))
    if args.micro:
        log("single-op timing")
        print()
        print(table(micro(args.rounds, args.threads), args.markdown))


if __name__ == "__main__":
    main()
