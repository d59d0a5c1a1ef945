"""Dynamic soft label assignment (NanoDet-Plus; RTMDet with the soft centre prior).

Definition (per image):

- a prior is a *candidate* when its centre lies strictly inside ANY valid object's box;
- soft target of a pair = IoU(object, prior's predicted box) at the object's class, 0 on
  the other classes;
- pair cost over candidates, for every object:
  ``sum_c BCE(score_c, soft_c) * |soft_c - score_c|^2 + iou_weight * -log(IoU + 1e-7)``;
  with ``soft_center_prior`` (RTMDet) plus ``10 ** (d / stride - soft_center_radius)``,
  ``d`` the distance from the prior's centre to the object's centre (exponent capped at 30
  so that far priors cost 1e30 instead of overflowing to inf);
- dynamic k and conflicts exactly as SimOTA (``candidate_topk`` largest IoUs, lowest cost
  over all objects wins).

Outputs: ``quality`` is the IoU of the assigned prior's predicted box with its object (the
soft target); ``candidate_mask [B, G, A]`` is "prior centre inside this object's box", whose
union over an image's objects is the candidate set. ``ensure_each_gt`` as in SimOTA.

Computation: on a GPU (and in huge scenes, a chunk of objects at a time) every pair, a block
of priors at a time, without a host sync. On CPU (``common.use_near_pairs``: the soft
target makes the class cost per pair at any number of classes) everyday batches are first
computed on each object's *near* pairs (:meth:`DSLAssigner._assign_packed`): candidate
priors whose predicted box overlaps it. Every other candidate pair has IoU 0, so a soft
target of 0 and a cost of at least ``iou_weight * -log(1e-7)`` (the class terms and the
centre prior are >= 0), and adds nothing to dynamic k; when each object's k-th cheapest near
pair is under that, the near pairs decide exactly, else the dense path runs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from densedet.assign import common
from densedet.assign.base import Assigner, Assignment

#: cap of the soft centre prior's exponent: 10**30 is finite in float32 (max ~3.4e38).
MAX_CENTRE_EXPONENT = 30.0
IOU_EPS = 1e-7


def soft_label_cost(p: Tensor, y: Tensor | float) -> Tensor:
    """``BCE(p, y) * |y - p|^2``, element-wise (quality-focal-style weighting)."""
    scale = (p - y).square_()
    return common.bce_cost(p, y).mul_(scale)


def soft_label_background(p: Tensor) -> Tensor:
    """``sum_c BCE(p_c, 0) * p_c^2`` over the last axis (one temporary, in-place passes)."""
    return common.log1m(p).clamp_(min=-100.0).mul_(p).mul_(p).sum(dim=-1).neg_()


def soft_label_correction(p: Tensor, t: Tensor) -> Tensor:
    """``f(p, t) - f(p, 0)`` of :func:`soft_label_cost` in closed form, element-wise.

    With ``L1 = clamp(log p)``, ``L0 = clamp(log(1 - p))`` (at -100, as BCE):
    ``BCE(p, t) = -(L0 + t (L1 - L0))`` and ``f(p, 0) = -L0 p^2``. Three temporaries of
    ``p``'s size and only vectorised in-place passes (``binary_cross_entropy`` and ``pow`` are
    several times slower on CPU).
    """
    log_q = common.log1m(p).clamp_(min=-100.0)  # L0
    out = p.log().clamp_(min=-100.0).sub_(log_q).mul_(t).add_(log_q).neg_()  # BCE(p, t)
    sq = torch.sub(p, t)
    sq.mul_(sq)  # (p - t)^2
    out.mul_(sq)  # f(p, t)
    torch.mul(p, p, out=sq)
    return out.add_(log_q.mul_(sq))  # f(p, t) + L0 p^2


def soft_centre_prior(priors: Tensor, gt_boxes: Tensor, radius: float,
                      aligned: bool = False) -> Tensor:
    """RTMDet's ``10 ** (distance / stride - radius)``, ``[B, G, A]`` for ``priors [A, 4]``
    and ``gt_boxes [B, G, 4]``; ``aligned``: pair by pair, ``[P, 4]`` each -> ``[P]`` (the
    same operations, so the same floats)."""
    centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, G, 2] or [P, 2]
    if aligned:
        x, y, stride = priors[:, 0], priors[:, 1], priors[:, 2]
        cx, cy = centre[:, 0], centre[:, 1]
    else:
        x, y, stride = common.contiguous_columns(priors[:, :3])  # [A] each
        cx, cy = centre[..., 0, None], centre[..., 1, None]
    dist = (x - cx).square_()
    dist += (y - cy).square_()
    exponent = dist.sqrt_().div_(stride).sub_(radius).clamp_(max=MAX_CENTRE_EXPONENT)
    return torch.pow(10.0, exponent)


class DSLAssigner(Assigner):
    name = "dsl"

    def __init__(self, num_classes: int, candidate_topk: int = 13, iou_weight: float = 3.0,
                 soft_center_prior: bool = False, soft_center_radius: float = 3.0,
                 ensure_each_gt: bool = False,
                 **small_objects):
        super().__init__(num_classes, **small_objects)  # stal options (Assigner)
        self.candidate_topk = int(candidate_topk)
        self.iou_weight = float(iou_weight)
        self.soft_center_prior = bool(soft_center_prior)
        self.soft_center_radius = float(soft_center_radius)
        self.ensure_each_gt = bool(ensure_each_gt)
        self._workspace = common.Workspace()

    def assign(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        B, A, _ = pred_scores.shape
        if gt_boxes.shape[1] == 0:
            return common.empty_assignment(B, A, pred_scores.device)
        G = gt_boxes.shape[1]
        # padding rows contain nothing; with stal small boxes are widened (inside tests only)
        boxes = common.mask_padding_boxes(self.candidate_boxes(gt_boxes, gt_valid), gt_valid)
        padding_inf = common.row_inf(gt_valid)  # [B, G, 1]: 0, inf on padding rows
        chunks = common.object_chunks(B, G, A)
        if (common.use_near_pairs(pred_scores.device, pred_scores.shape[-1], G,
                                  per_pair_class_cost=True)
                and self.iou_weight > 0 and len(chunks) == 1):
            out = self._assign_packed(priors, pred_scores, pred_boxes, gt_boxes, gt_labels,
                                      gt_valid, boxes)
            if out is not None:
                return out
        union = None  # the image's candidates (inside any box), [B, A]
        if common.union_first(chunks, pred_scores.device, pred_scores.shape[-1], G):
            union = common.prior_any(
                lambda part, blk: common.box_margin(priors[blk, :2], boxes[:, part]).amax(1) > 0,
                chunks, B, A, pred_scores.device)
        bg = common.per_prior_class_sum(pred_scores, soft_label_background, where=union)  # [B, A]

        def pairs(part: slice, blk: slice) -> tuple[Tensor, Tensor, Tensor]:
            """Inside-box mask, cost and IoU of the objects ``part`` with the priors ``blk``."""
            margin = common.box_margin(priors[blk, :2], boxes[:, part])  # [B, g, a], > 0 inside
            # the image's candidates: cost inf elsewhere
            candidate = margin.amax(dim=1) > 0 if union is None else union[:, blk]  # [B, a]
            ious = common.pairwise_iou(pred_boxes[:, blk], gt_boxes[:, part])  # the soft target
            bg_or_inf = bg[:, blk].masked_fill(~candidate, common.INF)
            cost = common.split_class_cost(pred_scores[:, blk], gt_labels[:, part], ious,
                                           soft_label_cost, soft_label_correction, bg=bg_or_inf)
            cost.sub_(ious.add(IOU_EPS).log_(), alpha=self.iou_weight)
            if self.soft_center_prior:
                cost += soft_centre_prior(priors[blk], gt_boxes[:, part], self.soft_center_radius)
            cost += padding_inf[:, part]
            ious.mul_(candidate[:, None, :])  # only candidate IoUs count for dynamic k
            return margin > 0, cost, ious

        # every pair depends on its own prior only: computed a block of priors at a time, a
        # chunk of objects at a time (huge scenes)
        gt_index, in_box = common.cost_chunks(
            pairs, lambda cost, ious: common.select_dynamic_k(cost, ious, self.candidate_topk),
            chunks, self._workspace, (B, G, A), gt_valid, self.ensure_each_gt,
            pred_scores.dtype, pred_scores.device)
        quality = common.assigned_box_iou(pred_boxes, gt_boxes, gt_index)
        return common.build_assignment(gt_index, gt_labels, quality=quality,
                                       candidate_mask=in_box)

    def _assign_packed(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor,
                       gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor,
                       boxes: Tensor) -> Assignment | None:
        """The same rule computed on the near pairs only (CPU, one chunk of objects), or None
        when they cannot vouch for every object's k cheapest (the caller then runs the dense
        path; see the module docstring and ``common``'s "near pairs"). Costs are the dense
        path's operations in its order on the listed pairs, every other pair ``inf``."""
        B, A, _ = pred_scores.shape
        G = gt_boxes.shape[1]
        dev = pred_scores.device

        def near_costs(pred_xyxy: Tensor, gt_xyxy: Tensor) -> common.NearCosts:
            def masks(blk: slice) -> tuple[Tensor, Tensor, Tensor]:
                margin = common.box_margin(priors[blk, :2], boxes)  # [B, G, a], > 0 inside
                union = margin.amax(dim=1) > 0  # [B, a], the image's candidates
                near = common.overlap_side(pred_xyxy, gt_xyxy, blk) > 0
                return margin > 0, near.logical_and_(union[:, None]), union

            in_box, near, union = common.fill_by_prior_blocks(masks, (
                torch.empty((B, G, A), dtype=torch.bool, device=dev),
                self._workspace.get("near", (B, G, A), torch.bool, dev),
                torch.empty((B, A), dtype=torch.bool, device=dev)), rows=B * G)
            pairs = common.list_pairs(near)
            bg = common.per_prior_class_sum(pred_scores, soft_label_background, where=union)
            # the dense path's operations and order: class cost (+ bg), - w * log IoU, + centre
            score = common.pair_scores(pred_scores, gt_labels, pairs)
            iou = common.pair_iou(pred_xyxy, gt_xyxy, pairs)
            cost = soft_label_correction(score, iou)
            cost.add_(bg.view(-1).index_select(0, pairs.prior))
            cost.sub_(iou.add(IOU_EPS).log_(), alpha=self.iou_weight)
            if self.soft_center_prior:
                cost += soft_centre_prior(priors.index_select(0, pairs.a),
                                          gt_boxes.reshape(B * G, 4).index_select(0, pairs.obj),
                                          self.soft_center_radius, aligned=True)
            return common.NearCosts(in_box, pairs, cost, iou)

        bound = self.iou_weight * -math.log(IOU_EPS) - common.BOUND_SLACK
        return common.assign_near_pairs(near_costs, pred_boxes, gt_boxes, gt_labels, gt_valid,
                                        bound, self.candidate_topk, self._workspace,
                                        self.ensure_each_gt)
