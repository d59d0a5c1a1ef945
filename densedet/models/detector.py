"""The detector: backbone -> neck -> head, with the priors and the assigner it trains with."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from densedet.assign import Assigner, Assignment, assigners_for, trains_with
from densedet.assign.base import SOFT_WEIGHTS
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
    #: the one-to-one branch's assignment (end-to-end models, docs/end2end.md)
    o2o_assignment: Optional[Assignment] = None


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
        the log when something changed. Heads that override it call this one first: it sets
        the one-to-many / one-to-one loss weights of an end-to-end head."""
        if not self.end2end:
            return None
        self.o2m_weight = o2m_weight_at(*self.o2m_schedule, epoch, max_epochs)
        return f"loss weights o2m {self.o2m_weight:.3f} / o2o {1 - self.o2m_weight:.3f}"

    # -- the one-to-one branch of an end-to-end head (docs/end2end.md) ----------------------
    #: weight of the one-to-many loss, the one-to-one loss weighs ``1 - o2m_weight``; set by
    #: :meth:`on_epoch` from ``o2m_schedule`` (start, end), linear over the epochs
    o2m_weight: float = 1.0
    o2m_schedule: tuple[float, float] = (0.8, 0.1)
    #: whether the one-to-one branch reads detached features (then its loss trains only its
    #: own layers)
    o2o_detach: bool = False
    #: what ``forward`` computes outside training in an end-to-end head: ``"both"``
    #: branches, or only ``"o2o"`` / ``"o2m"`` (inference needs one; see ``Detector.set_branch``)
    eval_branches: str = "both"

    @property
    def end2end(self) -> bool:
        """Whether the head has a one-to-one branch (``raw`` then also holds ``o2o_*`` keys)."""
        return "o2o" in self._modules

    def make_o2o_branch(self) -> nn.Module:
        """The one-to-one branch: copies of the last layer of the head's towers and of its
        prediction layers (a head with a one-to-one form overrides this)."""
        raise NotImplementedError(f"{type(self).__name__} has no one-to-one branch")

    def enable_end2end(self, o2m_weight: tuple[float, float] = (0.8, 0.1),
                       detach: bool = False) -> None:
        """Add the one-to-one branch (a copy of the current weights of the layers it copies)."""
        if self.needs & SOFT_WEIGHTS:
            raise NotImplementedError(
                f"{type(self).__name__}'s loss is built on soft pair weights over all candidates "
                f"({', '.join(sorted(self.needs & SOFT_WEIGHTS))}), which a one-to-one "
                "assignment (one hard positive per object) does not define")
        self.o2o = self.make_o2o_branch()
        self.o2m_schedule = (float(o2m_weight[0]), float(o2m_weight[1]))
        self.o2m_weight = self.o2m_schedule[0]
        self.o2o_detach = bool(detach)

    def branches(self) -> tuple[bool, bool]:
        """``(one-to-many, one-to-one)``: which branches this forward computes."""
        if not self.end2end:
            return True, False
        if self.training or self.eval_branches == "both":
            return True, True
        return self.eval_branches == "o2m", self.eval_branches == "o2o"

    @staticmethod
    def o2o_view(raw: dict[str, Tensor]) -> dict[str, Tensor]:
        """The one-to-one outputs under the head's usual keys (``o2o_cls`` -> ``cls``), so that
        :meth:`decode`, :meth:`assigner_inputs` and :meth:`loss` read either branch."""
        return {k[4:]: v for k, v in raw.items() if k.startswith("o2o_")}


def o2m_weight_at(start: float, end: float, epoch: int, max_epochs: int) -> float:
    """One-to-many loss weight of a 0-based ``epoch``: ``start`` at the first epoch, ``end``
    at the last, linear in between (Ultralytics YOLO26's schedule, 0.8 -> 0.1)."""
    return start + (end - start) * min(epoch / max(max_epochs - 1, 1), 1.0)


def topk_detections(scores: Tensor, boxes: Tensor, max_det: int) -> Tensor:
    """NMS-free inference: the ``max_det`` best (prior, class) pairs of each image by score.

    Args:
        scores: ``[B, A, C]``; boxes: ``[B, A, 4]``.
    Returns:
        ``[B, max_det, 6]`` (x1, y1, x2, y2, score, class), best first; rows past ``A * C``
        (tiny inputs) are zeros. Batched, no host sync: the ONNX export's output too.
    """
    B, A, C = scores.shape
    k = min(max_det, A * C)
    top, idx = scores.flatten(1).topk(k, dim=1)  # [B, k], sorted
    anchor = torch.div(idx, C, rounding_mode="floor")
    label = idx - anchor * C
    picked = boxes.gather(1, anchor[..., None].expand(B, k, 4))
    out = torch.cat([picked, top[..., None].to(picked.dtype), label[..., None].to(picked.dtype)], -1)
    if k < max_det:
        out = torch.cat([out, out.new_zeros(B, max_det - k, 6)], dim=1)
    return out


class Detector(nn.Module):
    """A dense detector.

    Args:
        backbone: images ``[B, 3, H, W]`` -> list of feature maps.
        neck: list of feature maps -> list of feature maps, one per stride in ``strides``.
        head: :class:`Head`.
        assigner: the label assigner used by :meth:`loss` (None for inference-only models).
        strides: output stride of each level.
        prior_offset: prior centre offset, ``(i + offset) * stride``.
    Images are RGB float in [0, 1]; the detector normalises them itself:
    ``x = (reorder(images) * input_scale - pixel_mean) / pixel_std``, where ``reorder`` gives
    BGR when ``input_bgr`` (see :meth:`set_input`; official YOLOX weights want BGR in 0-255).
    ``prior_step``: ``"stride"`` places a level's priors every ``stride`` pixels;
    ``"input_div"`` every ``input side // feature side`` pixels per axis (torchvision's
    anchor grid, which differs from the stride on P6/P7 when the input is not a multiple of
    128); the stride column of the priors (the distance unit) stays the level's stride.
    """

    #: input convention and prior grid (class defaults: densedet's own)
    input_bgr: bool = False
    input_scale: float = 1.0
    prior_step: str = "stride"

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
        #: the one-to-one branch's assigner (end-to-end models, :meth:`enable_end2end`)
        self.o2o_assigner: Optional[Assigner] = None

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    # -- end-to-end (NMS-free) detection, docs/end2end.md ----------------------------------
    @property
    def end2end(self) -> bool:
        """Whether the head has a one-to-one branch (inference then needs no NMS)."""
        return self.head.end2end

    def enable_end2end(self, o2o_assigner: Optional[Assigner] = None,
                       o2m_weight: tuple[float, float] = (0.8, 0.1), detach: bool = False) -> None:
        """Add the head's one-to-one branch, trained by ``o2o_assigner`` (None: inference
        only) beside the one-to-many head; the losses weigh ``o2m_weight`` (start, end, linear
        over the epochs) and one minus it. Raises ValueError for a head without one."""
        try:
            self.head.enable_end2end(o2m_weight, detach)
        except NotImplementedError as e:
            raise ValueError(f"end2end: {e}") from None
        if o2o_assigner is not None and not trains_with(self.head.needs, o2o_assigner.provides):
            raise ValueError(f"end2end: the head's loss cannot train with o2o assigner "
                             f"{o2o_assigner.name!r}")
        self.o2o_assigner = o2o_assigner

    def inference_branch(self, nms: Optional[bool] = None) -> str:
        """``"o2o"`` or ``"o2m"``: the branch :meth:`postprocess` reads. ``nms`` (``eval.nms``):
        None = automatic (the one-to-one branch of an end-to-end model, without NMS; else the
        one-to-many head with NMS); True = the one-to-many head with NMS; False = no NMS
        (the one-to-one branch when there is one)."""
        return "o2o" if self.end2end and not nms else "o2m"

    def set_branch(self, nms: Optional[bool] = None) -> str:
        """Make ``forward`` compute, outside training, only the branch that
        :meth:`postprocess` with this ``nms`` reads (what export and timing want); returns it."""
        branch = self.inference_branch(nms)
        if self.end2end:
            self.head.eval_branches = branch
        return branch

    def decode_branch(self, raw: dict[str, Tensor], branch: str = "o2m") -> tuple[Tensor, Tensor]:
        """Scores ``[B, A, C]`` and boxes ``[B, A, 4]`` of one branch (``"o2m"`` / ``"o2o"``)."""
        view = self.head.o2o_view(raw) if branch == "o2o" else raw
        if branch == "o2o" and not view:
            raise ValueError("no one-to-one outputs: the model is not end-to-end or its forward "
                             "skipped that branch (Detector.set_branch)")
        try:
            return self.head.decode(view, raw["priors"])
        except KeyError as e:
            raise ValueError(f"no {branch} outputs in raw (missing {e}); the forward skipped "
                             "that branch (Detector.set_branch)") from None

    def set_input(self, channel_order: str = "rgb", scale: float = 1.0,
                  mean: Optional[tuple[float, float, float]] = None,
                  std: Optional[tuple[float, float, float]] = None) -> None:
        """The pixels the network was trained on: ``channel_order`` ``"rgb"`` or ``"bgr"``,
        images multiplied by ``scale`` (255 for 0-255 models), then ``(x - mean) / std`` with
        ``mean``/``std`` in those units and that channel order (config ``model.channel_order``,
        ``model.input_scale``, ``model.pixel_mean``, ``model.pixel_std``)."""
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be rgb or bgr, got {channel_order!r}")
        self.input_bgr = channel_order == "bgr"
        self.input_scale = float(scale)
        for name, value in (("pixel_mean", mean), ("pixel_std", std)):
            if value is not None:
                buf = getattr(self, name)
                buf.copy_(torch.tensor([float(v) for v in value], dtype=buf.dtype).view(1, 3, 1, 1))

    def set_priors(self, offset: Optional[float] = None, step: Optional[str] = None) -> None:
        """Change the prior grid: ``offset`` (``(i + offset) * step``) and ``step``
        (``"stride"`` or ``"input_div"``, see the class doc)."""
        if step is not None:
            if step not in ("stride", "input_div"):
                raise ValueError(f"prior step must be stride or input_div, got {step!r}")
            self.prior_step = step
        if offset is not None:
            self.prior_offset = float(offset)
            if hasattr(self.head, "prior_offset"):  # heads that place priors themselves (DW)
                self.head.prior_offset = float(offset)
        self.__dict__.pop("_prior_cache", None)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``[B, 3, H, W]`` in [0, 1] -> raw head outputs (``[B, A, ...]``) plus ``"priors"`` ``[A, 4]``."""
        if self.input_bgr:
            images = images[:, [2, 1, 0]]
        if self.input_scale != 1.0:
            images = images * self.input_scale
        x = (images - self.pixel_mean) / self.pixel_std
        feats = self.neck(self.backbone(x))
        raw = self.head(feats)
        sizes = tuple(tuple(f.shape[-2:]) for f in feats)
        raw["priors"] = self.priors_for(sizes, images.device, tuple(images.shape[-2:]))
        return raw

    def priors_for(self, sizes: tuple[tuple[int, int], ...], device: torch.device,
                   input_hw: Optional[tuple[int, int]] = None) -> Tensor:
        """``[A, 4]`` priors for these feature sizes, cached: the same tensor every step lets
        assigners cache what they derive from it (ATSS's host-side level boundaries).
        ``input_hw`` is needed with ``prior_step="input_div"``."""
        by_input = self.prior_step == "input_div" and input_hw is not None
        key = (sizes, str(device), tuple(int(v) for v in input_hw) if by_input else None)
        cache = self.__dict__.setdefault("_prior_cache", {})
        if key not in cache:
            if len(cache) > 8:  # multi-scale training cycles through a few sizes
                cache.clear()
            priors = make_priors(sizes, self.strides, self.prior_offset, device=device)
            if by_input:
                priors = self._input_div_centres(priors, sizes, input_hw)
            cache[key] = priors
        return cache[key]

    def _input_div_centres(self, priors: Tensor, sizes, input_hw) -> Tensor:
        """Centres at ``(i + offset) * (input side // feature side)`` per axis and level."""
        out, start = priors.clone(), 0
        H, W = int(input_hw[0]), int(input_hw[1])
        for h, w in sizes:
            n = h * w
            ys = (torch.arange(h, device=priors.device, dtype=priors.dtype) + self.prior_offset) * (H // h)
            xs = (torch.arange(w, device=priors.device, dtype=priors.dtype) + self.prior_offset) * (W // w)
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            out[start:start + n, 0], out[start:start + n, 1] = cx.reshape(-1), cy.reshape(-1)
            start += n
        return out

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
        o2o_assignment = None
        if self.end2end:
            # dual assignment: the one-to-one branch is assigned on its own predictions and
            # trained with the head's own loss; the two losses weigh o2m_weight and 1 - it
            if self.o2o_assigner is None:
                raise RuntimeError("this end-to-end detector has no one-to-one assigner; build "
                                   "it with one to train")
            view = self.head.o2o_view(raw)
            priors = raw["priors"]
            t0 = time.perf_counter()
            scores, boxes = self.head.assigner_inputs(view, priors)
            o2o_assignment = self.o2o_assigner(priors, scores, boxes, targets["gt_boxes"],
                                               targets["gt_labels"], targets["gt_valid"])
            assign_seconds += time.perf_counter() - t0
            o2o_terms, _ = self.head.loss(view, priors, o2o_assignment, targets)
            w = self.head.o2m_weight
            terms = {**{k: w * v for k, v in terms.items()},
                     **{f"o2o_{k}": (1.0 - w) * v for k, v in o2o_terms.items()}}
        total = sum(terms.values())
        return LossOutput(total=total, terms=terms, num_pos=num_pos,
                          assign_seconds=assign_seconds, assignment=assignment,
                          o2o_assignment=o2o_assignment)

    @torch.no_grad()
    def postprocess(self, raw: dict[str, Tensor], score_thresh: float = 0.01,
                    nms_iou: float = 0.65, max_det: int = 100, pre_nms_topk: int = 1000,
                    nms: Optional[bool] = None) -> list[Detections]:
        """Detections per image, boxes in network-input pixels.

        ``nms`` (``eval.nms``): None = automatic, True = the one-to-many head with score
        filter + class-wise NMS, False = no NMS (see :meth:`inference_branch`). Without NMS:
        the ``max_det`` best (prior, class) pairs by score above ``score_thresh``
        (:func:`topk_detections`), sorted by score.
        """
        branch = self.inference_branch(nms)
        scores, boxes = self.decode_branch(raw, branch)
        if not (nms if nms is not None else branch == "o2m"):
            dets = topk_detections(scores.float(), boxes.float(), max_det)
            out = []
            for d in dets:
                d = d[d[:, 4] > score_thresh]
                out.append(Detections(d[:, :4], d[:, 4], d[:, 5].long()))
            return out
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
