"""Per-image reference of ``tal_o2o`` (YOLO26's one-to-one TAL): ``o2o`` over ``tal``."""
from __future__ import annotations

from torch import Tensor

from densedet.assign.reference.o2o import assign as o2o_assign


def assign(priors: Tensor, scores: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
           num_classes: int, topk: int = 7, alpha: float = 1.0, beta: float = 6.0,
           ensure_each_gt: bool = False, **small_objects) -> dict:
    return o2o_assign(priors, scores, boxes, gt_boxes, gt_labels, num_classes, base="tal",
                      base_params={"topk": topk, "alpha": alpha, "beta": beta},
                      ensure_each_gt=ensure_each_gt, **small_objects)
