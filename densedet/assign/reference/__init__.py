"""Plain per-image reference assigners, written from each method's definition.

They loop over images (and freely over objects) and are the oracle the batched assigners are
tested against and the baseline ``benchmarks/assign.py`` times. Never used for training.

Each method module provides ``assign(priors, scores, boxes, gt_boxes, gt_labels, num_classes,
**params) -> dict`` for ONE image with only its valid objects:
``priors [A, 4]``, ``scores [A, C]``, ``boxes [A, 4]``, ``gt_boxes [g, 4]``, ``gt_labels [g]``;
the dict holds ``gt_index [A]`` (into the g valid objects, -1 background), ``labels [A]``,
``quality [A]`` and any method-specific field, with ``[g, A]``/``[A, C]`` shapes per image.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor


def candidate_boxes(gt_boxes: Tensor, stal: bool, small_side: float = 8.0,
                    widen_to: float = 16.0) -> Tensor:
    """``[g, 4]`` boxes of the "prior centre inside the box" tests of one image: ``gt_boxes``,
    or with ``stal`` (YOLO26's small-object widening) every width / height below
    ``small_side`` set to ``widen_to`` about the box centre, box by box, side by side."""
    if not stal:
        return gt_boxes
    out = gt_boxes.clone()
    for j in range(gt_boxes.shape[0]):
        x1, y1, x2, y2 = gt_boxes[j]
        for lo, hi, col in ((x1, x2, 0), (y1, y2, 1)):
            if hi - lo < small_side:
                c = (lo + hi) / 2
                out[j, col], out[j, col + 2] = c - widen_to / 2, c + widen_to / 2
    return out


def reference_assign(name: str):
    """The per-image reference function of method ``name``."""
    return importlib.import_module(f"densedet.assign.reference.{name}").assign


def run_per_image(name: str, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor,
                  gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, num_classes: int,
                  **params) -> dict[str, Tensor]:
    """Run the reference of ``name`` image by image on a padded batch.

    Returns a dict of batched tensors with the padded layout of the batched assigners:
    ``gt_index [B, A]`` indexes the padded G axis; per-object fields ``[g, A]`` are scattered
    into ``[B, G, A]`` (zeros on padding rows); other fields are stacked.
    """
    fn = reference_assign(name)
    B, G = gt_labels.shape
    results = []
    for b in range(B):
        valid_idx = torch.nonzero(gt_valid[b], as_tuple=True)[0]
        r = fn(priors, pred_scores[b], pred_boxes[b], gt_boxes[b][valid_idx], gt_labels[b][valid_idx],
               num_classes, **params)
        gi = r["gt_index"]
        r = dict(r)
        r["gt_index"] = torch.where(gi >= 0, valid_idx[gi.clamp(min=0)] if len(valid_idx) else gi, -1)
        for k, v in list(r.items()):
            if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == len(valid_idx) \
                    and v.dim() == 2 and v.shape[1] == priors.shape[0] and k not in ("neg_weight",):
                full = torch.zeros((G, v.shape[1]), dtype=v.dtype, device=v.device)
                full[valid_idx] = v
                r[k] = full
        results.append(r)
    return {k: torch.stack([r[k] for r in results]) for k in results[0]
            if isinstance(results[0][k], Tensor)}
