"""Speed of the native qconvert kernels against ONNX Runtime's own ops.

    .venv/bin/python benchmarks/bench_ops.py [--elements 8388608] [--reps 15]

Activation ops (CompandQuant, AdaptiveStep) run on one float32 tensor of
``--elements`` values next to ORT's Relu on the same tensor, at 1 and 2
intra-op threads, then on model-sized tensors (a ResNet-20 activation,
16x16x16, at batch 1 and 32) at 1 thread, where the per-call cost shows.
Runs are interleaved (Relu, op, op, Relu, ...) so that all three see the
same machine state; the printed ratio is median(op) / median(Relu). Inputs
and outputs are bound once (IOBinding), so the timings hold the kernels and
ORT's dispatch, not Python copies.

Weight decode ops (LutGather, Pow2Shift) are timed with their inputs as
constant initializers (decoded once when the session is built, each run copies
the cached weights) and as graph inputs (decoded on every run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qconvert import native  # noqa: E402

F32 = TensorProto.FLOAT
U8 = TensorProto.UINT8


def one_node_model(
    op: str,
    domain: str,
    graph_inputs: list[tuple[str, int]],
    initializers: dict[str, np.ndarray],
    attrs: dict | None = None,
) -> bytes:
    names = [n for n, _ in graph_inputs] + list(initializers)
    # Keep the op's input order: graph inputs first is how every op below is laid out.
    node = helper.make_node(op, names, ["Y"], domain=domain, name="bench", **(attrs or {}))
    graph = helper.make_graph(
        [node],
        "bench",
        [helper.make_tensor_value_info(n, t, None) for n, t in graph_inputs],
        [helper.make_tensor_value_info("Y", F32, None)],
        initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("qconvert", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString()


def session(model: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    native.register(so)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


class Bound:
    """A session with its inputs and output bound once, run repeatedly."""

    def __init__(self, sess: ort.InferenceSession, feeds: dict[str, np.ndarray], out_shape):
        self.sess = sess
        self.binding = sess.io_binding()
        self.keep = []
        for name, value in feeds.items():
            ov = ort.OrtValue.ortvalue_from_numpy(value)
            self.keep.append(ov)
            self.binding.bind_ortvalue_input(name, ov)
        out = ort.OrtValue.ortvalue_from_shape_and_type(list(out_shape), np.float32)
        self.keep.append(out)
        self.binding.bind_ortvalue_output("Y", out)

    def run(self) -> float:
        start = time.perf_counter()
        self.sess.run_with_iobinding(self.binding)
        return time.perf_counter() - start


def lcq_params(bits: int, signed: bool, K: int = 8):
    rng = np.random.default_rng(0)
    theta = rng.normal(size=K).astype(np.float32)
    p = np.exp(theta) / np.exp(theta).sum()
    slopes = (K * p).astype(np.float32)
    offsets = np.concatenate([[0.0], np.cumsum(p)[:-1]]).astype(np.float32)
    S = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    levels = np.linspace(0, 3.0, S + 1, dtype=np.float32)
    return np.array([3.0], np.float32), slopes, offsets, levels


def time_side_by_side(runners: dict[str, Bound], reps: int) -> dict[str, float]:
    for r in runners.values():  # warm-up: arena growth, page faults, thread start
        r.run()
        r.run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for rep in range(reps):
        for name in order if rep % 2 == 0 else reversed(order):
            times[name].append(runners[name].run())
    return {k: statistics.median(v) for k, v in times.items()}


def activation_models(shape, bits: int, signed: int, intervals: int) -> dict[str, bytes]:
    alpha, slopes, offsets, levels = lcq_params(bits, bool(signed), intervals)
    return {
        "Relu": one_node_model("Relu", "", [("X", F32)], {}),
        "CompandQuant": one_node_model(
            "CompandQuant",
            "qconvert",
            [("X", F32)],
            {"alpha": alpha, "slopes": slopes, "offsets": offsets, "levels": levels},
            {"bits": bits, "signed": signed},
        ),
        "AdaptiveStep": one_node_model(
            "AdaptiveStep",
            "qconvert",
            [("X", F32)],
            {
                "step": np.array([0.1], np.float32),
                "beta": np.linspace(1, 2, shape[0]).astype(np.float32),
            },
            {"bits": bits, "signed": signed},
        ),
    }


def bench_activations(n: int, reps: int, bits: int, signed: int, intervals: int) -> None:
    shape = (8, n // 8)
    x = np.random.default_rng(1).normal(0, 1.5, size=shape).astype(np.float32)
    models = activation_models(shape, bits, signed, intervals)
    print(
        f"activation ops on {n} float32 elements, bits={bits} signed={signed} K={intervals}, "
        f"median of {reps} interleaved runs"
    )
    print(f"{'threads':>7} {'op':>13} {'ms':>8} {'x Relu':>7}")
    for threads in (1, 2):
        runners = {k: Bound(session(m, threads), {"X": x}, shape) for k, m in models.items()}
        med = time_side_by_side(runners, reps)
        for name, t in med.items():
            print(f"{threads:>7} {name:>13} {t * 1e3:8.2f} {t / med['Relu']:7.2f}")


def bench_small_activations(shapes, reps: int, bits: int, signed: int, intervals: int) -> None:
    """Model-sized tensors (a ResNet-20 activation at batch 1 and 32), 1 thread:
    here the per-call cost (input checks, allocation, dispatch) shows."""
    print(f"\nactivation ops on model-sized tensors, 1 thread, median of {reps} interleaved runs")
    print(f"{'shape':>18} {'op':>13} {'us':>9} {'x Relu':>7}")
    for shape in shapes:
        x = np.random.default_rng(1).normal(0, 1.5, size=shape).astype(np.float32)
        models = activation_models(shape, bits, signed, intervals)
        runners = {k: Bound(session(m, 1), {"X": x}, shape) for k, m in models.items()}
        med = time_side_by_side(runners, reps)
        for name, t in med.items():
            print(f"{str(shape):>18} {name:>13} {t * 1e6:9.1f} {t / med['Relu']:7.2f}")


def bench_decode(reps: int) -> None:
    # A 3x3 conv weight with 256 in and out channels, 4-bit codes.
    shape = (256, 256, 3, 3)
    n = int(np.prod(shape))
    rng = np.random.default_rng(2)
    bits = 4
    codes = rng.integers(0, 2**bits, size=n, dtype=np.uint8)
    packed = np.packbits(
        ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8).ravel(), bitorder="little"
    )
    table = rng.normal(size=(shape[0], 2**bits)).astype(np.float32)
    alpha = rng.uniform(0.5, 2, size=shape[0]).astype(np.float32)
    cases = {
        "LutGather": ("table", table, {"bits": bits, "shape": list(shape)}),
        "Pow2Shift": ("alpha", alpha, {"bits": bits, "root": 2, "shape": list(shape)}),
    }
    print(f"\nweight decode of {shape} ({n} weights, {bits}-bit), 1 thread, median of {reps}")
    print(f"{'op':>10} {'constant (cached) ms':>21} {'graph input ms':>15}")
    for op, (pname, param, attrs) in cases.items():
        const = one_node_model(op, "qconvert", [], {"codes": packed, pname: param}, attrs)
        dyn = one_node_model(op, "qconvert", [("codes", U8), (pname, F32)], {}, attrs)
        runners = {
            "const": Bound(session(const, 1), {}, shape),
            "input": Bound(session(dyn, 1), {"codes": packed, pname: param}, shape),
        }
        med = time_side_by_side(runners, reps)
        print(f"{op:>10} {med['const'] * 1e3:21.3f} {med['input'] * 1e3:15.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--reps", type=int, default=15)
    # The project's default activation quantizer: 4-bit unsigned LCQ, 16 intervals.
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--signed", type=int, default=0, choices=[0, 1])
    parser.add_argument("--intervals", type=int, default=16)
    args = parser.parse_args()
    if native.library_path() is None:
        sys.exit("libqconvert_ops.so not built: run `make ops`")
    print(
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, library {native.library_path()}"
    )
    bench_activations(args.elements, args.reps, args.bits, args.signed, args.intervals)
    small = [(1, 16, 16, 16), (32, 16, 16, 16)]
    bench_small_activations(small, args.reps * 40, args.bits, args.signed, args.intervals)
    bench_decode(args.reps)


if __name__ == "__main__":
    main()
