"""How each layer output and residual sum reaches uint8: requantized straight onto the grid
of the quantizer that reads it (that quantizer then reads the codes as they are and only
its ceiling Clip remains) or calibrated over the range it takes (docs/integer-mode.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ... import manifest
from ...graph import with_extra_outputs
from .activations import IntAct, code_ceiling
from .edit import GraphEdit, stock_session

CALIB_BATCH = 64


@dataclass
class Requant:
    """A QuantizeLinear / DequantizeLinear pair to insert after ``value``'s producer; a
    None scale is calibrated (uint8 over the observed min..max)."""

    value: str
    scale: float | None = None
    zero_point: int = 0
    non_negative: bool = False  # calibrate from 0: only a Relu reads it
    grid: tuple[float, int] | None = None  # (step, zero point) of a quantizer that reads
    # the value, used when its uint8 range covers the values: that quantizer then reads
    # the codes as they are (its own QuantizeLinear drops out, only its Clip remains)
    sole: bool = False  # quantizers on that grid are the only readers: their range is all
    # that counts
    cap: float | None = None  # a ReLU6's bound: a ceiling on the uint8 codes
    follows: str | None = None  # take the grid of this value's requantization (a MaxPool's
    # output, on its input's grid, so ONNX Runtime runs the pool on uint8)


def _reader_grid(g: GraphEdit, value: str, quantizers: dict[int, IntAct],
                 non_negative: bool) -> tuple[tuple[float, int] | None, bool]:
    """((step, zero point), sole reader?) of a per-tensor uniform quantizer reading
    ``value``: requantizing onto its grid lets it read the codes as they are. After a Relu
    only a zero point of 0 keeps the Relu folded into the requantization."""
    readers = g.consumers.get(value, [])
    grids = [_grid_of(quantizers.get(id(r)), non_negative) for r in readers]
    found = [grid for grid in grids if grid is not None]
    if not found:
        return None, False
    return found[0], all(grid == found[0] for grid in grids)


def _grid_of(act: IntAct | None, non_negative: bool) -> tuple[float, int] | None:
    if act is None or act.info.kind != "lsq" or act.scale_value is not None:
        return None
    if non_negative and act.zero_point != 0:
        return None
    return act.scale, act.zero_point


def _capped_requant(g: GraphEdit, clip: onnx.NodeProto, quantizers: dict[int, IntAct],
                    graph_outputs: set[str], share: bool) -> Requant | None:
    """A layer output read by a Clip(0, c) (ReLU6) whose output a quantizer reads with
    other nodes (MobileNet's stem feeding a residual addition), with ``share``: a Relu
    folded into the requantization onto that quantizer's grid and c a ceiling on the uint8
    codes (round(min(v, c) / s) = min(round(v / s), round(c / s))), so the quantizer reads
    the codes as they are and no float Clip splits the fused kernel from its
    QuantizeLinear. Without a quantizer's grid the float Clip stays (docs/integer-mode.md:
    a calibrated 0..c grid was tried and not kept)."""
    out = clip.output[0]
    if (clip.op_type != "Clip" or out in graph_outputs or len(clip.input) < 3
            or not all(g.is_const(i) for i in clip.input[1:3])):
        return None
    lo, hi = (float(g.array(i).reshape(-1)[0]) for i in clip.input[1:3])
    if lo != 0.0 or hi <= 0.0:
        return None
    grid, sole = _reader_grid(g, out, quantizers, non_negative=True)
    if grid is None or not (share or sole):
        return None
    clip.op_type = "Relu"
    del clip.input[1:]
    return Requant(out, non_negative=True, grid=grid, sole=sole, cap=hi)


def _sums_per_grid(g: GraphEdit, add: onnx.NodeProto, relu: bool, value: str,
                   quantizers: dict[int, IntAct]) -> list[Requant]:
    """A sum read only by uniform quantizers on different grids (ResNet's stage
    transitions: the next block's conv1 and shortcut): one addition per further grid, each
    a QLinearAdd onto its reader's grid, instead of requantizing from the first grid (a
    second rounding and two more nodes). The further readers leave ``value``."""
    readers = g.consumers.get(value, [])
    grids = [_grid_of(quantizers.get(id(r)), relu) for r in readers]
    if len(readers) < 2 or any(grid is None for grid in grids):
        return []
    requants, kept = [], []
    for reader, grid in zip(readers, grids, strict=True):
        if grid == grids[0]:
            kept.append(reader)
            continue
        total = g.node(add, "Add", list(add.input), after=True)
        if relu:
            total = g.node(add, "Relu", [total], after=True)
        g.reroute(quantizers[id(reader)].quantizer, value, total)
        requants.append(Requant(total, non_negative=relu, grid=grid, sole=True))
    g.consumers[value] = kept
    return requants


def _pooled_requants(g: GraphEdit, value: str, chain: list[onnx.NodeProto],
                     quantizers: dict[int, IntAct], graph_outputs: set[str],
                     share: bool) -> list[Requant]:
    """Relu -> MaxPool -> several readers (ResNet's stem): uint8 before the pool (the Relu
    folds into the requantization) and the same grid after it, so ONNX Runtime runs the
    pool on uint8 codes (max commutes with rounding) and the readers take those codes; the
    grid is a reading quantizer's (``share`` or sole reader) when it covers the values."""
    pools = [i for i, n in enumerate(chain) if n.op_type == "MaxPool"]
    if not pools or any(n.op_type == "Relu" for n in chain[pools[0]:]):
        return []
    pooled = chain[-1].output[0]
    if pooled in graph_outputs:
        return []
    before = chain[pools[0] - 1].output[0] if pools[0] else value
    relu = pools[0] > 0
    grid, sole = _reader_grid(g, pooled, quantizers, non_negative=relu)
    return [Requant(before, non_negative=relu, grid=grid if share or sole else None,
                    sole=sole),
            Requant(pooled, follows=before)]


def output_requant(g: GraphEdit, value: str, quantizers: dict[int, IntAct],
                    graph_outputs: set[str], share: bool) -> tuple[str, list[Requant]]:
    """How a per-tensor layer's output reaches the next layer. Through Relu / MaxPool into a
    uniform quantizer: QuantizeLinear onto that quantizer's grid (ONNX Runtime fuses
    Conv -> Relu -> QuantizeLinear into one requantizing kernel; a MaxPool commutes with the
    rounding, so a QuantizeLinear before it keeps the codes). Otherwise calibrated uint8, or
    with ``share`` (quantized residuals) the grid of a quantizer among several readers when
    it covers the values."""
    if value in graph_outputs:
        return "float", []
    chain: list[onnx.NodeProto] = []
    current = value
    while True:
        readers = g.consumers.get(current, [])
        if len(readers) != 1:
            break
        reader = readers[0]
        act = quantizers.get(id(reader))
        if act is not None and act.scale_value is None and act.info.kind == "lsq":
            relu = any(n.op_type == "Relu" for n in chain)
            if relu and act.zero_point != 0:
                break
            pools = [i for i, n in enumerate(chain) if n.op_type == "MaxPool"]
            if not pools:
                return "requantized", []
            before_pool = chain[pools[0] - 1].output[0] if pools[0] else value
            return "requantized", [Requant(before_pool, act.scale, act.zero_point)]
        if reader.op_type not in ("Relu", "MaxPool") or current in graph_outputs:
            break
        chain.append(reader)
        current = reader.output[0]
    pooled = _pooled_requants(g, value, chain, quantizers, graph_outputs, share)
    if pooled:
        return "calibrated", pooled
    readers = g.consumers.get(value, [])
    capped = _capped_requant(g, readers[0], quantizers, graph_outputs, share) \
        if len(readers) == 1 else None
    if capped is not None:
        return "calibrated", [capped]
    if len(readers) == 1 and readers[0].op_type == "Relu" and value not in graph_outputs \
            and readers[0].output[0] not in graph_outputs:
        # after the Relu: ONNX Runtime folds it into the requantization (zero point 0)
        after = readers[0].output[0]
        grid, sole = _reader_grid(g, after, quantizers, non_negative=True)
        return "calibrated", [Requant(after, non_negative=True, sole=sole,
                                      grid=grid if share or sole else None)]
    grid, sole = _reader_grid(g, value, quantizers, non_negative=False)
    return "calibrated", [Requant(value, grid=grid if share or sole else None, sole=sole)]


def residual_requants(g: GraphEdit, graph_outputs: set[str],
                       quantizers: dict[int, IntAct]) -> list[Requant]:
    """Quantized-domain residual additions: the sum (after its Relu, when one reads it)
    goes through uint8, so ONNX Runtime runs DequantizeLinear -> Add -> QuantizeLinear as
    one QLinearAdd. The grid is that of a uniform quantizer reading the sum when it is the
    only reader or its uint8 range covers the sum (that quantizer's codes are then the
    sum's own), else calibrated."""
    requants = []
    for node in g.model.graph.node:
        if node.op_type != "Add" or any(g.is_const(i) or i not in g.producers
                                        for i in node.input):
            continue
        value, readers = node.output[0], g.consumers.get(node.output[0], [])
        relu = len(readers) == 1 and readers[0].op_type == "Relu"
        if relu:
            value = readers[0].output[0]
        if value in graph_outputs:
            continue
        requants.extend(_sums_per_grid(g, node, relu, value, quantizers))
        grid, sole = _reader_grid(g, value, quantizers, non_negative=relu)
        requants.append(Requant(value, non_negative=relu, grid=grid, sole=sole))
    return requants


def calibrate(model: onnx.ModelProto, requants: list[Requant], inputs: np.ndarray) -> None:
    """Fill in the missing scales: uint8 over the range the values take on ``inputs``."""
    wanted = [r for r in requants if r.scale is None and r.follows is None]
    if wanted:
        _calibrate_ranges(model, wanted, inputs)
    by_value = {r.value: r for r in requants}
    for r in requants:
        if r.follows is not None:
            r.scale, r.zero_point = by_value[r.follows].scale, by_value[r.follows].zero_point


def _calibrate_ranges(model: onnx.ModelProto, wanted: list[Requant],
                      inputs: np.ndarray) -> None:
    names = list(dict.fromkeys(r.value for r in wanted))
    sess = stock_session(with_extra_outputs(model, names))
    lo = {n: 0.0 for n in names}
    hi = {n: 0.0 for n in names}
    for start in range(0, len(inputs), CALIB_BATCH):
        values = sess.run(names, {manifest.INPUT_NAME: inputs[start:start + CALIB_BATCH]})
        for name, v in zip(names, values, strict=True):
            lo[name] = min(lo[name], float(v.min()))
            hi[name] = max(hi[name], float(v.max()))
    for r in wanted:
        low = 0.0 if r.non_negative else lo[r.value]
        high = hi[r.value] if r.cap is None else min(hi[r.value], r.cap)
        if r.grid is not None and (r.sole or _covers(r.grid, low, high)):
            r.scale, r.zero_point = r.grid
            continue
        span = high - low
        r.scale = float(np.float32(span / 255)) if span > 0 else 1.0
        r.zero_point = int(np.clip(np.round(-low / r.scale), 0, 255))


def _covers(grid: tuple[float, int], low: float, high: float) -> bool:
    """Whether uint8 codes on ``grid`` (step, zero point) hold low..high unclipped."""
    step, zero_point = grid
    return -zero_point * step <= low and high <= (255 - zero_point) * step


def insert_requants(model: onnx.ModelProto, requants: list[Requant]) -> None:
    """QuantizeLinear -> DequantizeLinear right after each value's producer; readers keep
    the value's name."""
    by_value = {r.value: r for r in requants}
    inits = model.graph.initializer
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        nodes.append(node)
        for k, out in enumerate(node.output):
            r = by_value.get(out)
            if r is None:
                continue
            raw, key = f"{out}/f", f"{out}/rq"
            node.output[k] = raw
            inits.extend([numpy_helper.from_array(np.array(r.scale, np.float32), f"{key}_s"),
                          numpy_helper.from_array(np.array(r.zero_point, np.uint8), f"{key}_z")])
            nodes.append(onnx.helper.make_node(
                "QuantizeLinear", [raw, f"{key}_s", f"{key}_z"], [f"{out}/q"], name=f"{key}_q"))
            codes = f"{out}/q"
            ceiling = None if r.cap is None else code_ceiling(r.cap, r.scale) + r.zero_point
            if ceiling is not None and ceiling < 255:
                codes = f"{out}/capped"
                inits.append(numpy_helper.from_array(np.array(ceiling, np.uint8),
                                                     f"{key}_cap"))
                nodes.append(onnx.helper.make_node(
                    "Clip", [f"{out}/q", f"{key}_z", f"{key}_cap"], [codes], name=f"{key}_cap"))
            nodes.append(onnx.helper.make_node(
                "DequantizeLinear", [codes, f"{key}_s", f"{key}_z"], [out],
                name=f"{key}_dq"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def skip_requantize_pairs(model: onnx.ModelProto) -> None:
    """QuantizeLinear(DequantizeLinear(q)) with the same scale and zero point is q: the
    reader takes q directly (an exact identity; ONNX Runtime would run both)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def params(node):
        if not all(i in inits for i in node.input[1:3]) or len(node.input) < 3:
            return None
        return inits[node.input[1]].tobytes(), inits[node.input[2]].tobytes(), \
            inits[node.input[2]].dtype

    rename: dict[str, str] = {}
    for node in model.graph.node:
        dq = producers.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and params(dq) is not None \
                and params(dq) == params(node):
            rename[node.output[0]] = dq.input[0]
    _redirect_readers(model, rename)


def skip_redundant_clips(model: onnx.ModelProto) -> None:
    """Clip(Clip(q, a, b), c, d) with c <= a and b <= d is the inner Clip (a ReLU6 ceiling
    on a shared grid below the quantizer's own ceiling): its readers take the inner one."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def bounds(node):
        if node is None or node.op_type != "Clip" or len(node.input) < 3 \
                or not all(i in inits and inits[i].dtype == np.uint8 for i in node.input[1:3]):
            return None
        return tuple(int(inits[i]) for i in node.input[1:3])

    rename: dict[str, str] = {}
    for node in model.graph.node:
        outer, inner = bounds(node), bounds(producers.get(node.input[0]))
        if outer and inner and outer[0] <= inner[0] and inner[1] <= outer[1]:
            rename[node.output[0]] = node.input[0]
    _redirect_readers(model, rename)


def _redirect_readers(model: onnx.ModelProto, rename: dict[str, str]) -> None:
    """Every node reading a key of ``rename`` reads its value instead (the skipped node is
    left without readers)."""
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
