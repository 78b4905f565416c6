"""RetinaNet's standard decoding in PyTorch, and box-level agreement between two models.

A detector's exported network part returns raw per-level class logits ``[N, A*K, H, W]``
and box regressions ``[N, A*4, H, W]``; anchors, box decoding, the score threshold and
non-maximum suppression run after it, in the deployment's own code. ``validate --task
detection`` runs this decoding (torchvision RetinaNet's, written here: torchvision is not
a dependency) on each model's raw outputs, in float64, and matches the detections.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import QConvertError

IOU_MATCH = 0.5  # a detection matches one of the same class with IoU >= this


def default_anchor_sizes(levels: int) -> tuple[tuple[int, ...], ...]:
    """torchvision RetinaNet's: 32, 64, ... per level, each at scales 1, 2^(1/3), 2^(2/3)."""
    return tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3)))
                 for s in (32 * 2**level for level in range(levels)))


@dataclass(frozen=True)
class DecodeSpec:
    """torchvision RetinaNet's post-processing defaults."""

    anchor_sizes: tuple[tuple[float, ...], ...]
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    topk_candidates: int = 1000  # per level
    detections_per_img: int = 300
    box_clamp: float = math.log(1000.0 / 16)  # the largest dw, dh before exp
    min_size: float = 1e-2  # boxes narrower or lower than this after clipping are dropped

    @property
    def anchors_per_location(self) -> int:
        return len(self.anchor_sizes[0]) * len(self.aspect_ratios)


@dataclass
class Detections:
    boxes: torch.Tensor  # [D, 4] x1, y1, x2, y2
    scores: torch.Tensor  # [D]
    labels: torch.Tensor  # [D] int64


_LEVEL_PATH = re.compile(r"^\[(.+?)\]\[(\d+)\]$")
GROUPS = (("'cls_logits'", "'bbox_regression'"), ("0", "1"))


def split_levels(names: Sequence[str], arrays: Sequence[torch.Tensor]):
    """(class logits per level, box regressions per level) from the outputs named by their
    paths: ``{'cls_logits': [...], 'bbox_regression': [...]}`` or a tuple of the two lists."""
    groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, array in zip(names, arrays, strict=True):
        found = _LEVEL_PATH.match(name)
        if found:
            groups.setdefault(found.group(1), []).append((int(found.group(2)), array))
    for cls_key, box_key in GROUPS:
        if {cls_key, box_key} == set(groups) and len(groups[cls_key]) == len(groups[box_key]):
            return ([a for _, a in sorted(groups[cls_key], key=lambda p: p[0])],
                    [a for _, a in sorted(groups[box_key], key=lambda p: p[0])])
    raise QConvertError(
        f"--task detection needs the outputs as {{'cls_logits': [per level], "
        f"'bbox_regression': [per level]}} or a tuple of those two lists; this model "
        f"returns {', '.join(names)}")


def level_anchors(image_hw: tuple[int, int], feature_hw: tuple[int, int],
                  sizes: Sequence[float], ratios: Sequence[float]) -> torch.Tensor:
    """[H*W*A, 4] anchors in torchvision's order: location-major, then ratio, then size."""
    ratios_t = torch.tensor(ratios, dtype=torch.float64)
    sizes_t = torch.tensor(sizes, dtype=torch.float64)
    h_ratio = ratios_t.sqrt()
    ws = ((1 / h_ratio)[:, None] * sizes_t[None, :]).reshape(-1)
    hs = (h_ratio[:, None] * sizes_t[None, :]).reshape(-1)
    base = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
    stride_y, stride_x = image_hw[0] // feature_hw[0], image_hw[1] // feature_hw[1]
    ys = torch.arange(feature_hw[0], dtype=torch.float64) * stride_y
    xs = torch.arange(feature_hw[1], dtype=torch.float64) * stride_x
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([x.reshape(-1), y.reshape(-1)] * 2, dim=1)
    return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor, clamp: float) -> torch.Tensor:
    """torchvision's BoxCoder with weights (1, 1, 1, 1): deltas (dx, dy, dw, dh) -> boxes."""
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw, dh = deltas[:, 2].clamp(max=clamp), deltas[:, 3].clamp(max=clamp)
    pcx, pcy = dx * widths + cx, dy * heights + cy
    pw, ph = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] intersection over union (0 where the union is empty)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(dim=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-300), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_thresh: float) -> torch.Tensor:
    """Greedy NMS: in descending score order (ties: lower index first), keep a box unless it
    overlaps a kept box by IoU > ``iou_thresh``. Returns the kept indices in that order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    ranked = boxes[order]
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):  # one row of IoUs per kept box: memory O(boxes)
        if not suppressed[i]:
            keep.append(i)
            suppressed |= box_iou(ranked[i:i + 1], ranked)[0] > iou_thresh
    return order[torch.tensor(keep, dtype=torch.int64)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                iou_thresh: float) -> torch.Tensor:
    """NMS within each class; kept indices in descending score order (ties: lower index
    first, as within a class)."""
    keep = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    keep = torch.cat([idx[nms(boxes[idx], scores[idx], iou_thresh)] for idx in keep]
                     or [torch.zeros(0, dtype=torch.int64)]).sort().values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def _level_candidates(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
                      spec: DecodeSpec):
    """One image, one level: [A*K, H, W] logits and [A*4, H, W] deltas -> scored boxes."""
    anchors_per_loc = spec.anchors_per_location
    classes = logits.shape[0] // anchors_per_loc
    h, w = logits.shape[1:]
    scores = torch.sigmoid(logits.reshape(anchors_per_loc, classes, h, w)
                           .permute(2, 3, 0, 1).reshape(-1))
    deltas = deltas.reshape(anchors_per_loc, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4)
    kept = torch.nonzero(scores > spec.score_thresh).flatten()
    top = torch.sort(scores[kept], descending=True, stable=True).indices
    kept = kept[top[:spec.topk_candidates]]
    anchor_index, labels = kept // classes, kept % classes
    boxes = decode_boxes(deltas[anchor_index], anchors[anchor_index], spec.box_clamp)
    return boxes, scores[kept], labels


def detect(cls_levels: Sequence[torch.Tensor], box_levels: Sequence[torch.Tensor],
           image_hw: tuple[int, int], spec: DecodeSpec) -> list[Detections]:
    """Per image: candidates per level (score > threshold, top-k), boxes decoded and clipped
    to the image, empty boxes dropped, class-wise NMS, the best ``detections_per_img``.

    Dropping boxes under ``min_size`` (torchvision's Faster R-CNN does, its RetinaNet does
    not) removes boxes clipped to a line outside the image: they cover nothing, and with
    no area their IoU with anything is 0, so no two models could ever agree on them."""
    check_levels(cls_levels, box_levels, spec)
    anchors = [level_anchors(image_hw, tuple(c.shape[-2:]), spec.anchor_sizes[i],
                             spec.aspect_ratios) for i, c in enumerate(cls_levels)]
    found = []
    for n in range(cls_levels[0].shape[0]):
        parts = [_level_candidates(c[n].double(), b[n].double(), a, spec)
                 for c, b, a in zip(cls_levels, box_levels, anchors, strict=True)]
        boxes, scores, labels = (torch.cat(p) for p in zip(*parts, strict=True))
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image_hw[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image_hw[0])
        sized = ((boxes[:, 2] - boxes[:, 0] >= spec.min_size)
                 & (boxes[:, 3] - boxes[:, 1] >= spec.min_size)).nonzero().flatten()
        boxes, scores, labels = boxes[sized], scores[sized], labels[sized]
        keep = batched_nms(boxes, scores, labels, spec.nms_thresh)[:spec.detections_per_img]
        found.append(Detections(boxes[keep], scores[keep], labels[keep]))
    return found


def check_levels(cls_levels: Sequence[torch.Tensor], box_levels: Sequence[torch.Tensor],
                 spec: DecodeSpec) -> None:
    """Refuse level outputs the decoding cannot read, naming the level and shapes."""
    if len(cls_levels) > len(spec.anchor_sizes):
        raise QConvertError(f"{len(cls_levels)} output levels but anchor sizes for "
                            f"{len(spec.anchor_sizes)}; give the model an anchor_sizes "
                            "attribute with one tuple per level")
    anchors_per_loc = spec.anchors_per_location
    for i, (c, b) in enumerate(zip(cls_levels, box_levels, strict=True)):
        if (c.ndim != 4 or b.ndim != 4 or b.shape[1] != 4 * anchors_per_loc
                or c.shape[1] % anchors_per_loc or c.shape[2:] != b.shape[2:]):
            raise QConvertError(
                f"level {i}: class logits {list(c.shape[1:])} and box regressions "
                f"{list(b.shape[1:])} are not [A*K, H, W] and [A*4, H, W] with "
                f"A = {anchors_per_loc} anchors per location (sizes x aspect ratios)")


def matched(reference: Detections, other: Detections, iou: float = IOU_MATCH) -> int:
    """One-to-one matches: each of ``other``'s detections, best score first, takes the
    unmatched reference detection of its class with the highest IoU, if that is >= iou."""
    if not len(reference.scores) or not len(other.scores):
        return 0
    overlaps = box_iou(other.boxes, reference.boxes)
    overlaps[other.labels[:, None] != reference.labels[None, :]] = -1
    free = torch.ones(len(reference.scores), dtype=torch.bool)
    count = 0
    for i in torch.sort(other.scores, descending=True, stable=True).indices.tolist():
        candidates = torch.where(free, overlaps[i], torch.full_like(overlaps[i], -1))
        best = int(candidates.argmax())
        if candidates[best] >= iou:
            free[best] = False
            count += 1
    return count


@dataclass
class BoxAgreement:
    """A model's detections against reference detections, over all images."""

    reference: int  # reference detections
    detections: int  # this model's detections
    matched: int

    @property
    def unmatched(self) -> int:
        """Reference detections not found plus detections with no reference counterpart."""
        return self.reference + self.detections - 2 * self.matched

    def to_dict(self) -> dict:
        found = self.matched / self.reference if self.reference else None
        kept = self.matched / self.detections if self.detections else None
        return {"reference": self.reference, "detections": self.detections,
                "matched": self.matched, "unmatched": self.unmatched,
                "reference_found": found, "detections_confirmed": kept}


def agreement(reference: Sequence[Detections], other: Sequence[Detections]) -> BoxAgreement:
    return BoxAgreement(sum(len(r.scores) for r in reference),
                        sum(len(o.scores) for o in other),
                        sum(matched(r, o) for r, o in zip(reference, other, strict=True)))
