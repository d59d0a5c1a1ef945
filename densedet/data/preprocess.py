"""Fitting one image to the network for evaluation, prediction and the Python API.

densedet's own evaluation view is the centred letterbox of :mod:`densedet.data.transforms`.
Weights from elsewhere were evaluated with their own resize, and their outputs only agree
with the official ones when the same pixels go in (config section ``preprocess``):

| official model        | resize        | placement / padding             | rounding | interpolation |
|-----------------------|---------------|---------------------------------|----------|---------------|
| densedet              | letterbox     | centred, grey 114               | round    | cv2 (uint8)   |
| YOLOX                 | letterbox     | top-left, grey 114 bottom-right | floor    | cv2 (uint8)   |
| NanoDet-Plus          | warp (stretch)| none                            | -        | cv2.warpPerspective |
| torchvision FCOS      | shorter side 800, longer <= 1333, pad to 32 | zero after normalising | floor | torch bilinear (float) |
| mmdet FCOS            | shorter side 800, longer <= 1333, pad to 32 | zero after normalising | round | cv2 (uint8) |

:func:`fit_image` returns the image as the dataset does (``[3, H, W]`` float32 RGB in
[0, 1]) and a ``meta`` with ``scale`` ``(sx, sy)`` and ``pad`` ``(left, top)`` such that
``x_input = x_orig * sx + left`` (:func:`densedet.data.transforms.unletterbox_boxes` undoes
it), plus ``fill``: the RGB value of the padding, which :func:`densedet.data.loader.collate`
uses when it pads images of different sizes to one batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from densedet.errors import DensedetError

__all__ = ["Fit", "fit_image", "fit_boxes"]

RESIZES = ("letterbox", "shorter_side", "warp")


@dataclass(frozen=True)
class Fit:
    """How :func:`fit_image` fits an image (the config's ``preprocess`` section).

    Attributes:
        resize: ``letterbox`` | ``shorter_side`` | ``warp``.
        position: letterbox placement, ``center`` or ``top_left``.
        pad_value: grey level 0-255, or ``"mean"``: ``mean_rgb`` (zero after normalising).
        rounding: resized side lengths ``round`` or ``floor``.
        max_size: shorter_side: cap on the longer side (None: no cap).
        size_divisor: shorter_side: pad the input to a multiple of this.
        interpolation: ``cv2`` (uint8 INTER_LINEAR) or ``torch`` (float bilinear).
        mean_rgb: the network's normalisation mean as an RGB value in [0, 1].
    """

    resize: str = "letterbox"
    position: str = "center"
    pad_value: Union[int, str] = 114
    rounding: str = "round"
    max_size: Optional[int] = None
    size_divisor: int = 32
    interpolation: str = "cv2"
    mean_rgb: tuple[float, float, float] = (0.485, 0.456, 0.406)

    def __post_init__(self):
        if self.resize not in RESIZES:
            raise DensedetError(f"preprocess.resize must be one of {', '.join(RESIZES)}, got {self.resize!r}")

    @property
    def is_default(self) -> bool:
        """densedet's own centred letterbox (the dataset's historical path)."""
        return (self.resize == "letterbox" and self.position == "center" and self.pad_value == 114
                and self.rounding == "round" and self.interpolation == "cv2")

    @classmethod
    def from_config(cls, cfg) -> "Fit":
        """From a :class:`densedet.config.Config` (its ``preprocess`` and ``model`` input keys)."""
        p, m = cfg.preprocess, cfg.model
        mean = [float(v) / float(m.input_scale) for v in m.pixel_mean]
        if m.channel_order == "bgr":
            mean = mean[::-1]
        return cls(resize=p.resize, position=p.letterbox_position, pad_value=p.pad_value,
                   rounding=p.size_rounding, max_size=p.max_size, size_divisor=p.size_divisor,
                   interpolation=p.interpolation, mean_rgb=tuple(mean))

    def fill_rgb(self) -> tuple[float, float, float]:
        """The padding as an RGB value in [0, 1]."""
        if self.pad_value == "mean":
            return tuple(float(v) for v in self.mean_rgb)
        g = float(self.pad_value) / 255.0
        return (g, g, g)


def _side(x: float, rounding: str) -> int:
    return max(1, int(math.floor(x)) if rounding == "floor" else int(round(x)))


def _to_float_rgb(image_bgr: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 BGR -> ``[3, H, W]`` float32 RGB in [0, 1] (the dataset's conversion)."""
    out = np.empty((3,) + image_bgr.shape[:2], np.float32)
    np.multiply(image_bgr.transpose(2, 0, 1)[::-1], np.float32(1.0 / 255.0), out=out)
    return torch.from_numpy(out)


def _resize(image_bgr: np.ndarray, new_hw: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Resize to ``new_hw`` and convert to float RGB: on uint8 with OpenCV, or on the float
    image with torch's bilinear (align_corners=False), as torchvision's transform does."""
    h, w = new_hw
    if interpolation == "torch":
        x = _to_float_rgb(image_bgr)
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        return x
    if image_bgr.shape[:2] != (h, w):
        image_bgr = cv2.resize(image_bgr, (w, h), interpolation=cv2.INTER_LINEAR)
    return _to_float_rgb(image_bgr)


def _pad(x: torch.Tensor, out_hw: tuple[int, int], left: int, top: int,
         fill: tuple[float, float, float]) -> torch.Tensor:
    H, W = out_hw
    h, w = x.shape[-2:]
    if (h, w) == (H, W):
        return x
    out = torch.tensor(fill, dtype=torch.float32).view(3, 1, 1).expand(3, H, W).clone()
    out[:, top:top + h, left:left + w] = x
    return out


def fit_image(image_bgr: np.ndarray, input_hw: tuple[int, int], fit: Fit,
              orig_size: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, dict]:
    """Fit a decoded ``[h, w, 3]`` uint8 BGR image to the network (see the module doc).

    Args:
        image_bgr: the image (possibly decoded at reduced resolution).
        input_hw: the config's input size; for ``shorter_side`` its first value is the
            shorter side's target.
        fit: how.
        orig_size: ``(h, w)`` the boxes refer to (default: the image's own size).
    Returns:
        ``[3, H, W]`` float32 RGB in [0, 1] and ``meta`` (``scale (sx, sy)``, ``pad (left,
        top)``, ``fill``, ``input_hw``).
    """
    h0, w0 = orig_size if orig_size is not None else image_bgr.shape[:2]
    th, tw = int(input_hw[0]), int(input_hw[1])
    fill = fit.fill_rgb()
    if fit.resize == "warp":
        # NanoDet-Plus: cv2.warpPerspective of the image scaled to the input (no aspect kept)
        h, w = image_bgr.shape[:2]
        M = np.array([[tw / w, 0, 0], [0, th / h, 0], [0, 0, 1]], dtype=np.float64)
        warped = cv2.warpPerspective(image_bgr, M, dsize=(tw, th))
        x = _to_float_rgb(warped)
        scale, pad = (tw / w0, th / h0), (0, 0)
    elif fit.resize == "shorter_side":
        short, long_ = min(h0, w0), max(h0, w0)
        r = th / short
        if fit.max_size is not None:
            r = min(r, fit.max_size / long_)
        nh, nw = _side(h0 * r, fit.rounding), _side(w0 * r, fit.rounding)
        x = _resize(image_bgr, (nh, nw), fit.interpolation)
        d = max(1, int(fit.size_divisor))
        H, W = int(math.ceil(nh / d) * d), int(math.ceil(nw / d) * d)
        x = _pad(x, (H, W), 0, 0, fill)
        # per-axis ratios of the actual sizes (torchvision's resize_boxes, mmdet's scale_factor)
        scale, pad = (nw / w0, nh / h0), (0, 0)
    else:
        r = min(th / h0, tw / w0)
        nh, nw = min(th, _side(h0 * r, fit.rounding)), min(tw, _side(w0 * r, fit.rounding))
        x = _resize(image_bgr, (nh, nw), fit.interpolation)
        left, top = ((tw - nw) // 2, (th - nh) // 2) if fit.position == "center" else (0, 0)
        x = _pad(x, (th, tw), left, top, fill)
        scale, pad = (r, r), (left, top)
    meta = dict(scale=scale, pad=pad, fill=fill, input_hw=tuple(x.shape[-2:]))
    return x.contiguous(), meta


def fit_boxes(boxes: np.ndarray, meta: dict) -> np.ndarray:
    """``[N, 4]`` xyxy original px -> input px of :func:`fit_image`'s output."""
    sx, sy = meta["scale"]
    left, top = meta["pad"]
    mul = np.array([sx, sy, sx, sy], np.float32)
    off = np.array([left, top, left, top], np.float32)
    return (boxes.astype(np.float32) * mul + off).astype(np.float32)
