"""Per-image reference of SimOTA (YOLOX), written straight from the definition.

Also holds the per-image dynamic-k, conflict and rescue steps that the DSL and LLA references
share with it (their definitions say "same as SimOTA").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from densedet.boxes import box_iou


def inside_boxes(priors: Tensor, gt_boxes: Tensor, margin: float = 0.0) -> Tensor:
    """``[g, A]``: prior centre inside the box by more than ``margin`` on all four sides."""
    x, y = priors[:, 0], priors[:, 1]
    deltas = torch.stack([x[None] - gt_boxes[:, 0, None], y[None] - gt_boxes[:, 1, None],
                          gt_boxes[:, 2, None] - x[None], gt_boxes[:, 3, None] - y[None]], dim=-1)
    return deltas.min(dim=-1).values > margin


def inside_centre_squares(priors: Tensor, gt_boxes: Tensor, radius: float) -> Tensor:
    """``[g, A]``: prior centre inside the square of half-size radius*stride at the box centre."""
    x, y = priors[:, 0], priors[:, 1]
    r = radius * priors[:, 2]
    cx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2
    cy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
    deltas = torch.stack([x[None] - (cx[:, None] - r[None]), y[None] - (cy[:, None] - r[None]),
                          (cx[:, None] + r[None]) - x[None], (cy[:, None] + r[None]) - y[None]], dim=-1)
    return deltas.min(dim=-1).values > 0


def dynamic_k(cost: Tensor, ious: Tensor, candidate_topk: int) -> Tensor:
    """``[g, n]`` bool: each object's k cheapest columns, k from its best IoUs (per object)."""
    g, n = cost.shape
    matching = torch.zeros((g, n), dtype=torch.bool)
    if n == 0:
        return matching
    top_ious = torch.topk(ious, min(candidate_topk, n), dim=1).values
    ks = top_ious.sum(dim=1).floor().clamp(min=1).long()
    for j in range(g):
        idx = torch.topk(cost[j], int(ks[j]), largest=False).indices
        matching[j, idx] = True
    return matching


def resolve(matching: Tensor, cost: Tensor, ensure_each_gt: bool) -> Tensor:
    """``[n]`` object per column (-1 none): conflicts go to the lowest cost of the whole column;
    with ``ensure_each_gt`` an object left with nothing takes back its cheapest matched column
    (rescued objects wanting the same column: cheaper first, then lower index)."""
    g, n = matching.shape
    before = matching
    multiple = matching.sum(dim=0) > 1
    matching = matching.clone()
    if g:
        matching[:, multiple] = False
        matching[cost[:, multiple].argmin(dim=0), multiple] = True
    local = torch.where(matching.any(dim=0), matching.to(torch.uint8).argmax(dim=0),
                        torch.full((n,), -1, dtype=torch.long))
    if ensure_each_gt:
        wants = []
        for j in range(g):
            if before[j].any() and not matching[j].any():
                c = cost[j].masked_fill(~before[j], float("inf"))
                a = int(c.argmin())
                wants.append((float(c[a]), j, a))
        taken = set()
        for _, j, a in sorted(wants):
            if a not in taken:
                taken.add(a)
                local[a] = j
    return local


def finish(num_priors: int, columns: Tensor, local: Tensor, gt_labels: Tensor, ious: Tensor,
           **extra) -> dict[str, Tensor]:
    """Scatter per-column results (columns = prior indices) into the ``[A]`` result dict."""
    gt_index = torch.full((num_priors,), -1, dtype=torch.long)
    labels = torch.full((num_priors,), -1, dtype=torch.long)
    quality = torch.zeros(num_priors)
    pos = local >= 0
    gt_index[columns[pos]] = local[pos]
    labels[columns[pos]] = gt_labels[local[pos]]
    quality[columns[pos]] = ious[local[pos], torch.nonzero(pos).flatten()]
    return dict(gt_index=gt_index, labels=labels, quality=quality, **extra)


def assign(priors: Tensor, scores: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
           num_classes: int, center_radius: float = 2.5, candidate_topk: int = 10,
           iou_weight: float = 3.0, center_only: bool = False,
           ensure_each_gt: bool = False, stal: bool = False, stal_small_side: float = 8.0,
           stal_widen_to: float = 16.0) -> dict[str, Tensor]:
    """SimOTA for one image with ``g`` valid objects; see ``densedet.assign.simota``."""
    from densedet.assign.reference import candidate_boxes

    A, g = priors.shape[0], gt_boxes.shape[0]
    in_centre = inside_centre_squares(priors, gt_boxes, center_radius)
    if center_only:
        region, ok, penalty = in_centre, in_centre, 1e6
    else:
        in_box = inside_boxes(priors, candidate_boxes(gt_boxes, stal, stal_small_side,
                                                      stal_widen_to))
        region, ok, penalty = in_box | in_centre, in_box & in_centre, 1e5
    columns = torch.nonzero(region.any(dim=0)).flatten()  # the image's candidate priors
    n = len(columns)
    if g == 0 or n == 0:
        return finish(A, columns[:0], torch.zeros(0, dtype=torch.long), gt_labels,
                      torch.zeros(g, 0), candidate_mask=region)
    ious = box_iou(gt_boxes, boxes[columns])  # [g, n]
    p = scores[columns][None].expand(g, n, num_classes)
    onehot = F.one_hot(gt_labels, num_classes).to(p.dtype)[:, None].expand(g, n, num_classes)
    cls_cost = F.binary_cross_entropy(p, onehot, reduction="none").sum(dim=-1)
    cost = cls_cost + iou_weight * -torch.log(ious + 1e-8) + penalty * (~ok[:, columns]).float()
    matching = dynamic_k(cost, ious, candidate_topk)
    local = resolve(matching, cost, ensure_each_gt)
    return finish(A, columns, local, gt_labels, ious, candidate_mask=region)
