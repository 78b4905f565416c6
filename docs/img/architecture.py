"""Draw docs/img/architecture.png: qconvert's layers and the one-way data flow.

    .venv/bin/python docs/img/architecture.py

Each band is a layer (higher bands may import lower ones, never the reverse); the boxes
on the right are the data as it flows from a checkpoint to a report, each drawn in the
band of the layer that produces it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (backend first)
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_suffix(".png")

# Top to bottom: (layer, modules, band colour).
LAYERS = [
    ("command line", "qconvert.cli", "#e8e8f4"),
    ("measurement", "qconvert.bench, qconvert.integer_search", "#e4eef8"),
    ("reports", "qconvert.validate, qconvert.inspect_model", "#e2f2ec"),
    ("runtime", "qconvert.runtime (sessions, NCHWc rewrite)", "#eef4dc"),
    ("export", "qconvert.export (deploy form, ONNX, integer mode)", "#fbf1d8"),
    ("contract", "qconvert.manifest, qconvert.graph", "#fbe4d8"),
    ("foundations", "qconvert.ops, quant, archs, checkpoint,\ncalib, preprocess, native, errors",
     "#f1e4f0"),
]
BAND_H, GAP, WIDTH, LABEL_W = 1.0, 0.12, 17.4, 6.2


def band_y(layer: str) -> float:
    """Centre height of a layer's band (the top layer is highest)."""
    index = [name for name, _, _ in LAYERS].index(layer)
    return (len(LAYERS) - 1 - index) * (BAND_H + GAP) + BAND_H / 2


def draw_bands(ax) -> None:
    for name, modules, colour in LAYERS:
        y = band_y(name)
        ax.add_patch(FancyBboxPatch((0, y - BAND_H / 2), WIDTH, BAND_H,
                                    boxstyle="round,pad=0,rounding_size=0.08",
                                    facecolor=colour, edgecolor="#9a9a9a", linewidth=0.8))
        ax.text(0.2, y + 0.18, name, fontsize=11, fontweight="bold", va="center")
        ax.text(0.2, y - 0.2, modules, fontsize=8.2, va="center", family="monospace",
                linespacing=1.1)


def box(ax, x: float, layer: str, text: str, width: float = 2.7, dashed: bool = False) -> tuple:
    y = band_y(layer)
    ax.add_patch(FancyBboxPatch((x - width / 2, y - 0.3), width, 0.6,
                                boxstyle="round,pad=0.02,rounding_size=0.1",
                                facecolor="white", edgecolor="#333333", linewidth=1.1,
                                linestyle="--" if dashed else "-"))
    ax.text(x, y, text, fontsize=8.6, ha="center", va="center", linespacing=1.1)
    return x, y


def arrow(ax, start: tuple, end: tuple, label: str = "", dashed: bool = False,
          label_left: bool = False) -> None:
    (x0, y0), (x1, y1) = start, end
    # Leave the boxes' edges: horizontal arrows by half a width, vertical by half a height.
    if abs(y1 - y0) < 1e-6:
        step = 1.35 if x1 > x0 else -1.35
        x0, x1 = x0 + step, x1 - step
    else:
        step = 0.3 if y1 > y0 else -0.3
        y0, y1 = y0 + step, y1 - step
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=13,
                                 color="#b03a2e", linewidth=1.6,
                                 linestyle="--" if dashed else "-"))
    if label:
        offset = -0.08 if label_left else 0.08
        ax.text((x0 + x1) / 2 + offset, (y0 + y1) / 2, label, fontsize=7.5, color="#b03a2e",
                ha="right" if label_left else "left", va="center")


def draw_flow(ax) -> None:
    left, right, notes = 9.3, 15.3, 13.1
    ckpt = box(ax, left, "foundations", "checkpoint (.pt)\nload_checkpoint")
    model = box(ax, right, "foundations", "quantized PyTorch model\n(quant + archs)",
                width=3.0)
    deploy = box(ax, right, "export", "deploy form\n(packed codes + ops)")
    onnx_model = box(ax, left, "export", "ONNX model\n(+ function bodies)")
    manifest = box(ax, left, "contract", "manifest: layers, bits,\nvalue names", dashed=True)
    session = box(ax, left, "runtime", "session: native /\nfunction / reference")
    report = box(ax, left, "reports", "report: parity,\ncontents, sizes")
    box(ax, right, "measurement", "bench tables, chosen b'")
    box(ax, right, "command line", "qconvert export | validate |\ninspect | bench | ops-lib",
        width=3.6)
    arrow(ax, ckpt, model)
    arrow(ax, model, deploy, "to_deploy")
    arrow(ax, deploy, onnx_model)
    arrow(ax, onnx_model, manifest, "written via", dashed=True)
    arrow(ax, onnx_model, session)
    arrow(ax, session, report)
    ax.text(notes, band_y("contract"), "the one statement of what an exported\n"
            "model contains: export writes it; runtime,\nreports and bench read it",
            fontsize=7.8, ha="center", va="center", style="italic", color="#444444")
    ax.text(notes, band_y("runtime"), "ONNX Runtime (+ native kernels)\nor onnx.reference",
            fontsize=7.8, ha="center", va="center", style="italic", color="#444444")
    ax.text(notes, band_y("reports"), "validate, inspect", fontsize=7.8, ha="center",
            va="center", style="italic", color="#444444")
    arrow_x = WIDTH + 0.45
    top, bottom = band_y("command line"), band_y("foundations")
    ax.add_patch(FancyArrowPatch((arrow_x, top), (arrow_x, bottom), arrowstyle="-|>",
                                 mutation_scale=16, color="#2c3e50", linewidth=2))
    ax.text(arrow_x + 0.2, (top + bottom) / 2, "imports point down only\n(import-linter)",
            rotation=90, fontsize=9, ha="left", va="center", color="#2c3e50")


def main() -> None:
    fig, ax = plt.subplots(figsize=(13.5, 7.2))
    draw_bands(ax)
    draw_flow(ax)
    height = len(LAYERS) * (BAND_H + GAP)
    ax.text(LABEL_W + 0.1, height + 0.05, "data flow (red): checkpoint -> quantized model "
            "-> deploy form -> ONNX -> runtime -> report", fontsize=9.5, color="#b03a2e")
    ax.set_xlim(-0.1, WIDTH + 1.3)
    ax.set_ylim(-0.1, height + 0.4)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.savefig(OUT, dpi=110, bbox_inches="tight")
    print(OUT)


if __name__ == "__main__":
    main()
