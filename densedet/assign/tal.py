"""Task-aligned assignment (TOOD; PP-YOLOE and Ultralytics YOLOv8 use it), batched.

For every object and every prior whose centre lies strictly inside the box (by more than
1e-9, Ultralytics' margin), the alignment metric is ``t = s**alpha * IoU**beta`` with ``s`` the
prior's score on the object's class and IoU that of the prior's predicted box with the object.
The object keeps its ``topk`` largest ``t`` among those priors, written as a rank comparison:
``t >= (its topk-th largest t)`` and ``t > 0`` (mmdet's ``metric > 0``), so exact ties at
the k-th place are all kept instead of being cut by an arbitrary sort order.
A prior chosen by several objects goes to the one, among those that chose it, whose IoU with
the prediction is highest (ties → lowest object index).

Extra output ``align_target [B, A]``: per object, ``t * max_pos(IoU) / (max_pos(t) + 1e-9)``
over the object's final positives, i.e. the alignment metric scaled so that the object's best
positive gets the object's best IoU (the soft classification target of TOOD/YOLOv8).

Differences from Ultralytics' ``TaskAlignedAssigner``: plain IoU instead of CIoU in ``t``, and
conflicts are resolved among the objects that chose the prior (mmdet) rather than over every
object whose box contains it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from densedet.assign import common
from densedet.assign.base import Assigner, Assignment
from densedet.boxes import box_iou

INSIDE_EPS = 1e-9
NORM_EPS = 1e-9


def int_pow(x: Tensor, exponent: float) -> Tensor:
    """``x ** exponent``; by repeated multiplication when the exponent is a small
    non-negative integer (``iou ** 6`` through ``pow`` costs a log and an exp per element)."""
    if exponent == 1.0:
        return x
    if float(exponent).is_integer() and 0 <= exponent <= 16:
        n = int(exponent)
        result = torch.ones_like(x) if n == 0 else None
        base = x
        while n:
            if n & 1:
                result = base if result is None else result * base
            n >>= 1
            if n:
                base = base * base
        return result
    return x.pow(exponent)


def topk_threshold(metric: Tensor, k: int) -> Tensor:
    """``[B, G, 1]`` threshold ``th = max(k-th largest value of the row, smallest positive
    float)``: ``metric >= th`` is then ``metric >= kth and metric > 0`` (as ``metric > 0`` iff
    ``metric >= nextafter(0, 1)``), one comparison instead of three bool passes."""
    k = min(k, metric.shape[-1])
    if k == 0:
        return metric.new_full((*metric.shape[:-1], 1), common.INF)
    kth = common.row_topk(metric, k)[0][..., -1:]  # [B, G, 1]
    tiny = torch.nextafter(metric.new_zeros(()), metric.new_ones(()))
    return torch.maximum(kth, tiny)


class TALAssigner(Assigner):
    """Task-aligned assigner; see the module docstring for the exact rule."""

    name = "tal"
    provides = frozenset({"align_target"})

    def __init__(self, num_classes: int, topk: int = 13, alpha: float = 1.0, beta: float = 6.0,
                 ensure_each_gt: bool = False,
                 **small_objects):
        super().__init__(num_classes, **small_objects)  # stal options (Assigner)
        if not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        self.topk = topk
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.ensure_each_gt = bool(ensure_each_gt)
        self._workspace = common.Workspace()

    def assign(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        B, A, _ = pred_scores.shape
        G = gt_boxes.shape[1]
        dev, dtype = pred_scores.device, pred_scores.dtype
        if G == 0:
            gt_index = torch.full((B, A), -1, dtype=torch.long, device=dev)
            zeros = torch.zeros((B, A), device=dev, dtype=dtype)
            return self._result(gt_index, gt_labels, zeros, zeros.clone(),
                                torch.zeros((B, 0, A), dtype=torch.bool, device=dev))
        # padding rows contain nothing, so their metric is 0 and they never choose a prior
        # padding rows contain nothing; with stal small boxes are widened (inside tests only)
        boxes = common.mask_padding_boxes(self.candidate_boxes(gt_boxes, gt_valid), gt_valid)
        candidates = torch.empty((B, G, A), dtype=torch.bool, device=dev)  # returned
        chunks = common.object_chunks(B, G, A)
        capacity = B * (chunks[0].stop - chunks[0].start) * A
        # each prior's winner so far: the highest IoU among the objects that chose it, over
        # the chunks of objects (ties: the lowest index), and its metric
        best = common.RunningArgBest((B, A), largest=True, init=-1.0, dtype=dtype, device=dev)
        own_metric = torch.zeros((B, A), dtype=dtype, device=dev)
        summaries = []  # per chunk, for ensure_each_gt
        for part in chunks:
            g = part.stop - part.start

            # Pass 1, by blocks of priors (see common.fill_by_prior_blocks): candidates, IoU
            # and the alignment metric, 0 outside the candidates.
            def pass1(blk: slice, part=part) -> tuple[Tensor, ...]:
                margin = common.box_margin(priors[blk, :2], boxes[:, part])  # [B, g, a]
                inside = margin > INSIDE_EPS
                ious = box_iou(gt_boxes[:, part], pred_boxes[:, blk])  # [B, g, a]
                # scores on the objects' classes (gathered along the class axis, then one
                # contiguous transposed copy: a strided operand makes the kernels scalar)
                scores = common.gather_gt_class_scores(pred_scores[:, blk], gt_labels[:, part])
                metric = int_pow(scores, self.alpha) * int_pow(ious, self.beta)
                metric.mul_(margin.gt_(INSIDE_EPS))  # * float 0/1: exact, faster than masked_fill
                return inside, ious, metric

            _, ious, metric = common.fill_by_prior_blocks(pass1, (
                candidates[:, part],
                self._workspace.get("ious", (B, g, A), dtype, dev, capacity),
                self._workspace.get("metric", (B, g, A), dtype, dev, capacity)), rows=B * g)
            # chosen = metric >= (the object's topk-th largest) and metric > 0, i.e. one test
            # against max(kth, the smallest positive float)
            kth = topk_threshold(metric, self.topk)  # [B, g, 1]

            # Pass 2: among the objects that chose a prior, the highest IoU wins (ties: the
            # lowest index)
            def pass2(blk: slice, metric=metric, ious=ious, kth=kth) -> tuple[Tensor, ...]:
                metric_blk, iou = metric[..., blk], ious[..., blk]
                chosen = metric_blk.clone().ge_(kth)  # float 0/1 (a bool result is slower)
                # IoU where chosen, -1 elsewhere (exact: iou * 1 + 0 and iou * 0 + (-1))
                top, idx = torch.addcmul(chosen - 1, iou, chosen).max(dim=1)  # [B, a]
                return top, idx, metric_blk.gather(1, idx[:, None]).squeeze(1)

            top, idx, top_metric = common.fill_by_prior_blocks(pass2, (
                torch.empty((B, A), dtype=dtype, device=dev),
                torch.empty((B, A), dtype=torch.long, device=dev),
                torch.empty((B, A), dtype=dtype, device=dev)), rows=B * g)
            better = best.update(top, idx, part.start)
            own_metric = torch.where(better, top_metric, own_metric)
            if self.ensure_each_gt:  # the object's chosen prior of highest IoU, per object
                summaries.append(common.matched_summary(metric >= kth, ious.neg()))
        gt_index = best.index
        if self.ensure_each_gt:
            any_chosen, best_prior, best_cost = (torch.cat(t, dim=1) for t in zip(*summaries))
            gt_index = common.rescue_matched(gt_index, any_chosen, best_prior, best_cost)
            best_iou, own_metric = self._recompute_owned(gt_index, priors, pred_scores,
                                                         pred_boxes, gt_boxes, gt_labels)
            quality = torch.where(gt_index >= 0, best_iou, 0.0)
        else:
            quality = torch.where(gt_index >= 0, best.value, 0.0)
        align_target = self._align_target(gt_index, own_metric, quality, G)
        return self._result(gt_index, gt_labels, quality, align_target, candidates)

    def _recompute_owned(self, gt_index: Tensor, priors: Tensor, pred_scores: Tensor,
                         pred_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor):
        """IoU and metric of each prior with its (possibly rescued) object, ``[B, A]`` each
        (0 for background)."""
        iou = common.assigned_box_iou(pred_boxes, gt_boxes, gt_index)
        label = gt_labels.gather(1, gt_index.clamp(min=0)).clamp(0, pred_scores.shape[-1] - 1)
        score = pred_scores.gather(2, label[..., None]).squeeze(-1)
        metric = int_pow(score, self.alpha) * int_pow(iou, self.beta)
        return iou, torch.where(gt_index >= 0, metric, 0.0)

    @staticmethod
    def _align_target(gt_index: Tensor, own_metric: Tensor, own_iou: Tensor, G: int) -> Tensor:
        """``[B, A]`` metric normalised per object so its best positive gets its best IoU.

        The per-object maxima over its positives are ``scatter_reduce`` over ``[B, A]``
        (slot G collects background), so no ``[B, G, A]`` tensor is needed.
        """
        B, A = gt_index.shape
        slot = torch.where(gt_index >= 0, gt_index, G)
        zeros = own_metric.new_zeros((B, G + 1))
        best_metric = zeros.scatter_reduce(1, slot, own_metric, reduce="amax", include_self=True)
        best_iou = zeros.scatter_reduce(1, slot, own_iou, reduce="amax", include_self=True)
        scale = best_iou / (best_metric + NORM_EPS)  # [B, G + 1]
        target = own_metric * scale.gather(1, slot)
        return torch.where(gt_index >= 0, target, torch.zeros_like(target))

    @staticmethod
    def _result(gt_index: Tensor, gt_labels: Tensor, quality: Tensor, align_target: Tensor,
                candidates: Tensor) -> Assignment:
        pos = gt_index >= 0
        if gt_labels.shape[1] == 0:
            labels = torch.full_like(gt_index, -1)
        else:
            labels = torch.where(pos, gt_labels.gather(1, gt_index.clamp(min=0)), -1)
        # the contract's fields, filled like common.build_assignment does (quality is
        # already the IoU with the assigned object, gathered on the fly above)
        return Assignment(gt_index=gt_index, labels=labels, quality=quality,
                          align_target=align_target, candidate_mask=candidates)
