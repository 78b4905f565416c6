"""The validate verdict: PASS, FAIL or INCONCLUSIVE, from a :class:`validate.Report`.

PASS needs every check below; ``docs/validation.md`` justifies the constants.

- ``op_exact``: the teacher-forced op-level check finds 0 mismatching quantizer outputs
  and 0 mismatching decoded weights (exact-mode models).
- ``segments``: teacher-forced (the graph cut at every quantizer and fed PyTorch's
  quantized values), each value between quantizers (a quantizer's input, ASQ's beta, a
  model output) has mean |ONNX - referee| <= MEAN_FACTOR x mean |PyTorch fp32 - referee|
  + SEGMENT_FLOOR x max |value|, the referee forced the same way.
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

When ``finite``, ``op_exact`` and ``segments`` pass on every sample and every level flip
that starts in ONNX from PyTorch's own values sits on a rounding tie, failed end-to-end
referee checks are waived (kept in the report with ``waived``): every layer computes what
PyTorch computes, so the end-to-end gap is float32 rounding amplified by the network, and
the diagnosis says where its level flips start.

Integer-mode models approximate the QAT model on purpose: they are judged on top-1
agreement with PyTorch (``min_agreement``, 1.0 unless given) and the referee figures are
reported beside. A degenerate comparison (constant outputs, quantizers that output only
0) is INCONCLUSIVE, never PASS.
"""

from __future__ import annotations

import math

from .validate import LayerReport, OutputReport, Report, SegmentReport

MEAN_FACTOR = 4.0
FLOAT32_FLOOR = 1e-6  # relative: a few float32 ulps, so exact-to-rounding models pass
# Per segment nothing amplifies rounding: a segment PyTorch computes exactly may be off by
# one float32 ulp of its largest value on average (docs/validation.md).
SEGMENT_FLOOR = 2.0 ** -23
END_TO_END = ("referee_mean", "referee_top1", "referee_pixels", "referee_boxes")
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


def segment_allowed(seg: SegmentReport) -> float:
    return MEAN_FACTOR * seg.torch_mean_diff + SEGMENT_FLOOR * seg.max_abs_value


def segment_fails(seg: SegmentReport) -> bool:
    return not seg.onnx_mean_diff <= segment_allowed(seg)  # NaN fails


def _segment_figures(seg: SegmentReport) -> str:
    return (f"{seg.name}: ONNX {seg.onnx_mean_diff:.3g}, PyTorch fp32 "
            f"{seg.torch_mean_diff:.3g} (allowed {segment_allowed(seg):.3g})")


def _segment_check(report: Report) -> dict:
    """Teacher-forced, each value between quantizers against the referee forced the same way."""
    failed = [seg for seg in report.segments if segment_fails(seg)]
    if failed:
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        return _check("segments", False, "teacher-forced mean |diff| to the float64 referee "
                      "between quantizers: " + "; ".join(map(_segment_figures, failed[:3]))
                      + more)
    worst = max(report.segments, key=lambda s: s.onnx_mean_diff / (segment_allowed(s) or 1))
    return _check("segments", True,
                  f"{len(report.segments)} values between quantizers, teacher-forced, within "
                  f"float32 rounding of the referee (closest to its bound: "
                  f"{_segment_figures(worst)}; {report.per_layer_samples} samples)")


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
        if report.segments:
            checks.append(_segment_check(report))
        if report.referee:
            checks += _referee_checks(report)
    checks += _user_checks(report, min_agreement, max_abs_diff, max_rel_diff)
    report.checks = checks
    report.thresholds = {"min_agreement": min_agreement, "max_abs_diff": max_abs_diff,
                         "max_rel_diff": max_rel_diff, "mean_factor": MEAN_FACTOR,
                         "segment_floor": SEGMENT_FLOOR,
                         "top1_slack": top1_slack(report.samples)}
    failed = [c for c in checks if not c["passed"]]
    waived = bool(failed) and amplified(report) and report.per_layer_samples == report.samples
    for check in failed if waived else ():
        check["waived"] = True
    failed = [] if waived else failed
    report.verdict = "FAIL" if failed else ("INCONCLUSIVE" if report.degenerate else "PASS")
    report.passed = report.verdict == "PASS"
    report.first_departure = first_departure(report)
    report.diagnosis = amplification(report) if waived else diagnosis(report, failed)
    return report


def _only_end_to_end_fails(report: Report) -> bool:
    passed = {c["name"] for c in report.checks if c["passed"]}
    failed = {c["name"] for c in report.checks if not c["passed"]}
    return bool(failed) and failed <= set(END_TO_END) and {"finite", "op_exact",
                                                           "segments"} <= passed


def untied_seeds(report: Report) -> list[SegmentReport]:
    """Quantizer inputs where ONNX, from PyTorch's own values, takes another level than
    PyTorch although the referee's value is not within float32 rounding of the boundary:
    not rounding, whatever the segment's mean says."""
    return [seg for seg in report.segments if seg.seed_flips > seg.seed_ties]


def amplified(report: Report) -> bool:
    """Only end-to-end referee checks fail while every layer computes what PyTorch computes
    (op_exact and segments pass, every level flip that starts in ONNX starts on a rounding
    tie): the gap is float32 rounding amplified by the network."""
    return _only_end_to_end_fails(report) and not untied_seeds(report)


def needs_every_sample(report: Report) -> bool:
    """The end-to-end gap looks amplified, but the per-layer pass saw only some samples: a
    waiver needs the teacher-forced checks on every sample."""
    return (report.verdict == "FAIL" and amplified(report)
            and report.per_layer_samples < report.samples)


def amplification(report: Report) -> str:
    """Why a model whose end-to-end referee checks fail passes: where its level flips start,
    and whether those that start from PyTorch's own values sit on rounding ties."""
    parts = ["the end-to-end gap to the referee is float32 rounding amplified by the "
             "network: every quantizer op is exact and every value between quantizers, "
             "computed from PyTorch's own quantized values, is within float32 rounding of "
             "the referee"]
    start = next((layer for layer in report.layers
                  if layer.onnx_level_flips > layer.torch_level_flips), None)
    if start is not None:
        parts.append(f"ONNX's level flips start at {start.name} ({start.onnx_level_flips} "
                     f"there, {report.level_flips['onnx']} in all; PyTorch fp32 "
                     f"{report.level_flips['torch']})")
    seeds = [seg for seg in report.segments if seg.seed_flips]
    if seeds:
        parts.append(
            f"from PyTorch's own values, {sum(s.seed_flips for s in seeds)} quantizer inputs "
            f"in {len(seeds)} layers (first: {seeds[0].layer}) land on another level than "
            "PyTorch's, all on rounding ties (the referee's value within one float32 ulp, "
            "or PyTorch fp32's largest error in that layer, of the level boundary; at most "
            f"{max(s.seed_max_ulps for s in seeds):.2g} float32 ulps from it)")
    else:
        parts.append("no quantizer input computed from PyTorch's own values lands on another "
                     "level than PyTorch's")
    return "; ".join(parts)


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


def first_departure(report: Report) -> str | None:
    """The first layer (or model output) that is computed wrongly: op or weight mismatches,
    or a failing segment; else the first where ONNX leaves the referee more than PyTorch."""
    wrong_segments = {seg.layer or seg.name for seg in report.segments if segment_fails(seg)}
    wrong_segments |= {seg.layer for seg in untied_seeds(report)}
    wrong = [layer.name for layer in report.layers if layer.op_mismatches
             or layer.weight_mismatches or layer.name in wrong_segments]
    outputs = [seg.name for seg in report.segments if seg.layer is None
               and seg.name in wrong_segments]
    return next(iter(wrong + outputs), None) or next(
        (layer.name for layer in report.layers if not layer.integer and departs(layer)), None)


def diagnosis(report: Report, failed: list[dict]) -> str:
    """One sentence: why it failed and where, or why a pass would mean nothing."""
    if report.verdict == "INCONCLUSIVE":
        return ("a degenerate comparison: " + "; ".join(report.degenerate)
                + "; use data or a model where the outputs vary")
    if not failed:
        return ""
    parts = [c["detail"] for c in failed]
    untied = untied_seeds(report)
    if _only_end_to_end_fails(report) and untied:
        parts.append(f"not amplified rounding: from PyTorch's own values, "
                     f"{sum(s.seed_flips - s.seed_ties for s in untied)} quantizer inputs of "
                     f"{', '.join(s.layer for s in untied)} land on another level than "
                     "PyTorch's with the referee's value farther than float32 rounding from "
                     f"the boundary (up to {max(s.seed_max_ulps for s in untied):.3g} ulps)")
    elif amplified(report):  # the waiver needs the teacher-forced checks on every sample
        parts.append(f"every layer computes as PyTorch does on the "
                     f"{report.per_layer_samples}-sample per-layer pass; rerun with "
                     "--per-layer to check every sample")
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
