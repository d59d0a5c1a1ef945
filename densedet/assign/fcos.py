"""FCOS assignment (mmdet's ``FCOSHead.get_targets``), batched over images and objects.

A prior is a positive of an object when
1. its centre lies strictly inside the box (or, with ``center_sampling``, strictly inside a
   square of half-size ``center_radius * stride`` around the box centre, clipped to the box),
2. the largest of its distances (l, t, r, b) to the box sides lies in its level's regress
   range ``[lo, hi]``, both ends inclusive (mmdet's ``>= lo`` and ``<= hi``).
Several objects → the one with the smallest area (ties → lowest object index).

Levels: a prior's pyramid level is the rank of its stride among the distinct strides present
(ascending). With L levels the first L ``regress_ranges`` are used; priors on levels beyond
the given ranges reuse the last range. Note that the default five ranges end at 256 px on the
third level, so a three-level (strides 8/16/32) model should pass e.g.
``((-1, 64), (64, 128), (128, inf))`` or large objects are never assigned.

Extra output ``centerness [B, A]``: ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))`` of the
assigned object, 0 for background.
"""
from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch
from torch import Tensor

from densedet.assign import common
from densedet.assign.base import Assigner, Assignment
from densedet.boxes import box_area, box_iou

INF = float("inf")
DEFAULT_REGRESS_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))


#: elements of one ``[B, g, A]`` slice: the batched assigners walk the objects in slices of
#: about this many pairs, so their element-wise temporaries stay a few MB (large fresh
#: tensors cost page faults on CPU; measured fastest around 1M) and memory stays bounded.
#: The number of slices depends on shapes only, never on data.
CHUNK_ELEMENTS = 1 << 20


def object_slices(B: int, G: int, A: int) -> list[slice]:
    """Slices of the object axis with about :data:`CHUNK_ELEMENTS` pairs each."""
    step = max(1, CHUNK_ELEMENTS // max(1, B * A))
    return [slice(s, min(s + step, G)) for s in range(0, G, step)]


def prior_levels(priors: Tensor) -> Tensor:
    """Pyramid level of each prior: the rank of its stride among the distinct strides present.

    Computed with a sort and a cumulative count of "stride changed" marks, so it needs no
    ``unique`` (data-dependent shape) and no host sync.

    Args:
        priors: ``[A, 4]`` (cx, cy, stride_w, stride_h); the level key is ``stride_w``.
    Returns:
        ``[A]`` int64, 0 = smallest stride.
    """
    stride = priors[:, 2]
    if stride.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=priors.device)
    sorted_s, order = stride.sort(stable=True)
    new_level = torch.ones_like(sorted_s, dtype=torch.long)
    new_level[0] = 0
    new_level[1:] = (sorted_s[1:] != sorted_s[:-1]).long()
    rank_sorted = new_level.cumsum(0)
    return torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)


class LevelLayout:
    """Host-side ``(start, size)`` of each level, cached per priors tensor.

    ATSS takes a fixed number of candidates *per level*, which needs the level boundaries as
    Python ints. Reading them costs one host sync; the result is cached on the identity of the
    priors tensor (and its in-place version counter), so a model that reuses its priors tensor
    pays that sync once, not every step.
    """

    def __init__(self):
        self._key = None
        self._segments: list[tuple[int, int]] = []

    def segments(self, priors: Tensor) -> list[tuple[int, int]]:
        """``[(start, size), ...]`` per level; levels must be contiguous (docs/design.md order)."""
        key = self._key
        if key is not None and key[0]() is priors and key[1] == priors._version \
                and key[2] == tuple(priors.shape):
            return self._segments
        levels = prior_levels(priors).cpu()  # the one host sync, cached below
        segments = []
        if levels.numel():
            counts = torch.bincount(levels).tolist()
            start = 0
            for n in counts:
                segments.append((start, n))
                start += n
            expected = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
            if not torch.equal(expected, levels):
                raise ValueError("priors must be ordered by ascending stride, one contiguous "
                                 "block per level (see docs/design.md)")
        self._segments = segments
        self._key = (weakref.ref(priors), priors._version, tuple(priors.shape))
        return segments


def level_regress_ranges(priors: Tensor, table: Tensor) -> Tensor:
    """``[A, 2]`` (lo, hi) regress range of each prior's level from the ``[L, 2]`` table of
    ranges (levels past the end reuse the last range)."""
    levels = prior_levels(priors).clamp(max=table.shape[0] - 1)
    return table[levels]


def side_distances(points: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Distances from every point to every box side, as four ``[B, G, A]`` tensors.

    Kept as four separate tensors instead of one ``[B, G, A, 4]`` stack: the min/max over
    sides are then element-wise ops and no 4x-sized intermediate is built.
    """
    px, py = points[:, 0], points[:, 1]
    x1, y1, x2, y2 = (gt_boxes[..., i, None] for i in range(4))  # [B, G, 1]
    return px - x1, py - y1, x2 - px, y2 - py


def centerness_of(left: Tensor, top: Tensor, right: Tensor, bottom: Tensor) -> Tensor:
    """FCOS centerness ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))``, 0 where undefined
    (a side distance <= 0, i.e. not strictly inside)."""
    lr_min, lr_max = torch.minimum(left, right), torch.maximum(left, right)
    tb_min, tb_max = torch.minimum(top, bottom), torch.maximum(top, bottom)
    ok = (lr_min > 0) & (tb_min > 0)
    ratio = (lr_min / lr_max.clamp(min=1e-12)) * (tb_min / tb_max.clamp(min=1e-12))
    return torch.where(ok, ratio.clamp(min=0).sqrt(), torch.zeros_like(ratio))


def apply_ensure_each_gt(gt_index: Tensor, matched: Tensor, cost: Tensor) -> Tensor:
    """Optional rescue of objects that lost every matched prior in conflict resolution."""
    if matched.shape[1] == 0:
        return gt_index
    return common.ensure_each_gt(gt_index, matched, cost)


def assigned_iou(pred_boxes: Tensor, gt_boxes: Tensor, gt_index: Tensor) -> Tensor:
    """IoU of each prior's prediction with its assigned object, ``[B, 1, A]`` expanded to
    ``[B, G, A]`` without copying so that :func:`common.build_assignment` can gather from it.

    The geometric methods never need the full ``[B, G, A]`` prediction IoU, only this.
    """
    B, A = gt_index.shape
    G = gt_boxes.shape[1]
    if G == 0:
        return pred_boxes.new_zeros((B, 0, A))
    box = gt_boxes.gather(1, gt_index.clamp(min=0)[..., None].expand(B, A, 4))  # [B, A, 4]
    iou = box_iou(pred_boxes, box, aligned=True)  # [B, A]
    return iou[:, None, :].expand(B, G, A)


class FCOSAssigner(Assigner):
    """mmdet FCOS targets; see the module docstring for the exact rule."""

    name = "fcos"
    uses_predictions = False

    def __init__(self, num_classes: int, center_sampling: bool = True, center_radius: float = 1.5,
                 regress_ranges: Sequence[Sequence[float]] = DEFAULT_REGRESS_RANGES,
                 ensure_each_gt: bool = False):
        super().__init__(num_classes)
        if center_radius <= 0:
            raise ValueError(f"center_radius must be > 0, got {center_radius!r}")
        ranges = tuple((float(lo), float(hi)) for lo, hi in regress_ranges)
        if not ranges or any(not lo < hi or math.isnan(lo) for lo, hi in ranges):
            raise ValueError(f"regress_ranges must be non-empty (lo, hi) pairs with lo < hi, got "
                             f"{regress_ranges!r}")
        self.center_sampling = bool(center_sampling)
        self.center_radius = float(center_radius)
        self.regress_ranges = ranges
        self.ensure_each_gt = bool(ensure_each_gt)
        self._tables: dict[tuple, Tensor] = {}

    def __repr__(self) -> str:  # the base repr lists every attribute; hide the caches
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"

    def _range_table(self, priors: Tensor) -> Tensor:
        """``[L, 2]`` regress ranges on the priors' device, built once per device (a host to
        device copy on every step would stall a GPU pipeline)."""
        key = (priors.device, priors.dtype)
        if key not in self._tables:
            self._tables[key] = torch.tensor(self.regress_ranges, dtype=priors.dtype,
                                             device=priors.device)
        return self._tables[key]

    def assign(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        B, A, _ = pred_scores.shape
        G = gt_boxes.shape[1]
        dev = priors.device
        points = priors[:, :2]
        ranges = level_regress_ranges(priors, self._range_table(priors))  # [A, 2]
        radii = self.center_radius * priors[:, 2]
        areas = box_area(gt_boxes)  # [B, G]
        # running winner per prior over the object slices: the smallest area; a later slice
        # must be strictly smaller, so equal areas keep the lowest object index
        best_area = torch.full((B, A), INF, device=dev)
        gt_index = torch.full((B, A), -1, dtype=torch.long, device=dev)
        matched = torch.empty((B, G, A), dtype=torch.bool, device=dev)  # every slice fills it
        for part in object_slices(B, G, A):
            boxes = gt_boxes[:, part]
            left, top, right, bottom = side_distances(points, boxes)  # [B, g, A] each
            if self.center_sampling:
                inside = common.points_in_centre_region(points, radii, boxes, clip_to_box=True)
            else:
                inside = torch.minimum(torch.minimum(left, top), torch.minimum(right, bottom)) > 0
            max_side = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
            ok = (max_side >= ranges[:, 0]).logical_and_(max_side <= ranges[:, 1])
            ok &= inside
            ok &= gt_valid[:, part, None]
            area = areas[:, part, None].expand(ok.shape).masked_fill(~ok, INF)
            part_area, part_idx = area.min(dim=1)  # [B, A]; ties -> first
            better = part_area < best_area
            best_area = torch.where(better, part_area, best_area)
            gt_index = torch.where(better, part_idx + part.start, gt_index)
            matched[:, part] = ok
        if self.ensure_each_gt:
            gt_index = apply_ensure_each_gt(gt_index, matched, areas[..., None].expand(B, G, A))

        centerness = self._centerness(gt_index, points, gt_boxes)
        ious = assigned_iou(pred_boxes, gt_boxes, gt_index)
        return common.build_assignment(gt_index, gt_labels, ious, centerness=centerness,
                                       candidate_mask=matched)

    @staticmethod
    def _centerness(gt_index: Tensor, points: Tensor, gt_boxes: Tensor) -> Tensor:
        """``[B, A]`` centerness of the assigned object (0 for background)."""
        B, A = gt_index.shape
        if gt_boxes.shape[1] == 0:
            return torch.zeros((B, A), dtype=gt_boxes.dtype, device=gt_index.device)
        box = gt_boxes.gather(1, gt_index.clamp(min=0)[..., None].expand(B, A, 4))  # [B, A, 4]
        px, py = points[:, 0], points[:, 1]
        c = centerness_of(px - box[..., 0], py - box[..., 1], box[..., 2] - px, box[..., 3] - py)
        return torch.where(gt_index >= 0, c, torch.zeros_like(c))
