"""The detector: backbone -> neck -> head, with the priors and the assigner it trains with."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from densedet.assign import Assigner, Assignment, assigners_for
from densedet.priors import make_priors


@dataclass
class LossOutput:
    """One training step's loss.

    Attributes:
        total: scalar to backpropagate.
        terms: named scalar terms (already weighted) that sum to ``total``; used for logging
            and to name the culprit when a loss turns NaN.
        num_pos: scalar tensor, positives in the batch (before averaging over processes).
        assign_seconds: wall time spent in the assigner (host clock).
        assignment: the assigner's decision (for pictures and statistics).
    """

    total: Tensor
    terms: dict[str, Tensor]
    num_pos: Tensor
    assign_seconds: float = 0.0
    assignment: Optional[Assignment] = None


@dataclass
class Detections:
    """Detections of one image, ``N`` boxes: ``boxes [N, 4] xyxy``, ``scores [N]``, ``labels [N]``."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    extra: dict = field(default_factory=dict)


class Head(nn.Module):
    """What every head provides. ``raw`` is a dict of flattened outputs ``[B, A, ...]``."""

    num_classes: int
    #: optional Assignment fields the loss needs (DW: its pair weights); the methods this
    #: head trains with follow from it (:attr:`compatible_assigners`).
    needs: frozenset[str] = frozenset()

    @property
    def compatible_assigners(self) -> tuple[str, ...]:
        """Registered assigners whose outputs this head's loss can train with."""
        return assigners_for(self.needs)

    def decode(self, raw: dict[str, Tensor], priors: Tensor) -> tuple[Tensor, Tensor]:
        """Scores ``[B, A, C]`` (probabilities) and boxes ``[B, A, 4]`` xyxy for inference."""
        raise NotImplementedError

    def assigner_inputs(self, raw: dict[str, Tensor], priors: Tensor) -> tuple[Tensor, Tensor]:
        """Scores and boxes the assigner sees (detached). Defaults to :meth:`decode`."""
        scores, boxes = self.decode(raw, priors)
        return scores.detach(), boxes.detach()

    def loss(self, raw: dict[str, Tensor], priors: Tensor, assignment: Assignment,
             targets: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """Weighted loss terms and the positive count (normaliser before DDP averaging)."""
        raise NotImplementedError

    def on_epoch(self, epoch: int, max_epochs: int, no_aug: bool) -> Optional[str]:
        """Called before each training epoch (0-based); ``no_aug`` is true in the last
        epochs, trained without mosaic/mixup. A head whose loss changes with the schedule
        (YOLOX's L1 term, NanoDet-Plus's guidance detach) does it here and returns a note for
        the log when something changed."""
        return None


class Detector(nn.Module):
    """A dense detector.

    Args:
        backbone: images ``[B, 3, H, W]`` -> list of feature maps.
        neck: list of feature maps -> list of feature maps, one per stride in ``strides``.
        head: :class:`Head`.
        assigner: the label assigner used by :meth:`loss` (None for inference-only models).
        strides: output stride of each level.
        prior_offset: prior centre offset, ``(i + offset) * stride``.
    Images are RGB float in [0, 1]; the detector normalises them itself.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: Head,
                 assigner: Optional[Assigner], strides: list[int], prior_offset: float = 0.5,
                 pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
                 pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)):
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head
        self.assigner = assigner
        self.strides = list(strides)
        self.prior_offset = prior_offset
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``[B, 3, H, W]`` in [0, 1] -> raw head outputs (``[B, A, ...]``) plus ``"priors"`` ``[A, 4]``."""
        x = (images - self.pixel_mean) / self.pixel_std
        feats = self.neck(self.backbone(x))
        raw = self.head(feats)
        sizes = tuple(tuple(f.shape[-2:]) for f in feats)
        raw["priors"] = self.priors_for(sizes, images.device)
        return raw

    def priors_for(self, sizes: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
        """``[A, 4]`` priors for these feature sizes, cached: the same tensor every step lets
        assigners cache what they derive from it (ATSS's host-side level boundaries)."""
        key = (sizes, str(device))
        cache = self.__dict__.setdefault("_prior_cache", {})
        if key not in cache:
            if len(cache) > 8:  # multi-scale training cycles through a few sizes
                cache.clear()
            cache[key] = make_priors(sizes, self.strides, self.prior_offset, device=device)
        return cache[key]

    def set_epoch(self, epoch: int, max_epochs: int, no_aug: bool = False) -> Optional[str]:
        """The head's :meth:`Head.on_epoch`: returns its note for the log, if any."""
        return self.head.on_epoch(epoch, max_epochs, no_aug)

    def assign(self, raw: dict[str, Tensor], targets: dict[str, Tensor]) -> Assignment:
        """Run the assigner on the head's (detached) predictions."""
        if self.assigner is None:
            raise RuntimeError("this detector has no assigner; build it with one to train")
        priors = raw["priors"]
        scores, boxes = self.head.assigner_inputs(raw, priors)
        return self.assigner(priors, scores, boxes, targets["gt_boxes"], targets["gt_labels"],
                             targets["gt_valid"])

    def loss(self, raw: dict[str, Tensor], targets: dict[str, Tensor]) -> LossOutput:
        """Assign, then compute the head's loss. ``targets``: gt_boxes ``[B,G,4]``,
        gt_labels ``[B,G]``, gt_valid ``[B,G]``."""
        t0 = time.perf_counter()
        assignment = self.assign(raw, targets)
        assign_seconds = time.perf_counter() - t0
        terms, num_pos = self.head.loss(raw, raw["priors"], assignment, targets)
        total = sum(terms.values())
        return LossOutput(total=total, terms=terms, num_pos=num_pos,
                          assign_seconds=assign_seconds, assignment=assignment)

    @torch.no_grad()
    def postprocess(self, raw: dict[str, Tensor], score_thresh: float = 0.01,
                    nms_iou: float = 0.65, max_det: int = 100, pre_nms_topk: int = 1000) -> list[Detections]:
        """Score filter + class-wise NMS per image; boxes in network-input pixels."""
        scores, boxes = self.head.decode(raw, raw["priors"])
        out = []
        C = scores.shape[-1]
        for s, b in zip(scores, boxes):  # per image: NMS output sizes differ anyway
            flat = s.flatten()
            k = min(pre_nms_topk, flat.numel())
            top_scores, idx = flat.topk(k)
            keep = top_scores > score_thresh
            top_scores, idx = top_scores[keep], idx[keep]
            anchor, label = idx // C, idx % C
            bb = b[anchor]
            kept = batched_nms(bb.float(), top_scores.float(), label, nms_iou)[:max_det]
            out.append(Detections(bb[kept], top_scores[kept], label[kept]))
        return out
