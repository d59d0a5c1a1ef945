"""Per-image reference of LLA (loss-aware label assignment), IoU computed from l,t,r,b."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from densedet.assign.reference.simota import finish, resolve


def distances(priors: Tensor, boxes: Tensor) -> Tensor:
    """``[..., A, 4]`` (l, t, r, b) from every prior centre to ``boxes [..., A or 1, 4]``."""
    x, y = priors[:, 0], priors[:, 1]
    return torch.stack([x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], -1)


def ltrb_iou(d1: Tensor, d2: Tensor) -> Tensor:
    """IoU of two boxes given as distances from the same point (signed, exact overlap)."""
    area1 = (d1[..., 0] + d1[..., 2]).clamp(min=0) * (d1[..., 1] + d1[..., 3]).clamp(min=0)
    area2 = (d2[..., 0] + d2[..., 2]).clamp(min=0) * (d2[..., 1] + d2[..., 3]).clamp(min=0)
    w = (torch.minimum(d1[..., 0], d2[..., 0]) + torch.minimum(d1[..., 2], d2[..., 2])).clamp(min=0)
    h = (torch.minimum(d1[..., 1], d2[..., 1]) + torch.minimum(d1[..., 3], d2[..., 3])).clamp(min=0)
    inter = w * h
    return inter / (area1 + area2 - inter).clamp(min=1e-7)


def focal(p: Tensor, y: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss on probabilities: alpha_t * (1 - p_t)^gamma * BCE."""
    p_t = p * y + (1 - p) * (1 - y)
    alpha_t = alpha * y + (1 - alpha) * (1 - y)
    return alpha_t * (1 - p_t).pow(gamma) * F.binary_cross_entropy(p, y, reduction="none")


def assign(priors: Tensor, scores: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
           num_classes: int, topk: int = 10, reg_weight: float = 1.5,
           ensure_each_gt: bool = False, stal: bool = False, stal_small_side: float = 8.0,
           stal_widen_to: float = 16.0) -> dict[str, Tensor]:
    """LLA for one image with ``g`` valid objects; see ``densedet.assign.lla``."""
    from densedet.assign.reference import candidate_boxes

    A, g = priors.shape[0], gt_boxes.shape[0]
    gt_d = distances(priors, gt_boxes[:, None])  # [g, A, 4]
    wide = candidate_boxes(gt_boxes, stal, stal_small_side, stal_widen_to)  # the inside test
    in_box = distances(priors, wide[:, None]).min(dim=-1).values > 0.01
    if g == 0 or A == 0:
        return finish(A, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                      gt_labels, torch.zeros(g, 0), candidate_mask=in_box)
    ious = ltrb_iou(distances(priors, boxes)[None], gt_d)  # [g, A]
    p = scores[None].expand(g, A, num_classes)
    onehot = F.one_hot(gt_labels, num_classes).to(p.dtype)[:, None].expand(g, A, num_classes)
    cost = (focal(p, onehot).sum(dim=-1) + reg_weight * -torch.log(ious + 1e-7)
            + 1e3 * (~in_box).float())
    matching = torch.zeros((g, A), dtype=torch.bool)
    idx = torch.topk(cost, min(topk, A), dim=1, largest=False).indices
    matching[torch.arange(g)[:, None], idx] = True
    local = resolve(matching, cost, ensure_each_gt)
    return finish(A, torch.arange(A), local, gt_labels, ious, candidate_mask=in_box)
