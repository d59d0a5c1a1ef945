"""Per-image reference of the one-to-one wrapper (``densedet.assign.o2o``), object by object.

The base method's own per-image reference decides its positives; then, for every object, the
base metric is written out plainly (full class sums, float64) at each of its positives and
the first prior of largest metric is kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from densedet.boxes import box_iou


def _metric(base: str, params: dict, r: dict, j: int, a: int, priors: Tensor, scores: Tensor,
            boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int) -> float:
    """The base metric (higher is better) of prior ``a`` with object ``j``, from its definition."""
    from densedet.assign.reference import candidate_boxes
    from densedet.assign.reference.lla import focal

    box = gt_boxes[j].double()
    # the penalties' inside-the-box tests: the base's candidate boxes (stal widening)
    cand = candidate_boxes(gt_boxes, params.get("stal", False), params.get("stal_small_side", 8.0),
                           params.get("stal_widen_to", 16.0))[j].double()
    c = int(gt_labels[j])
    p = scores[a].double()
    s = p[c]
    iou = box_iou(boxes[a][None], gt_boxes[j][None])[0, 0].double()
    x, y, stride = (float(v) for v in priors[a, :3])
    x1, y1, x2, y2 = box.tolist()
    onehot = F.one_hot(torch.tensor(c), num_classes).double()
    if base == "tal":
        return float(s ** params.get("alpha", 1.0) * iou ** params.get("beta", 6.0))
    if base == "fcos":
        return float(r["centerness"][a])
    if base == "atss":
        half = priors[a, 2:] * params.get("anchor_scale", 8.0) / 2
        anchor = torch.cat([priors[a, :2] - half, priors[a, :2] + half])
        return float(box_iou(anchor[None], gt_boxes[j][None])[0, 0])
    if base == "dw":
        return float(r["pos_weight"][j, a])
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if base == "simota":
        cost = F.binary_cross_entropy(p, onehot, reduction="sum") \
            - params.get("iou_weight", 3.0) * torch.log(iou + 1e-8)
        rad = params.get("center_radius", 2.5) * stride
        in_square = cx - rad < x < cx + rad and cy - rad < y < cy + rad
        in_box = abs(x - cx) < (cand[2] - cand[0]) / 2 and abs(y - cy) < (cand[3] - cand[1]) / 2
        if params.get("center_only", False):
            return -float(cost + 1e6 * (not in_square))
        return -float(cost + 1e5 * (not (in_box and in_square)))
    if base == "dsl":
        soft = onehot * iou
        cost = (F.binary_cross_entropy(p, soft, reduction="none") * (soft - p) ** 2).sum() \
            - params.get("iou_weight", 3.0) * torch.log(iou + 1e-7)
        if params.get("soft_center_prior", False):
            dist = ((x - cx) ** 2 + (y - cy) ** 2) ** 0.5
            exponent = min(dist / stride - params.get("soft_center_radius", 3.0), 30.0)
            cost = cost + 10.0 ** exponent
        return -float(cost)
    margin = min(x - cand[0], y - cand[1], cand[2] - x, cand[3] - y)
    if base == "lla":
        cost = focal(p, onehot).sum() - params.get("reg_weight", 1.5) * torch.log(iou + 1e-7)
        return -float(cost + 1e3 * (margin <= 0.01))
    if base == "ota":
        alpha, gamma = params.get("focal_alpha", 0.25), params.get("focal_gamma", 2.0)
        eps = float(torch.finfo(torch.float32).eps)
        cost = focal(p, onehot, alpha, gamma).sum() \
            - params.get("reg_weight", 1.5) * torch.log(iou.clamp(min=eps))
        rad = params.get("center_radius", 2.5) * stride
        ok = margin > 0.01 and cx - rad < x < cx + rad and cy - rad < y < cy + rad
        return -float(cost + 1e6 * (not ok))
    raise ValueError(f"no one-to-one metric for {base!r}")


def assign(priors: Tensor, scores: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
           num_classes: int, base: str = "tal", base_params: dict | None = None,
           ensure_each_gt: bool = False, **small_objects) -> dict:
    """``o2o`` of ``base`` for one image with ``g`` valid objects."""
    from densedet.assign.reference import reference_assign

    params = dict(base_params or {})
    params.setdefault("ensure_each_gt", ensure_each_gt)
    for key, value in small_objects.items():
        params.setdefault(key, value)
    r = reference_assign(base)(priors, scores, boxes, gt_boxes, gt_labels, num_classes, **params)
    A = priors.shape[0]
    gt_index = torch.full((A,), -1, dtype=torch.long)
    align_target = torch.zeros(A)
    for j in range(gt_boxes.shape[0]):
        mine = (r["gt_index"] == j).nonzero().flatten().tolist()  # ascending prior index
        if not mine:
            continue
        values = [_metric(base, params, r, j, a, priors, scores, boxes, gt_boxes, gt_labels,
                          num_classes) for a in mine]
        best = max(range(len(mine)), key=lambda i: (values[i], -i))  # first of the largest
        a = mine[best]
        gt_index[a] = j
        # TAL's target over the one-to-one positives: t * IoU / (t + 1e-9)
        align_target[a] = values[best] * float(r["quality"][a]) / (values[best] + 1e-9)
    keep = gt_index >= 0
    out = {"gt_index": gt_index, "labels": torch.where(keep, r["labels"], -1),
           "quality": torch.where(keep, r["quality"], 0.0),
           "candidate_mask": r["candidate_mask"]}
    if "centerness" in r:
        out["centerness"] = torch.where(keep, r["centerness"], 0.0)
    if base == "tal":
        out["align_target"] = align_target
    return out
