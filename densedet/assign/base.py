"""The assigner contract: the ``Assignment`` result and the ``Assigner`` base class."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Assignment:
    """What an assigner decided for every prior of every image.

    Attributes:
        gt_index: ``[B, A]`` int64 index into G of the assigned object, -1 for background.
        labels: ``[B, A]`` int64 class of the assigned object, -1 for background.
        quality: ``[B, A]`` float IoU of the prediction with its object (0 for background).
        pos_weight: soft positive weights where the method defines them (DW: ``[B, G, A]``).
        neg_weight: soft negative weights where the method defines them (DW: ``[B, A, C]``).
        centerness: ``[B, A]`` FCOS centerness target of positives (0 for background).
        align_target: ``[B, A]`` TAL alignment target normalised per object (0 for background).
        candidate_mask: ``[B, G, A]`` bool, priors each object could have taken (for
            pictures and diagnostics; None when the method has no such notion).
    """

    gt_index: Tensor
    labels: Tensor
    quality: Tensor
    pos_weight: Optional[Tensor] = None
    neg_weight: Optional[Tensor] = None
    centerness: Optional[Tensor] = None
    align_target: Optional[Tensor] = None
    candidate_mask: Optional[Tensor] = None

    @property
    def pos_mask(self) -> Tensor:
        """``[B, A]`` bool, priors assigned to an object."""
        return self.gt_index >= 0

    def to(self, device: torch.device | str) -> "Assignment":
        kw = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
              for f in fields(self)}
        return Assignment(**kw)


# Soft weights change what a loss optimises: a head that ignores them would train another
# method under this one's name, so a method that provides them needs a head that reads them.
SOFT_WEIGHTS = frozenset({"pos_weight", "neg_weight"})


def trains_with(head_needs: frozenset[str], provides: frozenset[str]) -> bool:
    """Whether a head whose loss needs the Assignment fields ``head_needs`` can train with a
    method that fills ``provides``: every needed field is there, and any soft weights the
    method defines are read by the head."""
    return head_needs <= provides and (provides & SOFT_WEIGHTS) <= head_needs


def widen_small_boxes(boxes: Tensor, valid: Tensor | None, small_side: float,
                      widen_to: float) -> Tensor:
    """YOLO26's STAL widening: each side (width, height) of a box shorter than ``small_side``
    becomes ``widen_to`` about the box centre, ``x1 = cx - widen_to / 2``,
    ``x2 = cx + widen_to / 2`` with ``cx = (x1 + x2) / 2`` (likewise y); other sides and rows
    where ``valid`` is False are kept. ``boxes [..., 4]`` xyxy, ``valid [...]`` bool or None.
    A new tensor; shapes are kept (no host sync)."""
    lo, hi = boxes[..., :2], boxes[..., 2:]
    centre = (lo + hi) / 2
    small = (hi - lo) < small_side
    if valid is not None:
        small &= valid[..., None]
    half = widen_to / 2
    return torch.cat([torch.where(small, centre - half, lo),
                      torch.where(small, centre + half, hi)], dim=-1)


class Assigner:
    """Base class: validates shapes, runs ``assign`` in float32 without autograd.

    Subclasses implement :meth:`assign` with the same arguments; the base makes every
    method cost-compute in float32 even under autocast (costs like -log(IoU) and 1e5
    penalties lose the ordering in half precision) and never builds a graph.

    Every method whose candidates are "prior centre inside the box" (fcos, atss, simota, dsl,
    lla, dw, tal, ota) takes the keyword options ``stal=False, stal_small_side=8.0,
    stal_widen_to=16.0`` (small-object widening for candidate selection only, see
    :meth:`candidate_boxes` and docs/design.md); the others accept them only as defaults.
    """

    name: str = ""
    #: whether the method reads predictions (the dynamic ones) or only geometry.
    uses_predictions: bool = True
    #: the optional :class:`Assignment` fields this method fills (beyond gt_index, labels,
    #: quality); heads declare what they need and compatibility follows (:func:`trains_with`).
    provides: frozenset[str] = frozenset()

    def __init__(self, num_classes: int, *, stal: bool = False, stal_small_side: float = 8.0,
                 stal_widen_to: float = 16.0):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        # small-object widening (YOLO26's STAL), for candidate selection only; see
        # :meth:`candidate_boxes`. Off by default (results unchanged).
        if not 0 < float(stal_small_side) <= float(stal_widen_to):
            raise ValueError("need 0 < stal_small_side <= stal_widen_to, got "
                             f"{stal_small_side!r}, {stal_widen_to!r}")
        self.stal = bool(stal)
        self.stal_small_side = float(stal_small_side)
        self.stal_widen_to = float(stal_widen_to)

    def candidate_boxes(self, gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
        """The boxes of the "prior centre inside the box" tests (candidate selection).

        With ``stal`` off: ``gt_boxes`` itself (the same tensor, so results are bit-identical).
        With ``stal`` on (YOLO26's small-target-aware assignment): :func:`widen_small_boxes`,
        every side of a valid box shorter than ``stal_small_side`` px is set to
        ``stal_widen_to`` px about the box centre. IoUs, costs, centre distances, targets and
        labels always use the real ``gt_boxes``; assigners call this from ``assign`` (so a
        wrapper calling ``base.assign`` gets it too).
        """
        if not self.stal:
            return gt_boxes
        return widen_small_boxes(gt_boxes, gt_valid, self.stal_small_side, self.stal_widen_to)

    def __call__(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
                 gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        """Assign priors to objects.

        Args:
            priors: ``[A, 4]`` (cx, cy, stride_w, stride_h).
            pred_scores: ``[B, A, C]`` probabilities in [0, 1] (detached).
            pred_boxes: ``[B, A, 4]`` xyxy decoded predictions (detached).
            gt_boxes: ``[B, G, 4]`` xyxy, padded.
            gt_labels: ``[B, G]`` int64, padded.
            gt_valid: ``[B, G]`` bool, False on padding rows.
        Returns:
            :class:`Assignment`.
        """
        B, A, C = pred_scores.shape
        if priors.shape != (A, 4):
            raise ValueError(f"priors must be [A={A}, 4], got {tuple(priors.shape)}")
        if C != self.num_classes:
            raise ValueError(f"pred_scores has {C} classes, assigner built for {self.num_classes}")
        if pred_boxes.shape != (B, A, 4):
            raise ValueError(f"pred_boxes must be [{B}, {A}, 4], got {tuple(pred_boxes.shape)}")
        G = gt_boxes.shape[1]
        if gt_boxes.shape != (B, G, 4) or gt_labels.shape != (B, G) or gt_valid.shape != (B, G):
            raise ValueError("gt_boxes/gt_labels/gt_valid must be [B,G,4]/[B,G]/[B,G], got "
                             f"{tuple(gt_boxes.shape)}/{tuple(gt_labels.shape)}/{tuple(gt_valid.shape)}")
        device_type = pred_scores.device.type
        with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
            return self.assign(priors.float(), pred_scores.detach().float(),
                               pred_boxes.detach().float(), gt_boxes.float(), gt_labels.long(),
                               gt_valid.bool())

    def assign(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                           if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
