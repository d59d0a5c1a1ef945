"""LLA (Ge et al., "LLA: Loss-aware Label Assignment for Dense Pedestrian Detection", 2021).

The FCOS head of :mod:`densedet.models.fcos` with an IoU branch in place of centerness (same
place: on the regression tower). The detector is FCOS; what LLA changes is the assigner
(``lla``: each object takes the ``topk`` priors with the lowest classification + regression
loss) and the loss below.

Scores: ``sqrt(sigmoid(cls) · sigmoid(iou))``, both for inference and for the assigner.

Loss (the LLA reference): sigmoid focal loss (α 0.25, γ 2) over all priors / num_pos;
``2 ×`` IoU loss at positives / num_pos (mode ``box_loss``, GIoU by default, ``"log_iou"`` for
UnitBox's −log IoU); ``0.5 ×`` BCE of the IoU logit against the IoU of the (detached)
prediction with its object / num_pos.

The IoU target is recomputed here from the prediction rather than read from
``assignment.quality``: it is the same number for a contract-abiding assigner, and this way
the head does not depend on how each assigner fills ``quality``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from densedet.assign import Assigner, Assignment
from densedet.boxes import box_iou
from densedet.losses import bce_with_logits, iou_loss
from densedet.models.detector import Detector
from densedet.models.fcos import FCOSHead, build_fcos_family, gather_assigned_boxes


class LLAHead(FCOSHead):
    """FCOS-style head with an IoU branch; see the module docstring.

    Args (besides :class:`FCOSHead`'s): ``box_weight`` (2.0) and ``iou_weight`` (0.5).
    ``raw`` keys: ``cls_logits``, ``distances``, ``iou_logits [B, A]``.
    """

    quality_key = "iou_logits"

    def __init__(self, num_classes: int, width: int, *args, box_weight: float = 2.0,
                 iou_weight: float = 0.5, **kwargs):
        super().__init__(num_classes, width, *args, **kwargs)
        self.box_weight, self.iou_weight = box_weight, iou_weight

    def decode(self, raw: dict[str, Tensor], priors: Tensor) -> tuple[Tensor, Tensor]:
        """``sqrt(sigmoid(cls)·sigmoid(iou))`` ``[B, A, C]`` and boxes ``[B, A, 4]``."""
        scores = (raw["cls_logits"].float().sigmoid()
                  * raw[self.quality_key].float().sigmoid()[..., None]).sqrt()
        return scores, self.boxes(raw, priors)

    def assigner_inputs(self, raw: dict[str, Tensor], priors: Tensor) -> tuple[Tensor, Tensor]:
        """The inference score (see module docstring), detached."""
        scores, boxes = self.decode(raw, priors)
        return scores.detach(), boxes.detach()

    def loss(self, raw: dict[str, Tensor], priors: Tensor, assignment: Assignment,
             targets: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """``{"cls", "box", "iou"}`` and the number of positives."""
        pos = assignment.pos_mask
        num_pos = pos.sum().float()
        norm = num_pos.clamp(min=1.0)
        gt = gather_assigned_boxes(targets["gt_boxes"].float(), assignment.gt_index)
        pred = self.boxes(raw, priors)
        box = iou_loss(pred, gt, mode=self.box_loss) * pos
        with torch.no_grad():
            iou_target = box_iou(pred, gt, aligned=True) * pos
        iou = bce_with_logits(raw[self.quality_key], iou_target) * pos
        terms = {"cls": self.classification_loss(raw, assignment, norm),
                 "box": self.box_weight * box.sum() / norm,
                 "iou": self.iou_weight * iou.sum() / norm}
        return terms, num_pos


def build(num_classes: int, assigner: Assigner | str | None = None, size: str = "r18",
          **params) -> Detector:
    """LLA detector. ``params``: ``width`` and :class:`LLAHead` / :class:`FCOSHead` arguments."""
    return build_fcos_family(LLAHead, num_classes, assigner, size, **params)
