"""Per-image ATSS reference: straight from the definition, one object and level at a time."""
from __future__ import annotations

import torch
from torch import Tensor


def assign(priors: Tensor, scores: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
           num_classes: int, topk: int = 9, anchor_scale: float = 8.0,
           ensure_each_gt: bool = False, stal: bool = False, stal_small_side: float = 8.0,
           stal_widen_to: float = 16.0) -> dict:
    from densedet.assign.reference import candidate_boxes
    from densedet.boxes import box_iou

    cand_boxes = candidate_boxes(gt_boxes, stal, stal_small_side, stal_widen_to)

    A = priors.shape[0]
    strides = priors[:, 2].tolist()
    distinct = sorted(set(strides))
    level_of = [distinct.index(s) for s in strides]
    level_members = [[a for a in range(A) if level_of[a] == lv] for lv in range(len(distinct))]
    half = priors[:, 2:] * anchor_scale / 2
    anchors = torch.cat([priors[:, :2] - half, priors[:, :2] + half], dim=1)

    best = torch.full((A,), float("-inf"))
    gt_index = torch.full((A,), -1, dtype=torch.long)
    cand_rows = []
    for g in range(gt_boxes.shape[0]):
        box = gt_boxes[g]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        dist = ((priors[:, 0] - cx) ** 2 + (priors[:, 1] - cy) ** 2).sqrt()
        chosen = []
        for members in level_members:
            m = torch.tensor(members, dtype=torch.long)
            k = min(topk, len(members))
            chosen.append(m[dist[m].topk(k, largest=False).indices])
        cand = torch.cat(chosen)
        cand_row = torch.zeros(A, dtype=torch.bool)
        cand_row[cand] = True
        cand_rows.append(cand_row)
        ious = box_iou(anchors[cand], box[None])[:, 0]
        thr = ious.mean() + (ious.std() if len(ious) > 1 else 0.0)
        for j, a in enumerate(cand.tolist()):
            x, y = priors[a, 0], priors[a, 1]
            wbox = cand_boxes[g]  # the inside test's box (stal widens small ones)
            margin = min(x - wbox[0], y - wbox[1], wbox[2] - x, wbox[3] - y)
            if ious[j] >= thr and margin > 0.01 and ious[j] > best[a]:
                best[a] = ious[j]
                gt_index[a] = g

    pos = gt_index >= 0
    idx = gt_index.clamp(min=0)
    if gt_boxes.shape[0]:
        labels = torch.where(pos, gt_labels[idx], -1)
        quality = torch.where(pos, box_iou(boxes, gt_boxes[idx], aligned=True), 0.0)
        candidate_mask = torch.stack(cand_rows)
    else:
        labels = torch.full((A,), -1, dtype=torch.long)
        quality = torch.zeros(A)
        candidate_mask = torch.zeros((0, A), dtype=torch.bool)
    return {"gt_index": gt_index, "labels": labels, "quality": quality,
            "candidate_mask": candidate_mask}
