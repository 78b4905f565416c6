"""``qconvert bench`` tables: the plain-load and session rows against FP32, with the
targets of each architecture marked."""

from __future__ import annotations

import json

from qconvert.bench import EAGER, FP32, PLAIN, SESSION, BenchResult
from qconvert.bench_report import format_markdown, format_table


def _row(name: str, b1: float, b32: float, size: int | None = 1000) -> dict:
    return {"name": name, "file_bytes": size, "top1_agreement": 1.0,
            "latency_ms": {1: {"median": b1, "p90": b1 * 1.1},
                           32: {"median": b32, "p90": b32 * 1.1}}}


def _result(arch: str) -> BenchResult:
    return BenchResult(
        checkpoint=f"{arch}.pt", arch=arch, threads=1, ideal_bytes=900,
        candidates=[_row(PLAIN, 1.25, 12.0), _row(SESSION, 1.05, 10.5),
                    _row(FP32, 1.0, 10.0, 8000), _row(EAGER, 20.0, 50.0, None)],
        export_seconds=2.0, float_export_seconds=1.0, validate_samples_per_s=100.0,
        bare_samples_per_s=200.0, load_average=[1.5, 2.5])


def test_markdown_marks_each_architectures_targets():
    small = format_markdown(_result("resnet20"))
    assert "- batch 1: plain load 1.25x FP32 (target <= 1.30x: met); qconvert session 1.05x" \
        in small
    assert "- batch 32: plain load 1.20x FP32 (target <= 1.15x: MISSED)" in small
    assert "load (1-min average) before / after timing: 1.50 / 2.50" in small
    big = format_markdown(_result("resnet18"))
    assert "- batch 1: plain load 1.25x FP32 (target <= 1.10x: MISSED)" in big
    assert "- batch 32: plain load 1.20x FP32; " in big  # no target at batch 32
    assert "| plain load (ORT + library) | 1.25 | 1.25 (1.38) | 1.20 |" in big
    assert "20.0x faster than" not in big and "19.0x faster" in big  # eager 20 ms / 1.05 ms


def test_table_and_json_carry_every_row():
    result = _result("digits_cnn")
    table = format_table(result)
    assert [line.split("  ")[0] for line in table.splitlines()[2:6]] == [
        PLAIN, SESSION, FP32, EAGER]
    assert "- batch 1: plain load 1.25x FP32; qconvert session" in format_markdown(result)
    assert [c["name"] for c in json.loads(result.to_json())["candidates"]] == [
        PLAIN, SESSION, FP32, EAGER]
