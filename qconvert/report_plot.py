"""The validate plot: per-layer SQNR (three curves), the per-sample output differences, and
every output's distance to the float64 referee with its task measure."""

from __future__ import annotations

import numpy as np

from .validate import LayerReport, OutputReport, Report

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


def _task_measure(out: OutputReport) -> str:
    onnx_d = out.referee.get("onnx", out.onnx_vs_torch)
    if onnx_d.top1_agreement is not None:
        return f"top-1 {onnx_d.top1_agreement:.1%}"
    if onnx_d.pixel_agreement is not None:
        return f"pixels {onnx_d.pixel_agreement:.1%}, IoU {onnx_d.agreement_iou:.3f}"
    return out.kind


def _plot_outputs(ax, report: Report) -> None:
    """Mean |diff| to the referee per output: ONNX beside the farthest PyTorch float32
    evaluation (against PyTorch float32 when there is no referee)."""
    outputs = report.outputs
    rows = np.arange(len(outputs))
    floor = 1e-12
    onnx_means = [out.referee.get("onnx", out.onnx_vs_torch).mean_abs_diff for out in outputs]
    torch_means = [max((d.mean_abs_diff for k, d in out.referee.items()
                        if k.startswith("torch")), default=0.0) for out in outputs]
    ax.barh(rows - 0.2, np.maximum(onnx_means, floor), height=0.4, label="ONNX")
    ax.barh(rows + 0.2, np.maximum(torch_means, floor), height=0.4,
            label="PyTorch fp32 (farthest)")
    ax.set_xscale("log")
    ax.set_yticks(rows, [f"{out.name} {out.shape}\n{_task_measure(out)}" for out in outputs],
                  fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel(f"mean |diff| to the float64 referee per output (0 drawn at {floor:g})")
    title = f"task {report.task}"
    if report.detection.get("onnx"):
        found = report.detection["onnx"]
        title += f"; boxes matched {found['matched']} of {found['reference']}"
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="lower right")


def plot(report: Report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(4.5, 0.3 * len(report.outputs))
    fig, (ax_layers, ax_hist, ax_outputs) = plt.subplots(1, 3, figsize=(18, height))
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
    if report.outputs:
        _plot_outputs(ax_outputs, report)
    else:
        ax_outputs.set_axis_off()
    agreement = ("" if report.top1_agreement is None
                 else f", top-1 agreement {report.top1_agreement:.2%}")
    fig.suptitle(f"qconvert validate: {report.verdict or '?'}; {report.samples} samples, "
                 f"runtime {report.runtime}{agreement}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
