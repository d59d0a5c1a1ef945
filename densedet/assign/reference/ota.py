"""Per-image reference of OTA (optimal transport assignment), written from the definition.

Float64, one image, all priors, the way the official code states it: the centre-prior penalty
is a real ``1e6`` added to the cost, the potentials start at 1, every Sinkhorn iteration does
both updates with the official ``M = (-C + u + v) / eps`` form, the plan's rows are rescaled to
their maximum (in the log domain) and each prior takes the first row of largest entry. The
batched assigner (``densedet.assign.ota``) reaches the same numbers through ``-inf`` kernel
entries instead of the penalty; this is the independent check that the two agree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from densedet.assign.reference.lla import focal
from densedet.assign.reference.simota import inside_boxes, inside_centre_squares
from densedet.boxes import box_iou

PENALTY = 1e6
IOU_EPS = float(torch.finfo(torch.float32).eps)


def sinkhorn(mu: Tensor, nu: Tensor, cost: Tensor, eps: float, iters: int) -> tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn-Knopp (the official ``SinkhornDistance``); returns ``(u, v)``."""
    u = torch.ones_like(mu)
    v = torch.ones_like(nu)

    def M(u, v):
        return (-cost + u[:, None] + v[None, :]) / eps

    for _ in range(iters):
        v = eps * (torch.log(nu + 1e-8) - torch.logsumexp(M(u, v).t(), dim=-1)) + v
        u = eps * (torch.log(mu + 1e-8) - torch.logsumexp(M(u, v), dim=-1)) + u
    return u, v


def assign(priors: Tensor, scores: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
           num_classes: int, candidate_topk: int = 20, reg_weight: float = 1.5,
           center_radius: float = 2.5, sinkhorn_eps: float = 0.1, sinkhorn_iters: int = 50,
           focal_alpha: float = 0.25, focal_gamma: float = 2.0,
           ensure_each_gt: bool = False, stal: bool = False, stal_small_side: float = 8.0,
           stal_widen_to: float = 16.0) -> dict[str, Tensor]:
    """OTA for one image with ``g`` valid objects; see ``densedet.assign.ota``."""
    from densedet.assign.reference import candidate_boxes

    # the inside test's boxes (stal widens small ones), widened in the input precision
    wide = candidate_boxes(gt_boxes, stal, stal_small_side, stal_widen_to).double()
    priors, scores, boxes, gt_boxes = (t.double() for t in (priors, scores, boxes, gt_boxes))
    A, g = priors.shape[0], gt_boxes.shape[0]
    region = inside_boxes(priors, wide, 0.01) & inside_centre_squares(priors, gt_boxes,
                                                                      center_radius)
    gt_index = torch.full((A,), -1, dtype=torch.long)
    labels = torch.full((A,), -1, dtype=torch.long)
    quality = torch.zeros(A)
    if g == 0:
        return {"gt_index": gt_index, "labels": labels, "quality": quality,
                "candidate_mask": region}

    ious = box_iou(gt_boxes, boxes)  # [g, A]
    p = scores[None].expand(g, A, num_classes)
    onehot = F.one_hot(gt_labels, num_classes).to(p.dtype)[:, None].expand(g, A, num_classes)
    pair_cost = (focal(p, onehot, focal_alpha, focal_gamma).sum(dim=-1)
                 + reg_weight * -torch.log(ious.clamp(min=IOU_EPS)))  # [g, A], unpenalised
    cost = pair_cost + PENALTY * (~region).double()
    bg_cost = focal(scores, torch.zeros_like(scores), focal_alpha, focal_gamma).sum(dim=-1)  # [A]

    # dynamic k per object over its penalty-free priors; the background supplies the rest
    k = torch.topk(ious * region, min(candidate_topk, A), dim=1).values.sum(dim=1)
    k = k.floor().clamp(min=1)
    mu = torch.cat([k, (A - k.sum()).clamp(min=0)[None]])
    nu = torch.ones(A, dtype=torch.float64)
    full_cost = torch.cat([cost, bg_cost[None]])  # [g + 1, A]
    u, v = sinkhorn(mu, nu, full_cost, sinkhorn_eps, sinkhorn_iters)

    log_plan = (-full_cost + u[:, None] + v[None, :]) / sinkhorn_eps
    rescaled = log_plan - log_plan.max(dim=1, keepdim=True).values  # pi / pi.max(dim=1)
    winner = rescaled.argmax(dim=0)  # first maximum: objects in order, background last
    local = torch.where(winner == g, -1, winner)

    if ensure_each_gt:
        owned = torch.zeros(g, dtype=torch.long)
        for j in local[local >= 0].tolist():
            owned[j] += 1
        wants = []
        for j in range(g):
            if owned[j] == 0:
                a = int(log_plan[j].argmax())
                wants.append((float(pair_cost[j, a]), j, a))
        taken = set()
        for _, j, a in sorted(wants):
            if a not in taken:
                taken.add(a)
                local[a] = j

    pos = local >= 0
    gt_index[pos] = local[pos]
    labels[pos] = gt_labels[local[pos]]
    quality[pos] = ious[local[pos], torch.nonzero(pos).flatten()].float()
    return {"gt_index": gt_index, "labels": labels, "quality": quality,
                "candidate_mask": region}
