"""The validate verdict: PASS, FAIL or INCONCLUSIVE, from a :class:`validate.Report`.

PASS needs every check below; ``docs/validation.md`` justifies the constants.

- ``op_exact``: the teacher-forced op-level check finds 0 mismatching quantizer outputs
  and 0 mismatching decoded weights (exact-mode models).
- ``referee_mean``: mean |ONNX - referee| <= MEAN_FACTOR x mean |PyTorch fp32 - referee|
  + FLOAT32_FLOOR x max |output|.
- ``referee_top1`` (each class-logit output): the ONNX model disagrees with the referee's
  top-1 on at most top1_slack(N) more samples than PyTorch float32 does.
- ``referee_pixels`` (each dense class map, segmentation): the same rule over pixels: at
  most top1_slack(pixels) more per-pixel argmax disagreements than PyTorch float32.
- ``referee_boxes`` (detection): after the same decoding, the same rule over detections:
  at most top1_slack(referee detections) more detections unmatched with the referee's
  than PyTorch float32.
- ``finite``: no NaN / Inf output.
- User thresholds when given: ``min_agreement`` (top-1 agreement ONNX vs PyTorch),
  ``max_abs_diff``, ``max_rel_diff`` (x max |output|).

Integer-mode models approximate the QAT model on purpose: they are judged on top-1
agreement with PyTorch (``min_agreement``, 1.0 unless given) and the referee figures are
reported beside. A degenerate comparison (constant outputs, quantizers that output only
0) is INCONCLUSIVE, never PASS.
"""

from __future__ import annotations

import math

from .validate import LayerReport, OutputReport, Report

MEAN_FACTOR = 4.0
FLOAT32_FLOOR = 1e-6  # relative: a few float32 ulps, so exact-to-rounding models pass
LEVEL_FLIP_FACTOR = 16.0  # per layer, for naming where ONNX departs
SQNR_CAP_DB = 120.0  # float32 precision: SQNRs above this all count as exact


def top1_slack(samples: int) -> int:
    """Extra top-1 disagreements with the referee allowed: 1 sample, plus 0.5 %."""
    return 1 + samples // 200


def _check(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}


def _op_check(report: Report) -> dict:
    wrong = [layer.name for layer in report.layers if layer.op_mismatches
             or layer.weight_mismatches]
    checked = sum(layer.op_elements for layer in report.layers)
    return _check("op_exact", not wrong,
                  f"quantizer ops differ from PyTorch in {', '.join(wrong)}" if wrong else
                  f"0 of {checked} quantizer outputs differ, 0 decoded weights differ "
                  f"({report.per_layer_samples} samples)")


def float32_envelope(report: Report) -> float:
    """The farthest mean |diff| any PyTorch float32 evaluation landed from the referee."""
    return max(d.mean_abs_diff for key, d in report.referee.items() if key.startswith("torch"))


def _referee_checks(report: Report) -> list[dict]:
    onnx_d = report.referee["onnx"]
    torch_mean = float32_envelope(report)
    allowed = MEAN_FACTOR * torch_mean + FLOAT32_FLOOR * report.max_abs_output
    checks = [_check("referee_mean", onnx_d.mean_abs_diff <= allowed,
                     f"mean |diff| to the float64 referee: ONNX {onnx_d.mean_abs_diff:.3g}, "
                     f"PyTorch fp32 up to {torch_mean:.3g} (allowed {allowed:.3g})")]
    for out in report.outputs:  # every class output, also among several
        checks += _class_checks(out, report)
    if report.detection:
        checks.append(_box_check(report.detection))
    return checks


def _class_checks(out: OutputReport, report: Report) -> list[dict]:
    """Top-1 (class logits) or per-pixel argmax (class maps) disagreements with the referee:
    ONNX may have top1_slack(count) more than the PyTorch float32 evaluation with most."""
    onnx_out = out.referee.get("onnx")
    where = f" (output {out.name})" if len(report.outputs) > 1 else ""
    if onnx_out is None:
        return []
    if onnx_out.top1_disagreements is not None:
        field, name, what, count = ("top1_disagreements", "referee_top1", "top-1",
                                    report.samples)
    elif onnx_out.pixel_disagreements is not None:
        field, name, what, count = ("pixel_disagreements", "referee_pixels",
                                    "per-pixel argmax", onnx_out.pixels)
    else:
        return []
    most = max(getattr(d, field) for key, d in out.referee.items() if key.startswith("torch"))
    slack = top1_slack(count)
    got = getattr(onnx_out, field)
    return [_check(name, got <= most + slack,
                   f"{what} disagreements with the referee{where}: ONNX {got}, PyTorch fp32 "
                   f"up to {most} (allowed {slack} more, of {count})")]


def _box_check(found: dict[str, dict]) -> dict:
    """Unmatched detections against the referee's (both directions): ONNX may have
    top1_slack(referee detections) more than the PyTorch float32 evaluation with most. No
    factor as for mean |diff|: the count saturates (two float32 orders of a chaotic network
    land within 20 % of each other, docs/validation.md), so a factor would let anything
    pass."""
    onnx_boxes = found["onnx"]
    most = max(d["unmatched"] for key, d in found.items() if key.startswith("torch"))
    slack = top1_slack(onnx_boxes["reference"])
    return _check("referee_boxes", onnx_boxes["unmatched"] <= most + slack,
                  f"detections unmatched with the referee's {onnx_boxes['reference']} "
                  f"(same class, IoU >= 0.5): ONNX {onnx_boxes['unmatched']}, PyTorch fp32 up "
                  f"to {most} (allowed {slack} more)")


def _user_checks(report: Report, min_agreement: float | None, max_abs_diff: float | None,
                 max_rel_diff: float | None) -> list[dict]:
    checks = []
    if min_agreement is not None:
        agreement = report.top1_agreement
        checks.append(_check("min_agreement", agreement is not None
                             and agreement >= min_agreement,
                             f"top-1 agreement with PyTorch {_pct(agreement)} "
                             f"(at least {min_agreement:.2%})"))
    bounds = [b for b in (max_abs_diff, None if max_rel_diff is None
                          else max_rel_diff * report.max_abs_output) if b is not None]
    if bounds:
        bound = min(bounds)
        checks.append(_check("max_abs_diff", report.max_abs_diff <= bound,
                             f"max |ONNX - PyTorch| {report.max_abs_diff:.3g} "
                             f"(at most {bound:.3g})"))
    return checks


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def judge(report: Report, min_agreement: float | None = None,
          max_abs_diff: float | None = None, max_rel_diff: float | None = None) -> Report:
    """Fill in ``checks``, ``verdict``, ``passed``, ``first_departure`` and ``diagnosis``."""
    if report.integer and min_agreement is None:
        min_agreement = 1.0
    checks = [_check("finite", report.nan_samples == 0,
                     f"{report.nan_samples} samples gave NaN or Inf")]
    if not report.integer:
        if report.layers:
            checks.append(_op_check(report))
        if report.referee:
            checks += _referee_checks(report)
    checks += _user_checks(report, min_agreement, max_abs_diff, max_rel_diff)
    report.checks = checks
    report.thresholds = {"min_agreement": min_agreement, "max_abs_diff": max_abs_diff,
                         "max_rel_diff": max_rel_diff, "mean_factor": MEAN_FACTOR,
                         "top1_slack": top1_slack(report.samples)}
    failed = [c for c in checks if not c["passed"]]
    report.verdict = "FAIL" if failed else ("INCONCLUSIVE" if report.degenerate else "PASS")
    report.passed = report.verdict == "PASS"
    report.first_departure = first_departure(report.layers)
    report.diagnosis = diagnosis(report, failed)
    return report


def departs(layer: LayerReport) -> bool:
    """Whether ONNX leaves the referee at this layer more than PyTorch float32 does."""
    if layer.op_mismatches or layer.weight_mismatches:
        return True
    flips = layer.onnx_level_flips > (LEVEL_FLIP_FACTOR * layer.torch_level_flips
                                      + 1 + layer.level_elements // 10_000)
    torch_db = _capped(layer.torch_out_sqnr_db)
    onnx_db = _capped(layer.onnx_out_sqnr_db)
    return flips or onnx_db < torch_db - 20 * math.log10(MEAN_FACTOR)


def _capped(db: float | None) -> float:
    return SQNR_CAP_DB if db is None else min(db, SQNR_CAP_DB)


def first_departure(layers: list[LayerReport]) -> str | None:
    return next((layer.name for layer in layers if not layer.integer and departs(layer)), None)


def diagnosis(report: Report, failed: list[dict]) -> str:
    """One sentence: why it failed and where, or why a pass would mean nothing."""
    if report.verdict == "INCONCLUSIVE":
        return ("a degenerate comparison: " + "; ".join(report.degenerate)
                + "; use data or a model where the outputs vary")
    if not failed:
        return ""
    parts = [c["detail"] for c in failed]
    if report.integer:
        pass  # approximate by design: no layer is expected to match
    elif report.first_departure:
        parts.append(f"the ONNX model first leaves the referee more than PyTorch does at "
                     f"layer {report.first_departure}")
    elif report.layers:
        parts.append(f"no layer departs on the {report.per_layer_samples}-sample per-layer "
                     "pass; rerun with --per-layer to check every sample")
    else:
        parts.append("run with --per-layer to find the layer")
    return "; ".join(parts)
