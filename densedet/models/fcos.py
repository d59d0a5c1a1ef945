"""FCOS (Tian et al., ICCV 2019) in its mmdet "improved" form, and the head DW and LLA build on.

Head, shared by all FPN levels (mmdet's ``norm_on_bbox`` / ``centerness_on_reg`` variant):

    x ─ cls tower (num_convs × [conv3x3, GroupNorm, ReLU]) ─ conv3x3 ─► cls_logits   [B, C, H, W]
      └ reg tower (same, own weights) ─┬ conv3x3 ─ Scale_l ─ ReLU ─ × stride ─► distances [B, 4, H, W]
                                       └ conv3x3 ─► quality logit (centerness; IoU in LLA) [B, 1, H, W]

Distances are (left, top, right, bottom) in input pixels from the prior centre. The network
predicts them in units of the level's stride (so every level regresses numbers of the same
magnitude) and a learnable per-level ``Scale`` absorbs the rest.

Scores:
- inference (:meth:`FCOSHead.decode`): ``sigmoid(cls) * sigmoid(centerness)`` per class, as
  mmdet multiplies the centerness into the class scores before NMS (no square root).
- assigner (:meth:`FCOSHead.assigner_inputs`): ``sigmoid(cls)`` alone. The FCOS and ATSS rules
  ignore scores; the dynamic ones (SimOTA, DSL, LLA, TAL) then compare the classifier
  with the one-hot target it is trained towards, not with a centerness-damped product.

Loss (mmdet FCOS): sigmoid focal loss (α 0.25, γ 2) over all priors / num_pos; GIoU loss at
positives weighted by the centerness target / Σ centerness targets; centerness BCE at
positives / num_pos. The centerness target is ``assignment.centerness`` when the assigner
provides it (``fcos``), else it is computed from the assigned box and the prior, so that any
assigner in :attr:`FCOSHead.compatible_assigners` works.

All losses are computed densely with masks (no boolean indexing), so there is no host sync
and a batch without positives gives exact zeros, with zero gradients, for the box terms.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.assign import Assigner, Assignment, build_assigner
from densedet.assign.fcos import centerness_target
from densedet.boxes import distance_to_box
from densedet.losses import bce_with_logits, iou_loss, sigmoid_focal_loss
from densedet.models.common import ConvNormAct, Scale, flatten_levels, prior_bias
from densedet.models.detector import Detector, Head
from densedet.models.resnet_fpn import STRIDES, build_resnet_fpn


def conv_gn_relu_tower(width: int, num_convs: int, bias: bool = False) -> nn.Sequential:
    """``num_convs`` × [conv3x3 (with a bias when ``bias``: torchvision's and mmdet's layout),
    GroupNorm (32 groups, fewer for small widths), ReLU]."""
    return nn.Sequential(*(ConvNormAct(width, width, 3, act="relu", norm="gn", bias=bias)
                           for _ in range(num_convs)))


def split_last(tower: nn.Sequential) -> tuple[nn.Module, nn.Module]:
    """``(all but the last layer, the last layer)`` of a tower (identities when it is empty):
    an end-to-end head shares the first part and gives its one-to-one branch a copy of the
    last layer (docs/end2end.md)."""
    if not len(tower):
        return nn.Identity(), nn.Identity()
    return tower[:-1], tower[-1]


def gather_assigned_boxes(gt_boxes: Tensor, gt_index: Tensor) -> Tensor:
    """The box of each prior's assigned object: ``[B, G, 4]``, ``[B, A]`` -> ``[B, A, 4]``
    (background priors get object 0's box, or zeros when G = 0; mask them out)."""
    B, A = gt_index.shape
    if gt_boxes.shape[1] == 0:
        return gt_boxes.new_zeros(B, A, 4)
    idx = gt_index.clamp(min=0)[..., None].expand(B, A, 4)
    return gt_boxes.gather(1, idx)


class FCOSHead(Head):
    """FCOS head; see the module docstring.

    Args:
        num_classes: C.
        width: channels of the FPN levels and of the towers.
        strides: stride of each level (one ``Scale`` per level).
        num_convs: convs per tower.
        prior_prob: initial foreground probability of the classifier (bias init).
        reg_bias: initial bias of the distance conv (distance ≈ ``relu(reg_bias)·stride``).
        prior_offset: prior centre offset (the detector's); used by heads that need the
            prior positions inside ``forward`` (DW's box refinement).
        focal_alpha, focal_gamma: focal loss parameters.
        box_loss: IoU-loss mode (see :func:`densedet.losses.iou_loss`).
        tower_bias: a bias in every tower conv (before its GroupNorm), as torchvision's and
            mmdet's FCOS have (``model.tower_bias``; needed to load their weights).
        score_sqrt: inference score ``sqrt(sigmoid(cls)·sigmoid(centerness))``, torchvision's
            (``model.score_sqrt``); the assigner's inputs are unchanged.
    ``raw`` keys: ``cls_logits [B, A, C]``, ``distances [B, A, 4]`` (ltrb pixels, ≥ 0),
    ``<quality_key> [B, A]``.
    """

    #: name of the quality branch's output in ``raw``.
    quality_key = "centerness_logits"

    def __init__(self, num_classes: int, width: int, strides: Sequence[int] = STRIDES,
                 num_convs: int = 4, prior_prob: float = 0.01, reg_bias: float = 0.0,
                 prior_offset: float = 0.5, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 box_loss: str = "giou", tower_bias: bool = False, score_sqrt: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.strides = list(strides)
        self.prior_offset = prior_offset
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_loss = box_loss
        self.score_sqrt = score_sqrt
        self.cls_tower = conv_gn_relu_tower(width, num_convs, tower_bias)
        self.reg_tower = conv_gn_relu_tower(width, num_convs, tower_bias)
        self.cls_logits = nn.Conv2d(width, num_classes, 3, padding=1)
        self.bbox_reg = nn.Conv2d(width, 4, 3, padding=1)
        self.quality = nn.Conv2d(width, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Start every prior at foreground probability prior_prob, so that the ~A·C negatives
        # do not swamp the focal loss in the first iterations (RetinaNet's prior init).
        nn.init.constant_(self.cls_logits.bias, prior_bias(prior_prob))
        nn.init.constant_(self.bbox_reg.bias, reg_bias)

    #: whether :meth:`refine` changes the distances (then ``raw`` also holds the unrefined
    #: ``coarse_distances``).
    box_refine = False

    def refine(self, distances: Tensor, reg_feat: Tensor, stride: int) -> Tensor:
        """Hook for heads that refine the per-level distances ``[B, 4, H, W]`` (DW)."""
        return distances

    def make_o2o_branch(self) -> nn.Module:
        """The one-to-one branch (docs/end2end.md): copies of the last layer of both towers,
        of the three prediction convs and of the per-level scales."""
        return nn.ModuleDict({
            "cls_last": copy.deepcopy(split_last(self.cls_tower)[1]),
            "reg_last": copy.deepcopy(split_last(self.reg_tower)[1]),
            "cls_logits": copy.deepcopy(self.cls_logits), "bbox_reg": copy.deepcopy(self.bbox_reg),
            "quality": copy.deepcopy(self.quality), "scales": copy.deepcopy(self.scales)})

    def forward(self, feats: list[Tensor]) -> dict[str, Tensor]:
        """Per-level features ``[B, width, H_l, W_l]`` -> flattened raw outputs ``[B, A, ...]``."""
        if len(feats) != len(self.strides):
            raise ValueError(f"head built for {len(self.strides)} levels, got {len(feats)}")
        o2m, o2o = self.branches()
        outs: dict[str, list[Tensor]] = {}

        def predict(prefix: str, m: nn.Module, cls_last: nn.Module, reg_last: nn.Module,
                    level: int, c: Tensor, r: Tensor, refine: bool) -> None:
            cls_feat, reg_feat = cls_last(c), reg_last(r)
            # float32 from here: the distances feed IoU losses and box decoding.
            d = F.relu(m.scales[level](m.bbox_reg(reg_feat).float())) * self.strides[level]
            got = {"cls_logits": m.cls_logits(cls_feat), self.quality_key: m.quality(reg_feat),
                   "distances": self.refine(d, reg_feat, self.strides[level]) if refine else d}
            if refine and self.box_refine:
                got["coarse_distances"] = d
            for key, t in got.items():
                outs.setdefault(prefix + key, []).append(t)

        # all but the last tower layer serve both branches
        (cls_shared, cls_last), (reg_shared, reg_last) = map(split_last, (self.cls_tower, self.reg_tower))
        for level, x in enumerate(feats):
            c, r = cls_shared(x), reg_shared(x)
            if o2m:
                predict("", self, cls_last, reg_last, level, c, r, refine=True)
            if o2o:
                if self.o2o_detach:
                    c, r = c.detach(), r.detach()
                predict("o2o_", self.o2o, self.o2o.cls_last, self.o2o.reg_last, level, c, r,
                        refine=False)
        raw = {key: flatten_levels(v) for key, v in outs.items()}
        for key in (self.quality_key, "o2o_" + self.quality_key):
            if key in raw:
                raw[key] = raw[key][..., 0]
        return raw

    # --- decoding -------------------------------------------------------------------------
    @staticmethod
    def boxes(raw: dict[str, Tensor], priors: Tensor) -> Tensor:
        """``[B, A, 4]`` xyxy predicted boxes (with gradient)."""
        return distance_to_box(priors[:, :2], raw["distances"].float())

    def decode(self, raw: dict[str, Tensor], priors: Tensor) -> tuple[Tensor, Tensor]:
        """Inference scores ``sigmoid(cls)·sigmoid(centerness)`` ``[B, A, C]`` (its square root
        with ``score_sqrt``, as torchvision's FCOS ranks) and boxes ``[B, A, 4]``."""
        scores = raw["cls_logits"].float().sigmoid() * raw[self.quality_key].float().sigmoid()[..., None]
        if self.score_sqrt:
            scores = scores.sqrt()
        return scores, self.boxes(raw, priors)

    def assigner_inputs(self, raw: dict[str, Tensor], priors: Tensor) -> tuple[Tensor, Tensor]:
        """``sigmoid(cls)`` (no centerness, see the module docstring) and boxes, detached."""
        return raw["cls_logits"].detach().float().sigmoid(), self.boxes(raw, priors).detach()

    # --- loss -----------------------------------------------------------------------------
    def classification_loss(self, raw: dict[str, Tensor], assignment: Assignment,
                            num_pos: Tensor) -> Tensor:
        """Sigmoid focal loss over all priors and classes, one-hot targets, / num_pos."""
        logits = raw["cls_logits"].float()
        pos = assignment.pos_mask
        onehot = F.one_hot(assignment.labels.clamp(min=0), self.num_classes).float() * pos[..., None]
        return sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma).sum() / num_pos

    def loss(self, raw: dict[str, Tensor], priors: Tensor, assignment: Assignment,
             targets: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """``{"cls", "box", "centerness"}`` and the number of positives (see module docstring)."""
        pos = assignment.pos_mask  # [B, A]
        num_pos = pos.sum().float()
        norm = num_pos.clamp(min=1.0)
        gt = gather_assigned_boxes(targets["gt_boxes"].float(), assignment.gt_index)
        ctr = assignment.centerness
        if ctr is None:
            ctr = centerness_target(priors[:, :2], gt)
        ctr = torch.where(pos, ctr.float(), torch.zeros_like(ctr, dtype=torch.float32)).detach()

        box = iou_loss(self.boxes(raw, priors), gt, mode=self.box_loss)
        box = (box * ctr).sum() / ctr.sum().clamp(min=1e-6)
        ctr_loss = bce_with_logits(raw[self.quality_key], ctr) * pos
        terms = {"cls": self.classification_loss(raw, assignment, norm), "box": box,
                 "centerness": ctr_loss.sum() / norm}
        return terms, num_pos


def as_assigner(assigner: Assigner | str | None, num_classes: int) -> Optional[Assigner]:
    """Accept an assigner object, a registered name, or None."""
    if isinstance(assigner, str):
        return build_assigner(assigner, num_classes=num_classes)
    return assigner


def build_fcos_family(head_cls: type[FCOSHead], num_classes: int, assigner: Assigner | str | None,
                      size: str = "r18", width: int | None = None, prior_offset: float = 0.5,
                      **head_params) -> Detector:
    """ResNet-FPN (``size``, ``width``) + ``head_cls`` -> :class:`Detector` (strides 8…128)."""
    backbone, neck, width = build_resnet_fpn(size, width)
    head = head_cls(num_classes, width, STRIDES, prior_offset=prior_offset, **head_params)
    return Detector(backbone, neck, head, as_assigner(assigner, num_classes), list(STRIDES), prior_offset)


def build(num_classes: int, assigner: Assigner | str | None = None, size: str = "r18",
          **params) -> Detector:
    """FCOS detector. ``params``: ``width`` and :class:`FCOSHead` arguments."""
    return build_fcos_family(FCOSHead, num_classes, assigner, size, **params)
