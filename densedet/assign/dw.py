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

Computation: on a GPU, every pair a block of priors at a time, a chunk of objects at a time
(huge scenes), with no host sync; on CPU the same rule on the list of candidate pairs only
(:meth:`DWAssigner._assign_packed`, usually 1-2 % of the pairs).
"""
from __future__ import annotations

import torch
from torch import Tensor

from densedet.assign import common
from densedet.assign.base import Assigner, Assignment
from densedet.boxes import box_iou

SUM_EPS = 1e-12
NEG_IOU = 0.5
#: exp(-80) ~ 2e-35: a candidate this far from the centre (about 12 sigma) weighs nothing.
LOG_PRIOR_MIN = -80.0


def centre_distance_sq(priors: Tensor, gt_boxes: Tensor) -> Tensor:
    """``[B, G, A]`` squared distance from each prior to each box centre, in strides."""
    centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, G, 2]
    x, y, stride_w, stride_h = common.contiguous_columns(priors)  # [A] each
    dx = (x - centre[..., 0, None]).div_(stride_w)
    dy = (y - centre[..., 1, None]).div_(stride_h)
    return dx.mul_(dx).add_(dy.mul_(dy))


def neg_iou_f(x: Tensor) -> Tensor:
    """``f(IoU) = (1 - IoU^2) / (1 - 0.5^2)`` (1 at IoU 0.5, 0 at IoU 1), in place on ``x``."""
    return x.square_().neg_().add_(1).div_(1 - NEG_IOU ** 2)


def use_packed_pairs(device: torch.device) -> bool:
    """Whether :class:`DWAssigner` works on the list of candidate pairs
    (:meth:`DWAssigner._assign_packed`): on CPU, where the host sync that lists them costs
    nothing and the pairs outside the candidates (98-99 % in everyday batches) are most of
    the dense path's time. Elsewhere the dense path, without a host sync."""
    return device.type == "cpu"


class DWAssigner(Assigner):
    """Dual-weighting assigner; see the module docstring for the exact rule."""

    name = "dw"
    provides = frozenset({"pos_weight", "neg_weight"})

    def __init__(self, num_classes: int, sigma: float = 1.11, ensure_each_gt: bool = False,
                 **small_objects):
        super().__init__(num_classes, **small_objects)  # stal options (Assigner)
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.ensure_each_gt = bool(ensure_each_gt)
        self._workspace = common.Workspace()

    def assign(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        B, A, C = pred_scores.shape
        G = gt_boxes.shape[1]
        dev, dtype = pred_scores.device, pred_scores.dtype
        # neg weight starts at score**2 (P_neg = 1); an object lowers its class's entry to
        # P_neg * score**2 by an ``amin`` scatter. Since P_neg <= 1 and score**2 >= 0,
        # min(score**2, P_1 * score**2, ...) == min(1, P_1, ...) * score**2, the min-rule.
        neg_weight = pred_scores * pred_scores  # [B, A, C]
        if G == 0:
            gt_index = torch.full((B, A), -1, dtype=torch.long, device=dev)
            return Assignment(gt_index=gt_index, labels=gt_index.clone(),
                              quality=torch.zeros((B, A), device=dev, dtype=dtype),
                              pos_weight=pred_scores.new_zeros((B, 0, A)), neg_weight=neg_weight,
                              candidate_mask=torch.zeros((B, 0, A), dtype=torch.bool, device=dev))
        # padding rows contain nothing; with stal small boxes are widened (inside tests only)
        boxes = common.mask_padding_boxes(self.candidate_boxes(gt_boxes, gt_valid), gt_valid)
        if use_packed_pairs(dev):
            return self._assign_packed(priors, pred_scores, pred_boxes, gt_boxes, gt_labels,
                                       gt_valid, boxes, neg_weight)
        log_prior_scale = -1.0 / (2 * self.sigma * self.sigma)
        labels = gt_labels.clamp(0, C - 1)
        candidates = torch.empty((B, G, A), dtype=torch.bool, device=dev)  # returned
        pos_weight = torch.empty((B, G, A), dtype=dtype, device=dev)  # returned
        # Everything of an object is decided from its own row of pairs, so the objects are
        # walked a chunk at a time (huge scenes; one chunk in everyday batches) and only the
        # chunk's scratch is kept. Across chunks: neg_weight is an order-independent minimum,
        # and each prior's winner a running best (ties: the lowest object index).
        chunks = common.object_chunks(B, G, A)
        capacity = B * (chunks[0].stop - chunks[0].start) * A
        best = common.RunningArgBest((B, A), largest=True, init=-1.0, dtype=dtype, device=dev)
        quality = torch.zeros((B, A), dtype=dtype, device=dev)
        summaries = []  # per chunk, for ensure_each_gt
        for part in chunks:
            g = part.stop - part.start
            part_boxes, part_gt, part_labels = boxes[:, part], gt_boxes[:, part], labels[:, part]
            cand, weights = candidates[:, part], pos_weight[:, part]  # views of the outputs
            ious = self._workspace.get("ious", (B, g, A), dtype, dev, capacity)
            den_terms = self._workspace.get("den_terms", (B, g, A), dtype, dev, capacity)
            # per-object maximum / minimum candidate IoU (for the P_neg min-max), over all
            # blocks; an object without candidates ends with hi 0 and lo >= 2 (no span)
            iou_hi = pred_scores.new_zeros((B, g))
            iou_lo = pred_scores.new_full((B, g), 2.0)
            blocks = common.prior_blocks(B * g, A, dev)  # see common.fill_by_prior_blocks

            # Pass 1, by blocks of priors: everything per pair (written straight into the
            # outputs and the chunk's scratch), and the per-object reductions (the e^{3t} sum,
            # the IoU range) that pass 2 needs.
            for blk in blocks:
                margin = common.box_margin(priors[blk, :2], part_boxes)  # [B, g, a]
                torch.gt(margin, 0.0, out=cand[..., blk])
                inside = margin.gt_(0.0)  # the same test as a float 0/1 (fast on CPU)
                scores = common.gather_gt_class_scores(pred_scores[:, blk], part_labels)
                iou, giou = box_iou(part_gt, pred_boxes[:, blk], mode="iou_giou")  # [B, g, a]
                ious[..., blk] = iou
                # t = s * exp(-5 (1 - GIoU)), zeroed outside the candidates: their terms are 0
                t = giou.sub_(1).mul_(5).exp_().mul_(scores).mul_(inside)
                log_prior = centre_distance_sq(priors[blk], part_gt).mul_(log_prior_scale)
                log_prior.clamp_(min=LOG_PRIOR_MIN)
                # e^{3t} * t * prior and e^{5t} * t * prior, each as one exp(kt + log prior)
                torch.mul(t.mul(3).add_(log_prior).exp_(), t, out=den_terms[..., blk])
                torch.mul(log_prior.add_(t.mul(5)).exp_(), t, out=weights[..., blk])
                # candidate IoU range; exact: iou * 1 and iou + 2 * 0 at candidates, 0 and
                # >= 2 elsewhere (IoU is in [0, 1])
                torch.maximum(iou_hi, iou.mul_(inside).amax(-1), out=iou_hi)
                torch.minimum(iou_lo, torch.add(ious[..., blk], inside.neg_().add_(1.0),
                                                alpha=2.0).amin(-1), out=iou_lo)
            den = den_terms.sum(dim=-1, keepdim=True).clamp_(min=SUM_EPS)  # [B, g, 1]
            # P_neg min-max: f decreases with IoU (rounding keeps the order), so f_min / f_max
            # over the candidates are f of the largest / smallest candidate IoU
            f_min = neg_iou_f(iou_hi[..., None])
            f_hi = neg_iou_f(iou_lo[..., None]).clamp_(max=1.0)
            span = f_hi - f_min
            ok = span > 0  # else (one candidate, equal IoUs) P_neg = 1 on the whole object
            span = torch.where(ok, span, torch.ones_like(span))
            # P_neg = min(1, (f(IoU) - f_min) / span) then, exactly: at a candidate with
            # IoU < 0.5, f > 1 >= f_hi, so the ratio is >= 1; with IoU >= 0.5, f <= f_hi and
            # it is <= 1. Outside the candidates IoU is taken as 0 (f = 4/3 > 1: ratio >= 1),
            # and objects without a span get f_min = -inf (ratio inf): P_neg = 1 for both.
            f_min = torch.where(ok, f_min, -common.INF)

            # Pass 2: normalised positive weights, P_neg, and the chunk's best object.
            top = torch.empty((B, A), dtype=dtype, device=dev)
            idx = torch.empty((B, A), dtype=torch.long, device=dev)
            top_iou = torch.empty((B, A), dtype=dtype, device=dev)
            for blk in blocks:
                inside = cand[..., blk].to(dtype)
                weight = weights[..., blk].div_(den)  # in place in the returned tensor
                iou = ious[..., blk]
                neg = neg_iou_f(iou.mul(inside)).sub_(f_min).div_(span).clamp_(max=1.0)
                scores = common.gather_gt_class_scores(pred_scores[:, blk], part_labels)
                neg.mul_(scores).mul_(scores)  # [B, g, a]
                index = part_labels[:, None, :].expand(B, neg.shape[-1], g)
                neg_weight[:, blk].scatter_reduce_(2, index, neg.transpose(1, 2), reduce="amin",
                                                   include_self=True)
                # the candidate object with the largest weight (ties: the lowest index);
                # weights are 0 outside, so weight - outside is -1 there and >= 0 inside
                top[:, blk], idx[:, blk] = weight.sub(inside.neg_().add_(1.0)).max(dim=1)
                top_iou[:, blk] = iou.gather(1, idx[:, None, blk]).squeeze(1)
            quality = torch.where(best.update(top, idx, part.start), top_iou, quality)
            if self.ensure_each_gt:
                summaries.append(common.matched_summary(cand, weights.neg()))
        gt_index = best.index
        if self.ensure_each_gt:
            any_cand, best_prior, best_cost = (torch.cat(t, dim=1) for t in zip(*summaries))
            gt_index = common.rescue_matched(gt_index, any_cand, best_prior, best_cost)
            quality = common.assigned_box_iou(pred_boxes, gt_boxes, gt_index)
        pos = gt_index >= 0
        labels_out = torch.where(pos, gt_labels.gather(1, gt_index.clamp(min=0)), -1)
        return Assignment(gt_index=gt_index, labels=labels_out,
                          quality=torch.where(pos, quality, 0.0), pos_weight=pos_weight,
                          neg_weight=neg_weight, candidate_mask=candidates)

    def _assign_packed(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor,
                       gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, boxes: Tensor,
                       neg_weight: Tensor) -> Assignment:
        """The same rule on the candidate pairs only (CPU).

        Every per-pair quantity matters at candidates only: outside, ``t`` and the positive
        weight are 0, ``P_neg`` is 1 (no change to ``score**2``) and the pair never wins. So
        after the candidate mask (the returned one), the pairs inside it are listed
        (``common.mask_pairs``, a host sync) and everything else is computed on that list,
        typically 1-2 % of the ``B * G * A`` pairs; per-object sums and ranges are segment
        reductions, per-prior winners scatters. The sums run in another order than the
        dense path's, so weights agree to rounding; ties go to the lowest object index as there.
        """
        B, A, C = pred_scores.shape
        G = gt_boxes.shape[1]
        dev = pred_scores.device
        R = B * G
        labels = gt_labels.clamp(0, C - 1)

        def inside(blk: slice) -> tuple[Tensor]:
            return (common.box_margin(priors[blk, :2], boxes) > 0,)

        candidates, = common.fill_by_prior_blocks(
            inside, (torch.empty((B, G, A), dtype=torch.bool, device=dev),), rows=R)
        rows, pa = common.mask_pairs(candidates)
        pb, pi = rows.div(G, rounding_mode="floor"), rows.remainder(G)
        pair_labels = labels[pb, pi]
        scores = pred_scores[pb, pa, pair_labels]  # [P]
        gt = gt_boxes[pb, pi]  # [P, 4]
        iou, giou = box_iou(gt, pred_boxes[pb, pa], mode="iou_giou", aligned=True)
        t = giou.sub_(1).mul_(5).exp_().mul_(scores)
        centre = (gt[:, :2] + gt[:, 2:]) / 2
        pri = priors[pa]
        dx = (pri[:, 0] - centre[:, 0]).div_(pri[:, 2])
        dy = (pri[:, 1] - centre[:, 1]).div_(pri[:, 3])
        log_prior = dx.mul_(dx).add_(dy.mul_(dy)).mul_(-1.0 / (2 * self.sigma * self.sigma))
        log_prior.clamp_(min=LOG_PRIOR_MIN)
        den_terms = t.mul(3).add_(log_prior).exp_().mul_(t)
        weight = log_prior.add_(t.mul(5)).exp_().mul_(t)
        den = pred_scores.new_zeros(R).index_add_(0, rows, den_terms).clamp_(min=SUM_EPS)
        weight.div_(den[rows])
        # P_neg min-max over each object's candidates (see the dense path for the algebra)
        iou_hi = pred_scores.new_zeros(R).scatter_reduce_(0, rows, iou, "amax")
        iou_lo = pred_scores.new_full((R,), 2.0).scatter_reduce_(0, rows, iou, "amin")
        f_min = neg_iou_f(iou_hi)
        f_hi = neg_iou_f(iou_lo).clamp_(max=1.0)
        span = f_hi - f_min
        ok = span > 0
        span = torch.where(ok, span, torch.ones_like(span))
        f_min = torch.where(ok, f_min, -common.INF)
        neg = neg_iou_f(iou.clone()).sub_(f_min[rows]).div_(span[rows]).clamp_(max=1.0)
        neg.mul_(scores).mul_(scores)
        neg_weight = neg_weight.contiguous()  # (scores of a head's permuted view are not)
        neg_weight.view(-1).scatter_reduce_(0, (pb * A + pa) * C + pair_labels, neg, "amin")
        pos_weight = pred_scores.new_zeros((B, G, A))
        pos_weight.view(-1)[rows * A + pa] = weight
        # each prior's candidate object of largest weight, ties to the lowest index
        prior_id = pb * A + pa
        top = pred_scores.new_full((B * A,), -1.0).scatter_reduce_(0, prior_id, weight, "amax")
        tie = weight == top[prior_id]
        winner = torch.full((B * A,), G, dtype=torch.long, device=dev)
        winner.scatter_reduce_(0, prior_id[tie], pi[tie], "amin")
        gt_index = torch.where(winner == G, -1, winner).view(B, A)
        if self.ensure_each_gt:
            gt_index = common.rescue_matched(gt_index, *common.matched_summary(candidates, pos_weight.neg()))
        quality = common.assigned_box_iou(pred_boxes, gt_boxes, gt_index)
        pos = gt_index >= 0
        labels_out = torch.where(pos, gt_labels.gather(1, gt_index.clamp(min=0)), -1)
        return Assignment(gt_index=gt_index, labels=labels_out, quality=quality,
                          pos_weight=pos_weight, neg_weight=neg_weight, candidate_mask=candidates)
