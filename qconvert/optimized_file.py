"""``qconvert export --optimize-for cpu``: ONNX Runtime's optimized form of an exported model,
saved next to it for users who deploy on the same ONNX Runtime version and CPU family.

The file holds what a qconvert session runs after loading: the weights decoded (float
initializers, some already reordered into ORT's blocked NCHWc layout), the activation
quantizers spliced into the NCHWc layout (``qconvert/nchwc.py``) and ORT's own fusions
applied. A plain ``InferenceSession`` of it (native library registered)
needs no session-time rewrite, so C++, C# and Java users get the qconvert session's speed.

It is tied to what made it: the ORT version (its internal ``com.microsoft`` /
``com.microsoft.nchwc`` ops and fusions may change between versions) and the CPU's vector
width (the NCHWc block is 8 floats on AVX2, 16 on AVX-512). Both are recorded in its
metadata; the portable, packed export stays the file to ship anywhere else. Its weights
are float32, so it is about as large as the FP32 model.
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from . import native
from .errors import QConvertError
from .export.onnx_export import write_atomically
from .nchwc import spliced_model

TARGETS = ("cpu",)
SUFFIX = ".ort-cpu.onnx"
ORT_VERSION_KEY = "qconvert_onnxruntime_version"
TARGET_KEY = "qconvert_optimized_for"
CPU_KEY = "qconvert_cpu"
LEVEL_KEY = "qconvert_load_optimization_level"
_ISA_FLAGS = ("avx512f", "avx512_vnni", "avx2", "fma", "avx_vnni", "asimd", "sve")


def optimized_path(out: Path) -> Path:
    """``model.onnx`` -> ``model.ort-cpu.onnx``, next to it."""
    return out.with_name(out.name.removesuffix(".onnx") + SUFFIX)


def cpu_signature() -> str:
    """The CPU model and the vector-instruction flags ORT's kernels choose by."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    isa = [f for f in _ISA_FLAGS if f in flags]
    return f"{model}; {platform.machine()}" + (f" {' '.join(isa)}" if isa else "")


def _options(level: ort.GraphOptimizationLevel | None = None,
             save_to: Path | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = native.QUIET_LOGS
    native.register(options)
    if level is not None:
        options.graph_optimization_level = level
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
    return options


def _ort_optimized(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        ort.InferenceSession(model.SerializeToString(), _options(level, path),
                             providers=["CPUExecutionProvider"])
        return onnx.load(str(path))


def optimize_for_cpu(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's optimized form of ``model`` with qconvert's session rewrite, with metadata
    naming the ORT version and CPU it is tied to."""
    if native.library_path() is None:
        raise QConvertError("--optimize-for needs the native library (the optimized graph "
                            "runs the qconvert kernels); run `make ops`")
    spliced, level, optimized = spliced_model(model, _options), None, None
    if spliced is not None:  # the layout pass already ran: keep the splice
        level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        try:
            optimized = _ort_optimized(spliced, level)
        except Exception:  # e.g. a quantizer the library has no kernel for: no splice
            optimized = None
    if optimized is None:  # ORT's own full optimization
        level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            optimized = _ort_optimized(model, level)
        except Exception as exc:  # ORT raises its own exception types
            raise QConvertError(f"ONNX Runtime cannot optimize the model: {exc}") from exc
    del optimized.metadata_props[:]
    for prop in model.metadata_props:
        optimized.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in ((TARGET_KEY, "cpu"), (ORT_VERSION_KEY, ort.__version__),
                       (CPU_KEY, cpu_signature()), (LEVEL_KEY, level.name)):
        optimized.metadata_props.add(key=key, value=value)
    return optimized


def write_optimized(model: onnx.ModelProto, out: Path, force: bool) -> tuple[Path, int]:
    """Write the CPU-optimized form of ``model`` next to ``out``; its path and size."""
    path = optimized_path(out)
    size = write_atomically(optimize_for_cpu(model), path, force)
    return path, size
