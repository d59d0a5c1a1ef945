"""Dual-weighting assignment (DW, Li et al., CVPR 2022), batched.

Candidates of an object: priors whose centre lies strictly inside its box. Each candidate gets
a fixed Gaussian centre prior

    prior = exp(max(-(dx**2 + dy**2) / (2 * sigma**2), -80)),
    dx = (prior_x - box_centre_x) / stride_w,  dy = (prior_y - box_centre_y) / stride_h,

i.e. the distance to the box centre measured in the prior's own strides (AutoAssign's centre
prior with zero mean and a fixed, class-independent ``sigma``), floored at e^-80 ~ 2e-35 (12
sigma): the floor changes no weight that matters, keeps ``exp`` off its slow underflow path
on CPU, and makes "largest pos weight" well defined far from the centre instead of a tie
of underflowed zeros.

Positive weights (``pos_weight [B, G, A]``): with ``s`` the score on the object's class,
``q = exp(-5 * (1 - GIoU(pred, object)))`` and ``t = s * q``,

    w_pos = e^{5t} * t * prior / max(sum_over_candidates e^{3t} * t * prior, 1e-12)

on candidates, 0 elsewhere (the 5/3 exponents are the official code's).

Negative weights (``neg_weight [B, A, C]``): ``P_neg * score**2`` for every class, where
``P_neg = 1`` except on an object's class at its candidates. There, with
``f(IoU) = (1 - IoU**2) / (1 - 0.5**2)`` (1 at IoU 0.5, 0 at IoU 1):
``P_neg = 1`` for IoU < 0.5, otherwise ``(f - f_min) / (f_hi - f_min)`` where ``f_min`` and
``f_max`` are taken over all of the object's candidates and ``f_hi = min(1, f_max)``
(the official min-max normalisation); when ``f_hi <= f_min`` (one candidate, or equal IoUs)
``P_neg = 1`` (the official code's ``eps / eps``).
A prior inside several boxes of the same class takes the smallest of their ``P_neg`` (the
least negative reading: a prediction that matches any of them well is not a negative). This
rule is order-independent, unlike the official code's last-object-wins overwrite.

Hard assignment for the contract fields: a prior inside at least one valid box is assigned to
the candidate object with the largest ``pos_weight`` (ties → lowest object index), even when
that weight is 0; ``labels``/``quality`` follow (quality = IoU of prediction and object).
Objects without candidates get no weight and no prior.
"""
from __future__ import annotations

import torch
from torch import Tensor

from densedet.assign import common
from densedet.assign.base import Assigner, Assignment
from densedet.assign.fcos import apply_ensure_each_gt, object_slices
from densedet.assign.tal import class_scores_bag
from densedet.boxes import box_iou

SUM_EPS = 1e-12
NEG_IOU = 0.5
#: exp(-80) ~ 2e-35: a candidate this far from the centre (about 12 sigma) weighs nothing.
LOG_PRIOR_MIN = -80.0


def centre_distance_sq(priors: Tensor, gt_boxes: Tensor) -> Tensor:
    """``[B, G, A]`` squared distance from each prior to each box centre, in strides."""
    centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, G, 2]
    dx = (priors[:, 0] - centre[..., 0, None]).div_(priors[:, 2])
    dy = (priors[:, 1] - centre[..., 1, None]).div_(priors[:, 3])
    return dx.mul_(dx).add_(dy.mul_(dy))


def positive_weights(t: Tensor, dist_sq: Tensor, outside: Tensor, sigma: float) -> Tensor:
    """``[B, G, A]`` DW positive weights; 0 outside the candidates. Consumes ``t`` and
    ``dist_sq`` (modified in place).

    ``e^{5t} * prior`` is evaluated as one ``exp(5t + log prior)`` (and likewise for the
    ``e^{3t}`` denominator): one exponential per pair instead of two. With ``t`` zeroed
    outside the candidates their terms are exactly 0, so no further masking is needed.
    """
    t.masked_fill_(outside, 0.0)
    log_prior = dist_sq.mul_(-1.0 / (2 * sigma * sigma)).clamp_(min=LOG_PRIOR_MIN)
    den = t.mul(3).add_(log_prior).exp_().mul_(t).sum(dim=-1, keepdim=True).clamp_(min=SUM_EPS)
    return log_prior.add_(t.mul(5)).exp_().mul_(t).div_(den)


def negative_probability(ious: Tensor, outside: Tensor) -> Tensor:
    """``[B, G, A]`` P_neg of each prior for each object (1 outside its candidates).

    ``f = (1 - IoU^2) / 0.75`` decreases with IoU (and rounding keeps that order), so the
    per-object ``f_min``/``f_max`` over candidates are ``f`` of the largest/smallest candidate
    IoU: two reductions of IoU and ``f`` on ``[B, G, 1]`` instead of two masked copies of f.
    """
    def f_of(x: Tensor) -> Tensor:  # (1 - x^2) / 0.75, in place on one new tensor
        return x.square().neg_().add_(1).div_(1 - NEG_IOU ** 2)

    f_min = f_of(ious.masked_fill(outside, -1.0).amax(dim=-1, keepdim=True))
    f_max = f_of(ious.masked_fill(outside, 2.0).amin(dim=-1, keepdim=True))
    f_hi = f_max.clamp(max=1.0)
    span = f_hi - f_min
    ok = span > 0
    p = f_of(ious).sub_(f_min).div_(torch.where(ok, span, torch.ones_like(span)))
    keep_one = (ious < NEG_IOU).logical_or_(outside).logical_or_(~ok)
    return p.masked_fill_(keep_one, 1.0)


class DWAssigner(Assigner):
    """Dual-weighting assigner; see the module docstring for the exact rule."""

    name = "dw"

    def __init__(self, num_classes: int, sigma: float = 1.11, ensure_each_gt: bool = False):
        super().__init__(num_classes)
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.ensure_each_gt = bool(ensure_each_gt)

    def assign(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        B, A, C = pred_scores.shape
        G = gt_boxes.shape[1]
        dev = priors.device
        # every object slice below writes its rows, so no initialisation is needed
        pos_weight = torch.empty((B, G, A), device=dev)
        candidates = torch.empty((B, G, A), dtype=torch.bool, device=dev)
        # neg weight starts at score**2 (P_neg = 1); an object lowers its class's entry to
        # P_neg * score**2 by an ``amin`` scatter. Since P_neg <= 1 and score**2 >= 0,
        # min(score**2, P_1 * score**2, ...) == min(1, P_1, ...) * score**2, the min-rule.
        neg_weight = pred_scores.square()  # [B, A, C]
        # running winner per prior over the object slices: the largest pos weight; a later
        # slice must beat it strictly, so ties keep the lowest object index
        best = torch.full((B, A), -1.0, device=dev)
        gt_index = torch.full((B, A), -1, dtype=torch.long, device=dev)
        quality = torch.zeros((B, A), device=dev)
        all_scores = class_scores_bag(pred_scores, gt_labels)  # [B, A, G]
        labels = gt_labels.clamp(0, C - 1)
        for part in object_slices(B, G, A):
            boxes = gt_boxes[:, part]
            inside = common.points_in_boxes(priors[:, :2], boxes)
            inside &= gt_valid[:, part, None]  # [B, g, A]
            outside = ~inside
            # one strided copy: scores are read three times below, and the transposed view
            # reads one cache line per element
            scores = all_scores[:, :, part].transpose(1, 2).contiguous()  # [B, g, A]
            t = box_iou(boxes, pred_boxes, mode="giou").sub_(1).mul_(5).exp_().mul_(scores)
            weight = positive_weights(t, centre_distance_sq(priors, boxes), outside, self.sigma)
            del t
            ious = box_iou(boxes, pred_boxes)
            neg = negative_probability(ious, outside).mul_(scores).mul_(scores)  # [B, g, A]
            index = labels[:, None, part].expand(B, A, neg.shape[1])
            neg_weight.scatter_reduce_(2, index, neg.transpose(1, 2), reduce="amin",
                                       include_self=True)

            part_best, part_idx = weight.masked_fill(outside, -1.0).max(dim=1)  # [B, A]
            better = part_best > best
            best = torch.where(better, part_best, best)
            gt_index = torch.where(better, part_idx + part.start, gt_index)
            quality = torch.where(better, ious.gather(1, part_idx[:, None]).squeeze(1), quality)
            pos_weight[:, part] = weight
            candidates[:, part] = inside
        if self.ensure_each_gt and G:
            gt_index = apply_ensure_each_gt(gt_index, candidates, -pos_weight)
            quality = self._assigned_iou(gt_index, pred_boxes, gt_boxes)
        pos = gt_index >= 0
        labels_out = (torch.where(pos, gt_labels.gather(1, gt_index.clamp(min=0)), -1) if G
                      else torch.full_like(gt_index, -1))
        return Assignment(gt_index=gt_index, labels=labels_out,
                          quality=torch.where(pos, quality, 0.0), pos_weight=pos_weight,
                          neg_weight=neg_weight, candidate_mask=candidates)

    @staticmethod
    def _assigned_iou(gt_index: Tensor, pred_boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        B, A = gt_index.shape
        box = gt_boxes.gather(1, gt_index.clamp(min=0)[..., None].expand(B, A, 4))
        return box_iou(pred_boxes, box, aligned=True)
