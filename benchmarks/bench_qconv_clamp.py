"""qconvert's QConvClamp (convolution, requantization and the b-bit ceiling in one kernel)
against ONNX Runtime's QLinearConv + uint8 Clip, on each convolution shape of the shipped
ResNet-20 (16x16 input), batch 1, one thread.

    python benchmarks/bench_qconv_clamp.py [--rounds 30] [--copies 16] [--clock cpu]
    python benchmarks/bench_qconv_clamp.py --network CKPT [--rounds 40]
    python benchmarks/bench_qconv_clamp.py --layers mobilenetv2 [--copies 2]
    python benchmarks/bench_qconv_clamp.py --layers mobilenetv2-dw [--copies 2]

Each layer is timed as three single-layer models holding ``--copies`` independent nodes
(own weights, one shared input, outputs bound once with IOBinding), so a per-node time
is a run's time / copies and includes ORT's per-node dispatch, which is what a Clip costs:
- ``ort``: com.microsoft QLinearConv with channels_last=1 (the NHWC form ORT's own
  transformer makes of every QLinearConv in the full network, so no Transpose is timed)
  followed by Clip(0, 15) where the network has a ceiling there;
- ``ort_conv``: the same QLinearConv without the Clip;
- ``qconvert``: QConvClamp on NCHW codes (clamp to [0, 15], or [0, 255] where the network
  has no ceiling).
``--layers mobilenetv2-dw`` times depthwise layers the same way: ORT's QLinearConv with
group = C, against QDepthwiseConvClamp on the same NHWC codes (with the input ceiling
x_hi = 15 applied too, as when it absorbs the Clip before it).
Rounds interleave the three; ratios are medians of per-round ratios. Before timing, every
layer checks that QConvClamp gives QLinearConv + Clip's output to the bit on random codes
(4-bit activations 0..15 and weights -8..7; the stem reads 8-bit codes with |w| <= 64 as
integer export writes them) and on a multiplier of 0.5, whose odd sums are exact ties.

``--network CKPT``: the whole model. The integer-mode file (b' = 8) is rewritten as
``qconvert export --mode integer --conv-kernel qconvert`` writes it
(qconvert/export/integer/conv_kernel.py): every DequantizeLinear -> Conv [-> Relu] ->
QuantizeLinear [-> Clip] becomes one QConvClamp on the codes (all convolutions, so that
ORT's NHWC transformer leaves no QLinearConv to put Transposes around). The rewritten
file must give the exported file's outputs to the bit on the calibration samples; then
FP32, ORT's U8S8 model, the exported file and the rewritten one are timed interleaved
(batch 1, one thread, as bench_integer_ort.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_integer_ort import (  # noqa: E402
    checkpoint_and_samples,
    interleaved,
    plain_session,
    quantize_u8s8,
    repeats_for,
    save_as_exported,
)

from qconvert import native  # noqa: E402
from qconvert.bench import export_float, float_model  # noqa: E402
from qconvert.export.integer import to_integer, with_qconv_clamp  # noqa: E402
from qconvert.export.onnx_export import build_onnx  # noqa: E402
from qconvert.ops import DOMAIN_VERSION  # noqa: E402


@dataclass(frozen=True)
class Layer:
    name: str
    c: int          # input channels
    m: int          # output channels
    size: int       # input height = width
    kernel: int
    stride: int
    ceiling: bool   # a Clip(0, 15) follows in the exported network
    count: int      # how many convolutions of ResNet-20 have this shape
    x_max: int = 15
    w_range: tuple[int, int] = (-8, 7)
    x_zp: int = 0   # the stem's input is signed: uint8 codes around 128
    depthwise: bool = False  # group = C = M: QDepthwiseConvClamp on NHWC codes


# The 21 convolutions of ResNet-20 at 16x16 (stage 1: 16 channels at 16x16, stage 2: 32 at
# 8x8, stage 3: 64 at 4x4; 1x1 stride-2 shortcuts). conv1 of each block reads the block's
# input and is followed by its ceiling Clip; conv2 and the shortcuts feed QLinearAdd.
LAYERS = [
    Layer("stem 1->16 16x16", 1, 16, 16, 3, 1, True, 1, x_max=255, w_range=(-64, 64), x_zp=128),
    Layer("s1 conv1 16->16 16x16", 16, 16, 16, 3, 1, True, 3),
    Layer("s1 conv2 16->16 16x16", 16, 16, 16, 3, 1, False, 3),
    Layer("s2 shortcut 1x1/2 16->32", 16, 32, 16, 1, 2, False, 1),
    Layer("s2 conv1 3x3/2 16->32", 16, 32, 16, 3, 2, True, 1),
    Layer("s2 conv1 32->32 8x8", 32, 32, 8, 3, 1, True, 2),
    Layer("s2 conv2 32->32 8x8", 32, 32, 8, 3, 1, False, 3),
    Layer("s3 shortcut 1x1/2 32->64", 32, 64, 8, 1, 2, False, 1),
    Layer("s3 conv1 3x3/2 32->64", 32, 64, 8, 3, 2, True, 1),
    Layer("s3 conv1 64->64 4x4", 64, 64, 4, 3, 1, True, 2),
    Layer("s3 conv2 64->64 4x4", 64, 64, 4, 3, 1, False, 3),
]
CEILING = 15
# MobileNetV2's 1x1 convolutions at 224x224 (--layers mobilenetv2): an expansion (followed
# by its ceiling) and a projection (feeding a residual sum) per stage. Weights as integer
# export writes 4-bit codes, scaled to fill int8.
MOBILENETV2_1X1 = [
    Layer(f"{kind} {c}->{m} @{size}", c, m, size, 1, 1, kind == "expand", 1, w_range=(-126, 126))
    for kind, c, m, size in [
        ("expand", 16, 96, 112), ("project", 96, 24, 56), ("expand", 24, 144, 56),
        ("project", 144, 24, 56), ("expand", 32, 192, 28), ("project", 192, 32, 28),
        ("expand", 64, 384, 14), ("project", 384, 64, 14), ("expand", 160, 960, 7),
        ("project", 960, 160, 7)]]
# The seven 3x3 depthwise convolutions of qconvert.archs.mobilenetv2_small at a 224x224
# input (--layers mobilenetv2-dw), each followed by its ceiling.
MOBILENETV2_DW = [
    Layer(f"dw {c} @{size}/{stride}", c, c, size, 3, stride, True, 1, w_range=(-126, 126),
          depthwise=True)
    for c, size, stride in [(16, 224, 1), (64, 224, 2), (96, 112, 1), (96, 112, 2),
                            (128, 56, 1), (128, 56, 1), (256, 56, 1)]]


LAYER_SETS = {"resnet20": LAYERS, "mobilenetv2": MOBILENETV2_1X1,
              "mobilenetv2-dw": MOBILENETV2_DW}


@dataclass
class Params:
    w: np.ndarray        # int8 [M, C, k, k]
    bias: np.ndarray     # int32 [M]
    x_scale: np.float32
    w_scale: np.ndarray  # float32 [M]
    y_scale: np.float32

    def multiplier(self) -> np.ndarray:
        """ORT's requantization multiplier, in its float32 order: x_scale * w_scale / y_scale."""
        return (self.x_scale * self.w_scale) / self.y_scale


def out_size(layer: Layer) -> int:
    pad = layer.kernel // 2
    return (layer.size + 2 * pad - layer.kernel) // layer.stride + 1


def exact_acc(layer: Layer, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """int64 convolution of one NCHW image: the scale of typical outputs."""
    pad, s, o = layer.kernel // 2, layer.stride, out_size(layer)
    xp = np.pad(x[0].astype(np.int64) - layer.x_zp, ((0, 0), (pad, pad), (pad, pad)))
    acc = np.zeros((w.shape[0], o, o), np.int64)
    for kh in range(layer.kernel):
        for kw in range(layer.kernel):
            patch = xp[:, kh:kh + s * o:s, kw:kw + s * o:s]
            if layer.depthwise:
                acc += w[:, 0, kh, kw].astype(np.int64)[:, None, None] * patch
            else:
                acc += np.einsum("mc,chw->mhw", w[:, :, kh, kw].astype(np.int64), patch)
    return acc


def random_params(layer: Layer, rng: np.random.Generator, x: np.ndarray,
                  tie: bool = False) -> Params:
    lo, hi = layer.w_range
    group_c = 1 if layer.depthwise else layer.c
    w = rng.integers(lo, hi + 1, (layer.m, group_c, layer.kernel, layer.kernel)).astype(np.int8)
    k = group_c * layer.kernel ** 2
    bias = rng.integers(-4 * k, 4 * k + 1, layer.m).astype(np.int32)
    if tie:  # multiplier 0.5: every odd sum lands on .5 (half to even decides)
        return Params(w, bias, np.float32(1), np.full(layer.m, 0.5, np.float32), np.float32(1))
    x_scale = np.float32(0.05)
    w_scale = rng.uniform(0.005, 0.02, layer.m).astype(np.float32)
    real = (exact_acc(layer, x, w) + bias[:, None, None]) * (x_scale * w_scale)[:, None, None]
    top = max(float(np.percentile(real, 90)), 1e-3)
    return Params(w, bias, x_scale, w_scale, np.float32(top / (1.5 * CEILING)))


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def ort_model(layer: Layer, params: list[Params], clip: bool) -> onnx.ModelProto:
    """NHWC com.microsoft QLinearConv (+ Clip) per copy, one shared input."""
    o, pad = out_size(layer), layer.kernel // 2
    nodes, outputs = [], []
    inits = [_init("zero_u8", np.uint8(0)), _init("x_zp", np.uint8(layer.x_zp))]
    if clip:
        inits.append(_init("ceil", np.uint8(CEILING)))
    for i, p in enumerate(params):
        inits += [_init(f"xs{i}", p.x_scale), _init(f"w{i}", p.w), _init(f"ws{i}", p.w_scale),
                  _init(f"wz{i}", np.zeros(layer.m, np.int8)), _init(f"ys{i}", p.y_scale),
                  _init(f"b{i}", p.bias)]
        conv_out = f"c{i}" if clip else f"y{i}"
        nodes.append(helper.make_node(
            "QLinearConv", ["x", f"xs{i}", "x_zp", f"w{i}", f"ws{i}", f"wz{i}", f"ys{i}",
                            "zero_u8", f"b{i}"], [conv_out], domain="com.microsoft",
            kernel_shape=[layer.kernel] * 2, pads=[pad] * 4, strides=[layer.stride] * 2,
            channels_last=1, group=layer.c if layer.depthwise else 1))
        if clip:
            nodes.append(helper.make_node("Clip", [conv_out, "zero_u8", "ceil"], [f"y{i}"]))
        outputs.append(
            helper.make_tensor_value_info(f"y{i}", TensorProto.UINT8, [1, o, o, layer.m]))
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, layer.size, layer.size, layer.c])
    graph = helper.make_graph(nodes, "ort", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                   helper.make_opsetid("com.microsoft", 1)])


def qconvert_model(layer: Layer, params: list[Params], ceiling: int) -> onnx.ModelProto:
    """QConvClamp on NCHW codes, or QDepthwiseConvClamp on NHWC codes."""
    o, pad = out_size(layer), layer.kernel // 2
    nodes, inits, outputs = [], [], []
    op, extra = "QConvClamp", {}
    if layer.depthwise:
        op, extra = "QDepthwiseConvClamp", {"group": layer.c, "x_hi": CEILING}
    for i, p in enumerate(params):
        inits += [_init(f"w{i}", p.w), _init(f"b{i}", p.bias), _init(f"s{i}", p.multiplier())]
        nodes.append(helper.make_node(
            op, ["x", f"w{i}", f"b{i}", f"s{i}"], [f"y{i}"], domain="qconvert",
            strides=[layer.stride] * 2, pads=[pad] * 4, lo=0, hi=ceiling,
            x_zero_point=layer.x_zp, **extra))
        outputs.append(helper.make_tensor_value_info(
            f"y{i}", TensorProto.UINT8, [1, o, o, layer.m] if layer.depthwise
            else [1, layer.m, o, o]))
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, list(layout(layer, np.empty(
        (1, layer.c, layer.size, layer.size))).shape))
    graph = helper.make_graph(nodes, "qconvert", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                   helper.make_opsetid("qconvert", DOMAIN_VERSION)])


def layout(layer: Layer, x: np.ndarray) -> np.ndarray:
    """NCHW codes as the qconvert node reads them: NHWC for the depthwise op."""
    return x.transpose(0, 2, 3, 1) if layer.depthwise else x


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.register_custom_ops_library(str(native.library_path()))
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


class Bound:
    """A session with its input and every output bound once: run() times the graph only."""

    def __init__(self, sess: ort.InferenceSession, x: np.ndarray):
        self.sess, self.x = sess, np.ascontiguousarray(x)
        self.binding = sess.io_binding()
        self.binding.bind_cpu_input("x", self.x)
        self.outputs = []
        for out in sess.get_outputs():
            buf = np.empty(out.shape, np.uint8)
            self.binding.bind_output(out.name, "cpu", 0, np.uint8, buf.shape, buf.ctypes.data)
            self.outputs.append(buf)

    def run(self) -> None:
        self.sess.run_with_iobinding(self.binding)


def check_identical(layer: Layer, rng: np.random.Generator, copies: int) -> None:
    """QConvClamp == QLinearConv + Clip to the bit, on random codes and on exact ties."""
    for trial in range(3):
        x = rng.integers(0, layer.x_max + 1, (1, layer.c, layer.size, layer.size)).astype(np.uint8)
        params = [random_params(layer, rng, x, tie=(trial == 2)) for _ in range(copies)]
        ref = session(ort_model(layer, params, clip=True)).run(None, {"x": x.transpose(0, 2, 3, 1)})
        got = session(qconvert_model(layer, params, CEILING)).run(None, {"x": layout(layer, x)})
        for i, (r, g) in enumerate(zip(ref, got, strict=True)):
            if not np.array_equal(layout(layer, r.transpose(0, 3, 1, 2)), g):
                raise SystemExit(f"{layer.name}: copy {i} trial {trial} differs from "
                                 f"QLinearConv + Clip")


def time_layer(layer: Layer, rng: np.random.Generator, copies: int, rounds: int,
               clock) -> dict[str, float]:
    x = rng.integers(0, layer.x_max + 1, (1, layer.c, layer.size, layer.size)).astype(np.uint8)
    params = [random_params(layer, rng, x) for _ in range(copies)]
    x_nhwc = x.transpose(0, 2, 3, 1)
    cands = {"ort": Bound(session(ort_model(layer, params, clip=layer.ceiling)), x_nhwc),
             "ort_conv": Bound(session(ort_model(layer, params, clip=False)), x_nhwc),
             "qconvert": Bound(session(qconvert_model(
                 layer, params, CEILING if layer.ceiling else 255)), layout(layer, x))}
    # Runs per timed sample: a sample lasts >= 5 ms.
    started = clock()
    for _ in range(20):
        cands["ort"].run()
    repeats = max(1, int(np.ceil(0.005 / max((clock() - started) / 20, 1e-7))))
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for name, c in cands.items():
            c.run()
            started = clock()
            for _ in range(repeats):
                c.run()
            times[name].append((clock() - started) / repeats / copies)
    med = {k: float(np.median(v)) for k, v in times.items()}
    med["ratio"] = float(np.median(np.array(times["qconvert"]) / np.array(times["ort"])))
    med["ratio_conv"] = float(np.median(np.array(times["qconvert"]) / np.array(times["ort_conv"])))
    return med


def bench_network(target: str, rounds: int, clock) -> None:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        ckpt, samples = checkpoint_and_samples(target, "lsq", tmp)
        files = {"fp32": tmp / "fp32.onnx", "ort_u8s8": tmp / "u8s8.onnx",
                 "integer": tmp / "integer.onnx", "integer_qconv_clamp": tmp / "qcc.onnx"}
        export_float(float_model(ckpt), tuple(ckpt.input.shape), files["fp32"])
        quantize_u8s8(files["fp32"], files["ort_u8s8"], samples)
        exact, _ = build_onnx(ckpt)
        integer = to_integer(exact, 8, calib=samples)
        save_as_exported(integer, files["integer"])
        convs = sum(n.op_type == "Conv" for n in integer.graph.node)
        rewritten = with_qconv_clamp(integer)  # what --conv-kernel qconvert writes
        replaced = sum(n.op_type == "QConvClamp" for n in rewritten.graph.node)
        save_as_exported(rewritten, files["integer_qconv_clamp"])
        print(f"== {Path(target).stem}: {replaced} of {convs} convolutions as QConvClamp",
              flush=True)
        sessions = {k: plain_session(p, 1) for k, p in files.items()}
        ref = sessions["integer"].run(None, {"input": samples})[0]
        got = sessions["integer_qconv_clamp"].run(None, {"input": samples})[0]
        if not np.array_equal(ref, got):
            raise SystemExit(f"rewritten file differs from the exported one on "
                             f"{int((ref != got).any(axis=-1).sum())} of {len(ref)} samples")
        print(f"   outputs bit-identical to the exported file on {len(ref)} samples", flush=True)
        x = np.ascontiguousarray(samples[:1])
        repeats = repeats_for(sessions["fp32"], x, clock)
        times = interleaved(sessions, x, rounds, repeats, clock)
        ratio = {k: np.array(v) / np.array(times["fp32"]) for k, v in times.items()}
        print(f"   batch 1 ({rounds} rounds x {repeats} runs, load {os.getloadavg()[0]:.1f}): "
              + ", ".join(f"{k} {1e3 * np.median(v):.3f} ms ({np.median(ratio[k]):.2f}x)"
                          for k, v in times.items()), flush=True)
        for a, b in [("integer_qconv_clamp", "integer"), ("integer_qconv_clamp", "ort_u8s8"),
                     ("integer", "ort_u8s8")]:
            r = np.array(times[a]) / np.array(times[b])
            print(f"   {a} / {b}: median {np.median(r):.3f}, 10th-90th percentile "
                  f"{np.percentile(r, 10):.3f}-{np.percentile(r, 90):.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--copies", type=int, default=16)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--network", metavar="CKPT", help="time the whole model instead")
    parser.add_argument("--layers", choices=list(LAYER_SETS), default="resnet20",
                        help="mobilenetv2: its 1x1 convolutions at 224x224 (one of each); "
                             "mobilenetv2-dw: mobilenetv2_small's depthwise ones at 224x224")
    args = parser.parse_args()
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.network:
        print(f"load average {os.getloadavg()}; onnxruntime {ort.__version__}; library "
              f"{native.library_path()}; {args.clock} time", flush=True)
        bench_network(args.network, args.rounds, clock)
        print(f"load average {os.getloadavg()}")
        return
    rng = np.random.default_rng(args.seed)
    print(f"load average {os.getloadavg()}; onnxruntime {ort.__version__}; library "
          f"{native.library_path()}; {args.clock} time, {args.rounds} rounds, "
          f"{args.copies} nodes per model", flush=True)
    totals = {"ort": 0.0, "ort_conv": 0.0, "qconvert": 0.0}
    print(f"{'layer':<26} {'n':>2} {'clip':>4} {'ORT conv+clip us':>16} {'ORT conv us':>11} "
          f"{'qconvert us':>11} {'q/ORT':>6} {'q/conv':>6}")
    layers = LAYER_SETS[args.layers]
    for layer in layers:
        check_identical(layer, rng, copies=4)
        med = time_layer(layer, rng, args.copies, args.rounds, clock)
        for k in totals:
            totals[k] += layer.count * med[k]
        print(f"{layer.name:<26} {layer.count:>2} {'yes' if layer.ceiling else 'no':>4} "
              f"{1e6 * med['ort']:>16.2f} {1e6 * med['ort_conv']:>11.2f} "
              f"{1e6 * med['qconvert']:>11.2f} {med['ratio']:>6.2f} {med['ratio_conv']:>6.2f}",
              flush=True)
    print(f"summed ({sum(x.count for x in layers)} convolutions, "
          f"{sum(x.count for x in layers if x.ceiling)} ceilings): ORT QLinearConv + Clip "
          f"{1e6 * totals['ort']:.1f} us, ORT QLinearConv alone {1e6 * totals['ort_conv']:.1f} us, "
          f"{'QDepthwiseConvClamp' if layers[0].depthwise else 'QConvClamp'} "
          f"{1e6 * totals['qconvert']:.1f} us: "
          f"{totals['qconvert'] / totals['ort']:.2f}x ORT's nodes")
    print("bit-identical to QLinearConv + Clip on every layer (random codes and exact ties)")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
