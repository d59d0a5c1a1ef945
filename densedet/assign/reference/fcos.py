"""Per-image FCOS reference: straight from the definition, one object at a time."""
from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_REGRESS_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, math.inf))


def stride_levels(priors: Tensor) -> Tensor:
    """``[A]`` rank of each prior's stride among the distinct strides (ascending)."""
    distinct = sorted(set(priors[:, 2].tolist()))
    rank = {s: i for i, s in enumerate(distinct)}
    return torch.tensor([rank[s] for s in priors[:, 2].tolist()], dtype=torch.long)


def assign(priors: Tensor, scores: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
           num_classes: int, center_sampling: bool = True, center_radius: float = 1.5,
           regress_ranges=DEFAULT_REGRESS_RANGES, ensure_each_gt: bool = False,
           stal: bool = False, stal_small_side: float = 8.0,
           stal_widen_to: float = 16.0) -> dict:
    from densedet.assign.reference import candidate_boxes
    from densedet.boxes import box_iou

    cand_boxes = candidate_boxes(gt_boxes, stal, stal_small_side, stal_widen_to)

    A = priors.shape[0]
    px, py, stride = priors[:, 0], priors[:, 1], priors[:, 2]
    levels = stride_levels(priors).clamp(max=len(regress_ranges) - 1)
    lo = torch.tensor([float(regress_ranges[i][0]) for i in levels.tolist()])
    hi = torch.tensor([float(regress_ranges[i][1]) for i in levels.tolist()])

    best_area = torch.full((A,), math.inf)
    gt_index = torch.full((A,), -1, dtype=torch.long)
    centerness = torch.zeros(A)
    matched_rows = []
    for g in range(gt_boxes.shape[0]):
        x1, y1, x2, y2 = gt_boxes[g].tolist()
        l, t, r, b = px - x1, py - y1, x2 - px, y2 - py
        wx1, wy1, wx2, wy2 = cand_boxes[g].tolist()  # the inside tests' box (stal widens)
        if center_sampling:
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            rad = center_radius * stride
            rx1 = torch.clamp(cx - rad, min=wx1)
            ry1 = torch.clamp(cy - rad, min=wy1)
            rx2 = torch.clamp(cx + rad, max=wx2)
            ry2 = torch.clamp(cy + rad, max=wy2)
            inside = (px > rx1) & (py > ry1) & (rx2 > px) & (ry2 > py)
        else:
            inside = (px - wx1 > 0) & (py - wy1 > 0) & (wx2 - px > 0) & (wy2 - py > 0)
        m = torch.stack([l, t, r, b]).max(dim=0).values
        ok = inside & (m >= lo) & (m <= hi)
        matched_rows.append(ok)
        area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
        better = ok & (area < best_area)  # strict: an equal area keeps the earlier object
        best_area = torch.where(better, torch.tensor(area), best_area)
        gt_index = torch.where(better, torch.tensor(g), gt_index)
        lr = torch.minimum(l, r) / torch.maximum(l, r).clamp(min=1e-12)
        tb = torch.minimum(t, b) / torch.maximum(t, b).clamp(min=1e-12)
        # 0 where the prior is not strictly inside the real box (possible with stal)
        c = torch.where((l > 0) & (t > 0) & (r > 0) & (b > 0),
                        (lr * tb).clamp(min=0).sqrt(), 0.0)
        centerness = torch.where(better, c, centerness)

    pos = gt_index >= 0
    idx = gt_index.clamp(min=0)
    if gt_boxes.shape[0]:
        labels = torch.where(pos, gt_labels[idx], -1)
        quality = torch.where(pos, box_iou(boxes, gt_boxes[idx], aligned=True), 0.0)
        candidate_mask = torch.stack(matched_rows)
    else:
        labels = torch.full((A,), -1, dtype=torch.long)
        quality = torch.zeros(A)
        candidate_mask = torch.zeros((0, A), dtype=torch.bool)
    return {"gt_index": gt_index, "labels": labels, "quality": quality,
            "centerness": centerness, "candidate_mask": candidate_mask}
