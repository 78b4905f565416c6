"""Integer mode as a C++ / C# user runs it: the exported file in a plain
onnxruntime.InferenceSession (the qconvert library registered only when the file needs it),
against FP32 ONNX of the same float architecture and ONNX Runtime's own quantize_static
models of it (U8S8 per-channel, the fast x86 configuration, and the old S8S8 per-tensor).

    python benchmarks/bench_integer_ort.py [TARGET ...] [--bits 8] [--batch 1 32]
        [--rounds 15] [--threads 1] [--markdown] [--ceiling-cost] [--island-cost]

TARGET: a checkpoint path, or resnet18 / mobilenetv2 / resnet20 for a 224x224 (resnet20:
32x32) model with random LSQ W4A4 QAT parameters (``--scheme`` picks another). Default:
resnet18, resnet20, mobilenetv2. All candidates of one target run in one process, one
thread each, and the timing rounds interleave them (A, B, C, A, B, C, ...); each latency is
the median over the rounds, each ratio is to FP32 in the same rounds. The machine is shared:
the script prints the load average before and after; ``--clock cpu`` times this thread's CPU
time instead of wall time (one thread: ONNX Runtime computes in the calling thread), which
leaves out the time other processes hold the core. ``--ceiling-cost`` adds the integer file
with its uint8 ceiling Clips removed: not the QAT model any more (codes above 2^b - 1 pass),
only a measurement of what the ceilings cost. ``--island-cost`` adds the integer file with
its float islands channels-first (no transposes around LCQ's CompandQuant): the same
outputs, a measurement of what the transposes ORT then keeps cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qconvert import native  # noqa: E402
from qconvert.archs import build_architecture  # noqa: E402
from qconvert.bench import export_float, float_model, quantize_int8  # noqa: E402
from qconvert.calib import load_calibration  # noqa: E402
from qconvert.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from qconvert.errors import QConvertError  # noqa: E402
from qconvert.export.integer import integer_summary, to_integer, with_qconv_clamp  # noqa: E402
from qconvert.export.integer.layout import channels_first_islands  # noqa: E402
from qconvert.export.onnx_export import build_onnx, write_exported  # noqa: E402
from qconvert.ops import DOMAIN  # noqa: E402
from qconvert.preprocess import prepare_inputs  # noqa: E402
from qconvert.quant import quantize_model  # noqa: E402

CALIB = ROOT / "models" / "data" / "digits_calib.npz"
RANDOM = {"resnet18": ("resnet18", {}, (3, 224, 224)),
          "resnet20": ("resnet20", {}, (3, 32, 32)),
          "mobilenetv2": ("mobilenetv2_small", {}, (3, 224, 224))}


def quantize_u8s8(fp32_path: Path, out: Path, samples: np.ndarray) -> None:
    """ONNX Runtime's fast x86 int8 (uint8 activations, int8 per-channel weights)."""
    quantize_int8(fp32_path, out, samples, fast=True)


def plain_session(path: Path, threads: int) -> ort.InferenceSession:
    """The file as a C++ user loads it: default optimisations, the qconvert library only
    when the file has qconvert ops."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if threads > 1:  # an idle session's spinning workers would hold the core the next needs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if any(n.domain == DOMAIN for n in onnx.load(str(path)).graph.node):
        options.register_custom_ops_library(str(native.library_path()))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def without_ceilings(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every Clip on uint8 codes dropped (its readers take its input)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    uint8 = {i.name for i in out.graph.initializer if i.data_type == onnx.TensorProto.UINT8}
    rename = {n.output[0]: n.input[0] for n in out.graph.node
              if n.op_type == "Clip" and len(n.input) == 3 and set(n.input[1:]) <= uint8}
    kept = [n for n in out.graph.node if n.output[0] not in rename]
    for node in kept:
        for k, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[k] = name
    del out.graph.node[:]
    out.graph.node.extend(kept)
    read = {i for n in kept for i in n.input}
    inits = [i for i in out.graph.initializer if i.name in read]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out


def random_checkpoint(name: str, scheme: str, path: Path):
    arch, kwargs, shape = RANDOM[name]
    torch.manual_seed(0)
    model = quantize_model(build_architecture(arch, kwargs), scheme, 4, 4)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *shape))
    model.eval()
    save_checkpoint(path, model, arch=arch, arch_kwargs=kwargs, input_shape=shape,
                    training={"note": "random QAT parameters, for speed only"})
    return load_checkpoint(path)


def repeats_for(session: ort.InferenceSession, x: np.ndarray, clock,
                least: float = 0.005) -> int:
    """Runs per timed sample so that one sample lasts at least ``least`` seconds: a single
    0.3 ms run is at the mercy of the scheduler on a loaded machine."""
    session.run(None, {"input": x})
    spent = []
    for _ in range(5):
        started = clock()
        session.run(None, {"input": x})
        spent.append(clock() - started)
    return max(1, int(np.ceil(least / min(spent))))


def interleaved(sessions: dict[str, ort.InferenceSession], x: np.ndarray,
                rounds: int, repeats: int = 1, clock=time.perf_counter) -> dict[str, list[float]]:
    """Per candidate and round, the mean of ``repeats`` timed runs after an untimed one,
    candidates interleaved. ``clock=time.thread_time``: the CPU time of this thread, which
    with one intra-op thread is where ONNX Runtime computes, so time spent descheduled by
    other processes on a loaded machine is left out."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"input": x})
    for _ in range(rounds):
        for name, s in sessions.items():
            s.run(None, {"input": x})
            started = clock()
            for _ in range(repeats):
                s.run(None, {"input": x})
            times[name].append((clock() - started) / repeats)
    return times


def checkpoint_and_samples(target: str, scheme: str, tmp: Path) -> tuple[Checkpoint, np.ndarray]:
    """A shipped checkpoint with the calibration split, or a random-parameter built-in
    architecture with 64 standard-normal samples."""
    if target in RANDOM:
        ckpt = random_checkpoint(target, scheme, tmp / f"{target}.pt")
        return ckpt, np.random.default_rng(0).standard_normal(
            (64, *ckpt.input.shape)).astype(np.float32)
    ckpt = load_checkpoint(target)
    data = load_calibration(CALIB, ckpt.input.shape)
    return ckpt, prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean,
                                ckpt.input.std).numpy()


def save_as_exported(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` as ``qconvert export`` does (its custom ops' output shapes recorded),
    over the previous target's file of the same name."""
    write_exported(model, path, force=True)


def bench_target(target: str, args, tmp: Path) -> list[dict]:
    ckpt, samples = checkpoint_and_samples(target, args.scheme, tmp)
    label = (f"{target} {'x'.join(map(str, ckpt.input.shape[1:]))} (random {args.scheme})"
             if target in RANDOM else Path(target).stem)
    files = {"fp32": tmp / "fp32.onnx", "ort_u8s8": tmp / "u8s8.onnx",
             "ort_s8s8": tmp / "s8s8.onnx", "exact": tmp / "exact.onnx",
             "integer": tmp / "integer.onnx", "integer_float_residual": tmp / "integer_fres.onnx",
             "integer_quantized_residual": tmp / "integer_qres.onnx"}
    export_float(float_model(ckpt), tuple(ckpt.input.shape), files["fp32"])
    quantize_u8s8(files["fp32"], files["ort_u8s8"], samples)
    quantize_int8(files["fp32"], files["ort_s8s8"], samples, fast=False)
    exact, _ = build_onnx(ckpt)
    save_as_exported(exact, files["exact"])
    integer = to_integer(exact, args.bits, calib=samples)
    save_as_exported(integer, files["integer"])
    print(f"== {label}: {integer_summary(integer)}", flush=True)
    save_as_exported(to_integer(exact, args.bits, calib=samples, residual="float"),
                     files["integer_float_residual"])
    save_as_exported(to_integer(exact, args.bits, calib=samples, residual="quantized"),
                     files["integer_quantized_residual"])
    try:  # --conv-kernel qconvert: every convolution one QConvClamp (the library's)
        files["integer_qconv_clamp"] = tmp / "integer_qcc.onnx"
        save_as_exported(with_qconv_clamp(integer), files["integer_qconv_clamp"])
    except QConvertError as exc:
        del files["integer_qconv_clamp"]
        print(f"   no integer_qconv_clamp row: {exc}", flush=True)
    if args.ceiling_cost:
        files["integer_no_ceiling"] = tmp / "integer_no_ceiling.onnx"
        onnx.save(without_ceilings(integer), str(files["integer_no_ceiling"]))
    if args.island_cost:
        islands_nchw = onnx.ModelProto()
        islands_nchw.CopyFrom(integer)
        channels_first_islands(islands_nchw)
        if len(islands_nchw.graph.node) < len(integer.graph.node):  # it had islands
            files["integer_islands_nchw"] = tmp / "integer_islands_nchw.onnx"
            save_as_exported(islands_nchw, files["integer_islands_nchw"])
    sessions = {k: plain_session(p, args.threads) for k, p in files.items()}
    rows = []
    for batch in args.batch:
        x = np.ascontiguousarray(np.resize(samples, (batch, *samples.shape[1:])))
        rounds = args.rounds if batch == 1 else max(3, args.rounds // 3)
        load = os.getloadavg()[0]
        clock = time.thread_time if args.clock == "cpu" else time.perf_counter
        repeats = args.repeats or repeats_for(sessions["fp32"], x, clock)
        times = interleaved(sessions, x, rounds, repeats, clock)
        med = {k: float(np.median(v)) for k, v in times.items()}
        ratios = {k: float(np.median(np.array(times[k]) / np.array(times["fp32"])))
                  for k in times}
        row = {"target": label, "batch": batch, "rounds": rounds, "load": load,
               "repeats": repeats, "clock": args.clock,
               "ms": {k: 1e3 * v for k, v in med.items()}, "ratio_fp32": ratios,
               "vs_u8s8": float(np.median(np.array(times["integer"])
                                          / np.array(times["ort_u8s8"])))}
        if "integer_qconv_clamp" in times:
            row["qcc_vs_u8s8"] = float(np.median(np.array(times["integer_qconv_clamp"])
                                                 / np.array(times["ort_u8s8"])))
        rows.append(row)
        print(f"   batch {batch:>2} ({rounds} rounds x {repeats} runs, {args.clock} time, "
              f"load {load:.1f}): "
              + ", ".join(
            f"{k} {row['ms'][k]:.2f} ms ({ratios[k]:.2f}x)" for k in times)
            + f"; integer / ort_u8s8 {row['vs_u8s8']:.2f}"
            + (f", integer_qconv_clamp / ort_u8s8 {row['qcc_vs_u8s8']:.2f}"
               if "qcc_vs_u8s8" in row else ""), flush=True)
        spread = {k: np.percentile(np.array(times[k]) / np.array(times["fp32"]), [10, 90])
                  for k in times if k != "fp32"}
        print("      per-round ratio to fp32, 10th-90th percentile: " + ", ".join(
            f"{k} {lo:.2f}-{hi:.2f}" for k, (lo, hi) in spread.items()), flush=True)
    return rows


def agreement_rows(paths: list[str], bits: list[int], residual: str) -> list[dict]:
    """Per shipped checkpoint and b': top-1 agreement of the integer file (plain session)
    with the PyTorch QAT model on the calibration split, accuracy of both, and beside them
    how many predictions the QAT model itself changes in float32 against float64 and under
    input noise of 2^-10 x std (its own noise floor)."""
    rows = []
    for path in paths:
        ckpt = load_checkpoint(path)
        data = load_calibration(CALIB, ckpt.input.shape)
        x = prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean, ckpt.input.std)
        with torch.no_grad():
            want = ckpt.model(x).argmax(1).numpy()
            f64 = ckpt.model.double()(x.double()).argmax(1).numpy()
            ckpt.model.float()
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
            noisy = ckpt.model(x + 2.0**-10 * x.std() * noise).argmax(1).numpy()
        exact, _ = build_onnx(ckpt)
        for b in bits:
            with tempfile.TemporaryDirectory() as tmp:
                file = Path(tmp) / "integer.onnx"
                onnx.save(to_integer(exact, b, calib=x.numpy(), residual=residual), str(file))
                got = plain_session(file, 1).run(None, {"input": x.numpy()})[0].argmax(1)
            row = {"checkpoint": Path(path).stem, "bits": b, "n": len(want),
                   "agreement": float((got == want).mean()),
                   "acc_integer": float((got == data.y).mean()),
                   "acc_qat": float((want == data.y).mean()),
                   "f32_vs_f64_changes": int((want != f64).sum()),
                   "noise_changes": int((want != noisy).sum())}
            rows.append(row)
            print(f"   {row['checkpoint']} b'={b}: agreement {row['agreement']:.2%}, accuracy "
                  f"{row['acc_integer']:.2%} vs QAT {row['acc_qat']:.2%}; QAT float32 vs "
                  f"float64 changes {row['f32_vs_f64_changes']}, under 2^-10 noise "
                  f"{row['noise_changes']} of {row['n']}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| model | batch | FP32 ms | integer | ORT U8S8 | integer / ORT U8S8 | integer, "
            "--conv-kernel qconvert | that / ORT U8S8 | exact | ORT S8S8 (old baseline) |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        q = r["ratio_fp32"]
        qcc = (f"{q['integer_qconv_clamp']:.2f}x | {r['qcc_vs_u8s8']:.2f}"
               if "qcc_vs_u8s8" in r else "refused | -")
        lines.append(f"| {r['target']} | {r['batch']} | {r['ms']['fp32']:.2f} | "
                     f"{q['integer']:.2f}x | {q['ort_u8s8']:.2f}x | {r['vs_u8s8']:.2f} | "
                     f"{qcc} | {q['exact']:.2f}x | {q['ort_s8s8']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*")
    parser.add_argument("--scheme", default="lsq")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--agreement-bits", dest="bits_list", type=int, nargs="+")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this thread's CPU time (with --threads 1, robust to load)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="runs per timed sample (default: enough for 5 ms)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--ceiling-cost", action="store_true",
                        help="also time the integer file without its ceiling Clips")
    parser.add_argument("--island-cost", action="store_true",
                        help="also time the integer file with its float islands "
                             "channels-first")
    parser.add_argument("--agreement", action="store_true",
                        help="agreement of the shipped checkpoints instead of latency")
    parser.add_argument("--residual", default="auto", choices=["auto", "float", "quantized"])
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}; onnxruntime {ort.__version__}", flush=True)
    if args.agreement:
        shipped = sorted(str(p) for p in (ROOT / "models" / "checkpoints").glob("*.pt")
                         if "-float" not in p.name)
        agreement_rows(args.targets or shipped, sorted(set(args.bits_list or [6, 8])),
                       args.residual)
        return
    rows = []
    for target in args.targets or ["resnet18", "resnet20", "mobilenetv2"]:
        with tempfile.TemporaryDirectory() as tmp:
            rows.extend(bench_target(target, args, Path(tmp)))
    print(f"load average {os.getloadavg()}")
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
