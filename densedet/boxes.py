"""Box formats and the IoU family: the one place densedet converts or compares boxes.

Formats:
- ``xyxy``: (x1, y1, x2, y2), the project-wide convention.
- ``cxcywh``: (centre x, centre y, width, height).
- ``xywh``: (x1, y1, width, height), COCO's format.
- ``ltrb``: distances (left, top, right, bottom) from a point to a box's sides.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert as _tv_box_convert

EPS = 1e-7


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert ``[..., 4]`` boxes between ``xyxy``, ``cxcywh`` and ``xywh``."""
    if in_fmt == out_fmt:
        return boxes.clone()
    shape = boxes.shape
    return _tv_box_convert(boxes.reshape(-1, 4), in_fmt, out_fmt).reshape(shape)


def box_area(boxes: Tensor) -> Tensor:
    """``[..., 4] xyxy`` -> ``[...]`` area; degenerate (inverted) boxes have area 0."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_to_distance(points: Tensor, boxes: Tensor) -> Tensor:
    """Distances from points to box sides.

    Args:
        points: ``[..., 2]`` (x, y).
        boxes: ``[..., 4]`` xyxy, broadcastable against ``points``.
    Returns:
        ``[..., 4]`` (left, top, right, bottom); negative where the point is outside.
    """
    left_top = points - boxes[..., :2]
    right_bottom = boxes[..., 2:] - points
    return torch.cat([left_top, right_bottom], dim=-1)


def distance_to_box(points: Tensor, distances: Tensor) -> Tensor:
    """``[..., 2]`` points and ``[..., 4]`` ltrb distances -> ``[..., 4]`` xyxy boxes."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def box_iou(boxes1: Tensor, boxes2: Tensor, mode: str = "iou", aligned: bool = False,
            eps: float = EPS) -> Tensor:
    """IoU or GIoU between xyxy boxes, batched.

    torchvision's ``box_iou``/``generalized_box_iou`` are 2-D only ([N,4] x [M,4]); the
    assigners need leading batch dimensions and element-wise pairs, and degenerate boxes
    must give 0 rather than NaN, so this one function covers all of those cases.

    Args:
        boxes1: ``[..., N, 4]`` xyxy (``[..., 4]`` when ``aligned``).
        boxes2: ``[..., M, 4]`` xyxy (``[..., 4]`` when ``aligned``, broadcastable).
        mode: ``"iou"``, ``"giou"``, or ``"iou_giou"`` for the tuple ``(iou, giou)`` from one
            pass (GIoU computes the IoU on the way; the values equal the two separate calls).
        aligned: compare element-wise instead of all pairs.
    Returns:
        ``[..., N, M]`` (pairwise) or ``[...]`` (aligned); IoU in [0, 1], GIoU in [-1, 1].
    """
    if mode not in ("iou", "giou", "iou_giou"):
        raise ValueError(f"box_iou mode must be 'iou', 'giou' or 'iou_giou', got {mode!r}")
    if not aligned:
        return _pairwise_iou(boxes1, boxes2, mode, eps)
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = (area1 + area2 - inter).clamp(min=eps)
    iou = inter / union
    if mode == "iou":
        return iou
    enclose_wh = (torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
                  - torch.minimum(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    enclose = (enclose_wh[..., 0] * enclose_wh[..., 1]).clamp(min=eps)
    giou = iou - (enclose - union) / enclose
    return (iou, giou) if mode == "iou_giou" else giou


def _pairwise_iou(boxes1: Tensor, boxes2: Tensor, mode: str, eps: float) -> Tensor:
    """The pairwise case of :func:`box_iou`, ``[..., N, 4]`` x ``[..., M, 4]`` -> ``[..., N, M]``.

    Same arithmetic, element for element, as the aligned formula on broadcast ``[..., N, M, 2]``
    corners, but one coordinate at a time on ``[..., N, M]`` tensors (with ``boxes2``'s
    coordinates made contiguous rows) and in place: on CPU the trailing size-2 broadcasts
    and fresh temporaries made the assigners' ``[B, G, A]`` IoU several times slower.
    """
    coords2 = boxes2.transpose(-1, -2).contiguous()  # [..., 4, M]
    x11, y11, x12, y12 = (boxes1[..., i, None] for i in range(4))  # [..., N, 1]
    x21, y21, x22, y22 = (coords2[..., i, None, :] for i in range(4))  # [..., 1, M]
    area1 = box_area(boxes1)[..., :, None]
    area2 = box_area(boxes2)[..., None, :]
    w = torch.minimum(x12, x22).sub_(torch.maximum(x11, x21)).clamp_(min=0)
    h = torch.minimum(y12, y22).sub_(torch.maximum(y11, y21)).clamp_(min=0)
    inter = w.mul_(h)
    union = (area1 + area2).sub_(inter).clamp_(min=eps)
    iou = inter.div_(union)  # inter is not needed any more
    if mode == "iou":
        return iou
    ew = torch.maximum(x12, x22).sub_(torch.minimum(x11, x21)).clamp_(min=0)
    eh = torch.maximum(y12, y22).sub_(torch.minimum(y11, y21)).clamp_(min=0)
    enclose = ew.mul_(eh).clamp_(min=eps)
    penalty = torch.sub(enclose, union, out=union).div_(enclose)  # (enclose - union) / enclose
    if mode == "iou_giou":
        return iou, iou - penalty
    return iou.sub_(penalty)


def clip_boxes(boxes: Tensor, height: int | float, width: int | float) -> Tensor:
    """Clip ``[..., 4]`` xyxy boxes to an image of the given size."""
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
