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
"""
from __future__ import annotations

from torch import Tensor

from densedet.assign import common
from densedet.assign.base import Assigner, Assignment

IN_BOX_MARGIN = 0.01
OUTSIDE_PENALTY = 1e3


class LLAAssigner(Assigner):
    name = "lla"

    def __init__(self, num_classes: int, topk: int = 10, reg_weight: float = 1.5,
                 ensure_each_gt: bool = False):
        super().__init__(num_classes)
        self.topk = int(topk)
        self.reg_weight = float(reg_weight)
        self.ensure_each_gt = bool(ensure_each_gt)

    def assign(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        B, A, _ = pred_scores.shape
        if gt_boxes.shape[1] == 0:
            return common.empty_assignment(B, A, pred_scores.device)
        in_box = common.points_in_boxes(priors[:, :2], gt_boxes, eps=IN_BOX_MARGIN)
        in_box &= gt_valid[..., None]  # [B, G, A]

        ious = common.pairwise_iou(pred_boxes, gt_boxes)  # [B, G, A]
        cost = common.split_class_cost(pred_scores, gt_labels, 1.0, common.focal_cost)
        cost.sub_(ious.add(1e-7).log_(), alpha=self.reg_weight)
        cost.add_(in_box.logical_not(), alpha=OUTSIDE_PENALTY)
        # padding rows choose nothing and never win a conflict
        cost.masked_fill_(~gt_valid[..., None], common.INF)

        sel = common.select_cheapest(cost, self.topk)
        gt_index = common.resolve_selection(sel, cost, gt_valid)
        if self.ensure_each_gt:
            gt_index = common.rescue_lost(gt_index, sel)
        return common.build_assignment(gt_index, gt_labels, ious, candidate_mask=in_box)
