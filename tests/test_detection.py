"""The standard decoding validate --task detection runs (qconvert.detection), against
independent computations: a plain-Python greedy NMS with its own IoU, the definition of
greedy NMS as two properties, anchors and decoded boxes worked out by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from qconvert import detection
from qconvert.errors import QConvertError


def _iou(a, b) -> float:
    """IoU of two boxes, plain floats."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _brute_force_nms(boxes, scores, labels, thresh) -> list[int]:
    """Greedy NMS by its definition: visit boxes by score (ties: lower index first); a box
    survives when no survivor of its class overlaps it by IoU > thresh."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        if all(labels[j] != labels[i] or _iou(boxes[i], boxes[j]) <= thresh for j in kept):
            kept.append(i)
    return kept


def _random_boxes(rng, count: int, size: float = 40.0):
    xy = rng.uniform(0, size, (count, 2))
    wh = rng.uniform(1, size / 2, (count, 2))
    return np.concatenate([xy, xy + wh], axis=1)


@pytest.mark.parametrize("seed", range(6))
def test_batched_nms_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    count = 60
    boxes = _random_boxes(rng, count)
    scores = rng.random(count).round(2)  # rounding makes score ties
    labels = rng.integers(0, 3, count)
    got = detection.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                torch.from_numpy(labels), 0.5).tolist()
    want = _brute_force_nms(boxes.tolist(), scores.tolist(), labels.tolist(), 0.5)
    assert got == want
    # The two properties that define greedy NMS, checked on the result directly:
    kept = set(got)
    for i, j in itertools.combinations(got, 2):  # survivors of a class do not overlap
        assert labels[i] != labels[j] or _iou(boxes[i], boxes[j]) <= 0.5
    for i in set(range(count)) - kept:  # every dropped box has a better survivor over it
        assert any(labels[j] == labels[i] and _iou(boxes[i], boxes[j]) > 0.5
                   and (scores[j], -j) > (scores[i], -i) for j in kept)


def test_nms_suppresses_only_above_the_threshold():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    # IoU(box 0, box 1) = 0.5 exactly: kept; IoU(box 1, box 2) = 0.8: suppressed.
    assert detection.nms(boxes, scores, 0.5).tolist() == [0, 1]


def test_anchors_follow_torchvision_layout():
    anchors = detection.level_anchors((64, 64), (2, 2), (32,), (0.5, 1.0, 2.0))
    # ratio 0.5: w = 32 * sqrt(2) = 45.25, h = 32 / sqrt(2) = 22.63, halves rounded: 23, 11
    base = [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]
    stride = 32
    want = [[x0 + dx, y0 + dy, x1 + dx, y1 + dy]
            for dy in (0, stride) for dx in (0, stride) for x0, y0, x1, y1 in base]
    assert anchors.tolist() == want


def test_decode_boxes_by_hand():
    anchors = torch.tensor([[0.0, 0.0, 20.0, 10.0]], dtype=torch.float64)
    deltas = torch.tensor([[0.5, -1.0, math.log(2.0), 10.0]], dtype=torch.float64)
    # centre (10, 5) + (0.5 * 20, -1 * 10) = (20, -5); size (20 * 2, 10 * exp(clamp))
    clamp = math.log(1000 / 16)
    height = 10 * 1000 / 16
    got = detection.decode_boxes(deltas, anchors, clamp)
    assert got[0].tolist() == pytest.approx([0.0, -5 - height / 2, 40.0, -5 + height / 2])


def _dets(boxes, scores, labels) -> detection.Detections:
    return detection.Detections(torch.tensor(boxes, dtype=torch.float64),
                                torch.tensor(scores, dtype=torch.float64),
                                torch.tensor(labels))


def test_matching_is_one_to_one_same_class_iou_at_least_half():
    ref = _dets([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], [0.9, 0.8, 0.7], [0, 0, 1])
    other = _dets([[0, 0, 10, 5],  # IoU 0.5 with ref 0, class 0: match
                   [0, 0, 10, 10],  # ref 0 taken; ref 2 is class 1: no match
                   [20, 20, 30, 30]],  # class 1 here, ref 1 is class 0: no match
                  [0.95, 0.9, 0.5], [0, 0, 1])
    assert detection.matched(ref, other) == 1
    found = detection.agreement([ref], [other])
    assert (found.reference, found.detections, found.matched, found.unmatched) == (3, 3, 1, 4)


def test_detect_end_to_end_on_hand_made_outputs():
    """One level, 2x2 locations, 1 anchor size x 1 ratio, 2 classes: two confident
    detections survive, the overlapping weaker one of the same class does not."""
    spec = detection.DecodeSpec(((16,),), (1.0,))
    logits = torch.full((1, 2, 2, 2), -10.0, dtype=torch.float64)
    logits[0, 0, 0, 0] = 3.0  # class 0 at location (0, 0)
    logits[0, 1, 1, 1] = 2.0  # class 1 at location (1, 1)
    logits[0, 0, 0, 1] = 1.0  # class 0 at (0, 1): overlaps (0, 0) by IoU 1/3 after clipping
    deltas = torch.zeros((1, 4, 2, 2), dtype=torch.float64)
    (found,) = detection.detect([logits], [deltas], (16, 16), spec)
    assert found.labels.tolist() == [0, 1, 0]
    assert found.boxes.tolist() == [[0, 0, 8, 8], [0, 0, 16, 16], [0, 0, 16, 8]]
    assert found.scores.tolist() == pytest.approx(
        [1 / (1 + math.exp(-v)) for v in (3.0, 2.0, 1.0)])


def test_split_levels_names_the_expected_structure():
    maps = [torch.zeros(1, 9 * 2, 2, 2), torch.zeros(1, 36, 2, 2)]
    cls, box = detection.split_levels(["['cls_logits'][0]", "['bbox_regression'][0]"], maps)
    assert cls[0] is maps[0] and box[0] is maps[1]
    cls, box = detection.split_levels(["[0][0]", "[1][0]"], maps)
    assert cls[0] is maps[0]
    with pytest.raises(QConvertError, match="cls_logits.*returns output"):
        detection.split_levels(["output", "output"], maps)
