"""One-to-one assignment for NMS-free (end-to-end) detection, batched (docs/end2end.md).

A one-to-one branch learns to fire once per object, so that inference needs no NMS; it is
trained beside the usual one-to-many head with *consistent* matching (YOLOv10's dual
assignment): the same metric as the one-to-many method, one prior per object.

``o2o`` wraps any registered method (``base``, with its parameters ``base_params``):

1. the base method runs in full on the one-to-one branch's own predictions, including its own
   conflict rule, so its positives of different objects are disjoint;
2. every object keeps, among its base positives, the prior of best *base metric* (ties →
   the lowest prior index); the others become background.

After step 1 a prior serves at most one object, so step 2 leaves each valid object at most one
prior (exactly one when the base method gave it any) and each prior at most one object: no
further conflict resolution is needed, the base method's is the conflict resolution. An object
the base method leaves without positives (lost every conflict, nothing in range) stays without.

The base metric, higher is better, of a prior ``a`` and its object ``g`` (``s``: the prior's
score on ``g``'s class; IoU: of ``a``'s predicted box with ``g``):

============  ==================================================================================
``tal``       ``s**alpha * IoU**beta`` (the alignment metric)
``simota``    ``-cost``: ``sum_c BCE(score_c, onehot_c) + iou_weight * -log(IoU + 1e-8)`` plus
              the 1e5 (1e6 with ``center_only``) penalty outside box AND centre square
``dsl``       ``-cost``: ``sum_c BCE(score_c, soft_c) * |soft_c - score_c|**2 + iou_weight *
              -log(IoU + 1e-7)`` (+ the soft centre prior when on), ``soft = IoU`` at g's class
``lla``       ``-cost``: ``sum_c focal(score_c, onehot_c) + reg_weight * -log(IoU + 1e-7)`` plus
              1e3 outside the box by the 0.01 margin
``ota``       ``-cost``: ``sum_c focal(score_c, onehot_c; focal_alpha, focal_gamma) +
              reg_weight * -log(max(IoU, eps))`` plus 1e6 outside the penalty-free region
``fcos``      the FCOS centerness of ``a`` in ``g``'s box (the rule is geometric; centerness is
              the quality FCOS ranks its positives by)
``atss``      IoU of ``a``'s anchor box (``anchor_scale * stride`` square) with ``g`` (the
              statistic ATSS selects by)
``dw``        DW's positive weight of the pair (``pos_weight``); the result has hard labels
              only (no soft weights)
============  ==================================================================================

The metrics are evaluated in float64 at the ``[B, A]`` (prior, its object) pairs only (the
per-prior class sums over all classes in float32, as the base methods compute them), so the
wrapper adds ``O(B * A)`` memory to the base method's ``B * G * A``; no host sync, no loop over
images or objects.

``tal_o2o`` is Ultralytics YOLO26's one-to-one assigner: ``o2o`` over ``tal`` with ``topk=7``
(TAL's top 7, conflicts to the highest IoU, then the top 1 by the alignment metric). YOLOv10's
(top 1 before the conflict rule) is ``tal`` with ``topk=1``.

Outputs: ``gt_index``, ``labels``, ``quality`` (the base method's, kept at the chosen priors),
``centerness`` (``fcos``) kept at the chosen priors, ``align_target`` (``tal``) recomputed over
the one-to-one positives (TAL's normalisation: the chosen prior's own IoU),
``candidate_mask`` the base method's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from densedet.assign import common
from densedet.assign.base import Assigner, Assignment
from densedet.boxes import box_iou

INF = float("inf")
#: the one-to-one wrappers themselves cannot be a base
WRAPPERS = ("o2o", "tal_o2o")


def _gather_objects(out: Assignment, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int):
    """``(pos [B, A], box [B, A, 4], label [B, A])`` of each prior's assigned object."""
    gi = out.gt_index
    B, A = gi.shape
    idx = gi.clamp(min=0)
    box = gt_boxes.gather(1, idx[..., None].expand(B, A, 4))
    label = gt_labels.gather(1, idx).clamp(0, num_classes - 1)
    return gi >= 0, box, label


def pair_metric(base: Assigner, out: Assignment, priors: Tensor, scores: Tensor, boxes: Tensor,
                gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor) -> Tensor:
    """``[B, A]`` float64 base metric of each prior with its assigned object (see the module
    docstring; meaningless on background priors). The penalties' inside-the-box tests use the
    base method's candidate boxes (widened small boxes with its ``stal`` option), the rest the
    real boxes, as the base method does."""
    # local imports of the sibling methods' helpers: the registry imports a method lazily,
    # and o2o must not pull every method in when it is not used
    name = base.name
    _, box, label = _gather_objects(out, gt_boxes, gt_labels, base.num_classes)
    cand = base.candidate_boxes(gt_boxes, gt_valid)
    cbox = box if cand is gt_boxes else _gather_objects(out, cand, gt_labels, base.num_classes)[1]
    cbox = cbox.double()
    s = scores.gather(2, label[..., None]).squeeze(-1).double()  # [B, A]
    iou = box_iou(boxes, box, aligned=True).double()  # IoU with the assigned object
    pts = priors[:, :2]

    def background(fn) -> Tensor:
        """``sum_c f(score_c, 0)`` per prior, ``[B, A]``: the float32 sum the base method
        itself computes (blocked over priors, no ``[B, A, C]`` float64 copy)."""
        return common.per_prior_class_sum(scores, fn).double()
    if name == "tal":
        from densedet.assign.tal import int_pow
        return int_pow(s, base.alpha) * int_pow(iou, base.beta)
    if name == "fcos":
        return out.centerness.double()
    if name == "atss":
        from densedet.assign.atss import anchor_boxes
        anchors = anchor_boxes(priors, base.anchor_scale).expand_as(box)
        return box_iou(anchors, box, aligned=True).double()
    if name == "dw":
        return out.pos_weight.gather(1, out.gt_index.clamp(min=0)[:, None]).squeeze(1).double()
    box = box.double()
    if name == "simota":
        cls = background(common.bce_background) + common.bce_onehot_correction(s)
        cost = cls - base.iou_weight * torch.log(iou + 1e-8)
        centre = (box[..., :2] + box[..., 2:]) / 2
        radius = (base.center_radius * priors[:, 2]).double()[:, None]  # [A, 1]
        if base.center_only:  # the square only, written as common.points_in_centre_region
            p = pts.double()
            ok = ((p > centre - radius) & (centre + radius > p)).all(dim=-1)
            return -(cost + 1e6 * (~ok).double())
        d = (pts.double() - centre).abs()  # a widened box keeps its centre
        half = (cbox[..., 2:] - cbox[..., :2]) / 2
        ok = ((d - half).amax(-1) < 0) & ((d - radius).amax(-1) < 0)  # box AND square
        return -(cost + 1e5 * (~ok).double())
    if name == "dsl":
        from densedet.assign.dsl import soft_label_background, soft_label_correction
        cls = background(soft_label_background) + soft_label_correction(s, iou)
        cost = cls - base.iou_weight * torch.log(iou + 1e-7)
        if base.soft_center_prior:
            centre = (box[..., :2] + box[..., 2:]) / 2
            dist = (pts.double() - centre).square().sum(-1).sqrt() / priors[:, 2].double()
            cost = cost + torch.pow(10.0, (dist - base.soft_center_radius).clamp(max=30.0))
        return -cost
    margin = torch.minimum(pts.double() - cbox[..., :2], cbox[..., 2:] - pts.double()).amin(-1)
    if name == "lla":
        from densedet.assign.lla import IN_BOX_MARGIN, OUTSIDE_PENALTY
        cls = (background(common.focal_background)
               + common.focal_cost(s, 1.0) - common.focal_cost(s, 0.0))
        cost = cls - base.reg_weight * torch.log(iou + 1e-7)
        return -(cost + OUTSIDE_PENALTY * (margin <= IN_BOX_MARGIN).double())
    if name == "ota":
        from densedet.assign.ota import IN_BOX_MARGIN, IOU_EPS
        a, g = base.focal_alpha, base.focal_gamma
        cls = (background(lambda p: common.focal_background(p, a, g))
               + common.focal_onehot_correction(s, 1.0, a, g))
        cost = cls - base.reg_weight * torch.log(iou.clamp(min=IOU_EPS))
        centre = (box[..., :2] + box[..., 2:]) / 2
        radius = (base.center_radius * priors[:, 2]).double()[:, None]
        p = pts.double()
        ok = (margin > IN_BOX_MARGIN) & ((p > centre - radius) & (centre + radius > p)).all(-1)
        return -(cost + 1e6 * (~ok).double())
    raise ValueError(f"o2o: no one-to-one metric for base method {name!r}")


def keep_best_per_object(gt_index: Tensor, metric: Tensor, G: int) -> Tensor:
    """``[B, A]`` bool: for every object, its prior of largest ``metric`` among the priors
    assigned to it in ``gt_index`` (ties → the lowest prior index). Two scatters over
    ``[B, A]`` into ``[B, G + 1]`` (slot G collects background); no host sync."""
    B, A = gt_index.shape
    pos = gt_index >= 0
    slot = torch.where(pos, gt_index, G)
    m = torch.where(pos, torch.nan_to_num(metric, nan=-INF), -INF)
    best = m.new_full((B, G + 1), -INF).scatter_reduce(1, slot, m, reduce="amax")
    is_best = pos & (m >= best.gather(1, slot))
    prior = torch.arange(A, device=gt_index.device).expand(B, A)
    first = torch.full((B, G + 1), A, dtype=torch.long, device=gt_index.device)
    first.scatter_reduce_(1, slot, torch.where(is_best, prior, A), reduce="amin")
    return is_best & (prior == first.gather(1, slot))


class O2OAssigner(Assigner):
    """One-to-one form of the method ``base`` (module docstring).

    Args:
        num_classes: C.
        base: a registered method (not a one-to-one wrapper); ``tal`` by default.
        base_params: its parameters (its defaults when None).
        ensure_each_gt: passed to the base method unless ``base_params`` sets it.
        small_objects: the base method's ``stal`` options (``stal``, ``stal_small_side``,
            ``stal_widen_to``) unless ``base_params`` sets them.
    """

    name = "o2o"
    # hard labels only; the base method's centerness / align_target are kept when it has them
    provides = frozenset()

    def __init__(self, num_classes: int, base: str = "tal", base_params: Optional[dict] = None,
                 ensure_each_gt: bool = False, **small_objects):
        super().__init__(num_classes)
        from densedet.assign import build_assigner  # the registry imports this module
        if base in WRAPPERS:
            raise ValueError(f"base {base!r} is already one-to-one; give a one-to-many method")
        params = dict(base_params or {})
        params.setdefault("ensure_each_gt", bool(ensure_each_gt))
        for key, value in small_objects.items():  # stal options: the base method's
            params.setdefault(key, value)
        self.base = build_assigner(base, num_classes, **params)
        self.uses_predictions = self.base.uses_predictions

    def assign(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        out = self.base.assign(priors, pred_scores, pred_boxes, gt_boxes, gt_labels, gt_valid)
        G = gt_boxes.shape[1]
        if G == 0:
            return Assignment(gt_index=out.gt_index, labels=out.labels, quality=out.quality,
                              candidate_mask=out.candidate_mask)
        metric = pair_metric(self.base, out, priors, pred_scores, pred_boxes, gt_boxes, gt_labels,
                             gt_valid)
        keep = keep_best_per_object(out.gt_index, metric, G)
        gt_index = torch.where(keep, out.gt_index, -1)
        zero = out.quality.new_zeros(())
        result = Assignment(gt_index=gt_index, labels=torch.where(keep, out.labels, -1),
                            quality=torch.where(keep, out.quality, zero),
                            candidate_mask=out.candidate_mask)
        if out.centerness is not None:
            result.centerness = torch.where(keep, out.centerness, zero)
        if out.align_target is not None:  # TAL: renormalised over the one-to-one positives
            from densedet.assign.tal import TALAssigner
            own = torch.where(keep, metric.to(out.quality.dtype), zero)
            result.align_target = TALAssigner._align_target(gt_index, own, result.quality, G)
        return result


class TALO2OAssigner(O2OAssigner):
    """YOLO26's one-to-one assigner: ``o2o`` over ``tal`` (``topk=7``, then the top 1)."""

    name = "tal_o2o"
    provides = frozenset({"align_target"})

    def __init__(self, num_classes: int, topk: int = 7, alpha: float = 1.0, beta: float = 6.0,
                 ensure_each_gt: bool = False, **small_objects):
        super().__init__(num_classes, "tal", {"topk": topk, "alpha": alpha, "beta": beta},
                         ensure_each_gt, **small_objects)
