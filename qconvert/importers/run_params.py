"""The run-parameter file the public LCQ re-implementation writes next to its checkpoints
(``<model>.txt``): one ``key: value`` line per training argument, values as Python prints
them (``num_bits: 4``, ``w_quantizer: <class 'src.quantizer.nonuniform.lcq.LCQ_quantizer'>``,
``weight_norm: LWN``, ``w_grad_scale_mode: None``)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import QConvertError

MAX_BYTES = 1 << 20  # the real file is a few kB
LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*): (.*)$")
CLASS_VALUE = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>$")


def read_run_params(path: Path) -> dict[str, str]:
    """``key -> value`` (text) for every ``key: value`` line; other lines are ignored, a
    key given twice is an error."""
    if not path.is_file():
        raise QConvertError(f"{path}: no such run-parameter file")
    if path.stat().st_size > MAX_BYTES:
        raise QConvertError(f"{path}: {path.stat().st_size} bytes is not a run-parameter file "
                            "(the training script writes a few kB); give its <model>.txt")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise QConvertError(f"{path}: not a readable text file ({exc}); give the run's "
                            "<model>.txt") from None
    params: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = LINE.match(line.strip())
        if not match:
            continue
        key, value = match[1], match[2].strip()
        if key in params:
            raise QConvertError(f"{path}: line {number}: key {key} given twice")
        params[key] = value
    if not params:
        raise QConvertError(f"{path}: no 'key: value' lines; give the run's <model>.txt")
    return params


def class_name(value: str) -> str | None:
    """``<class 'src.quantizer.nonuniform.lcq.LCQ_quantizer'>`` -> ``LCQ_quantizer``;
    ``None`` (the source's FP) -> None; anything else is returned as it is."""
    if value in ("None", "null", ""):
        return None
    match = CLASS_VALUE.match(value)
    return match[1] if match else value
