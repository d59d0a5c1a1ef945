"""Loss functions of the dense detectors, element-wise.

Every function takes tensors and returns the loss per element (``reduction="none"``, the
default) so that a head can weight, mask and normalise it the way its paper does; pass
``reduction="sum"`` or ``"mean"`` for the plain reductions. Losses are computed in float32
whatever the input dtype: under autocast, ``log`` and ``exp`` of half-precision logits lose
the small differences the losses are made of.

Shapes: ``[...]`` is any leading shape; ``C`` classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss as _tv_sigmoid_focal_loss

from densedet.boxes import box_iou

EPS = 1e-7

__all__ = ["bce_with_logits", "distribution_focal_loss", "iou_loss", "l1_loss",
           "quality_focal_loss", "reduce_loss", "sigmoid_focal_loss", "varifocal_loss"]


def reduce_loss(loss: Tensor, reduction: str = "none") -> Tensor:
    """``"none"`` (as is), ``"sum"`` or ``"mean"``."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def _dense_target(logits: Tensor, label: Tensor | None, score: Tensor) -> Tensor:
    """``[..., C]`` soft target: ``score`` at the ``label`` class (label -1 = background ->
    all zeros), or ``score`` itself when it is already dense (``label is None``)."""
    if label is None:
        if score.shape != logits.shape:
            raise ValueError(f"dense score must match logits {tuple(logits.shape)}, got {tuple(score.shape)}")
        return score.float()
    C = logits.shape[-1]
    pos = label >= 0
    # one_hot refuses -1; background rows get class 0 and are zeroed by ``pos``.
    onehot = F.one_hot(label.clamp(min=0).long(), C).float() * pos[..., None]
    return onehot * score.float()[..., None]


def bce_with_logits(logits: Tensor, targets: Tensor, reduction: str = "none") -> Tensor:
    """Binary cross-entropy on logits, element-wise, in float32."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return reduce_loss(loss, reduction)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """Focal loss (RetinaNet): ``-α_t (1 - p_t)^γ log p_t``, element-wise.

    Args:
        logits: ``[..., C]``.
        targets: ``[..., C]`` in {0, 1} (soft targets are accepted and follow the same formula).
        alpha: weight of positives (``1 - alpha`` for negatives); ``alpha < 0`` disables it.
    """
    loss = _tv_sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma,
                                  reduction="none")
    return reduce_loss(loss, reduction)


def quality_focal_loss(logits: Tensor, label: Tensor | None, score: Tensor, beta: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """Quality focal loss (GFL): ``BCE(σ(x), y) · |y - σ(x)|^β`` with a soft target ``y``.

    The target is the quality (IoU) ``score`` at the object's class and 0 elsewhere, so a
    negative's loss is ``BCE(x, 0) · σ(x)^β``.

    Args:
        logits: ``[..., C]``.
        label: ``[...]`` int64 class, -1 for background; or None when ``score`` is a dense
            ``[..., C]`` target (TAL / DSL style soft labels).
        score: ``[...]`` quality in [0, 1] of the labelled class (or ``[..., C]`` if dense).
    Returns:
        ``[..., C]`` (reduced if asked).
    """
    x = logits.float()
    target = _dense_target(x, label, score)
    modulator = (target - x.sigmoid()).abs().pow(beta)
    loss = F.binary_cross_entropy_with_logits(x, target, reduction="none") * modulator
    return reduce_loss(loss, reduction)


def varifocal_loss(logits: Tensor, target_score: Tensor, label: Tensor | None = None,
                   alpha: float = 0.75, gamma: float = 2.0, reduction: str = "none") -> Tensor:
    """Varifocal loss (VarifocalNet): ``BCE(σ(x), q) · w`` with ``w = q`` where ``q > 0``
    (positives weighted by their own quality) and ``w = α σ(x)^γ`` where ``q = 0``.

    Args:
        logits: ``[..., C]``.
        target_score: dense ``[..., C]`` target ``q`` when ``label`` is None, else ``[...]``
            quality of the labelled class.
        label: optional ``[...]`` int64 class, -1 for background.
    Returns:
        ``[..., C]`` (reduced if asked).
    """
    x = logits.float()
    q = _dense_target(x, label, target_score)
    # Asymmetric: only negatives are down-weighted (focal-style, gradient flows through
    # sigma(x)^gamma as in focal loss); positives keep their full, quality-scaled weight.
    weight = torch.where(q > 0, q, alpha * x.sigmoid().pow(gamma))
    loss = F.binary_cross_entropy_with_logits(x, q, reduction="none") * weight
    return reduce_loss(loss, reduction)


def iou_loss(pred: Tensor, target: Tensor, mode: str = "iou", eps: float = EPS,
             reduction: str = "none") -> Tensor:
    """IoU-family box loss between aligned xyxy boxes.

    Modes: ``"iou"`` ``1 - IoU``; ``"giou"`` ``1 - GIoU``; ``"iou_sq"`` ``1 - IoU²`` (YOLOX's
    IoU loss); ``"log_iou"`` ``-log IoU`` (UnitBox / FCOS), IoU clamped at ``eps``.

    Args:
        pred, target: ``[..., 4]`` xyxy.
    Returns:
        ``[...]`` (reduced if asked).
    """
    pred, target = pred.float(), target.float()
    if mode == "giou":
        loss = 1.0 - box_iou(pred, target, mode="giou", aligned=True, eps=eps)
    elif mode in ("iou", "iou_sq", "log_iou"):
        iou = box_iou(pred, target, mode="iou", aligned=True, eps=eps)
        if mode == "iou":
            loss = 1.0 - iou
        elif mode == "iou_sq":
            loss = 1.0 - iou.pow(2)
        else:
            loss = -iou.clamp(min=eps).log()
    else:
        raise ValueError(f"iou_loss mode must be 'iou', 'giou', 'iou_sq' or 'log_iou', got {mode!r}")
    return reduce_loss(loss, reduction)


def l1_loss(pred: Tensor, target: Tensor, reduction: str = "none") -> Tensor:
    """``|pred - target|``, element-wise, in float32."""
    return reduce_loss((pred.float() - target.float()).abs(), reduction)


def distribution_focal_loss(pred_dist_logits: Tensor, target_distance: Tensor, reg_max: int,
                            reduction: str = "none") -> Tensor:
    """Distribution focal loss (GFL): cross-entropy towards the two bins around the target.

    A distance ``y`` in ``[0, reg_max]`` with neighbours ``yl = floor(y)``, ``yr = yl + 1``:
    ``-( (yr - y) log P(yl) + (y - yl) log P(yr) )`` with ``P = softmax(logits)``.

    Args:
        pred_dist_logits: ``[..., reg_max + 1]`` logits over the bins 0..reg_max.
        target_distance: ``[...]`` distance in bin units (distance / stride); clamped to
            ``[0, reg_max)`` so that the right neighbour is always a bin.
        reg_max: the largest bin.
    Returns:
        ``[...]`` (reduced if asked).
    """
    if pred_dist_logits.shape[-1] != reg_max + 1:
        raise ValueError(f"expected {reg_max + 1} bins, got {pred_dist_logits.shape[-1]}")
    logp = pred_dist_logits.float().log_softmax(dim=-1)
    y = target_distance.float().clamp(min=0, max=reg_max - 1e-4)
    left = y.floor().long()
    right = left + 1
    w_left = right.float() - y
    w_right = y - left.float()
    loss = -(logp.gather(-1, left[..., None]).squeeze(-1) * w_left
             + logp.gather(-1, right[..., None]).squeeze(-1) * w_right)
    return reduce_loss(loss, reduction)


# --- DW (dual weighting, Li et al., CVPR 2022) ------------------------------------------------

def _log_one_minus_joint(cls_logits: Tensor, obj_logits: Tensor, floor: float = 1e-30) -> Tensor:
    """``log(1 - σ(a)·σ(b))`` without cancellation: ``1 - σ(a)σ(b) = σ(-a) + σ(a)σ(-b)``.

    The floor keeps the value (and, through the clamp's zero gradient, the gradient) finite
    when both logits saturate.
    """
    a, b = cls_logits, obj_logits
    return (torch.sigmoid(-a) + torch.sigmoid(a) * torch.sigmoid(-b)).clamp(min=floor).log()


def dw_loss(cls_logits: Tensor, obj_logits: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
            gt_labels: Tensor, gt_valid: Tensor, pos_weight: Tensor, neg_prob: Tensor,
            pos_cls_weight: float = 0.25, box_weight: float = 1.25,
            neg_cls_weight: float = 1.0) -> tuple[dict[str, Tensor], Tensor]:
    """The DW detection loss on the joint score ``s = σ(cls)·σ(centerness)``.

    With ``N`` the number of objects in the batch, ``w`` the assigner's pair weights and
    ``P`` its probability of being a negative (both treated as constants)::

        pos_cls = 0.25 · Σ_{g,a} w[g,a] · (−log s[a, c_g])                 / max(N, 1)
        box     = 1.25 · Σ_{g,a} w[g,a] · (1 − GIoU(box_a, gt_g))          / max(N, 1)
        neg_cls =        Σ_{a,c} P[a,c] · s[a,c]² · (−log(1 − s[a,c]))     / max(Σ(1 − P), 1)

    The constants are those of the official implementation: it scales both positive terms by
    0.25 and writes the box term as ``BCE(exp(−5·GIoU loss), 1) = 5·GIoU loss``, hence 1.25.
    ``s²`` in the negative term is *not* detached (it is a focal-style modulating factor, as
    in the official code); ``P`` and ``w`` are.

    Args:
        cls_logits: ``[B, A, C]``.
        obj_logits: ``[B, A]`` centerness logits.
        pred_boxes: ``[B, A, 4]`` xyxy.
        gt_boxes: ``[B, G, 4]`` xyxy; gt_labels ``[B, G]``; gt_valid ``[B, G]`` bool.
        pos_weight: ``[B, G, A]`` positive pair weights (0 outside an object's candidates).
        neg_prob: ``[B, A, C]`` P_neg in [0, 1] (1 where a prior is a plain negative).
    Returns:
        ``({"pos_cls", "box", "neg_cls"}, N)``, the terms already weighted and normalised.
    """
    x, o = cls_logits.float(), obj_logits.float()
    B, A, C = x.shape
    G = gt_boxes.shape[1]
    w = (pos_weight.float() * gt_valid[..., None]).detach()  # [B, G, A]; padding never counts
    num_obj = gt_valid.sum().float()
    pos_norm = num_obj.clamp(min=1.0)

    # −log s at each object's class, gathered to [B, G, A] (never [B, G, A, C]).
    log_s = F.logsigmoid(x) + F.logsigmoid(o)[..., None]  # [B, A, C]
    idx = gt_labels.clamp(0, C - 1)[:, None, :].expand(B, A, G)
    log_s_gt = log_s.gather(2, idx).transpose(1, 2)  # [B, G, A]
    pos_cls = -(w * log_s_gt).sum() / pos_norm

    giou_loss = iou_loss(pred_boxes[:, None], gt_boxes[:, :, None], mode="giou")  # [B, G, A]
    box = (w * giou_loss).sum() / pos_norm

    p = neg_prob.float().detach()
    s = torch.sigmoid(x) * torch.sigmoid(o)[..., None]
    neg = (p * s.pow(2) * -_log_one_minus_joint(x, o[..., None])).sum()
    neg_cls = neg / (1.0 - p).sum().clamp(min=1.0)
    terms = {"pos_cls": pos_cls_weight * pos_cls, "box": box_weight * box,
             "neg_cls": neg_cls_weight * neg_cls}
    return terms, num_obj


__all__ += ["dw_loss"]
