"""Per-image reference of the dynamic soft label assigner (NanoDet-Plus / RTMDet)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from densedet.assign.reference.simota import dynamic_k, finish, inside_boxes, resolve
from densedet.boxes import box_iou


def assign(priors: Tensor, scores: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
           num_classes: int, candidate_topk: int = 13, iou_weight: float = 3.0,
           soft_center_prior: bool = False, soft_center_radius: float = 3.0,
           ensure_each_gt: bool = False, stal: bool = False, stal_small_side: float = 8.0,
           stal_widen_to: float = 16.0) -> dict[str, Tensor]:
    """DSL for one image with ``g`` valid objects; see ``densedet.assign.dsl``."""
    from densedet.assign.reference import candidate_boxes

    A, g = priors.shape[0], gt_boxes.shape[0]
    in_box = inside_boxes(priors, candidate_boxes(gt_boxes, stal, stal_small_side, stal_widen_to))
    columns = torch.nonzero(in_box.any(dim=0)).flatten()
    n = len(columns)
    if g == 0 or n == 0:
        return finish(A, columns[:0], torch.zeros(0, dtype=torch.long), gt_labels,
                      torch.zeros(g, 0), candidate_mask=in_box)
    ious = box_iou(gt_boxes, boxes[columns])  # [g, n]
    p = scores[columns][None].expand(g, n, num_classes)
    soft = F.one_hot(gt_labels, num_classes).to(p.dtype)[:, None] * ious[..., None]  # [g, n, C]
    cls_cost = (F.binary_cross_entropy(p, soft, reduction="none") * (soft - p).abs().pow(2)).sum(-1)
    cost = cls_cost + iou_weight * -torch.log(ious + 1e-7)
    if soft_center_prior:
        centre = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        dist = (priors[columns][None, :, :2] - centre[:, None]).pow(2).sum(-1).sqrt()
        cost = cost + torch.pow(10.0, (dist / priors[columns, 2] - soft_center_radius).clamp(max=30.0))
    matching = dynamic_k(cost, ious, candidate_topk)
    local = resolve(matching, cost, ensure_each_gt)
    return finish(A, columns, local, gt_labels, ious, candidate_mask=in_box)
