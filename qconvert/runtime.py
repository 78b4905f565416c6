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
from onnx.reference import ReferenceEvaluator

from . import native
from .errors import QConvertError
from .export.weight_decode import fold_constant_decodes
from .nchwc import spliced_session
from .ops import DOMAIN, REFERENCE_OPS, SUPPORTED_DOMAIN_VERSIONS

RUNTIMES = ("native", "function", "reference")


class Session:
    """One runtime behind one call: ``run(feeds, outputs=None) -> list of arrays``."""

    def __init__(self, model: onnx.ModelProto, runtime: str, threads: int = 0,
                 fold_weights: bool = True, rewrite: bool = True) -> None:
        """``rewrite`` (native): run the activation quantizers in ORT's NCHWc layout
        (qconvert/nchwc.py); outputs stay bit-identical."""
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
        spliced = spliced_session(model, lambda: _options(runtime, threads)) if rewrite else None
        self.spliced = spliced is not None  # quantizers run in ORT's NCHWc layout
        self._impl = spliced or _ort_session(model, runtime, threads)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list:
        _check_feeds(feeds, self.input_names)
        try:
            return self._impl.run(outputs, feeds)
        except Exception as exc:  # ORT / onnx.reference raise many types; keep the node name
            detail = " ".join(str(exc).split())[:400]
            raise QConvertError(f"the {self.runtime} runtime failed to run the model: {detail}; "
                                "re-export it with qconvert export") from exc


def _check_feeds(feeds, input_names: list[str]) -> None:
    """API misuse is the caller's error, not the model's: say how to call run()."""
    if not isinstance(feeds, dict):
        raise QConvertError(
            f"Session.run takes a dict of input name -> array, got {type(feeds).__name__}; "
            f"call run({{{input_names[0]!r}: x}})" if input_names else
            f"Session.run takes a dict of input name -> array, got {type(feeds).__name__}")
    unknown = sorted(set(feeds) - set(input_names))
    missing = sorted(set(input_names) - set(feeds))
    if unknown or missing:
        raise QConvertError(f"Session.run feeds: the model's inputs are {input_names}; "
                            f"missing {missing}, unknown {unknown}")


def _options(runtime: str, threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = native.QUIET_LOGS
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


def _missing_functions(model: onnx.ModelProto) -> list[str]:
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    return sorted(used - {f.name for f in model.functions if f.domain == DOMAIN})


def _check_domain_version(model: onnx.ModelProto) -> None:
    """Kernels and function bodies implement versions 1 and 2 of the op set (2 added
    UniformQuant); a model that asks for another would run with semantics it did not ask for."""
    for opset in model.opset_import:
        if opset.domain == DOMAIN and opset.version not in SUPPORTED_DOMAIN_VERSIONS:
            raise QConvertError(
                f"the model uses op set {DOMAIN} version {opset.version}; this qconvert "
                f"implements versions {', '.join(map(str, SUPPORTED_DOMAIN_VERSIONS))}: "
                "re-export it, or upgrade qconvert")


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
