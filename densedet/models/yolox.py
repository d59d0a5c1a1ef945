"""YOLOX: CSPDarknet + PAFPN + a decoupled head with objectness, trained with SimOTA.

Sizes (depth, width multipliers; Nano uses depthwise separable 3x3 convs everywhere but
the Focus stem and the 1x1 convs):

    nano 0.33 / 0.25 dw   tiny 0.33 / 0.375   s 0.33 / 0.50   m 0.67 / 0.75   l 1.0 / 1.0   x 1.33 / 1.25

Box parameterisation. YOLOX predicts ``(tx, ty, tw, th)`` per grid cell ``(i, j)`` with the
centre at ``(i + tx) * stride`` and the size ``exp(tw) * stride``. densedet's priors carry
their centre ``(i + 0.5) * stride`` (``prior_offset=0.5``), so this head decodes
``centre = prior + t * stride``: the same family of boxes, with ``t`` shifted by 0.5 (the
reg conv's bias absorbs the shift). The L1 target is encoded the same way.

Loss (YOLOX): objectness BCE over all priors (1 at positives), class BCE at positives
towards ``one_hot * IoU`` (``assignment.quality``), ``reg_weight * (1 - IoU²)`` at positives,
and, when ``use_l1`` is on (the last no-augmentation epochs), L1 between the raw regression
and the encoded target; everything divided by ``max(num_pos, 1)``.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.assign import Assigner, Assignment
from densedet.losses import bce_with_logits, iou_loss, l1_loss
from densedet.models.common import ConvNormAct, flatten_levels, prior_bias, set_bn
from densedet.models.cspdarknet import CSPDarknet, conv3x3
from densedet.models.detector import Detector, Head
from densedet.models.pafpn import PAFPN

__all__ = ["SIZES", "YOLOXHead", "build"]

#: size -> (depth, width, depthwise)
SIZES: dict[str, tuple[float, float, bool]] = {
    "nano": (0.33, 0.25, True),
    "tiny": (0.33, 0.375, False),
    "s": (0.33, 0.50, False),
    "m": (0.67, 0.75, False),
    "l": (1.0, 1.0, False),
    "x": (1.33, 1.25, False),
}

STRIDES = [8, 16, 32]


class YOLOXHead(Head):
    """Decoupled head, one (unshared) branch set per level.

    Per level: 1x1 stem to ``hidden`` channels, then a class branch (two 3x3 convs -> C
    logits) and a box branch (two 3x3 convs -> 4 box parameters and 1 objectness logit).

    ``raw`` keys: ``"cls"`` ``[B, A, C]`` logits, ``"reg"`` ``[B, A, 4]`` (tx, ty, tw, th),
    ``"obj"`` ``[B, A]`` logits.

    Args:
        num_classes: C.
        in_channels: channels of each neck level.
        hidden: channels inside the head (``256 * width`` in YOLOX).
        depthwise: depthwise separable 3x3 convs (Nano).
        reg_weight: weight of the IoU loss (5.0 in YOLOX).
        use_l1: add the L1 term; the trainer switches it on for the last epochs.
        max_log_wh: clamp on ``tw, th`` before ``exp`` so that an untrained head cannot
            overflow (``exp(8) * 32`` px is far beyond any image).
    """

    # Not "dw": DW's assignment is soft pair weights [B, G, A] and per-class negative
    # weights that need DW's own loss; this loss reads only gt_index / labels / quality.

    def __init__(self, num_classes: int, in_channels: list[int], hidden: int, depthwise: bool = False,
                 act: str = "silu", reg_weight: float = 5.0, use_l1: bool = False,
                 max_log_wh: float = 8.0):
        super().__init__()
        self.num_classes = num_classes
        self.reg_weight = reg_weight
        self.use_l1 = use_l1
        self.max_log_wh = max_log_wh

        def branch() -> nn.Sequential:
            return nn.Sequential(conv3x3(hidden, hidden, 1, depthwise, act), conv3x3(hidden, hidden, 1, depthwise, act))

        self.stems = nn.ModuleList([ConvNormAct(c, hidden, 1, act=act) for c in in_channels])
        self.cls_convs = nn.ModuleList([branch() for _ in in_channels])
        self.reg_convs = nn.ModuleList([branch() for _ in in_channels])
        self.cls_preds = nn.ModuleList([nn.Conv2d(hidden, num_classes, 1) for _ in in_channels])
        self.reg_preds = nn.ModuleList([nn.Conv2d(hidden, 4, 1) for _ in in_channels])
        self.obj_preds = nn.ModuleList([nn.Conv2d(hidden, 1, 1) for _ in in_channels])
        for conv in [*self.cls_preds, *self.obj_preds]:
            nn.init.constant_(conv.bias, prior_bias(0.01))

    def make_o2o_branch(self) -> nn.Module:
        """The one-to-one branch (docs/end2end.md): per level, copies of the last conv of the
        class and box branches and of the three prediction convs."""
        return nn.ModuleDict({
            "cls_last": nn.ModuleList(copy.deepcopy(b[-1]) for b in self.cls_convs),
            "reg_last": nn.ModuleList(copy.deepcopy(b[-1]) for b in self.reg_convs),
            "cls_preds": copy.deepcopy(self.cls_preds), "reg_preds": copy.deepcopy(self.reg_preds),
            "obj_preds": copy.deepcopy(self.obj_preds)})

    def forward(self, feats: list[Tensor]) -> dict[str, Tensor]:
        o2m, o2o = self.branches()
        outs: dict[str, list[Tensor]] = {}

        def predict(prefix: str, m: nn.Module, cls_last: nn.Module, reg_last: nn.Module,
                    k: int, c: Tensor, r: Tensor) -> None:
            r = reg_last(r)
            for key, t in (("cls", m.cls_preds[k](cls_last(c))), ("reg", m.reg_preds[k](r)),
                           ("obj", m.obj_preds[k](r))):
                outs.setdefault(prefix + key, []).append(t)

        for k, x in enumerate(feats):
            x = self.stems[k](x)
            # all but the last conv of each branch are shared by the two branches
            c, r = self.cls_convs[k][:-1](x), self.reg_convs[k][:-1](x)
            if o2m:
                predict("", self, self.cls_convs[k][-1], self.reg_convs[k][-1], k, c, r)
            if o2o:
                if self.o2o_detach:
                    c, r = c.detach(), r.detach()
                predict("o2o_", self.o2o, self.o2o.cls_last[k], self.o2o.reg_last[k], k, c, r)
        raw = {key: flatten_levels(v) for key, v in outs.items()}
        for key in ("obj", "o2o_obj"):
            if key in raw:
                raw[key] = raw[key][..., 0]
        return raw

    # -- boxes ------------------------------------------------------------------------------
    def decode_boxes(self, reg: Tensor, priors: Tensor) -> Tensor:
        """``[B, A, 4]`` (tx, ty, tw, th) -> ``[B, A, 4]`` xyxy, float32."""
        reg = reg.float()
        stride = priors[:, 2:]
        centre = priors[:, :2] + reg[..., :2] * stride
        wh = reg[..., 2:].clamp(max=self.max_log_wh).exp() * stride
        return torch.cat([centre - wh / 2, centre + wh / 2], dim=-1)

    @staticmethod
    def encode_boxes(boxes: Tensor, priors: Tensor) -> Tensor:
        """Inverse of :meth:`decode_boxes`: ``[N, 4]`` xyxy and their ``[N, 4]`` priors -> (tx, ty, tw, th)."""
        stride = priors[:, 2:]
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
        # 1e-8 as YOLOX: a zero-size box gives a large negative, not -inf
        return torch.cat([(centre - priors[:, :2]) / stride, torch.log(wh / stride + 1e-8)], dim=-1)

    def decode(self, raw: dict[str, Tensor], priors: Tensor) -> tuple[Tensor, Tensor]:
        """Inference scores ``sigmoid(cls) * sigmoid(obj)`` ``[B, A, C]`` and boxes ``[B, A, 4]``."""
        scores = raw["cls"].float().sigmoid() * raw["obj"].float().sigmoid()[..., None]
        return scores, self.decode_boxes(raw["reg"], priors)

    def assigner_inputs(self, raw: dict[str, Tensor], priors: Tensor) -> tuple[Tensor, Tensor]:
        # The geometric mean keeps the score on the scale of one probability; SimOTA's
        # class cost is a BCE against it (YOLOX does the same).
        scores, boxes = self.decode(raw, priors)
        return scores.sqrt().detach(), boxes.detach()

    # -- loss -------------------------------------------------------------------------------
    def on_epoch(self, epoch: int, max_epochs: int, no_aug: bool) -> Optional[str]:
        """YOLOX adds the L1 term for the epochs trained without mosaic/mixup."""
        notes = [super().on_epoch(epoch, max_epochs, no_aug)]
        if no_aug and not self.use_l1:
            self.use_l1 = True
            notes.append("L1 loss on")
        return "; ".join(n for n in notes if n) or None

    def loss(self, raw: dict[str, Tensor], priors: Tensor, assignment: Assignment,
             targets: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        pos = assignment.pos_mask                                     # [B, A]
        B, A = pos.shape
        num_pos = pos.sum().float()
        norm = num_pos.clamp(min=1.0)

        # positives only: [P] indices; empty when nothing is assigned (G may even be 0)
        batch_idx = torch.arange(B, device=pos.device)[:, None].expand(B, A)[pos]
        gt_idx = assignment.gt_index[pos]
        gt_boxes = targets["gt_boxes"][batch_idx, gt_idx].float()    # [P, 4]
        labels = assignment.labels[pos]                               # [P]
        quality = assignment.quality[pos].float()                     # [P]

        loss_obj = bce_with_logits(raw["obj"], pos.to(raw["obj"].dtype)).sum() / norm

        cls_target = F.one_hot(labels, self.num_classes).float() * quality[:, None]
        loss_cls = bce_with_logits(raw["cls"][pos], cls_target).sum() / norm

        pos_priors = priors[None].expand(B, A, 4)[pos]                 # [P, 4]
        pred_boxes = self.decode_boxes(raw["reg"][pos], pos_priors)
        loss_iou = iou_loss(pred_boxes, gt_boxes, mode="iou_sq").sum() / norm

        terms = {"obj": loss_obj, "cls": loss_cls, "iou": self.reg_weight * loss_iou}
        if self.use_l1:
            l1_target = self.encode_boxes(gt_boxes, pos_priors)
            terms["l1"] = l1_loss(raw["reg"][pos], l1_target).sum() / norm
        return terms, num_pos


def build(num_classes: int, assigner: Optional[Assigner] = None, size: str = "s",
          depth: Optional[float] = None, width: Optional[float] = None,
          depthwise: Optional[bool] = None, head_depthwise: Optional[bool] = None, act: str = "silu",
          **head_params) -> Detector:
    """A YOLOX detector.

    Args:
        num_classes: C.
        assigner: the label assigner (SimOTA in the paper); None for inference only.
        size: one of :data:`SIZES`; ``depth`` / ``width`` / ``depthwise`` override it.
        head_depthwise: depthwise separable convs in the head only (None: as ``depthwise``).
            The stride-8 head convs are the largest single cost of a regular-conv Nano step.
        head_params: :class:`YOLOXHead` options (``reg_weight``, ``use_l1``, ``max_log_wh``).
    """
    if size not in SIZES:
        raise ValueError(f"unknown YOLOX size {size!r}; choose one of {', '.join(SIZES)}")
    d, w, dw = SIZES[size]
    depth = d if depth is None else depth
    width = w if width is None else width
    depthwise = dw if depthwise is None else depthwise

    backbone = CSPDarknet(depth, width, depthwise, act)
    neck = PAFPN(backbone.out_channels, depth, depthwise, act)
    head_depthwise = depthwise if head_depthwise is None else head_depthwise
    head = YOLOXHead(num_classes, neck.out_channels, int(256 * width), head_depthwise, act, **head_params)
    model = Detector(backbone, neck, head, assigner, STRIDES, prior_offset=0.5)
    # YOLOX's BatchNorm settings: a small eps and a slow running average (momentum 0.03).
    set_bn(model, eps=1e-3, momentum=0.03)
    return model
