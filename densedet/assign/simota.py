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

Computation: on a GPU (and in huge scenes, a chunk of objects at a time) every pair, a block
of priors at a time, without a host sync. On CPU, batches with at least as many classes as
object slots (``common.use_near_pairs``) are first computed on each object's *near* pairs
(:meth:`SimOTAAssigner._assign_packed`): its penalty-free region, or a candidate prior whose
predicted box overlaps it. Every other candidate pair pays the penalty and has IoU 0, so it
costs at least ``penalty + iou_weight * -log(1e-8)`` (BCE terms are >= 0) and adds nothing
to dynamic k; when each object's k-th cheapest near pair is under that, the near pairs
decide exactly, else the dense path runs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from densedet.assign import common
from densedet.assign.base import Assigner, Assignment


IOU_EPS = 1e-8


class SimOTAAssigner(Assigner):
    name = "simota"

    def __init__(self, num_classes: int, center_radius: float = 2.5, candidate_topk: int = 10,
                 iou_weight: float = 3.0, center_only: bool = False, ensure_each_gt: bool = False,
                 **small_objects):
        super().__init__(num_classes, **small_objects)  # stal options (Assigner)
        self.center_radius = float(center_radius)
        self.candidate_topk = int(candidate_topk)
        self.iou_weight = float(iou_weight)
        self.center_only = bool(center_only)
        self.ensure_each_gt = bool(ensure_each_gt)
        self._workspace = common.Workspace()

    @property
    def penalty(self) -> float:
        """The cost added outside "box AND square" (the square alone with ``center_only``)."""
        return 1e6 if self.center_only else 1e5

    def geometry_gaps(self, priors: Tensor, gt_boxes: Tensor, gt_valid: Tensor,
                      candidate_boxes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Each object's own candidate region and the no-penalty region, as float "gaps".

        Returns:
            ``(region_gap, penalty_gap)``, ``[B, G, A]`` each: the region (box OR centre
            square; the centre square when ``center_only``) is ``region_gap < 0``, the
            penalty-free region (box AND centre square; the centre square when
            ``center_only``) is ``penalty_gap < 0``; both ``>= 0`` on padding rows. Floats
            rather than masks because float passes are several times cheaper on CPU than
            bool ones (see ``common.box_and_centre_gaps``). ``candidate_boxes``: the boxes
            of the inside-box test when they differ (``stal``); the square stays around the
            real box centre.
        """
        radii = self.center_radius * priors[:, 2]
        if self.center_only:
            region = common.points_in_centre_region(priors[:, :2], radii, gt_boxes)
            region &= gt_valid[..., None]
            gap = torch.where(region, -1.0, 1.0)
            return gap, gap.clone()
        box_gap, centre_gap = common.box_and_centre_gaps(priors[:, :2], radii, gt_boxes, gt_valid,
                                                         candidate_boxes)
        return torch.minimum(box_gap, centre_gap), torch.maximum(box_gap, centre_gap, out=box_gap)

    def assign(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        B, A, _ = pred_scores.shape
        if gt_boxes.shape[1] == 0:
            return common.empty_assignment(B, A, pred_scores.device)
        G = gt_boxes.shape[1]
        # the penalty per pair outside "box AND square": 1e5, or inf on padding rows, which
        # keeps them from choosing or winning anything
        penalty = torch.where(gt_valid, self.penalty, common.INF)[..., None]
        chunks = common.object_chunks(B, G, A)
        # the inside-box tests' boxes (widened small boxes with stal), None when they are gt_boxes
        cand_boxes = self.candidate_boxes(gt_boxes, gt_valid) if self.stal else None
        if (common.use_near_pairs(pred_scores.device, pred_scores.shape[-1], G)
                and self.iou_weight >= 0 and len(chunks) == 1):
            out = self._assign_packed(priors, pred_scores, pred_boxes, gt_boxes, gt_labels,
                                      gt_valid, cand_boxes)
            if out is not None:
                return out

        def cand(part: slice) -> Tensor | None:
            return None if cand_boxes is None else cand_boxes[:, part]

        union = None  # the image's candidates (union of the objects' regions), [B, A]
        if common.union_first(chunks, pred_scores.device, pred_scores.shape[-1], G):
            union = common.prior_any(
                lambda part, blk: self.geometry_gaps(priors[blk], gt_boxes[:, part],
                                                     gt_valid[:, part],
                                                     cand(part))[0].amin(dim=1) < 0,
                chunks, B, A, pred_scores.device)
        bg = common.per_prior_class_sum(pred_scores, common.bce_background, where=union)  # [B, A]

        def pairs(part: slice, blk: slice) -> tuple[Tensor, Tensor, Tensor]:
            """Region, cost and IoU of the objects ``part`` with the priors ``blk``,
            ``[B, g, a]``."""
            boxes = gt_boxes[:, part]
            region_gap, penalty_gap = self.geometry_gaps(priors[blk], boxes, gt_valid[:, part],
                                                         cand(part))
            # the image's candidates: cost inf elsewhere
            candidate = region_gap.amin(dim=1) < 0 if union is None else union[:, blk]  # [B, a]
            ious = common.pairwise_iou(pred_boxes[:, blk], boxes)  # [B, g, a]
            bg_or_inf = bg[:, blk].masked_fill(~candidate, common.INF)
            cost = common.split_class_cost(pred_scores[:, blk], gt_labels[:, part], 1.0,
                                           common.bce_cost, common.bce_onehot_correction,
                                           bg=bg_or_inf)
            cost.sub_(ious.add(IOU_EPS).log_(), alpha=self.iou_weight)
            # + penalty * [not (box AND square)], as a float 0/1 mask (fast on CPU)
            cost.add_(penalty_gap.ge_(0.0).mul_(penalty[:, part]))
            # only candidate IoUs count for dynamic k (and the quality of a positive is the IoU
            # of a candidate pair)
            ious.mul_(candidate[:, None, :])
            return region_gap.lt_(0.0).bool(), cost, ious

        # every pair depends on its own prior only: computed a block of priors at a time, a
        # chunk of objects at a time (huge scenes)
        gt_index, region = common.cost_chunks(
            pairs, lambda cost, ious: common.select_dynamic_k(cost, ious, self.candidate_topk),
            chunks, self._workspace, (B, G, A), gt_valid, self.ensure_each_gt,
            pred_scores.dtype, pred_scores.device)
        quality = common.assigned_box_iou(pred_boxes, gt_boxes, gt_index)
        return common.build_assignment(gt_index, gt_labels, quality=quality,
                                       candidate_mask=region)

    def _assign_packed(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor,
                       gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor,
                       cand_boxes: Tensor | None) -> Assignment | None:
        """The same rule computed on the near pairs only (CPU, one chunk of objects), or None
        when they cannot vouch for every object's k cheapest (the caller then runs the dense
        path; see the module docstring and ``common``'s "near pairs"). Costs are the dense
        path's operations in its order on the listed pairs, every other pair ``inf``."""
        B, A, _ = pred_scores.shape
        G = gt_boxes.shape[1]
        dev, dtype = pred_scores.device, pred_scores.dtype

        def near_costs(pred_xyxy: Tensor, gt_xyxy: Tensor) -> common.NearCosts:
            def masks(blk: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
                region_gap, penalty_gap = self.geometry_gaps(priors[blk], gt_boxes, gt_valid,
                                                             cand_boxes)
                union = region_gap.amin(dim=1) < 0  # [B, a], the image's candidates
                # near: penalty-free (gap < 0) or an overlap, among the candidates
                overlap = common.overlap_side(pred_xyxy, gt_xyxy, blk)
                near = torch.maximum(penalty_gap.neg(), overlap) > 0
                return region_gap < 0, penalty_gap < 0, near.logical_and_(union[:, None]), union

            region, free, near, union = common.fill_by_prior_blocks(masks, (
                torch.empty((B, G, A), dtype=torch.bool, device=dev),
                self._workspace.get("free", (B, G, A), torch.bool, dev),
                self._workspace.get("near", (B, G, A), torch.bool, dev),
                torch.empty((B, A), dtype=torch.bool, device=dev)), rows=B * G)
            pairs = common.list_pairs(near)
            bg = common.per_prior_class_sum(pred_scores, common.bce_background, where=union)
            # the dense path's operations and order: class cost (+ bg), - w * log IoU, + penalty
            score = common.pair_scores(pred_scores, gt_labels, pairs)
            cost = common.bce_onehot_correction(score, 1.0)
            cost.add_(bg.view(-1).index_select(0, pairs.prior))
            iou = common.pair_iou(pred_xyxy, gt_xyxy, pairs)
            cost.sub_(iou.add(IOU_EPS).log_(), alpha=self.iou_weight)
            penalised = free.view(-1).index_select(0, pairs.pair).logical_not_().to(dtype)
            cost.add_(penalised.mul_(self.penalty))
            return common.NearCosts(region, pairs, cost, iou)

        bound = self.penalty + self.iou_weight * -math.log(IOU_EPS) - common.BOUND_SLACK
        return common.assign_near_pairs(near_costs, pred_boxes, gt_boxes, gt_labels, gt_valid,
                                        bound, self.candidate_topk, self._workspace,
                                        self.ensure_each_gt)
