"""``qconvert import``: checkpoints trained with public QAT code -> qconvert checkpoints.

One module per source. Each exposes ``import_checkpoint(path, options) -> ImportResult``;
the model it returns computes what the source's model computes in eval mode.
"""

from __future__ import annotations

import importlib

from .common import ImportOptions, ImportResult

# Source name -> module under qconvert.importers (imported only when used).
SOURCES: dict[str, str] = {"asq-post": "asq_post", "nulsq": "nulsq"}


def import_checkpoint(source: str, path, options: ImportOptions) -> ImportResult:
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    module = importlib.import_module(f"{__name__}.{SOURCES[source]}")
    return module.import_checkpoint(path, options)


__all__ = ["SOURCES", "ImportOptions", "ImportResult", "import_checkpoint"]
