"""ATSS assignment (Zhang et al. 2020, mmdet's ``ATSSAssigner``), batched.

For every object:
1. on every level, the ``k = min(topk, level size)`` priors whose centres are closest
   (Euclidean distance) to the box centre are candidates;
2. each candidate's anchor box is an ``anchor_scale * stride`` square centred on the prior;
   its IoU with the object is computed;
3. threshold = mean + std of the candidate IoUs, std being the *unbiased* one (divide by n-1)
   like ``torch.std``/mmdet; with a single candidate the std is taken as 0 (instead of NaN);
4. a candidate is positive when its IoU >= threshold and its centre lies inside the box by
   more than 0.01 on every side (mmdet's ``min(l,t,r,b) > 0.01``).
A prior positive for several objects goes to the one with the highest anchor IoU (ties →
lowest object index). ``quality`` is the IoU of the *prediction* with the assigned object.

Distance ties between candidates at the k-th place are broken by ``torch.topk``; the
reference uses the same call on the same values.
"""
from __future__ import annotations

import torch
from torch import Tensor

from densedet.assign import common
from densedet.assign.base import Assigner, Assignment
from densedet.boxes import box_iou

NEG_INF = float("-inf")
INF = float("inf")
INSIDE_EPS = 0.01


def anchor_boxes(priors: Tensor, anchor_scale: float) -> Tensor:
    """``[A, 4]`` xyxy squares of side ``anchor_scale * stride`` centred at each prior."""
    half = priors[:, 2:] * (anchor_scale / 2)
    return torch.cat([priors[:, :2] - half, priors[:, :2] + half], dim=-1)


def nearest_per_level(centre_dist: Tensor, segments: list[tuple[int, int]], topk: int) -> Tensor:
    """Indices of the ``min(topk, size)`` nearest priors of every level.

    Args:
        centre_dist: ``[B, G, A]`` distance of each prior to each object centre.
        segments: ``(start, size)`` of each level.
    Returns:
        ``[B, G, K]`` int64 prior indices, ``K = sum(min(topk, size))``; unique per row.
    """
    out = []
    for start, size in segments:  # a loop over pyramid levels (3-5), not over data
        k = min(topk, size)
        idx = centre_dist[..., start:start + size].topk(k, dim=-1, largest=False).indices
        out.append(idx + start)
    return torch.cat(out, dim=-1)


def mean_plus_std(values: Tensor) -> Tensor:
    """``[..., n]`` -> ``[...]`` mean + unbiased std (std 0 when n == 1)."""
    n = values.shape[-1]
    mean = values.mean(dim=-1)
    if n < 2:
        return mean
    return mean + values.std(dim=-1, correction=1)


class ATSSAssigner(Assigner):
    """Adaptive training sample selection; see the module docstring for the exact rule."""

    name = "atss"
    uses_predictions = False

    def __init__(self, num_classes: int, topk: int = 9, anchor_scale: float = 8.0,
                 ensure_each_gt: bool = False, **small_objects):
        super().__init__(num_classes, **small_objects)  # stal options (Assigner)
        if not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        if anchor_scale <= 0:
            raise ValueError(f"anchor_scale must be > 0, got {anchor_scale!r}")
        self.topk = topk
        self.anchor_scale = float(anchor_scale)
        self.ensure_each_gt = bool(ensure_each_gt)
        self._layout = common.LevelLayout()

    def __repr__(self) -> str:  # the base repr lists every attribute; hide the caches
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"

    def assign(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        B, A, _ = pred_scores.shape
        G = gt_boxes.shape[1]
        dev = priors.device
        candidates = torch.zeros((B, G, A), dtype=torch.bool, device=dev)  # returned
        if G == 0 or A == 0:
            gt_index = torch.full((B, A), -1, dtype=torch.long, device=dev)
            return common.build_assignment(gt_index, gt_labels, quality=pred_boxes.new_zeros(
                (B, A)), candidate_mask=candidates)
        segments = self._layout.segments(priors)
        points = priors[:, :2]
        x, y = common.contiguous_columns(points)  # [A] each
        anchors = anchor_boxes(priors, self.anchor_scale)
        # Per object, only its K candidates matter ([B, G, K]); the [B, g, A] centre distances
        # they are picked from are built a chunk of objects at a time (huge scenes).
        chunk_cand = []
        for part in common.object_chunks(B, G, A):
            centres = (gt_boxes[:, part, :2] + gt_boxes[:, part, 2:]) / 2  # [B, g, 2]
            # sqrt(dx^2 + dy^2): the same floats as the [B, g, A, 2] pow(2).sum(-1) form
            dist = torch.sub(x, centres[..., 0, None]).square_()
            dist += torch.sub(y, centres[..., 1, None]).square_()
            chunk_cand.append(nearest_per_level(dist.sqrt_(), segments, self.topk))
            del dist
        cand = torch.cat(chunk_cand, dim=1)  # [B, G, K]
        del chunk_cand
        K = cand.shape[-1]

        cand_iou = box_iou(anchors[cand], gt_boxes[:, :, None, :], aligned=True)  # [B, G, K]
        threshold = mean_plus_std(cand_iou)  # [B, G]
        cand_points = points[cand]  # [B, G, K, 2]
        inside_boxes = self.candidate_boxes(gt_boxes, gt_valid)  # gt_boxes unless stal
        margin = torch.cat([cand_points - inside_boxes[:, :, None, :2],
                            inside_boxes[:, :, None, 2:] - cand_points], dim=-1).amin(dim=-1)
        positive = (cand_iou >= threshold[..., None]) & (margin > INSIDE_EPS) & gt_valid[..., None]

        # each prior's positive of highest anchor IoU (ties: the lowest object index), from
        # the sparse [B, G*K] positives: the best value per prior, then the lowest object
        # holding it (a candidate appears once per object)
        flat_prior = cand.reshape(B, G * K)
        value = cand_iou.masked_fill(~positive, NEG_INF).reshape(B, G * K)
        best = torch.full((B, A), NEG_INF, dtype=value.dtype, device=dev)
        best.scatter_reduce_(1, flat_prior, value, reduce="amax")
        gids = torch.arange(G, device=dev).repeat_interleave(K).expand(B, G * K)
        holds = positive.reshape(B, G * K) & (value == best.gather(1, flat_prior))
        gt_index = torch.full((B, A), G, dtype=torch.long, device=dev)
        gt_index.scatter_reduce_(1, flat_prior, torch.where(holds, gids, G), reduce="amin")
        gt_index = torch.where(gt_index < G, gt_index, -1)
        if self.ensure_each_gt:
            # per object, its positive of highest anchor IoU (cost -IoU), the lowest prior
            # index on ties, as a min over the object's row of priors takes the first
            low = torch.where(positive, -cand_iou, INF)
            best_cost = low.amin(dim=-1)  # [B, G]
            best_prior = torch.where(positive & (low == best_cost[..., None]), cand, A).amin(-1)
            gt_index = common.rescue_matched(gt_index, positive.any(dim=-1),
                                             best_prior.clamp_(max=A - 1), best_cost)

        candidates.scatter_(-1, cand, gt_valid[..., None].expand_as(cand))
        quality = common.assigned_box_iou(pred_boxes, gt_boxes, gt_index)
        return common.build_assignment(gt_index, gt_labels, quality=quality,
                                       candidate_mask=candidates)
