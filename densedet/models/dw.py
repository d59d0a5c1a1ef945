"""DW (Li et al., "A Dual Weighting Label Assignment Scheme for Object Detection", CVPR 2022).

The FCOS head of :mod:`densedet.models.fcos` (centerness on the regression tower), trained
only with the ``dw`` assigner, whose soft weights the loss needs:

- score ``s = sigmoid(cls) · sigmoid(centerness)``: what the assigner sees and what inference
  ranks by;
- loss :func:`densedet.losses.dw_loss` with the assigner's ``pos_weight [B, G, A]`` and
  ``P_neg`` (recovered from ``neg_weight = P_neg · s²``, see :meth:`DWHead.loss`);
- init as the official code: classifier prior 0.02, distance bias 4 (every prior starts
  with a 4-stride box, so that GIoU and the positive weights are informative at once).

Box refinement (``box_refine=True``, the paper's default)
---------------------------------------------------------
Points near an object's boundary see that boundary best. For every prior the coarse box
``(x1, y1, x2, y2)`` is decoded; then each coordinate is *re-read* from the coarse-box map at
a point on the corresponding side: ``x1`` from the point at the centre of the prior's row on
the left side ``(i_y, i_x − l/stride)``, ``y1`` from the top side ``(i_y − t/stride, i_x)``,
and so on, each moved by a learned offset ``(Δy, Δx)`` (a 3x3 conv on the regression tower,
8 channels, initialised near zero). The re-read box's coordinates, taken back relative to the
prior, are the refined ``distances`` (ReLU'd). The bilinear read is
``torchvision.ops.deform_conv2d`` with a 1x1 all-ones kernel and one group per coordinate
(4 groups, 4 offset groups): a differentiable gather, no weights of its own.
Unlike the official code the sample points are clamped into the feature map: there a point
past the border reads zero padding, which collapses boxes of objects touching the border.

``raw`` keys: ``cls_logits [B,A,C]``, ``distances [B,A,4]`` (refined), ``centerness_logits
[B,A]``, and with refinement ``coarse_distances [B,A,4]`` (for pictures and tests; not in the
loss, which, as in the paper, supervises the refined boxes only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from densedet.assign import Assigner, Assignment
from densedet.losses import dw_loss
from densedet.models.detector import Detector
from densedet.models.fcos import FCOSHead, build_fcos_family

#: scores below this are too small to recover P_neg = neg_weight / s² from (P_neg is then 1;
#: the term it multiplies is ≤ 1e-12 anyway).
_MIN_SCORE_SQ = 1e-12


class DWHead(FCOSHead):
    """DW head; see the module docstring.

    Args (besides :class:`FCOSHead`'s): ``box_refine`` (True), ``pos_cls_weight`` (0.25),
    ``box_weight`` (1.25), ``neg_cls_weight`` (1.0) — see :func:`densedet.losses.dw_loss`.
    Defaults: ``prior_prob=0.02``, ``reg_bias=4.0``.
    """

    needs = frozenset({"pos_weight", "neg_weight"})  # the DW loss is built on its pair weights

    def __init__(self, num_classes: int, width: int, *args, box_refine: bool = True,
                 pos_cls_weight: float = 0.25, box_weight: float = 1.25,
                 neg_cls_weight: float = 1.0, prior_prob: float = 0.02, reg_bias: float = 4.0,
                 **kwargs):
        super().__init__(num_classes, width, *args, prior_prob=prior_prob, reg_bias=reg_bias,
                         **kwargs)
        self.box_refine = box_refine
        self.loss_weights = dict(pos_cls_weight=pos_cls_weight, box_weight=box_weight,
                                 neg_cls_weight=neg_cls_weight)
        if box_refine:
            self.refine_offset = nn.Conv2d(width, 8, 3, padding=1)
            nn.init.normal_(self.refine_offset.weight, std=0.01)
            nn.init.zeros_(self.refine_offset.bias)

    def refine(self, distances: Tensor, reg_feat: Tensor, stride: int) -> Tensor:
        """Box refinement of one level (module docstring): ``[B, 4, H, W]`` ltrb pixels -> same."""
        if not self.box_refine:
            return distances
        B, _, H, W = distances.shape
        off = self.refine_offset(reg_feat).float()  # [B, 8, H, W]: (Δy, Δx) per coordinate
        gy = torch.arange(H, device=distances.device, dtype=torch.float32)[:, None]  # cell rows
        gx = torch.arange(W, device=distances.device, dtype=torch.float32)[None, :]
        py, px = (gy + self.prior_offset) * stride, (gx + self.prior_offset) * stride  # pixels
        l, t, r, b = distances.unbind(1)
        coarse = torch.stack([px - l, py - t, px + r, py + b], dim=1)  # [B, 4, H, W] xyxy
        # sample point (in cells) of each coordinate: on its side of the coarse box + offset
        ys = torch.stack([gy + off[:, 0], gy - t / stride + off[:, 2],
                          gy + off[:, 4], gy + b / stride + off[:, 6]], dim=1)
        xs = torch.stack([gx - l / stride + off[:, 1], gx + off[:, 3],
                          gx + r / stride + off[:, 5], gx + off[:, 7]], dim=1)
        ys, xs = ys.clamp(0, H - 1), xs.clamp(0, W - 1)
        offset = torch.stack([ys - gy, xs - gx], dim=2).reshape(B, 8, H, W)  # (dy, dx) pairs
        sampled = deform_conv2d(coarse, offset, coarse.new_ones(4, 1, 1, 1))
        x1, y1, x2, y2 = sampled.unbind(1)
        return F.relu(torch.stack([px - x1, py - y1, x2 - px, y2 - py], dim=1))

    def assigner_inputs(self, raw: dict[str, Tensor], priors: Tensor) -> tuple[Tensor, Tensor]:
        """The joint score ``sigmoid(cls)·sigmoid(centerness)`` and boxes, detached."""
        scores, boxes = self.decode(raw, priors)
        return scores.detach(), boxes.detach()

    def loss(self, raw: dict[str, Tensor], priors: Tensor, assignment: Assignment,
             targets: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """``{"pos_cls", "box", "neg_cls"}`` and the number of objects (DW's positive normaliser).

        The assigner gives ``neg_weight = P_neg · s²`` computed from the detached scores of
        this very ``raw``; P_neg is recovered by dividing by ``s²`` so that the loss can apply
        ``s²`` with its gradient (as the official code does) and normalise by ``Σ(1 − P_neg)``.
        """
        if assignment.pos_weight is None or assignment.neg_weight is None:
            raise ValueError("the DW head needs an assignment with pos_weight and neg_weight "
                             "(the 'dw' assigner)")
        with torch.no_grad():
            s2 = self.decode(raw, priors)[0].pow(2)
            neg_prob = torch.where(s2 > _MIN_SCORE_SQ,
                                   assignment.neg_weight.float() / s2.clamp(min=_MIN_SCORE_SQ),
                                   torch.ones_like(s2)).clamp(0.0, 1.0)
        return dw_loss(raw["cls_logits"], raw[self.quality_key], self.boxes(raw, priors),
                       targets["gt_boxes"].float(), targets["gt_labels"], targets["gt_valid"].bool(),
                       assignment.pos_weight, neg_prob, **self.loss_weights)


def build(num_classes: int, assigner: Assigner | str | None = None, size: str = "r18",
          **params) -> Detector:
    """DW detector. ``params``: ``width`` and :class:`DWHead` / :class:`FCOSHead` arguments."""
    return build_fcos_family(DWHead, num_classes, assigner, size, **params)
