"""Locating and registering the native ONNX Runtime kernels (``custom_ops/``).

The library registers the ``qconvert`` domain ops (CompandQuant, AdaptiveStep,
LutGather, Pow2Shift) with a session. Build it with ``make ops``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ENV_VAR = "QCONVERT_OPS_LIB"
_LIB_NAME = "libqconvert_ops.so"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def library_path() -> Path | None:
    """Path of the custom-op library, or None if it is not built.

    ``$QCONVERT_OPS_LIB`` wins when set (even if it points nowhere: then None,
    so a wrong setting is not silently replaced by another library).
    """
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override)
        return path if path.is_file() else None
    path = _REPO_ROOT / "custom_ops" / "build" / _LIB_NAME
    return path if path.is_file() else None


def register(session_options: Any) -> None:
    """Register the qconvert ops with an ``onnxruntime.SessionOptions``."""
    path = library_path()
    if path is None:
        where = os.environ.get(ENV_VAR) or str(_REPO_ROOT / "custom_ops" / "build" / _LIB_NAME)
        raise FileNotFoundError(
            f"qconvert native ops library not found at {where}; "
            f"build it with `make ops` or set {ENV_VAR} to its path"
        )
    session_options.register_custom_ops_library(str(path))
