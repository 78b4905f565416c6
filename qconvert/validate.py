"""Parity of an exported model with its PyTorch checkpoint, on calibration data.

End to end: top-1 / top-5 agreement, output differences, SQNR, accuracy with labels.
Per layer (optional): a teacher-forced op-level check (each activation quantizer's
ONNX nodes run alone on exactly the input PyTorch gave it) and free-running SQNR of
every layer's quantized input and output, so an op error is told apart from drift.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from . import manifest
from .calib import CalibData
from .checkpoint import Checkpoint
from .graph import scope_inputs
from .manifest import LayerRecord
from .preprocess import prepare_inputs
from .quant import quantized_layers
from .runtime import Session

ProgressFn = Callable[[int], None]


@dataclass
class LayerReport:
    name: str
    act_kind: str
    op_mismatches: int = 0
    op_elements: int = 0
    op_max_abs_diff: float = 0.0
    weight_mismatches: int = 0  # decoded ONNX weight vs the PyTorch quantized weight
    act_sqnr_db: float | None = None  # None: identical
    out_sqnr_db: float | None = None
    merged: bool = False  # the exporter shares an identical twin's nodes; checked there
    integer: bool = False  # integer mode: approximate by design, no op-level check


@dataclass
class Report:
    samples: int
    runtime: str
    top1_agreement: float
    top5_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_output: float
    sqnr_db: float | None
    nan_samples: int
    torch_accuracy: float | None
    onnx_accuracy: float | None
    passed: bool = False
    thresholds: dict = field(default_factory=dict)
    layers: list[LayerReport] = field(default_factory=list)
    abs_diffs: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("abs_diffs")
        return json.dumps(data, indent=2)


def sqnr_db(signal_energy: float, noise_energy: float) -> float | None:
    if noise_energy == 0:
        return None
    if signal_energy == 0:
        return -math.inf
    return 10 * math.log10(signal_energy / noise_energy)


class _Captures:
    """Forward hooks on the PyTorch model: each layer's quantizer input/output, ASQ beta,
    and the layer output."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.values: dict[tuple[str, str], torch.Tensor] = {}  # (layer, part) -> tensor
        self.handles = []
        for name, layer in quantized_layers(model):
            self._hook(layer.act_quant, (name, "act_in"), (name, "act"))
            self._hook(layer, None, (name, "out"))
            if hasattr(layer.act_quant, "adapter"):
                self._hook(layer.act_quant.adapter, None, (name, "beta"))

    def _hook(self, module, input_key, output_key) -> None:
        def hook(_, inputs, output):
            if input_key:
                self.values[input_key] = inputs[0].detach()
            self.values[output_key] = output.detach()
        self.handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def with_extra_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    existing = {o.name for o in extended.graph.output}
    extended.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                 for n in names if n not in existing)
    return extended


def quantizer_submodel(model: onnx.ModelProto, node_names: list[str]) -> onnx.ModelProto:
    """The given nodes alone, with the initializers they read; free inputs become inputs."""
    wanted = set(node_names)
    nodes = [n for n in model.graph.node if n.name in wanted]
    free = scope_inputs(model.graph, nodes)
    read = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes, "quantizer",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in free],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        [i for i in model.graph.initializer if i.name in read],
    )
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    return sub


def _count_differences(got: np.ndarray, want: np.ndarray) -> int:
    return int((~((got == want) | (np.isnan(got) & np.isnan(want)))).sum())


class _LayerChecker:
    """Runs each layer's quantizer and weight decode alone (teacher-forced) and tracks
    per-layer SQNR."""

    def __init__(self, model: onnx.ModelProto, torch_model: torch.nn.Module,
                 make_session) -> None:
        man = manifest.read(model)
        integer = man.mode == "integer"
        self.records: dict[str, LayerRecord] = {rec.name: rec for rec in man.layers}
        self.reports = {rec.name: LayerReport(rec.name, rec.act_kind, integer=integer,
                                              merged=rec.merged and not integer)
                        for rec in man.layers}
        self.sessions = {rec.name: make_session(quantizer_submodel(model, rec.act_nodes))
                         for rec in man.layers if rec.act_nodes}
        self.energy = {rec.name: [0.0, 0.0, 0.0, 0.0] for rec in man.layers}
        # ONNX value name -> PyTorch capture key, for the values export recorded.
        self.watched = {value: (rec.name, part) for rec in man.layers
                        for part, value in (("act", rec.act_value), ("out", rec.out_value))
                        if value}
        self.extra_outputs = list(self.watched)
        self._check_weights(model, torch_model, make_session)

    def _check_weights(self, model, torch_model, make_session) -> None:
        """Decode each weight alone in ONNX and compare with PyTorch's quantized weight."""
        layers = dict(quantized_layers(torch_model))
        for name, rec in self.records.items():
            if not rec.weight.nodes or name not in layers:
                continue
            decoded = make_session(quantizer_submodel(model, rec.weight.nodes)).run({})[0]
            with torch.no_grad():
                layer = layers[name]
                want = layer.weight_quant(layer.weight).numpy()
            self.reports[name].weight_mismatches = (
                _count_differences(decoded, want) if decoded.shape == want.shape else want.size)

    def teacher_forced(self, captured: dict[tuple[str, str], torch.Tensor]) -> None:
        for name, sess in self.sessions.items():
            feeds = {sess.input_names[0]: captured[name, "act_in"].numpy()}
            if len(sess.input_names) > 1:  # ASQ: beta as PyTorch's adapter made it
                feeds[sess.input_names[1]] = captured[name, "beta"].numpy()
            got = sess.run(feeds)[0]
            want = captured[name, "act"].numpy()
            report = self.reports[name]
            mismatches = _count_differences(got, want)
            report.op_mismatches += mismatches
            report.op_elements += want.size
            if mismatches:
                report.op_max_abs_diff = max(report.op_max_abs_diff,
                                             float(np.nanmax(np.abs(got - want))))

    def free_running(self, outputs: dict[str, np.ndarray],
                     captured: dict[tuple[str, str], torch.Tensor]) -> None:
        for value, key in self.watched.items():
            name, part = key
            slot = 0 if part == "act" else 2
            want = captured[key].double().numpy()
            self.energy[name][slot] += float((want**2).sum())
            self.energy[name][slot + 1] += float(((outputs[value] - want) ** 2).sum())

    def finish(self) -> list[LayerReport]:
        for name, report in self.reports.items():
            act_s, act_n, out_s, out_n = self.energy[name]
            report.act_sqnr_db, report.out_sqnr_db = sqnr_db(act_s, act_n), sqnr_db(out_s, out_n)
        return list(self.reports.values())


def _topk(logits: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    return np.sort(np.argsort(-logits, axis=1, kind="stable")[:, :k], axis=1)


def validate(
    ckpt: Checkpoint,
    model: onnx.ModelProto,
    data: CalibData,
    make_session: Callable[[onnx.ModelProto], Session],
    batch_size: int = 64,
    per_layer: bool = False,
    progress: ProgressFn | None = None,
) -> Report:
    """Run both models over ``data``; ``make_session`` builds a session on the chosen runtime."""
    checker = _LayerChecker(model, ckpt.model, make_session) if per_layer else None
    session = make_session(with_extra_outputs(model, checker.extra_outputs) if checker else model)
    input_name, output_name = session.input_names[0], session.output_names[0]
    captures = _Captures(ckpt.model) if checker else None
    torch_all, onnx_all = [], []
    try:
        for start in range(0, len(data.x), batch_size):
            x = prepare_inputs(data.x[start:start + batch_size], ckpt.input.shape,
                               ckpt.input.mean, ckpt.input.std, ckpt.input.vocab_size)
            with torch.no_grad():
                torch_out = ckpt.model(x).numpy()
            extra = checker.extra_outputs if checker else []
            names = [output_name] + [n for n in extra if n != output_name]
            results = dict(zip(names, session.run({input_name: x.numpy()}, names), strict=True))
            if checker:
                checker.teacher_forced(captures.values)
                checker.free_running(results, captures.values)
            torch_all.append(torch_out)
            onnx_all.append(np.asarray(results[output_name], np.float32))
            if progress:
                progress(len(x))
    finally:
        if captures:
            captures.close()
    report = _summary(np.concatenate(torch_all), np.concatenate(onnx_all), data.y,
                      session.runtime)
    if checker:
        report.layers = checker.finish()
    return report


def _summary(t: np.ndarray, o: np.ndarray, labels: np.ndarray | None, runtime: str) -> Report:
    t, o = t.reshape(len(t), -1), o.reshape(len(o), -1)  # [N, ...] outputs (images) as rows
    nan_rows = np.isnan(t).any(axis=1) | np.isnan(o).any(axis=1)
    finite = ~nan_rows
    diff = np.abs(t[finite].astype(np.float64) - o[finite])
    agree1 = (t.argmax(1) == o.argmax(1)) & finite  # a NaN sample never counts as agreement
    agree5 = np.all(_topk(t, 5) == _topk(o, 5), axis=1) & finite
    return Report(
        samples=len(t), runtime=runtime,
        top1_agreement=float(agree1.mean()), top5_agreement=float(agree5.mean()),
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        max_abs_output=float(np.abs(t[finite]).max()) if finite.any() else 0.0,
        sqnr_db=sqnr_db(float((t[finite].astype(np.float64) ** 2).sum()), float((diff**2).sum())),
        nan_samples=int(nan_rows.sum()),
        torch_accuracy=None if labels is None else float((t.argmax(1) == labels).mean()),
        onnx_accuracy=None if labels is None else float((o.argmax(1) == labels).mean()),
        abs_diffs=diff.max(axis=1).tolist() if diff.size else [],
    )


def judge(report: Report, min_agreement: float, max_abs_diff: float | None,
          max_rel_diff: float) -> Report:
    """Decide pass/fail. Without ``max_abs_diff`` the bound is ``max_rel_diff * max|output|``."""
    bound = max_abs_diff if max_abs_diff is not None else max_rel_diff * report.max_abs_output
    report.thresholds = {"min_agreement": min_agreement, "max_abs_diff": bound}
    report.passed = (report.top1_agreement >= min_agreement and report.max_abs_diff <= bound
                     and report.nan_samples == 0)
    return report


def _plot_layer_sqnr(ax, layers: list[LayerReport]) -> None:
    """Free-running SQNR of each layer's quantized input and output; identical ones are
    drawn at a cap and labelled 'exact' (their SQNR is infinite)."""
    finite = [v for layer in layers for v in (layer.act_sqnr_db, layer.out_sqnr_db)
              if v is not None and math.isfinite(v)]
    cap = max(finite, default=100.0) + 20
    rows = np.arange(len(layers))
    for offset, attr, label in ((-0.2, "act_sqnr_db", "quantized input"),
                                (0.2, "out_sqnr_db", "layer output")):
        values = [getattr(layer, attr) for layer in layers]
        bars = ax.barh(rows + offset, [cap if v is None else v for v in values], height=0.4,
                       label=label)
        for bar, value in zip(bars, values, strict=True):
            if value is None:
                ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " exact",
                        va="center", fontsize=6)
    ax.set_yticks(rows, [layer.name for layer in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("free-running SQNR against PyTorch, dB")
    ax.legend(fontsize=7, loc="lower right")


def plot(report: Report, path: str) -> None:
    """Per-layer SQNR (free-running) and a histogram of per-sample max output differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_layers, ax_hist) = plt.subplots(1, 2, figsize=(12, 4.5))
    layers = [layer for layer in report.layers if not layer.merged]
    if layers:
        _plot_layer_sqnr(ax_layers, layers)
    else:
        ax_layers.text(0.5, 0.5, "run with --per-layer for per-layer SQNR", ha="center")
        ax_layers.set_axis_off()
    diffs = np.asarray(report.abs_diffs) if report.abs_diffs else np.zeros(1)
    floor = 1e-12
    ax_hist.hist(np.log10(np.maximum(diffs, floor)), bins=40, color="tab:orange")
    ax_hist.set_xlabel(f"log10 max |ONNX - PyTorch| per sample (exact drawn at {floor:g})")
    ax_hist.set_ylabel("samples")
    fig.suptitle(f"qconvert validate: {report.samples} samples, runtime {report.runtime}, "
                 f"top-1 agreement {report.top1_agreement:.2%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
