"""SimOTA (YOLOX): dynamic-k matching on a classification + IoU cost.

Definition (per image, the form of the original YOLOX release):

- a prior is a *candidate* when its centre lies inside ANY valid object's box or inside the
  square of half-size ``center_radius * stride`` around ANY valid object's centre (YOLOX's
  ``fg_mask``: the union over objects);
- pair cost over candidates, for every object:
  ``sum_c BCE(score_c, onehot_c) + iou_weight * -log(IoU + 1e-8)
  + 1e5 * [not (centre inside this box AND inside this object's centre square)]``,
  IoU between the object and the prior's predicted box;
- every object takes its ``k`` cheapest candidates,
  ``k = max(1, floor(sum of its candidate_topk largest IoUs over the candidates))``;
- a prior taken by several objects goes to the object of lowest cost over all objects.

``center_only=True`` is the later YOLOX form: candidates and the geometric test use the centre
square only and the penalty is 1e6. YOLOX uses it with ``center_radius=1.5`` (pass it; the
default 2.5 belongs to the original form).

The square uses the prior's ``stride_w`` for both axes (priors are square in practice).

Outputs: ``quality`` is the IoU of the assigned prior's predicted box with its object;
``candidate_mask [B, G, A]`` is each object's own region (box OR centre square; the square
with ``center_only``), whose union over an image's objects is the candidate set.
``ensure_each_gt=True``: an object that took priors but lost all of them to cheaper objects
gets its cheapest one back (see ``common.rescue_lost``).
"""
from __future__ import annotations

from torch import Tensor

from densedet.assign import common
from densedet.assign.base import Assigner, Assignment


class SimOTAAssigner(Assigner):
    name = "simota"

    def __init__(self, num_classes: int, center_radius: float = 2.5, candidate_topk: int = 10,
                 iou_weight: float = 3.0, center_only: bool = False, ensure_each_gt: bool = False):
        super().__init__(num_classes)
        self.center_radius = float(center_radius)
        self.candidate_topk = int(candidate_topk)
        self.iou_weight = float(iou_weight)
        self.center_only = bool(center_only)
        self.ensure_each_gt = bool(ensure_each_gt)

    def geometry(self, priors: Tensor, gt_boxes: Tensor, gt_valid: Tensor) -> tuple[Tensor, Tensor]:
        """Each object's own candidate region and the no-penalty region.

        Returns:
            region ``[B, G, A]`` bool (box OR centre square; centre square when
            ``center_only``), penalty-free ``[B, G, A]`` bool (box AND centre square; centre
            square when ``center_only``); both False on padding rows.
        """
        radii = self.center_radius * priors[:, 2]
        valid = gt_valid[..., None]
        if self.center_only:
            in_centre = common.points_in_centre_region(priors[:, :2], radii, gt_boxes) & valid
            return in_centre, in_centre.clone()
        in_box, in_centre = common.box_and_centre_masks(priors[:, :2], radii, gt_boxes)
        in_box &= valid
        in_centre &= valid
        return in_box | in_centre, in_box.logical_and_(in_centre)

    def assign(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        B, A, _ = pred_scores.shape
        if gt_boxes.shape[1] == 0:
            return common.empty_assignment(B, A, pred_scores.device)
        region, no_penalty = self.geometry(priors, gt_boxes, gt_valid)
        candidate = region.any(dim=1, keepdim=True)  # [B, 1, A] the image's candidate priors

        ious = common.pairwise_iou(pred_boxes, gt_boxes)  # [B, G, A]
        cost = common.split_class_cost(pred_scores, gt_labels, 1.0, common.bce_cost,
                                       common.bce_onehot_correction, common.bce_background)
        cost.sub_(ious.add(1e-8).log_(), alpha=self.iou_weight)
        cost.add_(no_penalty.logical_not_(), alpha=1e6 if self.center_only else 1e5)
        del no_penalty

        # In place: only candidate pairs of valid objects are ever read again (the quality of
        # a positive is the IoU of a candidate pair).
        common.mask_non_candidates(cost, ious, candidate, gt_valid)
        sel = common.select_dynamic_k(cost, ious, self.candidate_topk)
        gt_index = common.resolve_selection(sel, cost, gt_valid)
        if self.ensure_each_gt:
            gt_index = common.rescue_lost(gt_index, sel)
        return common.build_assignment(gt_index, gt_labels, ious, candidate_mask=region)
