"""Pieces shared by the assigners: candidate masks, class-cost split, dynamic-k selection,
conflict resolution. All batched over images and objects, free of host syncs.

Shapes: B images, G (padded) objects, A priors, C classes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from densedet.assign.base import Assignment
from densedet.boxes import box_to_distance

INF = float("inf")


def points_in_boxes(points: Tensor, gt_boxes: Tensor, eps: float = 0.0) -> Tensor:
    """Whether each point lies strictly inside each box by more than ``eps``.

    Args:
        points: ``[A, 2]`` (x, y).
        gt_boxes: ``[B, G, 4]`` xyxy.
    Returns:
        ``[B, G, A]`` bool.
    """
    ltrb = box_to_distance(points[None, None], gt_boxes[:, :, None])  # [B, G, A, 4]
    return ltrb.amin(dim=-1) > eps


def points_in_centre_region(points: Tensor, radii: Tensor, gt_boxes: Tensor,
                            clip_to_box: bool = False) -> Tensor:
    """Whether each point lies inside a square of half-size ``radii`` around each box centre.

    Args:
        points: ``[A, 2]`` (x, y).
        radii: ``[A]`` half-size of the square for each point (``radius * stride``).
        gt_boxes: ``[B, G, 4]`` xyxy.
        clip_to_box: intersect the square with the box (FCOS centre sampling).
    Returns:
        ``[B, G, A]`` bool.
    """
    centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, G, 2]
    r = radii[None, None, :, None]  # [1, 1, A, 1]
    lo = centre[:, :, None] - r  # [B, G, A, 2]
    hi = centre[:, :, None] + r
    if clip_to_box:
        lo = torch.maximum(lo, gt_boxes[:, :, None, :2])
        hi = torch.minimum(hi, gt_boxes[:, :, None, 2:])
    p = points[None, None]
    return ((p - lo).amin(dim=-1) > 0) & ((hi - p).amin(dim=-1) > 0)


def gather_gt_class_scores(pred_scores: Tensor, gt_labels: Tensor) -> Tensor:
    """Each prior's score on each object's class.

    Args:
        pred_scores: ``[B, A, C]``.
        gt_labels: ``[B, G]`` int64 (padding rows may hold any value; they are clamped).
    Returns:
        ``[B, G, A]``.
    """
    B, A, C = pred_scores.shape
    idx = gt_labels.clamp(0, C - 1)[:, None, :].expand(B, A, gt_labels.shape[1])
    return pred_scores.gather(2, idx).transpose(1, 2)


def split_class_cost(pred_scores: Tensor, gt_labels: Tensor, target: Tensor | float,
                     pair_cost: Callable[[Tensor, Tensor | float], Tensor]) -> Tensor:
    """``sum_c pair_cost(p_c, y_c)`` for a target ``y`` that is ``target`` at the object's class
    and 0 elsewhere, without materialising ``[B, G, A, C]``.

    The sum over classes splits into the all-zero-target sum per prior plus a correction at
    the object's class: ``sum_c f(p_c, 0) + f(p_g, t) - f(p_g, 0)``.

    Args:
        pred_scores: ``[B, A, C]`` probabilities.
        gt_labels: ``[B, G]``.
        target: ``[B, G, A]`` target at the object's class (or a scalar, e.g. 1 for one-hot).
        pair_cost: element-wise ``f(p, y)``, broadcasting.
    Returns:
        ``[B, G, A]``.
    """
    background = pair_cost(pred_scores, 0.0).sum(dim=-1)  # [B, A]
    p_gt = gather_gt_class_scores(pred_scores, gt_labels)  # [B, G, A]
    return background[:, None, :] + pair_cost(p_gt, target) - pair_cost(p_gt, 0.0)


def bce_cost(p: Tensor, y: Tensor | float) -> Tensor:
    """Element-wise binary cross-entropy of probabilities (log clamped at -100 like torch)."""
    y = torch.as_tensor(y, dtype=p.dtype, device=p.device).expand_as(p)
    return F.binary_cross_entropy(p, y, reduction="none")


def dynamic_k_matching(cost: Tensor, ious: Tensor, candidates: Tensor, candidate_topk: int) -> Tensor:
    """SimOTA's dynamic-k selection, batched.

    Each object takes its ``k`` cheapest candidate priors, with
    ``k = max(1, floor(sum of its candidate_topk largest IoUs over candidates))``.
    Since every IoU is at most 1, ``k <= candidate_topk``, so one fixed-size ``topk`` and a
    rank comparison replace the per-object ``topk(k)`` of the reference implementations.

    Args:
        cost: ``[B, G, A]`` pair cost (any values at non-candidates; they are never chosen).
        ious: ``[B, G, A]`` IoU of each object with each prior's prediction.
        candidates: ``[B, G, A]`` bool, pairs that may be chosen (padding rows all False).
    Returns:
        ``[B, G, A]`` bool matching before conflict resolution.
    """
    A = cost.shape[-1]
    n = min(candidate_topk, A)
    if n == 0:
        return torch.zeros_like(candidates)
    top_ious = ious.masked_fill(~candidates, 0.0).topk(n, dim=-1).values  # [B, G, n]
    k = top_ious.sum(dim=-1).floor().clamp(min=1)  # [B, G]
    masked = cost.masked_fill(~candidates, INF)
    top_cost, top_idx = masked.topk(n, dim=-1, largest=False)  # [B, G, n]
    rank = torch.arange(n, device=cost.device)
    take = (rank < k[..., None]) & torch.isfinite(top_cost)
    matched = torch.zeros_like(candidates)
    return matched.scatter(-1, top_idx, take)


def resolve_to_cheapest(matched: Tensor, cost: Tensor, gt_valid: Tensor) -> Tensor:
    """Resolve priors matched by several objects the way YOLOX/NanoDet/LLA do.

    A prior matched once keeps its object; a prior matched several times goes to the object
    with the lowest cost among *all* valid objects (the reference code takes ``min`` over the
    whole cost column, not only over the objects that chose it).

    Args:
        matched: ``[B, G, A]`` bool.
        cost: ``[B, G, A]``.
        gt_valid: ``[B, G]`` bool.
    Returns:
        ``[B, A]`` int64 object index, -1 for background.
    """
    count = matched.sum(dim=1)  # [B, A]
    single = matched.float().argmax(dim=1)
    cheapest = cost.masked_fill(~gt_valid[..., None], INF).argmin(dim=1)
    gt_index = torch.where(count > 1, cheapest, single)
    return torch.where(count > 0, gt_index, torch.full_like(gt_index, -1))


def ensure_each_gt(gt_index: Tensor, matched: Tensor, cost: Tensor) -> Tensor:
    """Give every object that was matched to some prior but lost all of them in conflict
    resolution its cheapest matched prior back.

    If two rescued objects want the same prior, the cheaper keeps it. A rescue may take the
    only positive of another object; this is rare and accepted (the option is off by default).

    Args:
        gt_index: ``[B, A]`` after conflict resolution.
        matched: ``[B, G, A]`` bool matching before conflict resolution.
        cost: ``[B, G, A]``.
    Returns:
        ``[B, A]`` int64.
    """
    B, G, A = matched.shape
    owned = F.one_hot((gt_index + 1).clamp(min=0), G + 1)[..., 1:].transpose(1, 2).bool()  # [B,G,A]
    lost = matched.any(dim=-1) & ~owned.any(dim=-1)  # [B, G]
    masked = cost.masked_fill(~matched, INF)
    best_cost, best_prior = masked.min(dim=-1)  # [B, G]
    # among lost objects wanting the same prior, the cheaper wins: rank by cost, scatter in
    # descending cost order with a deterministic reduce.
    want = torch.full((B, A), INF, device=cost.device, dtype=cost.dtype)
    want = want.scatter_reduce(1, best_prior, best_cost.masked_fill(~lost, INF), reduce="amin")
    winner = lost & (best_cost <= want.gather(1, best_prior))
    gids = torch.arange(G, device=gt_index.device).expand(B, G)
    # several objects at exactly equal cost: the lowest index wins
    pick = torch.full((B, A), G, device=gt_index.device, dtype=torch.long)
    pick = pick.scatter_reduce(1, best_prior, torch.where(winner, gids, G), reduce="amin")
    return torch.where(pick < G, pick, gt_index)


def build_assignment(gt_index: Tensor, gt_labels: Tensor, ious: Tensor, **extra) -> Assignment:
    """Fill labels and quality from the chosen object indices.

    Args:
        gt_index: ``[B, A]`` int64, -1 for background.
        gt_labels: ``[B, G]`` int64.
        ious: ``[B, G, A]`` IoU of each object with each prior's prediction.
        extra: further :class:`Assignment` fields.
    """
    pos = gt_index >= 0
    idx = gt_index.clamp(min=0)
    if gt_labels.shape[1] == 0:
        labels = torch.full_like(gt_index, -1)
        quality = torch.zeros(gt_index.shape, device=gt_index.device, dtype=ious.dtype)
    else:
        labels = torch.where(pos, gt_labels.gather(1, idx), -1)
        quality = torch.where(pos, ious.gather(1, idx[:, None]).squeeze(1), 0.0)
    return Assignment(gt_index=gt_index, labels=labels, quality=quality, **extra)
