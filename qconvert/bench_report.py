"""Tables and plots of a ``qconvert bench`` result, with the figures the project aims at."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bench import EAGER, FP32, PLAIN, SESSION, BenchResult

# Plain load of the exported file against FP32 ONNX of the same architecture, one thread,
# by architecture and batch size.
PLAIN_LOAD_TARGETS: dict[str, dict[int, float]] = {
    "resnet18": {1: 1.10},
    "resnet20": {1: 1.30, 32: 1.15},
    "mobilenetv2_small": {1: 1.30, 32: 1.15},
}
SESSION_TARGET = 1.10  # qconvert's session against FP32, every batch size
EAGER_SPEEDUP_TARGET = 3.0  # the session against PyTorch eager QAT at batch 1
IDEAL_SIZE_TARGET = 1.10  # file size against the ideal packed size


def _row(result: BenchResult, name: str) -> dict | None:
    return next((r for r in result.candidates if r["name"] == name), None)


def _batches(result: BenchResult) -> list[int]:
    return sorted(int(b) for b in _row(result, FP32)["latency_ms"])


def _median(row: dict, batch: int) -> float:
    latency = row["latency_ms"]
    return latency[batch]["median"] if batch in latency else latency[str(batch)]["median"]


def _p90(row: dict, batch: int) -> float:
    latency = row["latency_ms"]
    return latency[batch]["p90"] if batch in latency else latency[str(batch)]["p90"]


def _verdict(value: float, target: float, at_most: bool = True) -> str:
    met = value <= target if at_most else value >= target
    return "met" if met else "MISSED"


def _load(result: BenchResult) -> str:
    if not result.load_average:
        return ""
    return ("machine load (1-min average) before / after timing: "
            + " / ".join(f"{v:.2f}" for v in result.load_average))


def format_table(result: BenchResult) -> str:
    fp32 = _row(result, FP32)
    batches = _batches(result)
    head = (f"{'model':<28}" + "".join(f" {'b' + str(b) + ' ms':>9} {'xFP32':>6}" for b in batches)
            + f" {'bytes':>10} {'xideal':>7} {'xFP32':>6} {'top-1 agr.':>10}")
    lines = [head, "-" * len(head)]
    for r in result.candidates:
        cells = "".join(f" {_median(r, b):>9.3f} {_median(r, b) / _median(fp32, b):>6.2f}"
                        for b in batches)
        size = r["file_bytes"]
        size_cells = f" {'-':>10} {'-':>7} {'-':>6}"
        if size:
            size_cells = (f" {size:>10} {size / result.ideal_bytes:>7.2f} "
                          f"{size / fp32['file_bytes']:>6.3f}")
        lines.append(f"{r['name']:<28}{cells}{size_cells} {r['top1_agreement']:>10.2%}")
    lines.append(f"export: qconvert {result.export_seconds:.1f} s vs float torch.onnx.export "
                 f"{result.float_export_seconds:.1f} s = "
                 f"{result.export_seconds / result.float_export_seconds:.2f}x")
    lines.append(f"validation: {result.validate_samples_per_s:.0f} samples/s vs bare inference "
                 f"of both models {result.bare_samples_per_s:.0f} samples/s = "
                 f"{result.bare_samples_per_s / result.validate_samples_per_s:.2f}x overhead")
    if _load(result):
        lines.append(_load(result))
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _latency_lines(result: BenchResult, batches: list[int]) -> list[str]:
    fp32, plain, ours = _row(result, FP32), _row(result, PLAIN), _row(result, SESSION)
    lines = []
    targets = PLAIN_LOAD_TARGETS.get(result.arch, {})
    for b in batches:
        cells = []
        if plain:
            ratio = _median(plain, b) / _median(fp32, b)
            target = targets.get(b)
            cells.append(f"plain load {ratio:.2f}x FP32" + (
                f" (target <= {target:.2f}x: {_verdict(ratio, target)})" if target else ""))
        if ours:
            ratio = _median(ours, b) / _median(fp32, b)
            cells.append(f"qconvert session {ratio:.2f}x (target <= {SESSION_TARGET:.2f}x: "
                         f"{_verdict(ratio, SESSION_TARGET)})")
        if cells:
            lines.append(f"- batch {b}: " + "; ".join(cells))
    return lines


def format_markdown(result: BenchResult) -> str:
    """The same table as markdown, ratios first, with the targets marked."""
    fp32, eager = _row(result, FP32), _row(result, EAGER)
    batches = _batches(result)
    head = ("| model | " + " | ".join(f"b{b} x FP32 | b{b} ms (p90)" for b in batches)
            + " | file x ideal | file x FP32 | top-1 agreement |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result.candidates:
        cells = []
        for b in batches:
            cells += [f"{_median(r, b) / _median(fp32, b):.2f}",
                      f"{_median(r, b):.2f} ({_p90(r, b):.2f})"]
        size = r["file_bytes"]
        sizes = ([f"{size / result.ideal_bytes:.2f}", f"{size / fp32['file_bytes']:.3f}"]
                 if size else ["-", "-"])
        lines.append(f"| {r['name']} | " + " | ".join(cells + sizes)
                     + f" | {r['top1_agreement']:.2%} |")
    lines.append("")
    lines += _latency_lines(result, batches)
    ours = _row(result, SESSION)
    if ours:
        b1 = batches[0]
        speedup = _median(eager, b1) / _median(ours, b1)
        lines.append(f"- qconvert session vs PyTorch eager QAT at batch {b1}: {speedup:.1f}x "
                     f"faster (target >= {EAGER_SPEEDUP_TARGET:.0f}x: "
                     f"{_verdict(speedup, EAGER_SPEEDUP_TARGET, at_most=False)})")
        size_ratio = ours["file_bytes"] / result.ideal_bytes
        lines.append(f"- file {ours['file_bytes']} B = {size_ratio:.2f}x ideal packed "
                     f"({result.ideal_bytes} B; target <= {IDEAL_SIZE_TARGET:.2f}x: "
                     f"{_verdict(size_ratio, IDEAL_SIZE_TARGET)}), "
                     f"{ours['file_bytes'] / fp32['file_bytes']:.3f}x the FP32 file")
    lines.append(f"- export: {result.export_seconds:.1f} s vs {result.float_export_seconds:.1f} s "
                 f"for torch.onnx.export of the float model "
                 f"({result.export_seconds / result.float_export_seconds:.2f}x)")
    lines.append(f"- validation: {result.validate_samples_per_s:.0f} samples/s; bare inference "
                 f"of both models {result.bare_samples_per_s:.0f} samples/s")
    if _load(result):
        lines.append(f"- {_load(result)}")
    lines += [f"- note: {n}" for n in result.notes]
    return "\n".join(lines)


def plot(result: BenchResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.candidates
    names = [r["name"] for r in rows]
    batches = _batches(result)
    fig, (ax_lat, ax_size) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        ax_lat.barh(np.arange(len(rows)) + i * width, [_median(r, b) for r in rows],
                    height=width, label=f"batch {b}")
    ax_lat.set_yticks(np.arange(len(rows)) + width * (len(batches) - 1) / 2, names)
    ax_lat.set_xscale("log")
    ax_lat.set_xlabel(f"median latency, ms ({result.threads} thread(s), this machine)")
    ax_lat.legend()
    sized = [r for r in rows if r["file_bytes"]]
    ax_size.barh([r["name"] for r in sized], [r["file_bytes"] / 1024 for r in sized],
                 color="tab:green")
    ax_size.axvline(result.ideal_bytes / 1024, color="black", linestyle="--",
                    label="ideal packed size")
    ax_size.set_xlabel("file size, KiB")
    ax_size.legend()
    fig.suptitle(f"qconvert bench: {Path(result.checkpoint).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
