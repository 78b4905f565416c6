"""Ready-to-run sessions for an exported model, on one of three runtimes.

- ``native``: ONNX Runtime with the qconvert custom-op library registered (its kernels win
  over the model-local function bodies);
- ``function``: stock ONNX Runtime running the model-local function bodies;
- ``reference``: ``onnx.reference.ReferenceEvaluator`` with the numpy reference ops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from . import native
from .errors import QConvertError
from .export.graph import uniform_chain, with_nodes_replaced
from .export.weight_decode import fold_constant_decodes
from .nchwc import spliced_session
from .ops import DOMAIN, DOMAIN_VERSION, REFERENCE_OPS, adaptive_step

RUNTIMES = ("native", "function", "reference")


class Session:
    """One runtime behind one call: ``run(feeds, outputs=None) -> list of arrays``."""

    def __init__(self, model: onnx.ModelProto, runtime: str, threads: int = 0,
                 fold_weights: bool = True, rewrite: bool = True) -> None:
        """``rewrite`` (native): fuse LSQ quantizers into AdaptiveStep and run the
        quantizers in ORT's NCHWc layout; outputs stay bit-identical."""
        self.runtime = runtime
        self.input_names = [i.name for i in model.graph.input]
        self.output_names = [o.name for o in model.graph.output]
        self.spliced = False
        if runtime == "reference":
            self._impl = ReferenceEvaluator(model, new_ops=REFERENCE_OPS)
            return
        if runtime == "native" and fold_weights:
            model = fold_weight_decodes(model)
        rewrite = rewrite and runtime == "native"
        if rewrite:
            model = fuse_uniform_quantizers(model)
        spliced = spliced_session(model, lambda: _options(runtime, threads)) if rewrite else None
        self.spliced = spliced is not None  # quantizers run in ORT's NCHWc layout
        self._impl = spliced or _ort_session(model, runtime, threads)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list:
        try:
            return self._impl.run(outputs, feeds)
        except Exception as exc:  # ORT / onnx.reference raise many types; keep the node name
            detail = " ".join(str(exc).split())[:400]
            raise QConvertError(f"the {self.runtime} runtime failed to run the model: {detail}; "
                                "re-export it with qconvert export") from exc


def _options(runtime: str, threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if runtime == "native":
        native.register(options)
    return options


def _ort_session(model: onnx.ModelProto, runtime: str, threads: int) -> ort.InferenceSession:
    options = _options(runtime, threads)
    if runtime != "native" and _missing_functions(model):
        raise QConvertError(
            f"the model has no function body for {', '.join(_missing_functions(model))}; "
            "use --runtime native, or export without --no-functions"
        )
    try:
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise QConvertError(f"ONNX Runtime cannot load the model: {exc}") from exc


def fold_weight_decodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """For files exported before constant decodes were written foldable: the same model
    with each constant-input ``LutGather`` / ``Pow2Shift`` in the function-only decode
    domain (``qconvert.export.weight_decode``), so ORT folds it into a float initializer
    at load instead of running a native kernel on every inference. Files exported now
    already are in that form: they come back unchanged."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    return folded if fold_constant_decodes(folded) else model


def fuse_uniform_quantizers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each exported LSQ quantizer (Div, Round, Clip, Mul: four passes over the tensor) as
    one native AdaptiveStep with beta = 1 per sample: the same operations, since
    ``s_a = step * 1`` is ``step`` exactly (docs/ops.md), in one pass. The ones take the
    graph input's batch size, so only quantizers whose input has the same batch dimension
    (by shape inference) are fused; the rest stay as they are."""
    batch = _batch_dim(model.graph.input[0]) if len(model.graph.input) == 1 else None
    if batch is None:
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model shape inference rejects: the plain session reports it
        return model
    batch_of = {v.name: _batch_dim(v) for v in inferred.graph.value_info}
    batch_of[model.graph.input[0].name] = batch
    producers = {o: n for n in model.graph.node for o in n.output}
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ones = "qconvert_fused_beta"
    fused: dict[int, onnx.NodeProto | None] = {}
    for node in model.graph.node:
        chain = uniform_chain(node, producers)
        if chain is None or batch_of.get(chain[0].input[0]) != batch:
            continue
        div, _, clip, mul = chain
        params = [constants.get(i) for i in (mul.input[1], *clip.input[1:3])]
        if any(p is None or p.size != 1 for p in params):
            continue
        lo, hi = (float(p.reshape(())) for p in params[1:])
        width = adaptive_step.width_of_range(lo, hi)
        if width is None:
            continue
        fused.update({id(n): None for n in chain[:-1]})
        fused[id(mul)] = onnx.helper.make_node(
            "AdaptiveStep", [div.input[0], mul.input[1], ones], [mul.output[0]],
            name=mul.name, domain=DOMAIN, bits=width[0], signed=int(width[1]))
    if not fused:
        return model
    batch_size = f"{ones}_n"
    out = with_nodes_replaced(model, fused, prepend=(
        onnx.helper.make_node("Shape", [model.graph.input[0].name], [batch_size], end=1),
        onnx.helper.make_node("Expand", [f"{ones}_one", batch_size], [ones])))
    out.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32), f"{ones}_one"))
    return out


def _batch_dim(value: onnx.ValueInfoProto) -> str | int | None:
    shape = value.type.tensor_type.shape
    if not value.type.tensor_type.HasField("shape") or not shape.dim:
        return None
    dim = shape.dim[0]
    return dim.dim_param or (dim.dim_value if dim.HasField("dim_value") else None)


def _missing_functions(model: onnx.ModelProto) -> list[str]:
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    return sorted(used - {f.name for f in model.functions if f.domain == DOMAIN})


def _check_domain_version(model: onnx.ModelProto) -> None:
    """Kernels and function bodies implement version 1 of the op set; a model that asks for
    another version would run with semantics it did not ask for."""
    for opset in model.opset_import:
        if opset.domain == DOMAIN and opset.version != DOMAIN_VERSION:
            raise QConvertError(
                f"the model uses op set {DOMAIN} version {opset.version}; this qconvert "
                f"implements version {DOMAIN_VERSION}: re-export it, or upgrade qconvert")


def default_runtime() -> str:
    return "native" if native.library_path() is not None else "function"


def load_model(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise QConvertError(f"{path}: no such ONNX model file")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf decode errors have several types
        raise QConvertError(f"{path}: not a readable ONNX model ({type(exc).__name__}); "
                            "re-export it with qconvert export") from exc


def session(path_or_model: str | Path | onnx.ModelProto, runtime: str | None = None,
            threads: int = 0, announce=print) -> Session:
    """A ready session; ``runtime=None`` picks native when the library is built, else function."""
    model = (path_or_model if isinstance(path_or_model, onnx.ModelProto)
             else load_model(path_or_model))
    if runtime is None:
        runtime = default_runtime()
        if announce is not None:
            announce(f"runtime: {runtime}" + ("" if runtime == "native" else
                     " (native library not built: run `make ops`)"))
    if runtime not in RUNTIMES:
        raise QConvertError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    _check_domain_version(model)
    if runtime == "native" and native.library_path() is None:
        raise QConvertError("the native library is not built; run `make ops` or pick "
                            "--runtime function")
    return Session(model, runtime, threads)
