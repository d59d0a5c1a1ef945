"""Per-image dual-weighting (DW) reference, one object at a time."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def assign(priors: Tensor, scores: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
           num_classes: int, sigma: float = 1.11, ensure_each_gt: bool = False,
           stal: bool = False, stal_small_side: float = 8.0,
           stal_widen_to: float = 16.0) -> dict:
    from densedet.assign.reference import candidate_boxes
    from densedet.boxes import box_iou

    cand_boxes = candidate_boxes(gt_boxes, stal, stal_small_side, stal_widen_to)

    A = priors.shape[0]
    g_count = gt_boxes.shape[0]
    px, py, sw, sh = priors.unbind(1)
    pos_weight = torch.zeros((g_count, A))
    p_neg_class = torch.ones((A, num_classes))
    inside_rows = []
    ious_all = box_iou(gt_boxes, boxes)  # [g, A]
    gious_all = box_iou(gt_boxes, boxes, mode="giou")
    for g in range(g_count):
        x1, y1, x2, y2 = gt_boxes[g].tolist()
        c = int(gt_labels[g])
        wx1, wy1, wx2, wy2 = cand_boxes[g].tolist()  # the candidates' box (stal widens)
        inside = (px - wx1 > 0) & (py - wy1 > 0) & (wx2 - px > 0) & (wy2 - py > 0)
        inside_rows.append(inside)
        if not inside.any():
            continue
        dx = (px - (x1 + x2) / 2) / sw
        dy = (py - (y1 + y2) / 2) / sh
        # the Gaussian is floored at e^-80 (see densedet.assign.dw: LOG_PRIOR_MIN)
        prior = torch.exp((-(dx ** 2 + dy ** 2) / (2 * sigma ** 2)).clamp(min=-80.0))
        t = scores[:, c] * torch.exp(-5 * (1 - gious_all[g]))
        t = torch.where(inside, t, 0.0)
        den = max(float((torch.exp(3 * t) * t * prior)[inside].sum()), 1e-12)
        pos_weight[g] = torch.where(inside, torch.exp(5 * t) * t * prior / den, 0.0)

        iou = ious_all[g]
        f = (1 - iou ** 2) / (1 - 0.5 ** 2)
        f_min, f_max = f[inside].min(), f[inside].max()
        f_hi = min(1.0, float(f_max))
        if f_hi > f_min:
            p = (f - f_min) / (f_hi - f_min)
        else:
            p = torch.ones(A)
        p = torch.where((iou < 0.5) | ~inside, 1.0, p)
        # a prior inside several boxes of this class keeps the smallest P_neg
        p_neg_class[:, c] = torch.minimum(p_neg_class[:, c], p)

    gt_index = torch.full((A,), -1, dtype=torch.long)
    best = torch.full((A,), -math.inf)
    for g in range(g_count):
        better = inside_rows[g] & (pos_weight[g] > best)
        best = torch.where(better, pos_weight[g], best)
        gt_index = torch.where(better, torch.tensor(g), gt_index)

    pos = gt_index >= 0
    idx = gt_index.clamp(min=0)
    if g_count:
        labels = torch.where(pos, gt_labels[idx], -1)
        quality = torch.where(pos, ious_all[idx, torch.arange(A)], 0.0)
        candidate_mask = torch.stack(inside_rows)
    else:
        labels = torch.full((A,), -1, dtype=torch.long)
        quality = torch.zeros(A)
        candidate_mask = torch.zeros((0, A), dtype=torch.bool)
    return {"gt_index": gt_index, "labels": labels, "quality": quality, "pos_weight": pos_weight,
            "neg_weight": p_neg_class * scores ** 2, "candidate_mask": candidate_mask}
