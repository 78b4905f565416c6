"""Parity of an exported model with its PyTorch checkpoint, on calibration data.

Three models see the same inputs: the ONNX file exactly as deployed, the PyTorch QAT
model in float32, and the same QAT model in float64 (the referee, ``referee.py``).
End to end, per output of any structure: each float32 model's distance to the referee and
to each other (max / mean |diff|, SQNR), and the task's own measures where they apply:
top-1 / top-5 agreement (and accuracy with labels) for class logits, per-pixel argmax
agreement and agreement IoU for dense class maps, box-level agreement after the standard
decoding for a detector's raw outputs (``detection.py``), nothing class-based for values.
Per layer, from a separate pass (hooks and extra graph outputs change what ONNX Runtime
and PyTorch run, so they never touch the end-to-end figures): a teacher-forced op-level
check (each quantizer's ONNX nodes run alone on exactly the input PyTorch gave it), the
teacher-forced segment check (the graph cut at every quantizer and fed PyTorch's quantized
values, so every other node runs on exactly PyTorch's inputs, against the float64 referee
forced the same way), quantizer outputs on a different level than the referee's, and
free-running SQNR.
The verdict is in ``verdict.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from . import detection, manifest
from .calib import CalibData
from .checkpoint import Checkpoint
from .errors import QConvertError
from .export.onnx_export import output_leaves
from .graph import cut, scope_inputs, with_extra_outputs
from .manifest import LayerRecord, act_value, out_value
from .preprocess import prepare_inputs
from .quant import quantized_layers
from .referee import as_referee_input, float64_twin, quantizers, run_checked, run_referee
from .runtime import Session

ProgressFn = Callable[[int], None]
TASKS = ("classification", "segmentation", "regression", "detection")
CLASS_LOGITS, CLASS_MAP, VALUES = "class logits", "class map", "values"


@contextlib.contextmanager
def _reference_convolutions():
    """PyTorch's own (non-oneDNN) convolutions: another, equally valid summation order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


# Other float32 evaluations of the same PyTorch model, each as valid as the default one.
# A low-bit network amplifies summation-order noise into whole levels, so how far float32
# can land from the referee is measured on more than one evaluation order.
FLOAT32_VARIANTS = {"reference convolutions": _reference_convolutions}
PER_LAYER_SUBSET = 64  # samples the per-layer pass sees by default (all with per_layer)
# Two quantizer outputs sit on the same level when they differ by less than this, relative:
# far above float32-vs-float64 rounding of a level (~1e-7), far below the relative gap
# between adjacent levels of an 8-bit grid (>= 1/255).
SAME_LEVEL_RTOL = 1e-5


def is_integer_model(model: onnx.ModelProto) -> bool:
    return manifest.read(model).mode == "integer"


@dataclass
class Distance:
    """How far model A's outputs are from model B's, over all samples."""

    max_abs_diff: float
    mean_abs_diff: float
    sqnr_db: float | None  # None: identical
    top1_agreement: float | None  # None: the outputs are not class logits
    top5_agreement: float | None
    top1_disagreements: int | None
    pixel_agreement: float | None = None  # dense class maps: same argmax class per pixel
    agreement_iou: float | None = None  # mean over classes of IoU of the two argmax maps
    pixel_disagreements: int | None = None
    pixels: int | None = None


@dataclass
class OutputReport:
    """One model output: its distances, class metrics when it holds class logits."""

    index: int
    shape: list[int]  # per sample
    kind: str  # CLASS_LOGITS ([N, C]), CLASS_MAP ([N, C, H, W], segmentation) or VALUES
    onnx_vs_torch: Distance
    referee: dict[str, Distance] = field(default_factory=dict)
    name: str = "output"  # its path in the model's output structure, e.g. ['boxes'][2]


@dataclass
class LayerReport:
    name: str
    act_kind: str
    op_mismatches: int = 0
    op_elements: int = 0
    op_max_abs_diff: float = 0.0
    weight_mismatches: int = 0  # decoded ONNX weight vs the PyTorch quantized weight
    act_sqnr_db: float | None = None  # ONNX vs PyTorch float32, free running; None: identical
    out_sqnr_db: float | None = None
    merged: bool = False  # the exporter shares an identical twin's nodes; checked there
    integer: bool = False  # integer mode: approximate by design, no op-level check
    # Against the float64 referee (free running):
    level_elements: int = 0
    torch_level_flips: int = 0  # quantizer outputs on another level than the referee's
    onnx_level_flips: int = 0
    torch_out_mean_diff: float | None = None  # mean |layer output - referee's|
    onnx_out_mean_diff: float | None = None
    torch_out_sqnr_db: float | None = None
    onnx_out_sqnr_db: float | None = None


@dataclass
class SegmentReport:
    """The float nodes that compute one value between quantizers (a quantizer's input, ASQ's
    beta, a model output), run teacher-forced: on PyTorch's quantized values, in ONNX, in
    PyTorch float32 and in the float64 referee."""

    value: str  # its ONNX name
    layer: str | None  # the layer whose quantizer reads it; None: a model output
    part: str  # "input" or "beta" of the layer's quantizer, or the output's name
    elements: int = 0
    max_abs_value: float = 0.0  # of the referee's value
    onnx_mean_diff: float = 0.0  # mean |ONNX - referee|
    torch_mean_diff: float = 0.0  # mean |PyTorch fp32 - referee|
    onnx_max_diff: float = 0.0
    torch_max_diff: float = 0.0
    # Quantizer inputs: elements ONNX's quantizer puts on another level than PyTorch's
    # although both computed them from the same values (where free-running flips start),
    # and how close the referee's value is to the level boundary there (in float32 ulps of
    # the value; the boundary lies between ONNX's and PyTorch's values).
    seed_flips: int = 0
    seed_ties: int = 0  # of those on a rounding tie (see _SegmentChecker.finish)
    seed_max_ulps: float = 0.0
    name: str = ""  # "<layer> input", "<layer> beta", or the output's name

    def __post_init__(self) -> None:
        self.name = self.name or (self.part if self.layer is None
                                  else f"{self.layer} {self.part}")


@dataclass
class Report:
    samples: int
    runtime: str
    top1_agreement: float | None  # ONNX vs PyTorch float32
    top5_agreement: float | None
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_output: float
    sqnr_db: float | None
    nan_samples: int
    torch_accuracy: float | None
    onnx_accuracy: float | None
    output_shapes: list[list[int]] = field(default_factory=list)  # per sample
    task: str = "classification"  # see TASKS and task_of
    outputs: list[OutputReport] = field(default_factory=list)
    # --task detection: box-level agreement after decoding, each against the referee's
    # detections ("torch", "torch (...)", "onnx") and ONNX against PyTorch ("onnx vs torch")
    detection: dict[str, dict] = field(default_factory=dict)
    referee: dict[str, Distance] = field(default_factory=dict)  # "torch", "onnx"
    integer: bool = False
    zero_quantizers: list[str] = field(default_factory=list)  # all-zero output on the data
    degenerate: list[str] = field(default_factory=list)
    per_layer_samples: int = 0
    # quantizer outputs (per-layer pass) on another level than the referee's, and of how many
    level_flips: dict[str, int] = field(default_factory=dict)
    passed: bool = False
    verdict: str = ""  # PASS, FAIL or INCONCLUSIVE (set by verdict.judge)
    checks: list[dict] = field(default_factory=list)
    thresholds: dict = field(default_factory=dict)
    diagnosis: str = ""
    first_departure: str | None = None
    layers: list[LayerReport] = field(default_factory=list)
    segments: list[SegmentReport] = field(default_factory=list)  # teacher-forced, per-layer pass
    abs_diffs: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("abs_diffs")
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def sqnr_db(signal_energy: float, noise_energy: float) -> float | None:
    if noise_energy == 0:
        return None
    if signal_energy == 0:
        return -math.inf
    return 10 * math.log10(signal_energy / noise_energy)


def flat_outputs(out) -> list[np.ndarray]:
    """A model's outputs (a tensor, or tuples / lists / dicts of them) as float64 arrays,
    in the order torch.export flattens them (the ONNX output order; None leaves dropped)."""
    return [np.asarray(t.detach().double().numpy() if isinstance(t, torch.Tensor) else t,
                       np.float64) for _, t in output_leaves(out)]


def output_names(out) -> list[str]:
    return [name for name, _ in output_leaves(out)]


def _batch_major(o: np.ndarray, batch: int) -> bool:
    return bool(o.ndim) and o.shape[0] == batch


def per_sample(outputs: list[np.ndarray], batch: int) -> np.ndarray:
    """Outputs as one [N, features] matrix (every output flattened per sample; an output
    without a batch dimension, e.g. a 0-d scalar, is repeated for each sample)."""
    rows = [o.reshape(batch, -1) if _batch_major(o, batch)
            else np.broadcast_to(o.reshape(1, -1), (batch, o.size)) for o in outputs]
    return np.concatenate(rows, axis=1)


def sample_shapes(outputs: list[np.ndarray], batch: int) -> list[list[int]]:
    """Each output's shape per sample, as ``per_sample`` lays it out."""
    return [list(o.shape[1:]) if _batch_major(o, batch) else list(o.shape) for o in outputs]


def check_same_shapes(outputs: list[np.ndarray], batch: int, want: list[list[int]],
                      names: list[str], which: str) -> None:
    """Refuse outputs whose shape per sample is not ``want`` (the PyTorch model's on the
    first batch): their size depends on the data (masking, NMS), so no per-element
    comparison exists."""
    for name, got, expected in zip(names, sample_shapes(outputs, batch), want, strict=True):
        if got != expected:
            raise QConvertError(
                f"{'the output' if name == 'output' else 'output ' + name} has shape {got} "
                f"per sample in {which}, {expected} in the "
                "PyTorch model's first batch: its size depends on the data (a boolean mask, "
                "NMS), which validate cannot compare element by element; export the network "
                "before that step and run it after the model (docs/tasks.md)")


class _Captures:
    """Forward hooks on a PyTorch model: each layer's quantizer input/output, ASQ beta,
    and the layer output."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, layer in quantized_layers(model):
            self._hook(layer.act_quant, f"{name}/act_in", act_value(name))
            self._hook(layer, None, out_value(name))
            if hasattr(layer.act_quant, "adapter"):
                self._hook(layer.act_quant.adapter, None, f"{name}/beta")

    def _hook(self, module, input_key, output_key) -> None:
        def hook(_, inputs, output):
            if input_key:
                self.values[input_key] = inputs[0].detach()
            self.values[output_key] = output.detach()
        self.handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class _ZeroWatch:
    """Which quantizers of the referee ever output a nonzero value."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.nonzero = {name: False for name, _ in quantizers(model)}
        self.handles = [q.register_forward_hook(self._hook(name)) for name, q in quantizers(model)]

    def _hook(self, name: str):
        def hook(_, __, output):
            if not self.nonzero[name] and bool((output != 0).any()):
                self.nonzero[name] = True
        return hook

    def all_zero(self) -> list[str]:
        return [name for name, seen in self.nonzero.items() if not seen]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


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


def other_level(got: np.ndarray, referee: np.ndarray) -> np.ndarray:
    """Where quantizer outputs sit on a different level than the referee's (see
    SAME_LEVEL_RTOL)."""
    got = got.astype(np.float64)
    return ~(np.abs(got - referee) <= SAME_LEVEL_RTOL * np.maximum(np.abs(got),
                                                                   np.abs(referee)))


def level_flips(got: np.ndarray, referee: np.ndarray) -> int:
    """Quantizer outputs on a different level than the referee's."""
    return int(other_level(got, referee).sum())


class _Energy:
    """Running sums for mean |diff| and SQNR of one value against a reference."""

    def __init__(self) -> None:
        self.signal = self.noise = self.abs_sum = self.max_diff = self.max_want = 0.0
        self.count = 0

    def add(self, got: np.ndarray, want: np.ndarray) -> None:
        diff = got.astype(np.float64) - want
        self.signal += float((want.astype(np.float64) ** 2).sum())
        self.noise += float((diff ** 2).sum())
        self.abs_sum += float(np.abs(diff).sum())
        self.count += diff.size
        if diff.size:  # fmax: a NaN (counted in the sums) leaves the maxima as they are
            self.max_diff = float(np.fmax(self.max_diff, np.abs(diff).max()))
            self.max_want = float(np.fmax(self.max_want, np.abs(want).max()))

    def mean(self) -> float | None:
        return self.abs_sum / self.count if self.count else None

    def sqnr(self) -> float | None:
        return sqnr_db(self.signal, self.noise)


class _LayerChecker:
    """The per-layer pass: each quantizer and weight decode run alone (teacher-forced),
    free-running SQNR against PyTorch, and level flips against the referee."""

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
        # ONNX value name -> (layer, capture key, is it the quantized input?), for the
        # values in the graph (a graph output keeps its own name).
        self.watched = {value: (rec.name, key, key == act_value(rec.name))
                        for rec in man.layers
                        for value, key in ((rec.act_value, act_value(rec.name)),
                                           (rec.out_value, out_value(rec.name))) if value}
        self.energy: dict[tuple[str, str], _Energy] = {}
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

    def teacher_forced(self, captured: dict[str, torch.Tensor]) -> None:
        for name, sess in self.sessions.items():
            feeds = {sess.input_names[0]: captured[f"{name}/act_in"].numpy()}
            if len(sess.input_names) > 1:  # ASQ: beta as PyTorch's adapter made it
                feeds[sess.input_names[1]] = captured[f"{name}/beta"].numpy()
            got = sess.run(feeds)[0]
            want = captured[act_value(name)].numpy()
            report = self.reports[name]
            mismatches = _count_differences(got, want)
            report.op_mismatches += mismatches
            report.op_elements += want.size
            if mismatches:
                report.op_max_abs_diff = max(report.op_max_abs_diff,
                                             float(np.nanmax(np.abs(got - want))))

    def _energy(self, key: tuple[str, str]) -> _Energy:
        return self.energy.setdefault(key, _Energy())

    def free_running(self, outputs: dict[str, np.ndarray], captured: dict[str, torch.Tensor],
                     referee: dict[str, torch.Tensor]) -> None:
        for value, (name, key, is_act) in self.watched.items():
            want, ref = captured[key].numpy(), referee[key].numpy()
            got = outputs[value]
            self._energy((key, "onnx-torch")).add(got, want)
            self._energy((key, "torch-referee")).add(want, ref)
            self._energy((key, "onnx-referee")).add(got, ref)
            if is_act:
                report = self.reports[name]
                report.level_elements += ref.size
                report.torch_level_flips += level_flips(want, ref)
                report.onnx_level_flips += level_flips(got, ref)

    def finish(self) -> list[LayerReport]:
        empty = _Energy()
        for name, report in self.reports.items():
            act, out = act_value(name), out_value(name)
            report.act_sqnr_db = self.energy.get((act, "onnx-torch"), empty).sqnr()
            report.out_sqnr_db = self.energy.get((out, "onnx-torch"), empty).sqnr()
            torch_out = self.energy.get((out, "torch-referee"), empty)
            onnx_out = self.energy.get((out, "onnx-referee"), empty)
            report.torch_out_mean_diff = torch_out.mean()
            report.onnx_out_mean_diff = onnx_out.mean()
            report.torch_out_sqnr_db, report.onnx_out_sqnr_db = torch_out.sqnr(), onnx_out.sqnr()
        return list(self.reports.values())


@contextlib.contextmanager
def _forced(model: torch.nn.Module, captured: dict[str, torch.Tensor]):
    """Every activation quantizer of ``model`` returns PyTorch's quantized value from
    ``captured`` (in the model's dtype): the float nodes between quantizers then run on
    exactly PyTorch's inputs."""
    def forcing(name: str):
        return lambda _, __, output: captured[act_value(name)].to(output.dtype)
    handles = [layer.act_quant.register_forward_hook(forcing(name))
               for name, layer in quantized_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _SegmentChecker:
    """The teacher-forced segment check: the ONNX graph cut at every activation quantizer
    (``graph.cut``), each cut fed PyTorch's quantized value, each quantizer input, ASQ beta
    and model output returned; compared, as PyTorch float32's values are, with the float64
    referee forced the same way (``_forced``)."""

    def __init__(self, model: onnx.ModelProto, layers: _LayerChecker, make_session) -> None:
        records = [rec for rec in layers.records.values() if rec.act_nodes]
        self.quantizer_sessions = layers.sessions
        self.session = make_session(cut(model, [n for rec in records for n in rec.act_nodes]))
        self.fed = _fed_captures(model, records, self.session.input_names)
        self.outputs = [o.name for o in model.graph.output]
        self.segments = {value: SegmentReport(value, layer, part)
                         for value, (layer, part) in _probed_values(model, records).items()
                         if value in self.session.output_names}
        self.segments.update({v: SegmentReport(v, None, v) for v in self.outputs
                              if v in self.session.output_names})
        self.energy = {value: (_Energy(), _Energy()) for value in self.segments}
        # per segment, each seed's (referee's distance to the boundary, float32 ulp there)
        self.seed_distances: dict[str, list[tuple[float, float]]] = {}

    def add(self, x: torch.Tensor, captured: dict[str, torch.Tensor], torch_out: list,
            forced: dict[str, torch.Tensor], forced_out: list) -> None:
        """One batch: PyTorch's values (``captured``, ``torch_out``) and the forced referee's
        (``forced``, ``forced_out``)."""
        feeds = {value: captured[key].numpy() for value, key in self.fed.items()}
        feeds[self.session.input_names[0]] = x.numpy()
        values = {**feeds, **dict(zip(self.session.output_names, self.session.run(feeds),
                                      strict=True))}
        for value, seg in self.segments.items():
            want, ref = self._pytorch_and_referee(seg, captured, torch_out, forced, forced_out)
            got = values[value]
            if got.size != want.size:  # a wrongly wired graph: nothing to compare, it fails
                self.energy[value][0].add(np.full(want.shape, np.nan), ref)
                continue
            want, ref = want.reshape(got.shape), ref.reshape(got.shape)
            onnx_energy, torch_energy = self.energy[value]
            onnx_energy.add(got, ref)
            torch_energy.add(want, ref)
            if seg.part == "input" and seg.layer in self.quantizer_sessions:
                self._seeds(seg, values, captured, forced)

    def _pytorch_and_referee(self, seg, captured, torch_out, forced, forced_out):
        if seg.layer is None:
            index = self.outputs.index(seg.value)
            return torch_out[index], forced_out[index]
        key = f"{seg.layer}/{'beta' if seg.part == 'beta' else 'act_in'}"
        return captured[key].numpy(), forced[key].numpy()

    def _seeds(self, seg: SegmentReport, values: dict, captured, forced) -> None:
        """Elements where ONNX's quantizer, on ONNX's segment result, takes another level than
        PyTorch's did: level flips that start here rather than arrive from upstream."""
        sess = self.quantizer_sessions[seg.layer]
        q_onnx = sess.run({n: values[n] for n in sess.input_names})[0]
        q_torch = captured[act_value(seg.layer)].numpy()
        seeds = other_level(q_onnx, q_torch.reshape(q_onnx.shape)).reshape(-1)
        if not seeds.any():
            return
        seg.seed_flips += int(seeds.sum())
        q_ref = forced[act_value(seg.layer)].numpy().reshape(-1)[seeds]
        x_ref = forced[f"{seg.layer}/act_in"].numpy().reshape(-1)[seeds]
        x_onnx = values[seg.value].reshape(-1)[seeds]
        x_torch = captured[f"{seg.layer}/act_in"].numpy().reshape(-1)[seeds]
        # The boundary lies between ONNX's and PyTorch's values: the one on another level
        # than the referee's bounds the referee's distance to it.
        other = np.where(other_level(q_onnx.reshape(-1)[seeds], q_ref), x_onnx, x_torch)
        ulp = np.spacing(np.abs(x_ref).astype(np.float32)).astype(np.float64)
        self.seed_distances.setdefault(seg.value, []).extend(
            zip(np.abs(other - x_ref).tolist(), ulp.tolist(), strict=True))

    def finish(self) -> list[SegmentReport]:
        for value, seg in self.segments.items():
            onnx_energy, torch_energy = self.energy[value]
            seg.elements = onnx_energy.count
            seg.max_abs_value = onnx_energy.max_want
            seg.onnx_mean_diff = onnx_energy.mean() or 0.0
            seg.torch_mean_diff = torch_energy.mean() or 0.0
            seg.onnx_max_diff, seg.torch_max_diff = onnx_energy.max_diff, torch_energy.max_diff
            seeds = self.seed_distances.get(value, [])
            # A tie: any float32 evaluation could round the referee's value either way; the
            # last rounding alone moves it by up to an ulp, the segment's sums by up to
            # PyTorch's largest error there.
            seg.seed_ties = sum(d <= max(seg.torch_max_diff, ulp) for d, ulp in seeds)
            seg.seed_max_ulps = max((d / ulp for d, ulp in seeds), default=0.0)
        return list(self.segments.values())


def _fed_captures(model: onnx.ModelProto, records: list[LayerRecord],
                  inputs: list[str]) -> dict[str, str]:
    """Each input of the cut graph (but the model's own) -> the capture that feeds it: the
    quantized value of the layer whose quantizer made it."""
    nodes = {n.name: n for n in model.graph.node}
    made_by = {o: rec.name for rec in records for name in rec.act_nodes
               for o in nodes[name].output}
    own = {i.name for i in model.graph.input}
    unknown = [i for i in inputs if i not in own and i not in made_by]
    if unknown:
        raise QConvertError(f"the graph cut at the quantizers has inputs no quantizer makes "
                            f"({', '.join(unknown)}); re-export the model with qconvert export")
    return {i: act_value(made_by[i]) for i in inputs if i not in own}


def _probed_values(model: onnx.ModelProto, records: list[LayerRecord]
                   ) -> dict[str, tuple[str, str]]:
    """Each value a quantizer reads -> (layer, "input" or "beta"): ASQ's beta is what its
    adapter nodes make."""
    nodes = {n.name: n for n in model.graph.node}
    probed: dict[str, tuple[str, str]] = {}
    for rec in records:
        beta = {o for name in rec.adapter_nodes for o in nodes[name].output}
        for value in scope_inputs(model.graph, [nodes[n] for n in rec.act_nodes]):
            probed.setdefault(value, (rec.name, "beta" if value in beta else "input"))
    return probed


def _topk(logits: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    return np.sort(np.argsort(-logits, axis=1, kind="stable")[:, :k], axis=1)


def _batches(data: CalibData, ckpt: Checkpoint, batch_size: int, limit: int | None = None):
    count = len(data.x) if limit is None else min(limit, len(data.x))
    for start in range(0, count, batch_size):
        yield prepare_inputs(data.x[start:min(start + batch_size, count)], ckpt.input.shape,
                             ckpt.input.mean, ckpt.input.std, ckpt.input.vocab_size)


def _onnx_outputs(session: Session, x: torch.Tensor, names: list[str] | None = None) -> list:
    return session.run({session.input_names[0]: x.numpy()}, names)


def validate(
    ckpt: Checkpoint,
    model: onnx.ModelProto,
    data: CalibData,
    make_session: Callable[[onnx.ModelProto], Session],
    batch_size: int = 64,
    per_layer: bool | None = False,
    progress: ProgressFn | None = None,
    referee: bool = True,
    task: str | None = None,
) -> Report:
    """Run the models over ``data``; ``make_session`` builds a session on the chosen runtime.

    ``task`` (one of TASKS) decides the task measures; None: the model's ``qconvert_task``
    attribute, else inferred from the output shapes (``task_of``).

    ``per_layer``: True checks every layer on all of ``data``, None on the first
    ``PER_LAYER_SUBSET`` samples, False not at all. ``referee=False`` skips the float64
    model (agreement-only callers such as the integer-mode width search).
    """
    twin = float64_twin(ckpt.model) if referee else None
    watch = _ZeroWatch(twin) if twin is not None else None
    session = make_session(model)  # the file as deployed: no added outputs
    torch_rows, onnx_rows, referee_rows = [], [], []
    variant_rows: dict[str, list[np.ndarray]] = {}
    shapes: list[list[int]] = []
    names: list[str] = []
    kinds: list[str] = []
    try:
        for x in _batches(data, ckpt, batch_size):
            structured = run_checked(ckpt.model, x, "the PyTorch model")
            torch_out, names = flat_outputs(structured), output_names(structured)
            if not shapes:  # the first batch: refuse a task no output fits before the rest
                shapes = sample_shapes(torch_out, len(x))
                task = task or getattr(ckpt.model, "qconvert_task", None) or task_of(shapes)
                kinds = _checked_kinds(ckpt, shapes, names, task)
            check_same_shapes(torch_out, len(x), shapes, names, "the PyTorch model")
            for name, context in FLOAT32_VARIANTS.items() if referee else ():
                with context():
                    variant = flat_outputs(run_checked(ckpt.model, x,
                                                       f"the PyTorch model ({name})"))
                check_same_shapes(variant, len(x), shapes, names, f"the PyTorch model ({name})")
                variant_rows.setdefault(name, []).append(per_sample(variant, len(x)))
            onnx_out = [np.asarray(o, np.float64) for o in _onnx_outputs(session, x)]
            if len(onnx_out) != len(torch_out):
                raise QConvertError(f"the ONNX model has {len(onnx_out)} outputs, the PyTorch "
                                    f"model {len(torch_out)} ({', '.join(names)}); re-export "
                                    "it from this checkpoint")
            check_same_shapes(onnx_out, len(x), shapes, names, "the ONNX model")
            torch_rows.append(per_sample(torch_out, len(x)))
            onnx_rows.append(per_sample(onnx_out, len(x)))
            if twin is not None:
                ref_out = flat_outputs(run_referee(twin, x))
                check_same_shapes(ref_out, len(x), shapes, names, "the float64 referee")
                referee_rows.append(per_sample(ref_out, len(x)))
            if progress:
                progress(len(x))
    finally:
        if watch is not None:
            watch.close()
    t, o = np.concatenate(torch_rows), np.concatenate(onnx_rows)
    classes = kinds == [CLASS_LOGITS]
    report = _summary(t, o, data.y, session.runtime, classes)
    report.output_shapes, report.task = shapes, task
    variants = {k: np.concatenate(v) for k, v in variant_rows.items()}
    r = np.concatenate(referee_rows) if referee_rows else None
    report.outputs = _per_output(shapes, names, kinds, t, o, r, variants)
    report.integer = is_integer_model(model)
    if r is not None:
        whole = CLASS_LOGITS if classes else VALUES
        report.referee = {"torch": distance(t, r, whole)}
        for name, rows in variants.items():
            report.referee[f"torch ({name})"] = distance(rows, r, whole)
        report.referee["onnx"] = distance(o, r, whole)
        report.zero_quantizers = watch.all_zero()
    if task == "detection":
        report.detection = _detection(ckpt, shapes, names, t, o, r, variants)
    report.degenerate = _degenerate(t, report.zero_quantizers) + _no_detections(report)
    if per_layer is not False:
        attach_per_layer(report, ckpt, model, data, make_session, batch_size,
                         None if per_layer else PER_LAYER_SUBSET, twin)
    return report


def _per_layer(ckpt, model, data, make_session, batch_size, limit, twin):
    """The per-layer pass, in its own sessions: the per-layer values as extra outputs, and
    (exact mode) the graph cut at the quantizers for the segment check."""
    # The twin first: a deep copy made later would carry the PyTorch model's capture hooks.
    twin = twin if twin is not None else float64_twin(ckpt.model)
    checker = _LayerChecker(model, ckpt.model, make_session)
    segments = None if is_integer_model(model) else _SegmentChecker(model, checker,
                                                                    make_session)
    session = make_session(with_extra_outputs(model, list(checker.watched)))
    captures = _Captures(ckpt.model)
    referee_captures = _Captures(twin)
    names = [session.output_names[0]] + [n for n in checker.watched
                                         if n != session.output_names[0]]
    samples = 0
    try:
        for x in _batches(data, ckpt, batch_size, limit):
            with torch.no_grad():
                torch_out = flat_outputs(ckpt.model(x))
                twin(as_referee_input(x))
                referee = dict(referee_captures.values)
                if segments is not None:  # before ONNX Runtime's threads spin on the cores
                    with _forced(twin, captures.values):
                        forced_out = flat_outputs(twin(as_referee_input(x)))
            results = dict(zip(names, _onnx_outputs(session, x, names), strict=True))
            checker.teacher_forced(captures.values)
            checker.free_running(results, captures.values, referee)
            if segments is not None:
                segments.add(x, captures.values, torch_out, referee_captures.values,
                             forced_out)
            samples += len(x)
    finally:
        captures.close()
        referee_captures.close()
    return checker.finish(), segments.finish() if segments is not None else [], samples


def attach_per_layer(report: Report, ckpt: Checkpoint, model: onnx.ModelProto,
                     data: CalibData, make_session: Callable[[onnx.ModelProto], Session],
                     batch_size: int = 64, limit: int | None = None,
                     twin: torch.nn.Module | None = None) -> Report:
    """Run the per-layer pass on the first ``limit`` samples (all: None) into ``report``."""
    report.layers, report.segments, report.per_layer_samples = _per_layer(
        ckpt, model, data, make_session, batch_size, limit, twin)
    report.level_flips = {
        "torch": sum(layer.torch_level_flips for layer in report.layers),
        "onnx": sum(layer.onnx_level_flips for layer in report.layers),
        "elements": sum(layer.level_elements for layer in report.layers)}
    return report


def is_class_logits(shape: list[int]) -> bool:
    return len(shape) == 1 and shape[0] > 1


def is_class_map(shape: list[int]) -> bool:
    return len(shape) == 3 and shape[0] > 1


def task_of(shapes: list[list[int]]) -> str:
    """The task when the shapes leave no doubt: class logits among the outputs ->
    classification, else regression. [N, C, H, W] could be class scores or a reconstruction:
    it is judged as values unless --task segmentation (or the model's qconvert_task) says."""
    return "classification" if any(is_class_logits(s) for s in shapes) else "regression"


def output_kinds(shapes: list[list[int]], names: list[str], task: str) -> list[str]:
    """What each output holds under ``task``; a task no output fits is an error."""
    if task not in TASKS:
        raise QConvertError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    kinds = [CLASS_LOGITS if is_class_logits(s) and task != "regression"
             else CLASS_MAP if is_class_map(s) and task == "segmentation" else VALUES
             for s in shapes]
    wanted = {"classification": CLASS_LOGITS, "segmentation": CLASS_MAP}.get(task)
    if wanted and wanted not in kinds:
        form = "[N, classes]" if wanted == CLASS_LOGITS else "[N, classes, H, W]"
        shown = ", ".join(f"{n} {[-1, *s]}" for n, s in zip(names, shapes, strict=True))
        raise QConvertError(f"--task {task} needs an output of shape {form} (classes > 1); "
                            f"this model returns {shown}; pick another --task")
    return kinds


def _checked_kinds(ckpt: Checkpoint, shapes: list[list[int]], names: list[str],
                   task: str) -> list[str]:
    """``output_kinds``; for detection also the structure and level shapes the decoding
    needs (errors name what is missing)."""
    kinds = output_kinds(shapes, names, task)
    if task == "detection":
        if len(ckpt.input.shape) != 3:
            raise QConvertError(f"--task detection needs image inputs [C, H, W]; this "
                                f"checkpoint's input is {list(ckpt.input.shape)}")
        cls_levels, box_levels = detection.split_levels(
            names, [torch.empty(1, *shape) for shape in shapes])
        detection.check_levels(cls_levels, box_levels, decode_spec(ckpt.model, len(cls_levels)))
    return kinds


def _columns(shapes: list[list[int]]) -> list[slice]:
    """Each output's columns in the per-sample matrices."""
    cols, start = [], 0
    for shape in shapes:
        cols.append(slice(start, start + int(np.prod(shape, dtype=np.int64))))
        start = cols[-1].stop
    return cols


def _per_output(shapes, names, kinds, t, o, r, variants) -> list[OutputReport]:
    """Split the per-sample matrices back into the model's outputs."""
    reports = []
    for index, (shape, cols) in enumerate(zip(shapes, _columns(shapes), strict=True)):
        kind = kinds[index]
        out = OutputReport(index, shape, kind, distance(o[:, cols], t[:, cols], kind, shape),
                           name=names[index])
        if r is not None:
            out.referee["torch"] = distance(t[:, cols], r[:, cols], kind, shape)
            for name, rows in variants.items():
                out.referee[f"torch ({name})"] = distance(rows[:, cols], r[:, cols], kind,
                                                          shape)
            out.referee["onnx"] = distance(o[:, cols], r[:, cols], kind, shape)
        reports.append(out)
    return reports


def distance(a: np.ndarray, b: np.ndarray, kind: str = VALUES,
             shape: list[int] | None = None) -> Distance:
    """A's distance to B (per-sample matrices), with the measures of the output's kind."""
    finite = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    diff = np.abs(a[finite] - b[finite])
    top1 = top5 = disagreements = None
    if kind == CLASS_LOGITS:
        agree1 = (a.argmax(1) == b.argmax(1)) & finite  # a NaN sample never agrees
        top1 = float(agree1.mean())
        top5 = float((np.all(_topk(a, 5) == _topk(b, 5), axis=1) & finite).mean())
        disagreements = int((~agree1).sum())
    found = Distance(
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        sqnr_db=sqnr_db(float((b[finite] ** 2).sum()), float((diff ** 2).sum())),
        top1_agreement=top1, top5_agreement=top5, top1_disagreements=disagreements)
    if kind == CLASS_MAP:
        _class_map_measures(found, a, b, finite, shape)
    return found


def _class_map_measures(found: Distance, a: np.ndarray, b: np.ndarray, finite: np.ndarray,
                        shape: list[int]) -> None:
    """Per-pixel argmax agreement, and the mean over classes (those either map uses) of
    the IoU between the pixels each map gives that class. A NaN sample's pixels disagree."""
    classes = shape[0]
    a_map = a.reshape(len(a), *shape).argmax(1)
    b_map = b.reshape(len(b), *shape).argmax(1)
    same = (a_map == b_map) & finite[:, None, None]
    ious = []
    for c in range(classes):
        in_a, in_b = a_map == c, b_map == c
        union = int((in_a | in_b).sum())
        if union:
            ious.append(int((in_a & in_b & same).sum()) / union)
    found.pixels = int(same.size)
    found.pixel_disagreements = int((~same).sum())
    found.pixel_agreement = float(same.mean())
    found.agreement_iou = float(np.mean(ious)) if ious else 1.0


def decode_spec(model: torch.nn.Module, levels: int) -> detection.DecodeSpec:
    """torchvision RetinaNet's decoding; a model's ``anchor_sizes`` / ``aspect_ratios``
    attributes override the anchors."""
    sizes = getattr(model, "anchor_sizes", None) or detection.default_anchor_sizes(levels)
    ratios = getattr(model, "aspect_ratios", None) or (0.5, 1.0, 2.0)
    return detection.DecodeSpec(tuple(tuple(s) for s in sizes), tuple(ratios))


def _detect(rows: np.ndarray, shapes, names, image_hw, spec) -> list[detection.Detections]:
    arrays = [torch.from_numpy(np.ascontiguousarray(rows[:, cols])).reshape(len(rows), *shape)
              for shape, cols in zip(shapes, _columns(shapes), strict=True)]
    cls_levels, box_levels = detection.split_levels(names, arrays)
    return detection.detect(cls_levels, box_levels, image_hw, spec)


def _detection(ckpt, shapes, names, t, o, r, variants) -> dict[str, dict]:
    """Box-level agreement after decoding each model's raw outputs the same way (float64):
    PyTorch float32 (both evaluations) and ONNX against the referee, ONNX against PyTorch."""
    levels, _ = detection.split_levels(names, [torch.empty(0)] * len(names))
    spec = decode_spec(ckpt.model, len(levels))
    image_hw = tuple(ckpt.input.shape[1:])
    found = {"torch": _detect(t, shapes, names, image_hw, spec),
             "onnx": _detect(o, shapes, names, image_hw, spec)}
    result = {"onnx vs torch": detection.agreement(found["torch"], found["onnx"]).to_dict()}
    if r is None:
        return result
    reference = _detect(r, shapes, names, image_hw, spec)
    result["torch"] = detection.agreement(reference, found["torch"]).to_dict()
    for name, rows in variants.items():
        result[f"torch ({name})"] = detection.agreement(
            reference, _detect(rows, shapes, names, image_hw, spec)).to_dict()
    result["onnx"] = detection.agreement(reference, found["onnx"]).to_dict()
    return result


def _no_detections(report: Report) -> list[str]:
    reference = report.detection.get("onnx", {}).get("reference")
    if reference == 0:
        return ["the float64 referee detects nothing above the score threshold on this data, "
                "so box-level agreement cannot show a difference"]
    return []


def _summary(t: np.ndarray, o: np.ndarray, labels: np.ndarray | None, runtime: str,
             classes: bool) -> Report:
    nan_rows = ~(np.isfinite(t).all(axis=1) & np.isfinite(o).all(axis=1))
    finite = ~nan_rows
    d = distance(o, t, CLASS_LOGITS if classes else VALUES)
    diff = np.abs(t[finite] - o[finite])
    accuracy = labels is not None and classes
    return Report(
        samples=len(t), runtime=runtime,
        top1_agreement=d.top1_agreement, top5_agreement=d.top5_agreement,
        max_abs_diff=d.max_abs_diff, mean_abs_diff=d.mean_abs_diff,
        max_abs_output=float(np.abs(t[finite]).max()) if diff.size else 0.0,
        sqnr_db=d.sqnr_db, nan_samples=int(nan_rows.sum()),
        torch_accuracy=float((t.argmax(1) == labels).mean()) if accuracy else None,
        onnx_accuracy=float((o.argmax(1) == labels).mean()) if accuracy else None,
        abs_diffs=diff.max(axis=1).tolist() if diff.size else [],
    )


def _degenerate(t: np.ndarray, zero_quantizers: list[str]) -> list[str]:
    """Why this comparison cannot show a difference, if it cannot."""
    found = []
    finite = t[np.isfinite(t).all(axis=1)]
    if finite.size and not finite.any():
        found.append("every output of the PyTorch model is 0")
    elif finite.size and finite.min() == finite.max():
        found.append(f"every output of the PyTorch model is the same number ({finite.min():g})")
    elif len(finite) > 1 and (finite == finite[0]).all():
        found.append("the PyTorch model gives the same output for every sample")
    if zero_quantizers:
        shown = ", ".join(zero_quantizers[:4]) + (
            f" and {len(zero_quantizers) - 4} more" if len(zero_quantizers) > 4 else "")
        found.append(f"{len(zero_quantizers)} quantizers output only 0 on this data ({shown})")
    return found


def plot(report: Report, path: str) -> None:
    """PNG: per-layer SQNR curves and a histogram of per-sample output differences."""
    from .report_plot import plot as plot_report

    plot_report(report, path)
