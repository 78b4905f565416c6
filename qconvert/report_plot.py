"""The validate plot: per-layer SQNR (three curves) and the per-sample output differences."""

from __future__ import annotations

import numpy as np

from .validate import LayerReport, Report

CURVES = (("out_sqnr_db", "ONNX vs PyTorch fp32"),
          ("torch_out_sqnr_db", "PyTorch fp32 vs float64 referee"),
          ("onnx_out_sqnr_db", "ONNX vs float64 referee"))


def _plot_layers(ax, layers: list[LayerReport]) -> None:
    """Free-running SQNR of each layer's output; identical values (infinite SQNR) are drawn
    at a cap above the largest finite one."""
    finite = [v for layer in layers for attr, _ in CURVES
              if (v := getattr(layer, attr)) is not None and np.isfinite(v)]
    cap = max(finite, default=100.0) + 20
    rows = np.arange(len(layers))
    for attr, label in CURVES:
        values = [getattr(layer, attr) for layer in layers]
        ax.plot([cap if v is None else v for v in values], rows, marker="o", markersize=3,
                label=label)
    ax.axvline(cap, color="grey", linewidth=0.5, linestyle=":")
    ax.text(cap, -0.5, " exact", fontsize=6, va="bottom")
    ax.set_yticks(rows, [layer.name for layer in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("free-running SQNR of the layer output, dB")
    ax.legend(fontsize=7, loc="lower left")


def plot(report: Report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_layers, ax_hist) = plt.subplots(1, 2, figsize=(12, 4.5))
    layers = [layer for layer in report.layers if not layer.merged]
    if layers:
        _plot_layers(ax_layers, layers)
    else:
        ax_layers.text(0.5, 0.5, "no per-layer pass in this report",
                       ha="center")
        ax_layers.set_axis_off()
    diffs = np.asarray(report.abs_diffs) if report.abs_diffs else np.zeros(1)
    floor = 1e-12
    ax_hist.hist(np.log10(np.maximum(diffs, floor)), bins=40, color="tab:orange")
    ax_hist.set_xlabel(f"log10 max |ONNX - PyTorch| per sample (exact drawn at {floor:g})")
    ax_hist.set_ylabel("samples")
    agreement = ("" if report.top1_agreement is None
                 else f", top-1 agreement {report.top1_agreement:.2%}")
    fig.suptitle(f"qconvert validate: {report.verdict or '?'}; {report.samples} samples, "
                 f"runtime {report.runtime}{agreement}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
