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
from typing import Sequence

import torch
from torch import Tensor

from densedet.assign import common
from densedet.assign.base import Assigner, Assignment
from densedet.boxes import box_area

INF = float("inf")
DEFAULT_REGRESS_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))

# re-exported: their former home (they are shared with other methods)
prior_levels = common.prior_levels
LevelLayout = common.LevelLayout


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
    px, py = common.contiguous_columns(points)  # contiguous rows: vectorised broadcasts
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


def centerness_target(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS centerness of each point in its box (the target the FCOS head learns), 0 where the
    point is not strictly inside the box.

    Args:
        points: ``[A, 2]`` prior centres.
        boxes: ``[..., A, 4]`` xyxy, one box per point (e.g. the assigned boxes ``[B, A, 4]``).
    Returns:
        ``[..., A]`` in [0, 1].
    """
    px, py = points[:, 0], points[:, 1]
    return centerness_of(px - boxes[..., 0], py - boxes[..., 1], boxes[..., 2] - px,
                         boxes[..., 3] - py)


class FCOSAssigner(Assigner):
    """mmdet FCOS targets; see the module docstring for the exact rule."""

    name = "fcos"
    provides = frozenset({"centerness"})
    uses_predictions = False

    def __init__(self, num_classes: int, center_sampling: bool = True, center_radius: float = 1.5,
                 regress_ranges: Sequence[Sequence[float]] = DEFAULT_REGRESS_RANGES,
                 ensure_each_gt: bool = False, **small_objects):
        super().__init__(num_classes, **small_objects)  # stal options (Assigner)
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
        lo, hi = common.contiguous_columns(ranges)  # [A] each, contiguous (broadcast operands)
        radii = self.center_radius * priors[:, 2]
        areas = box_area(gt_boxes)  # [B, G]
        cand_boxes = self.candidate_boxes(gt_boxes, gt_valid)  # the inside tests (stal)
        matched = torch.empty((B, G, A), dtype=torch.bool, device=dev)  # returned
        # each prior's winner over the chunks of objects: the smallest area; a later chunk
        # must be strictly smaller, so equal areas keep the lowest object index
        best = common.RunningArgBest((B, A), largest=False, init=INF, dtype=areas.dtype,
                                     device=dev)
        summaries = []  # per chunk, for ensure_each_gt
        for part in common.object_chunks(B, G, A):
            g = part.stop - part.start

            def block(blk: slice, part=part) -> tuple[Tensor, Tensor, Tensor]:
                """Matches of the objects ``part`` with the priors ``blk`` (``[B, g, a]``) and
                each prior's smallest matched area among them (ties: the first), ``[B, a]``."""
                boxes = gt_boxes[:, part]
                left, top, right, bottom = side_distances(points[blk], boxes)  # [B, g, a]
                if self.center_sampling:
                    inside = common.points_in_centre_region(
                        points[blk], radii[blk], boxes, clip_to_box=True,
                        clip_boxes=cand_boxes[:, part] if self.stal else None)
                elif self.stal:
                    inside = common.box_margin(points[blk], cand_boxes[:, part]) > 0
                else:
                    inside = torch.minimum(torch.minimum(left, top),
                                           torch.minimum(right, bottom)) > 0
                max_side = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
                ok = (max_side >= lo[blk]).logical_and_(max_side <= hi[blk])
                ok &= inside
                ok &= gt_valid[:, part, None]
                area = areas[:, part, None].expand(ok.shape).masked_fill(~ok, INF)
                low, low_idx = area.min(dim=1)  # [B, a]; ties -> first
                return ok, low, low_idx

            _, low, low_idx = common.fill_by_prior_blocks(block, (
                matched[:, part], torch.empty((B, A), dtype=areas.dtype, device=dev),
                torch.empty((B, A), dtype=torch.long, device=dev)), rows=B * g)
            best.update(low, low_idx, part.start)
            if self.ensure_each_gt:  # per object: its matched prior of smallest "cost" (area)
                summaries.append(common.matched_summary(matched[:, part],
                                                        areas[:, part, None]))
        gt_index = best.index
        if self.ensure_each_gt:
            any_matched, best_prior, best_cost = (torch.cat(t, dim=1) for t in zip(*summaries))
            gt_index = common.rescue_matched(gt_index, any_matched, best_prior, best_cost)

        centerness = self._centerness(gt_index, points, gt_boxes)
        quality = common.assigned_box_iou(pred_boxes, gt_boxes, gt_index)
        return common.build_assignment(gt_index, gt_labels, quality=quality,
                                       centerness=centerness, candidate_mask=matched)

    @staticmethod
    def _centerness(gt_index: Tensor, points: Tensor, gt_boxes: Tensor) -> Tensor:
        """``[B, A]`` centerness of the assigned object (0 for background)."""
        B, A = gt_index.shape
        if gt_boxes.shape[1] == 0:
            return torch.zeros((B, A), dtype=gt_boxes.dtype, device=gt_index.device)
        box = gt_boxes.gather(1, gt_index.clamp(min=0)[..., None].expand(B, A, 4))  # [B, A, 4]
        c = centerness_target(points, box)
        return torch.where(gt_index >= 0, c, torch.zeros_like(c))
