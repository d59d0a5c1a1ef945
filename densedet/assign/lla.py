"""LLA, loss-aware label assignment (crowded-scene pedestrians; the precursor of SimOTA).

Definition (per image):

- pair cost over ALL priors, for every object:
  ``sum_c focal(score_c, onehot_c; alpha=0.25, gamma=2) + reg_weight * -log(IoU_ltrb + 1e-7)
  + 1e3 * [min(l, t, r, b) of the prior centre to the box <= 0.01]``;
- every object takes its ``topk`` cheapest priors (fixed k, every level; priors outside the
  box only get in when the box holds fewer than ``topk`` cheap ones);
- a prior taken by several objects goes to the object of lowest cost over all objects.

IoU from l, t, r, b distances: with the prediction and the object both written as distances
``(l, t, r, b)`` from the prior centre, the overlap along x is ``min(l1, l2) + min(r1, r2)``
(the same as ``min(x2) - max(x1)``, whatever the signs: negative distances, i.e. a prior
outside a box, are exact, not clamped), clamped at 0 when the intervals do not overlap, and
areas are ``(l + r) * (t + b)`` clamped at 0 for inverted boxes. The prior centre cancels, so
this is exactly the xyxy IoU of the two boxes and is computed by ``densedet.boxes.box_iou``
(union clamped at 1e-7: a zero-area pair has IoU 0, never NaN). The original code adds 1 to
intersection and union (pixel-unit smoothing); we use ``+1e-7`` inside the log instead, as
DSL does, so the cost does not depend on the image scale.
The focal term is written on probabilities with logs clamped at -100 (no NaN at 0 or 1).

Outputs: ``quality`` is the IoU of the assigned prior's predicted box with its object;
``candidate_mask [B, G, A]`` is the penalty-free region (centre inside the box by more than
0.01); every prior is eligible. ``ensure_each_gt`` as in SimOTA.

Computation: on a GPU (and in huge scenes, a chunk of objects at a time) every pair, a block
of priors at a time, without a host sync. On CPU, batches with at least as many classes as
object slots (``common.use_near_pairs``) are computed on each object's *near* pairs only
(:meth:`LLAAssigner._assign_packed`): priors inside the box or whose predicted box overlaps
the object, 2.4 % of the pairs in the benchmark's B16 G20 scene. Any other pair costs at
least ``OUTSIDE_PENALTY + reg_weight * -log(1e-7)`` (the penalty, an IoU of 0, and a class
cost that is a sum of non-negative focal terms), so when each object's ``topk`` cheapest
near pairs all cost less than that, they are its ``topk`` cheapest pairs of all; when some
object's are not (a tiny object few predictions touch), the call falls back to the dense
computation. The class sum over the background classes is then needed at the near priors
only.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from densedet.assign import common
from densedet.assign.base import Assigner, Assignment

IN_BOX_MARGIN = 0.01
OUTSIDE_PENALTY = 1e3
IOU_EPS = 1e-7


class LLAAssigner(Assigner):
    name = "lla"

    def __init__(self, num_classes: int, topk: int = 10, reg_weight: float = 1.5,
                 ensure_each_gt: bool = False,
                 **small_objects):
        super().__init__(num_classes, **small_objects)  # stal options (Assigner)
        self.topk = int(topk)
        self.reg_weight = float(reg_weight)
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
        if (common.use_near_pairs(pred_scores.device, pred_scores.shape[-1], G)
                and self.reg_weight >= 0 and len(common.object_chunks(B, G, A)) == 1):
            out = self._assign_packed(priors, pred_scores, pred_boxes, gt_boxes, gt_labels,
                                      gt_valid, boxes)
            if out is not None:
                return out
        bg = common.per_prior_class_sum(pred_scores, common.focal_background)  # [B, A]
        # the penalty per pair outside the box; inf on padding rows, which keeps them from
        # choosing or winning anything
        penalty = common.row_inf(gt_valid, OUTSIDE_PENALTY)  # [B, G, 1]

        def pairs(part: slice, blk: slice) -> tuple[Tensor, Tensor]:
            """Penalty-free mask and cost of the objects ``part`` with the priors ``blk``."""
            margin = common.box_margin(priors[blk, :2], boxes[:, part])  # [B, g, a]
            in_box = margin > IN_BOX_MARGIN
            ious = common.pairwise_iou(pred_boxes[:, blk], gt_boxes[:, part])  # [B, g, a]
            cost = common.split_class_cost(pred_scores[:, blk], gt_labels[:, part], 1.0,
                                           common.focal_cost, common.focal_onehot_correction,
                                           bg=bg[:, blk])
            cost.sub_(ious.add_(IOU_EPS).log_(), alpha=self.reg_weight)
            # + penalty * [not inside by the margin], as a float 0/1 mask (fast on CPU)
            cost.add_(margin.le_(IN_BOX_MARGIN).mul_(penalty[:, part]))
            return in_box, cost

        # every pair depends on its own prior only: computed a block of priors at a time, a
        # chunk of objects at a time (huge scenes); the IoU of a positive is recomputed at
        # the end, so no [B, G, A] IoU is kept
        gt_index, in_box = common.cost_chunks(
            pairs, lambda cost: common.select_cheapest(cost, self.topk),
            common.object_chunks(B, G, A), self._workspace, (B, G, A), gt_valid,
            self.ensure_each_gt, pred_scores.dtype, pred_scores.device, extras=())
        quality = common.assigned_box_iou(pred_boxes, gt_boxes, gt_index)
        return common.build_assignment(gt_index, gt_labels, quality=quality,
                                       candidate_mask=in_box)

    def _assign_packed(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor,
                       gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor,
                       boxes: Tensor) -> Assignment | None:
        """The same rule computed on the near pairs only (CPU, one chunk of objects), or None
        when they cannot vouch for every object's ``topk`` (the caller then runs the dense
        path; see the module docstring for the bound and ``common``'s "near pairs").

        A pair is near when the prior is inside the (candidate) box by the margin or the
        predicted box overlaps the object (which every IoU > 0 needs). Costs are the dense
        path's operations in its order on the listed pairs, every other pair ``inf``.
        """
        B, A, _ = pred_scores.shape
        G = gt_boxes.shape[1]
        dev, dtype = pred_scores.device, pred_scores.dtype

        def near_costs(pred_xyxy: Tensor, gt_xyxy: Tensor) -> common.NearCosts:
            def masks(blk: slice) -> tuple[Tensor, Tensor]:
                margin = common.box_margin(priors[blk, :2], boxes)  # [B, G, a]
                in_box = margin > IN_BOX_MARGIN
                # near: margin > 0.01 or an overlap, as one comparison of floats
                overlap = common.overlap_side(pred_xyxy, gt_xyxy, blk)
                return in_box, torch.maximum(margin.sub_(IN_BOX_MARGIN), overlap) > 0

            in_box, near = common.fill_by_prior_blocks(masks, (
                torch.empty((B, G, A), dtype=torch.bool, device=dev),
                self._workspace.get("near", (B, G, A), torch.bool, dev)), rows=B * G)
            pairs = common.list_pairs(near)
            near_prior = torch.zeros(B * A, dtype=torch.bool, device=dev)
            near_prior.index_fill_(0, pairs.prior, True)
            bg = common.per_prior_class_sum(pred_scores, common.focal_background,
                                            where=near_prior.view(B, A))
            # the dense path's operations and order: class cost (+ bg), - reg * log IoU,
            # + penalty
            score = common.pair_scores(pred_scores, gt_labels, pairs)
            cost = common.focal_onehot_correction(score, 1.0)
            cost.add_(bg.view(-1).index_select(0, pairs.prior))
            iou = common.pair_iou(pred_xyxy, gt_xyxy, pairs)
            cost.sub_(iou.add_(IOU_EPS).log_(), alpha=self.reg_weight)
            outside = in_box.view(-1).index_select(0, pairs.pair).logical_not_().to(dtype)
            cost.add_(outside.mul_(OUTSIDE_PENALTY))
            return common.NearCosts(in_box, pairs, cost, None)

        bound = OUTSIDE_PENALTY + self.reg_weight * -math.log(IOU_EPS) - common.BOUND_SLACK
        return common.assign_near_pairs(near_costs, pred_boxes, gt_boxes, gt_labels, gt_valid,
                                        bound, self.topk, self._workspace, self.ensure_each_gt)
