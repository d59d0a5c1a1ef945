"""Per-image task-aligned (TOOD / YOLOv8) reference, one object at a time."""
from __future__ import annotations

import torch
from torch import Tensor


def assign(priors: Tensor, scores: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
           num_classes: int, topk: int = 13, alpha: float = 1.0, beta: float = 6.0,
           ensure_each_gt: bool = False, stal: bool = False, stal_small_side: float = 8.0,
           stal_widen_to: float = 16.0) -> dict:
    from densedet.assign.reference import candidate_boxes
    from densedet.boxes import box_iou

    cand_boxes = candidate_boxes(gt_boxes, stal, stal_small_side, stal_widen_to)

    A = priors.shape[0]
    g_count = gt_boxes.shape[0]
    px, py = priors[:, 0], priors[:, 1]
    ious = box_iou(gt_boxes, boxes)  # [g, A]
    metrics, chosen_rows, inside_rows = [], [], []
    for g in range(g_count):
        x1, y1, x2, y2 = cand_boxes[g].tolist()  # the inside test's box (stal widens)
        margin = torch.stack([px - x1, py - y1, x2 - px, y2 - py]).min(dim=0).values
        inside = margin > 1e-9
        metric = scores[:, gt_labels[g]].pow(alpha) * ious[g].pow(beta)
        metric = torch.where(inside, metric, 0.0)
        kth = metric.topk(min(topk, A)).values[-1]
        chosen = inside & (metric >= kth) & (metric > 0)
        metrics.append(metric)
        chosen_rows.append(chosen)
        inside_rows.append(inside)

    gt_index = torch.full((A,), -1, dtype=torch.long)
    best = torch.full((A,), -1.0)
    for g in range(g_count):
        better = chosen_rows[g] & (ious[g] > best)  # strict: equal IoU keeps the earlier object
        best = torch.where(better, ious[g], best)
        gt_index = torch.where(better, torch.tensor(g), gt_index)

    align_target = torch.zeros(A)
    for g in range(g_count):
        own = gt_index == g
        if own.any():
            scale = ious[g][own].max() / (metrics[g][own].max() + 1e-9)
            align_target[own] = metrics[g][own] * scale

    pos = gt_index >= 0
    idx = gt_index.clamp(min=0)
    if g_count:
        labels = torch.where(pos, gt_labels[idx], -1)
        quality = torch.where(pos, ious[idx, torch.arange(A)], 0.0)
        candidate_mask = torch.stack(inside_rows)
    else:
        labels = torch.full((A,), -1, dtype=torch.long)
        quality = torch.zeros(A)
        candidate_mask = torch.zeros((0, A), dtype=torch.bool)
    return {"gt_index": gt_index, "labels": labels, "quality": quality,
            "align_target": align_target, "candidate_mask": candidate_mask}
