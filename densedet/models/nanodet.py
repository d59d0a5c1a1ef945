"""NanoDet-Plus: ShuffleNetV2 + GhostPAN + a GFL head, trained with an assign-guidance head.

Sizes (NanoDet-Plus configs):

    m       ShuffleNetV2 1.0x, neck/head 96 channels, guidance head 192
    m-1.5x  ShuffleNetV2 1.5x, neck/head 128 channels, guidance head 256

Head (GFL). Per level a tower of ``stacked_convs`` depthwise separable ``5x5`` convs shared by
classification and regression, then one 1x1 conv giving C class logits and, per side, a
distribution over ``reg_max + 1`` bins; a side's distance is the distribution's mean times
the stride. Levels are strides 8, 16, 32 and 64 (one extra GhostPAN level).

Priors. NanoDet-Plus puts a level's points at ``i * stride`` (the cell's corner, not its
centre), hence ``prior_offset=0.0`` here; it is a :class:`Detector` parameter.

Assign guidance (the AGM of NanoDet-Plus). A lightweight head trained from scratch makes a
poor judge of its own predictions, so a larger auxiliary head predicts too, and *its*
detached scores and boxes feed the assigner (:meth:`NanoDetPlusHead.assigner_inputs`). Both
heads learn from that one assignment with the same loss. The auxiliary head reads the neck's
features; after ``detach_epoch`` epochs it reads them detached, so its loss stops shaping the
backbone and neck. It runs only in training mode: inference and export never compute it.
NanoDet-Plus feeds the guidance head the concatenation of the neck output and a second
(auxiliary) GhostPAN on the backbone features; here the detector's neck output is all the
head sees, so the guidance head gets its extra capacity from width and depth alone
(``aux_channels``, ``aux_convs``).

Loss (NanoDet-Plus weights): QFL towards ``assignment.quality`` at the assigned class
(weight 1, over ``max(num_pos, 1)``), GIoU (weight 2) and DFL (weight 0.25) at positives,
each positive weighted by its detached top class score, over ``max(sum of weights, 1)``.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torchvision
from torch import Tensor, nn

from densedet.assign import Assigner, Assignment
from densedet.boxes import box_to_distance, distance_to_box
from densedet.losses import distribution_focal_loss, iou_loss, quality_focal_loss
from densedet.models.common import (ConvNormAct, DepthwiseSeparableConv, Scale, flatten_levels,
                                    make_act, prior_bias)
from densedet.models.detector import Detector, Head
from densedet.models.ghostpan import GhostPAN

__all__ = ["SIZES", "GFLAuxHead", "NanoDetPlusHead", "ShuffleNetV2Backbone", "build"]

#: size -> (ShuffleNetV2 width, neck/head channels, guidance-head channels)
SIZES: dict[str, tuple[str, int, int]] = {
    "m": ("1.0x", 96, 192),
    "m-1.5x": ("1.5x", 128, 256),
}

STRIDES = [8, 16, 32, 64]

_SHUFFLENETS = {
    "0.5x": torchvision.models.shufflenet_v2_x0_5,
    "1.0x": torchvision.models.shufflenet_v2_x1_0,
    "1.5x": torchvision.models.shufflenet_v2_x1_5,
    "2.0x": torchvision.models.shufflenet_v2_x2_0,
}


class ShuffleNetV2Backbone(nn.Module):
    """torchvision's ShuffleNetV2 without ``conv5`` and the classifier.

    ``[B, 3, H, W] -> [stage2 (H/8), stage3 (H/16), stage4 (H/32)]``; channels 116, 232, 464
    at 1.0x. NanoDet-Plus uses LeakyReLU (slope 0.1) in place of ReLU: ``act`` swaps it in.
    Weights start random (``weights=None``).
    """

    def __init__(self, scale: str = "1.0x", act: str = "leaky_relu"):
        super().__init__()
        if scale not in _SHUFFLENETS:
            raise ValueError(f"unknown ShuffleNetV2 scale {scale!r}; choose one of {', '.join(_SHUFFLENETS)}")
        net = _SHUFFLENETS[scale](weights=None)
        self.conv1, self.maxpool = net.conv1, net.maxpool
        self.stage2, self.stage3, self.stage4 = net.stage2, net.stage3, net.stage4
        self.out_channels = list(net._stage_out_channels[1:4])
        if act != "relu":
            for module in list(self.modules()):
                for name, child in module.named_children():
                    if isinstance(child, nn.ReLU):
                        setattr(module, name, make_act(act))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.conv1(x))
        c3 = self.stage2(x)
        c4 = self.stage3(c3)
        c5 = self.stage4(c4)
        return [c3, c4, c5]


def _normal_init(module: nn.Module, std: float = 0.01) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class GFLAuxHead(nn.Module):
    """The guidance head (NanoDet-Plus's "SimpleConvHead"): separate class and box towers of
    ``num_convs`` dense 3x3 conv + GroupNorm, shared by all levels, with a learnable scale per
    level on the box output. ``feats`` -> (cls ``[B, A, C]``, reg ``[B, A, 4 (reg_max + 1)]``)."""

    def __init__(self, num_classes: int, in_channels: int, channels: int, num_convs: int,
                 num_levels: int, reg_max: int, act: str = "leaky_relu"):
        super().__init__()

        def tower() -> nn.Sequential:
            return nn.Sequential(*[ConvNormAct(in_channels if i == 0 else channels, channels, 3, act=act, norm="gn")
                                   for i in range(num_convs)])

        self.cls_tower, self.reg_tower = tower(), tower()
        self.cls_pred = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.reg_pred = nn.Conv2d(channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])
        _normal_init(self)
        nn.init.constant_(self.cls_pred.bias, prior_bias(0.01))

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        cls = [self.cls_pred(self.cls_tower(f)) for f in feats]
        reg = [s(self.reg_pred(self.reg_tower(f))) for s, f in zip(self.scales, feats)]
        return flatten_levels(cls), flatten_levels(reg)


class NanoDetPlusHead(Head):
    """GFL head with assign guidance.

    ``raw`` keys: ``"cls"`` ``[B, A, C]`` logits, ``"reg"`` ``[B, A, 4 * (reg_max + 1)]``
    distribution logits (sides l, t, r, b); in training mode with guidance also
    ``"aux_cls"`` and ``"aux_reg"`` of the same shapes.

    Args:
        num_classes: C.
        in_channels: channels of the neck's levels (all equal).
        num_levels: number of neck levels.
        feat_channels, stacked_convs, kernel_size: the per-level tower.
        reg_max: largest distance bin (distances up to ``reg_max * stride``).
        aux_channels, aux_convs: the guidance head; ``use_aux=False`` trains without it
            (then the head's own predictions feed the assigner).
        detach_epoch: from this epoch on the guidance head's gradient stops at its input.
        qfl_weight, giou_weight, dfl_weight: loss weights.
    """

    # Not "dw": its soft pair weights and per-class negative weights need DW's own loss.

    def __init__(self, num_classes: int, in_channels: int, num_levels: int = 4, feat_channels: int = 96,
                 stacked_convs: int = 2, kernel_size: int = 5, reg_max: int = 7, act: str = "leaky_relu",
                 use_aux: bool = True, aux_channels: int = 192, aux_convs: int = 4, detach_epoch: int = 10,
                 qfl_weight: float = 1.0, giou_weight: float = 2.0, dfl_weight: float = 0.25):
        super().__init__()
        self.num_classes, self.reg_max = num_classes, reg_max
        self.qfl_weight, self.giou_weight, self.dfl_weight = qfl_weight, giou_weight, dfl_weight
        self.detach_epoch = detach_epoch
        self.epoch = 0
        self.towers = nn.ModuleList([
            nn.Sequential(*[DepthwiseSeparableConv(in_channels if i == 0 else feat_channels, feat_channels,
                                                   kernel_size, act=act) for i in range(stacked_convs)])
            for _ in range(num_levels)])
        self.preds = nn.ModuleList([nn.Conv2d(feat_channels, num_classes + 4 * (reg_max + 1), 1)
                                    for _ in range(num_levels)])
        _normal_init(self)
        for p in self.preds:
            nn.init.constant_(p.bias[:num_classes], prior_bias(0.01))
        self.aux = (GFLAuxHead(num_classes, in_channels, aux_channels, aux_convs, num_levels, reg_max, act)
                    if use_aux else None)
        self.register_buffer("bins", torch.arange(reg_max + 1, dtype=torch.float32), persistent=False)

    def on_epoch(self, epoch: int, max_epochs: int, no_aug: bool) -> Optional[str]:
        notes = [super().on_epoch(epoch, max_epochs, no_aug)]
        detached_before = self.aux_detached
        self.epoch = epoch
        if self.aux is not None and self.aux_detached and not detached_before:
            notes.append("guidance head input detached")
        return "; ".join(n for n in notes if n) or None

    def make_o2o_branch(self) -> nn.Module:
        """The one-to-one branch (docs/end2end.md): per level, copies of the tower's last conv
        and of the prediction conv. Its assigner sees its own predictions (the guidance head
        judges for the one-to-many head only)."""
        return nn.ModuleDict({"tower_last": nn.ModuleList(copy.deepcopy(t[-1]) for t in self.towers),
                              "preds": copy.deepcopy(self.preds)})

    @property
    def aux_detached(self) -> bool:
        """Whether the guidance head's input is detached now (``epoch >= detach_epoch``)."""
        return self.epoch >= self.detach_epoch

    def forward(self, feats: list[Tensor]) -> dict[str, Tensor]:
        o2m, o2o = self.branches()
        shared = [t[:-1](f) for t, f in zip(self.towers, feats)]  # both branches' input
        raw = {}
        if o2m:
            out = flatten_levels([p(t[-1](x)) for t, p, x in zip(self.towers, self.preds, shared)])
            raw.update(cls=out[..., : self.num_classes], reg=out[..., self.num_classes:])
        if o2o:
            xs = [x.detach() for x in shared] if self.o2o_detach else shared
            out = flatten_levels([p(t(x)) for t, p, x in zip(self.o2o.tower_last, self.o2o.preds, xs)])
            raw.update(o2o_cls=out[..., : self.num_classes], o2o_reg=out[..., self.num_classes:])
        if self.training and self.aux is not None:
            aux_in = [f.detach() for f in feats] if self.aux_detached else feats
            raw["aux_cls"], raw["aux_reg"] = self.aux(aux_in)
        return raw

    # -- boxes ------------------------------------------------------------------------------
    def distances(self, reg: Tensor) -> Tensor:
        """``[..., 4 (reg_max + 1)]`` logits -> ``[..., 4]`` expected distance in bins (float32)."""
        dist = reg.float().unflatten(-1, (4, self.reg_max + 1)).softmax(dim=-1)
        return dist @ self.bins.to(dist.dtype)  # float32 even in a model cast to float64

    def decode_boxes(self, reg: Tensor, priors: Tensor) -> Tensor:
        """``[..., 4 (reg_max + 1)]`` logits and broadcastable ``[..., 4]`` priors -> xyxy boxes."""
        return distance_to_box(priors[..., :2], self.distances(reg) * priors[..., 2:3])

    def decode(self, raw: dict[str, Tensor], priors: Tensor) -> tuple[Tensor, Tensor]:
        """Main head only: scores ``sigmoid(cls)`` ``[B, A, C]``, boxes ``[B, A, 4]``."""
        return raw["cls"].float().sigmoid(), self.decode_boxes(raw["reg"], priors)

    def assigner_inputs(self, raw: dict[str, Tensor], priors: Tensor) -> tuple[Tensor, Tensor]:
        """The guidance head's predictions when present (training), else the head's own."""
        if "aux_cls" in raw:
            scores, boxes = raw["aux_cls"].float().sigmoid(), self.decode_boxes(raw["aux_reg"], priors)
        else:
            scores, boxes = self.decode(raw, priors)
        return scores.detach(), boxes.detach()

    # -- loss -------------------------------------------------------------------------------
    def loss(self, raw: dict[str, Tensor], priors: Tensor, assignment: Assignment,
             targets: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        terms, num_pos = self.gfl_loss(raw["cls"], raw["reg"], priors, assignment, targets)
        if "aux_cls" in raw:
            aux_terms, _ = self.gfl_loss(raw["aux_cls"], raw["aux_reg"], priors, assignment, targets)
            terms.update({f"aux_{k}": v for k, v in aux_terms.items()})
        return terms, num_pos

    def gfl_loss(self, cls: Tensor, reg: Tensor, priors: Tensor, assignment: Assignment,
                 targets: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """QFL + GIoU + DFL of one head's ``cls [B, A, C]`` and ``reg [B, A, 4 (R + 1)]``."""
        pos = assignment.pos_mask                                      # [B, A]
        B, A = pos.shape
        num_pos = pos.sum().float()
        quality = torch.where(pos, assignment.quality.float(), 0.0)
        labels = torch.where(pos, assignment.labels, -1)
        loss_qfl = quality_focal_loss(cls, labels, quality).sum() / num_pos.clamp(min=1.0)

        batch_idx = torch.arange(B, device=pos.device)[:, None].expand(B, A)[pos]
        gt_boxes = targets["gt_boxes"][batch_idx, assignment.gt_index[pos]].float()  # [P, 4]
        pos_priors = priors[None].expand(B, A, 4)[pos]                 # [P, 4]
        pos_reg = reg[pos]                                             # [P, 4 (R + 1)]
        # Each positive counts as much as the head's confidence in it (GFL): boxes of
        # priors the classifier does not believe in are not worth fitting yet.
        weight = cls[pos].detach().float().sigmoid().amax(dim=-1)      # [P]
        wnorm = weight.sum().clamp(min=1.0)

        pred_boxes = self.decode_boxes(pos_reg, pos_priors)
        loss_giou = (iou_loss(pred_boxes, gt_boxes, mode="giou") * weight).sum() / wnorm
        # DFL target in bins, kept inside [0, reg_max - 0.1] as NanoDet-Plus does
        target = (box_to_distance(pos_priors[:, :2], gt_boxes) / pos_priors[:, 2:3]).clamp(0, self.reg_max - 0.1)
        dfl = distribution_focal_loss(pos_reg.unflatten(-1, (4, self.reg_max + 1)), target, self.reg_max)
        loss_dfl = (dfl * weight[:, None]).sum() / (4 * wnorm)
        terms = {"qfl": self.qfl_weight * loss_qfl, "giou": self.giou_weight * loss_giou,
                 "dfl": self.dfl_weight * loss_dfl}
        return terms, num_pos


def build(num_classes: int, assigner: Optional[Assigner] = None, size: str = "m",
          prior_offset: float = 0.0, act: str = "leaky_relu", **head_params) -> Detector:
    """A NanoDet-Plus detector.

    Args:
        num_classes: C.
        assigner: the label assigner (DSL in the paper); None for inference only.
        size: one of :data:`SIZES`.
        prior_offset: 0.0 as NanoDet-Plus (points at ``i * stride``).
        head_params: :class:`NanoDetPlusHead` options, e.g. ``detach_epoch=10``,
            ``use_aux``, ``aux_channels``, ``reg_max``, loss weights.
    """
    if size not in SIZES:
        raise ValueError(f"unknown NanoDet-Plus size {size!r}; choose one of {', '.join(SIZES)}")
    scale, channels, aux_channels = SIZES[size]
    head_params.setdefault("aux_channels", aux_channels)
    head_params.setdefault("feat_channels", channels)
    backbone = ShuffleNetV2Backbone(scale, act)
    neck = GhostPAN(backbone.out_channels, channels, kernel_size=5, num_extra_levels=1, act=act)
    head = NanoDetPlusHead(num_classes, channels, num_levels=len(STRIDES), act=act, **head_params)
    return Detector(backbone, neck, head, assigner, STRIDES, prior_offset=prior_offset)
