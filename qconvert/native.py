"""Locating and registering the native ONNX Runtime kernels (``custom_ops/``).

The library registers the ``qconvert`` domain ops (CompandQuant, AdaptiveStep,
LutGather, Pow2Shift, UniformQuant, SampleMaxQuant) with a session. ``pip install`` builds it
and ships it inside the package; in a source checkout ``make ops`` also builds
it into ``custom_ops/build`` (with the C++ runner and the sanitizer variant).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ENV_VAR = "QCONVERT_OPS_LIB"
# SessionOptions.log_severity_level for qconvert's sessions: ONNX Runtime logs a failing
# kernel on stderr before raising, and qconvert reports that error itself in one line, so
# only ORT's fatal messages go through.
QUIET_LOGS = 4
_LIB_NAME = "libqconvert_ops.so"
_PACKAGE_DIR = Path(__file__).resolve().parent
_DEV_BUILD = _PACKAGE_DIR.parent / "custom_ops" / "build" / _LIB_NAME


def _package_library() -> Path | None:
    """The copy installed with the package.

    Every entry of the package's ``__path__`` is searched: an editable install
    keeps the compiled library in site-packages and the Python files in the
    source tree, and lists both there.
    """
    package = sys.modules.get(__package__ or "")
    for entry in getattr(package, "__path__", [str(_PACKAGE_DIR)]):
        path = Path(entry) / _LIB_NAME
        if path.is_file():
            return path
    return None


def ops_library_path() -> Path | None:
    """Path of the native custom-op library, or None when there is none.

    ``$QCONVERT_OPS_LIB`` wins when set (even if it points nowhere: then None,
    so a wrong setting is not silently replaced by another library). Else the
    copy installed inside the package. A source checkout's ``make ops`` build
    (``custom_ops/build``) is used when the package has no copy, or when it is
    the newer of the two: it is the one rebuilt after editing the C++ sources,
    while an editable install's copy dates from ``pip install``.
    """
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override)
        return path if path.is_file() else None
    packaged = _package_library()
    dev = _DEV_BUILD if _DEV_BUILD.is_file() else None
    if packaged is None or dev is None:
        return packaged or dev
    return dev if dev.stat().st_mtime > packaged.stat().st_mtime else packaged


# The name the rest of the package has always used.
library_path = ops_library_path


def register(session_options: Any) -> None:
    """Register the qconvert ops with an ``onnxruntime.SessionOptions``."""
    path = ops_library_path()
    if path is None:
        where = os.environ.get(ENV_VAR) or f"the qconvert package or {_DEV_BUILD}"
        raise FileNotFoundError(
            f"qconvert native ops library not found in {where}; reinstall the package "
            f"(pip install .), build it with `make ops`, or set {ENV_VAR} to its path"
        )
    session_options.register_custom_ops_library(str(path))
