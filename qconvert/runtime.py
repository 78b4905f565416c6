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
from .ops import DOMAIN, REFERENCE_OPS

RUNTIMES = ("native", "function", "reference")


class Session:
    """One runtime behind one call: ``run(feeds, outputs=None) -> list of arrays``."""

    def __init__(self, model: onnx.ModelProto, runtime: str, threads: int = 0) -> None:
        self.runtime = runtime
        self.model = model
        self.input_names = [i.name for i in model.graph.input]
        self.output_names = [o.name for o in model.graph.output]
        if runtime == "reference":
            self._impl = ReferenceEvaluator(model, new_ops=REFERENCE_OPS)
            return
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if runtime == "native":
            native.register(options)
        elif _missing_functions(model):
            raise QConvertError(
                f"the model has no function body for {', '.join(_missing_functions(model))}; "
                "use --runtime native, or export without --no-functions"
            )
        try:
            self._impl = ort.InferenceSession(model.SerializeToString(), options,
                                              providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types
            raise QConvertError(f"ONNX Runtime cannot load the model: {exc}") from exc

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list:
        return self._impl.run(outputs, feeds)


def _missing_functions(model: onnx.ModelProto) -> list[str]:
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    return sorted(used - {f.name for f in model.functions if f.domain == DOMAIN})


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
    if runtime == "native" and native.library_path() is None:
        raise QConvertError("the native library is not built; run `make ops` or pick "
                            "--runtime function")
    return Session(model, runtime, threads)
