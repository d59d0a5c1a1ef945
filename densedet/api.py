"""The Python API: a trained or converted model in three lines.

    import densedet
    model = densedet.load("yolox_s.pt")          # a densedet checkpoint, or a converted file
    dets = model.predict("img.jpg")              # [{"box": [x1, y1, x2, y2], "score", "label", "class"}]
    raw = model.predict_raw("img.jpg")           # every prior, before NMS

``predict`` gives the records ``densedet predict`` writes to ``detections.json`` for that
image (boxes in original-image pixels, clipped to it). ``predict_raw`` gives ``boxes [A, 4]``
(float32 xyxy in original-image pixels, not clipped) and ``scores [A, C]`` (the score the
model ranks by: YOLOX ``obj * cls``, FCOS ``cls * centerness`` or torchvision's square root,
NanoDet-Plus ``cls``) for every prior, plus ``priors [A, 4]`` in network-input pixels. Images
are a path or an ``[H, W, 3]`` uint8 BGR array (OpenCV's layout) and are fitted to the network
as the checkpoint's config says (``preprocess``: an official model's own resize).

``load`` also takes an official file (``yolox_s.pth``, a NanoDet-Plus ``.ckpt``, ...) and
converts it in memory (:mod:`densedet.convert`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from densedet.config import config_from_dict
from densedet.convert import converted_checkpoint
from densedet.data.image import read_image
from densedet.data.preprocess import Fit, fit_image
from densedet.data.transforms import unletterbox_boxes
from densedet.engine.build import build_detector, model_from_weights, resolve_device
from densedet.engine.official import detect_layout, extract_state, read_weights
from densedet.errors import DensedetError
from densedet.predict import predict_images

__all__ = ["Model", "load"]

Image = Union[str, Path, np.ndarray]


class Model:
    """A detector ready to run: the network, its config and class names.

    Attributes:
        net: the :class:`~densedet.models.Detector` (eval mode).
        cfg: its :class:`~densedet.config.Config`.
        classes: class names.
        device: where it runs.
    """

    def __init__(self, net: torch.nn.Module, cfg, classes: list[str], device: torch.device):
        self.net, self.cfg, self.classes, self.device = net, cfg, list(classes), device
        self.fit = Fit.from_config(cfg)

    def __repr__(self) -> str:
        return (f"densedet.Model({self.cfg.model.name} {self.cfg.model.size}, {len(self.classes)} classes, "
                f"input {self.cfg.input_size}, {self.fit.resize})")

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _image(image: Image) -> np.ndarray:
        if isinstance(image, (str, Path)):
            return read_image(image)
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise DensedetError(f"an image is a path or an [H, W, 3] uint8 BGR array, got "
                                f"{arr.dtype} {tuple(arr.shape)}")
        return np.ascontiguousarray(arr)

    @torch.no_grad()
    def _run(self, image: Image):
        bgr = self._image(image)
        x, meta = fit_image(bgr, self.cfg.input_hw, self.fit)
        meta["orig_size"] = bgr.shape[:2]
        raw = self.net(x[None].to(self.device))
        return raw, meta

    # ------------------------------------------------------------------ outputs
    def predict(self, image: Image, score_thresh: float = 0.3) -> list[dict]:
        """Detections of one image, as ``densedet predict`` records them:
        ``[{"box": [x1, y1, x2, y2], "score", "label", "class"}]`` (original-image pixels)."""
        if isinstance(image, (str, Path)):
            results, errors = predict_images(self.net, self.cfg, self.classes, [Path(image)], self.device,
                                             score_thresh, batch_size=1)
            if errors:
                raise DensedetError(f"{errors[0]['file']}: {errors[0]['error']}")
            return results[0]["detections"]
        raw, meta = self._run(image)
        det = self.net.postprocess(raw, score_thresh=score_thresh, nms_iou=self.cfg.eval.nms_iou,
                                   max_det=self.cfg.eval.max_det)[0]
        boxes = unletterbox_boxes(det.boxes.float().cpu(), meta)
        return [{"box": [round(float(v), 2) for v in b], "score": round(float(s), 4), "label": int(c),
                 "class": self.classes[int(c)]}
                for b, s, c in zip(boxes.tolist(), det.scores.tolist(), det.labels.tolist())]

    def predict_raw(self, image: Image) -> dict:
        """Every prior before NMS: ``boxes [A, 4]`` xyxy original-image pixels (unclipped),
        ``scores [A, C]``, ``priors [A, 4]`` (input px), ``input_hw``, ``scale``, ``pad``."""
        raw, meta = self._run(image)
        with torch.no_grad():
            scores, boxes = self.net.head.decode(raw, raw["priors"])
        boxes = unletterbox_boxes(boxes[0].float().cpu(), meta, clip=False)
        return {"boxes": boxes, "scores": scores[0].float().cpu(), "priors": raw["priors"].cpu(),
                "input_hw": tuple(meta["input_hw"]), "scale": meta["scale"], "pad": meta["pad"]}

    __call__ = predict


def load(path: str | Path, device: str = "cpu", overrides: Optional[list[str]] = None,
         layout: Optional[str] = None, log=None) -> Model:
    """A :class:`Model` from a densedet checkpoint (``best.pt``, a ``densedet convert``
    output) or an official weights file (converted in memory; ``layout`` as ``--from``).
    ``overrides``: ``key=value`` on the stored config (e.g. ``input_size=512``)."""
    quiet = log or (lambda *_: None)
    dev = resolve_device(device)
    obj = read_weights(path)
    official = isinstance(obj, dict) and "config" not in obj and (
        layout is not None or detect_layout(extract_state(obj)[0]) not in (None, "torchvision-resnet",
                                                                          "torchvision-shufflenet"))
    if not official:
        net, cfg, classes = model_from_weights(path, None, overrides, device=dev, log=quiet)
        return Model(net, cfg, classes, dev)
    ckpt = converted_checkpoint(path, layout, log=quiet)
    cfg = config_from_dict(ckpt["config"], overrides, where=f"{path} (converted config)")
    net = build_detector(cfg, len(ckpt["classes"]), with_assigner=False)
    net.load_state_dict(ckpt["model"])
    return Model(net.to(dev).eval(), cfg, ckpt["classes"], dev)
