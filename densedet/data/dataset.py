"""The training / evaluation dataset: ``Sample`` list -> (image tensor, target, meta).

Training (``augment`` given), per sample, as YOLOX does:
  with ``mosaic_prob``: mosaic of 4 images -> random affine back to the input size ->
  with ``mixup_prob``: mixup with a letterboxed random image;
  otherwise: letterbox;
  then HSV jitter (``hsv_prob``) and horizontal flip (``flip_prob``).
Evaluation (``augment=None``): letterbox only; ``meta`` maps predictions back
(:func:`densedet.data.transforms.unletterbox_boxes`).

Mosaic and mixup can be switched off mid-training with :meth:`DetectionDataset.close_mosaic`
/ :meth:`DetectionDataset.set_augment`. The two probabilities live in a shared-memory
tensor, so DataLoader workers (persistent or not, fork or spawn) see the change without
rebuilding the loader. PyTorch hands out no indices for an epoch before ``iter(loader)``,
so calling it before an epoch's loop affects every batch of that epoch.

Indices: ``dataset[i]`` draws its randomness from numpy's global RNG (seeded per worker by
PyTorch); ``dataset[(i, seed)]`` (what :func:`densedet.data.loader.build_loader` feeds)
uses ``seed`` alone, so a sample's augmentation does not depend on the worker count.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from densedet.data.image import read_image
from densedet.data.preprocess import Fit, fit_boxes, fit_image
from densedet.data.sample import Sample
from densedet.data.transforms import (PAD_VALUE, Augmentation, clip_boxes_np, hflip, hsv_jitter,
                                      letterbox, letterbox_boxes, letterbox_params, mixup, mosaic,
                                      random_affine_matrix, unletterbox_boxes, warp_affine)
from densedet.errors import DensedetError

# unletterbox_boxes is re-exported: callers think of it as part of the dataset API
__all__ = ["DetectionDataset", "load_image", "unletterbox_boxes"]

_IGNORE_MODES = ("drop", "keep")
_MIXUP_TRIES = 10  # attempts at finding a mixup partner that has objects (YOLOX insists)


def _reduction(orig_size: tuple[int, int], input_size: tuple[int, int]) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) that still decodes at least at letterbox size:
    decoding a 640x480 JPEG at 1/2 is ~3x faster and loses nothing a 320 px input keeps."""
    (h, w), (th, tw) = orig_size, input_size
    if h <= 0 or w <= 0:
        return 1
    scale = min(th / h, tw / w)
    for factor in (8, 4, 2):
        if factor * scale <= 1.0:
            return factor
    return 1


def load_image(path: str, reduction: int = 1, expected_size: tuple[int, int] | None = None
               ) -> np.ndarray:
    """Decode an image as ``[h, w, 3]`` uint8 BGR, optionally at 1/``reduction`` size, with
    :func:`densedet.data.image.read_image` (stored pixel grid, EXIF orientation ignored, as
    everywhere in densedet). Raises ``DensedetError`` naming the file when it cannot be
    decoded, is a truncated JPEG, or its size disagrees with ``expected_size (h, w)``.
    """
    image = read_image(path, reduction)
    if expected_size is not None and min(expected_size) > 0:
        h, w = image.shape[:2]
        eh, ew = expected_size
        # reduced decodes round up (JPEG) or to nearest (other formats): allow one step
        if abs(h * reduction - eh) >= reduction + 1 or abs(w * reduction - ew) >= reduction + 1:
            raise DensedetError(f"{path}: decoded size {w * reduction}x{h * reduction} differs "
                                f"from the annotated {ew}x{eh} (width x height)")
    return image


class DetectionDataset(Dataset):
    """Samples -> ``(image, target, meta)``.

    Args:
        samples: annotated images (boxes xyxy original px).
        input_size: network input, an int (square) or ``(height, width)``.
        augment: training augmentation, or None for evaluation (letterbox only).
        ignore_mode: ``"drop"`` leaves ``ignore`` objects (VOC difficult, COCO crowd) out of
            the targets; ``"keep"`` trains on them as ordinary objects.
        fast_decode: decode JPEGs at 1/2, 1/4 or 1/8 when that still covers the input size.

    Creating one sets OpenCV to a single thread for the whole process (reason in
    ``__init__``). Call :meth:`cache_images` to decode everything once into memory;
    :meth:`close_mosaic` / :meth:`set_augment` switch augmentations, also in live workers.

    ``__getitem__`` returns:
        image ``[3, H, W]`` float32 RGB in [0, 1];
        target ``dict(boxes [N, 4] float32 xyxy input px, labels [N] int64)``;
        meta ``dict(image_id, orig_size (h, w), scale, pad (left, top), mosaic)``. ``scale``
        and ``pad`` give ``x_input = x_orig * scale + left`` for letterboxed samples; a
        flipped letterboxed sample has them too but its boxes are mirrored; mosaic samples
        have ``scale = pad = None``.
    """

    def __init__(self, samples: list[Sample], input_size: int | tuple[int, int],
                 augment: Augmentation | None = None, ignore_mode: str = "drop",
                 fast_decode: bool = True, fit: Fit | None = None):
        if ignore_mode not in _IGNORE_MODES:
            raise DensedetError(f"ignore_mode must be one of {_IGNORE_MODES}, got {ignore_mode!r}")
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.samples = list(samples)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        # evaluation view other than the centred letterbox (an official model's resize,
        # densedet.data.preprocess); decoded at full resolution, as the official code does
        self.fit = fit if fit is not None and not fit.is_default else None
        if self.fit is not None:
            fast_decode = False
        self.augment = augment
        self.ignore_mode = ignore_mode
        self.fast_decode = fast_decode
        # One OpenCV thread, process-wide: per-image ops at detector input sizes gain little
        # from threads on small CPU machines, forked workers inherit the setting (so two
        # workers on two cores do not each run a pool), and no worker has to reconfigure
        # the pool after fork, which can hang (see densedet.data.loader.seed_worker).
        cv2.setNumThreads(1)
        # [mosaic_prob, mixup_prob] in shared memory: workers hold copies of this object
        # but the storage is shared, so close_mosaic() reaches them
        probs = [augment.mosaic_prob, augment.mixup_prob] if augment else [0.0, 0.0]
        self._probs = torch.tensor(probs, dtype=torch.float64).share_memory_()
        self._canvas_buffer: np.ndarray | None = None
        self._cache: list[tuple[np.ndarray, tuple[int, int]]] | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_canvas_buffer"] = None  # scratch memory; not worth pickling to workers
        return state

    def __len__(self) -> int:
        return len(self.samples)

    # ------------------------------------------------------------------ switches
    def set_augment(self, mosaic_prob: float | None = None, mixup_prob: float | None = None):
        """Change mosaic / mixup probabilities, also in running DataLoader workers."""
        for slot, value in ((0, mosaic_prob), (1, mixup_prob)):
            if value is None:
                continue
            if not 0.0 <= value <= 1.0:
                raise DensedetError(f"augment probability must be in [0, 1], got {value}")
            if self.augment is None and value > 0:
                raise DensedetError("this dataset has no augmentation (evaluation dataset)")
            self._probs[slot] = float(value)

    def close_mosaic(self):
        """YOLOX's last-epochs switch: no more mosaic (hence no affine and no mixup)."""
        self.set_augment(mosaic_prob=0.0, mixup_prob=0.0)

    @property
    def mosaic_prob(self) -> float:
        return float(self._probs[0])

    @property
    def mixup_prob(self) -> float:
        return float(self._probs[1])

    # ------------------------------------------------------------------ loading
    def cache_images(self) -> int:
        """Decode every image once and keep it in memory at letterbox resolution (what
        mosaic, mixup and letterbox start from anyway, so the pipeline's output is the same
        up to resampling). Call it before building the loader: forked workers then share
        the pages (spawned ones receive a copy). Returns the bytes held (about
        ``H*W*3`` per image, e.g. 230 kB at 320 px for a 4:3 image)."""
        self._cache = None
        cache, total = [], 0
        for index in range(len(self)):
            image, orig = self._decode(index)
            _, (h, w), _ = letterbox_params(orig, self.input_size)
            if image.shape[:2] != (h, w):
                image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
            cache.append((image, orig))
            total += image.nbytes
        self._cache = cache
        return total

    def _decode(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """BGR image (maybe at reduced resolution) and the original ``(h, w)``."""
        if self._cache is not None:
            return self._cache[index]
        sample = self.samples[index]
        orig = (int(sample.height), int(sample.width))
        factor = _reduction(orig, self.input_size) if self.fast_decode else 1
        image = load_image(sample.path, factor, orig)
        if min(orig) <= 0:  # size not annotated: trust the file
            orig = (image.shape[0] * factor, image.shape[1] * factor)
        return image, orig

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """One sample decoded: BGR image (maybe at reduced resolution: the consumers resize
        from ``orig``), boxes ``[N, 4]`` (original px, clipped to the image) and labels
        ``[N]`` with ignore objects handled, original ``(h, w)``."""
        image, orig = self._decode(index)
        sample = self.samples[index]
        boxes, labels = sample.boxes, sample.labels
        if self.ignore_mode == "drop" and sample.ignore.any():
            boxes, labels = boxes[~sample.ignore], labels[~sample.ignore]
        boxes = clip_boxes_np(boxes.astype(np.float32), *orig)  # annotations may overhang
        return image, boxes, labels.astype(np.int64), orig

    def _letterboxed(self, index: int):
        image, boxes, labels, orig = self.load(index)
        pad_value = self.augment.pad_value if self.augment else PAD_VALUE
        image, scale, pad = letterbox(image, self.input_size, pad_value, orig_size=orig)
        return image, letterbox_boxes(boxes, scale, pad), labels, orig, scale, pad

    # ------------------------------------------------------------------ items
    def __getitem__(self, index):
        seed = None
        if isinstance(index, (tuple, list)):
            index, seed = index
        index = int(index)
        sample = self.samples[index]
        if self.augment is None and self.fit is not None:
            image, boxes, labels, orig = self.load(index)
            tensor, fit_meta = fit_image(image, self.input_size, self.fit, orig_size=orig)
            meta = dict(image_id=sample.image_id, orig_size=orig, mosaic=False, **fit_meta)
            boxes = fit_boxes(boxes.reshape(-1, 4), fit_meta)
            target = dict(boxes=torch.from_numpy(boxes),
                          labels=torch.from_numpy(np.ascontiguousarray(labels, np.int64).reshape(-1)))
            return tensor, target, meta
        if self.augment is None:
            image, boxes, labels, orig, scale, pad = self._letterboxed(index)
            meta_extra = dict(scale=scale, pad=pad, mosaic=False)
        else:
            if seed is None:
                # numpy's global RNG is what PyTorch seeds per worker; draw a seed from it
                seed = np.random.randint(0, 2**31 - 1)
            rng = np.random.default_rng(int(seed))
            image, boxes, labels, orig, meta_extra = self._augmented(index, rng)
        meta = dict(image_id=sample.image_id, orig_size=orig, **meta_extra)
        boxes = np.ascontiguousarray(boxes, np.float32).reshape(-1, 4)
        labels = np.ascontiguousarray(labels, np.int64).reshape(-1)
        target = dict(boxes=torch.from_numpy(boxes), labels=torch.from_numpy(labels))
        return _to_tensor(image), target, meta

    def _augmented(self, index: int, rng: np.random.Generator):
        cfg = self.augment
        mosaic_prob, mixup_prob = self._probs.tolist()
        if rng.random() < mosaic_prob:
            image, boxes, labels, orig = self._mosaic_affine(index, rng)
            if rng.random() < mixup_prob:
                image, boxes, labels = self._mixup(image, boxes, labels, rng)
            meta_extra = dict(scale=None, pad=None, mosaic=True)
        else:
            image, boxes, labels, orig, scale, pad = self._letterboxed(index)
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            keep = (w >= cfg.min_box_size) & (h >= cfg.min_box_size)
            boxes, labels = boxes[keep], labels[keep]
            meta_extra = dict(scale=scale, pad=pad, mosaic=False)
        if rng.random() < cfg.hsv_prob:
            image = hsv_jitter(image, rng, cfg.hsv_gains, bgr=True)
        if rng.random() < cfg.flip_prob:
            image, boxes = hflip(image, boxes)
        return image, boxes, labels, orig, meta_extra

    def _mosaic_affine(self, index: int, rng: np.random.Generator):
        cfg = self.augment
        picks = [index] + rng.integers(0, len(self), 3).tolist()
        loaded = [self.load(i) for i in picks]
        canvas, boxes, labels = mosaic([x[0] for x in loaded], [x[1] for x in loaded],
                                       [x[2] for x in loaded], self.input_size, rng,
                                       cfg.pad_value, orig_sizes=[x[3] for x in loaded],
                                       out=self._canvas_buffer)
        self._canvas_buffer = canvas  # per process (workers hold copies); only read below
        matrix = random_affine_matrix(rng, canvas.shape[:2], self.input_size, cfg.degrees,
                                      cfg.translate, cfg.mosaic_scale, cfg.shear)
        image, boxes, labels = warp_affine(canvas, boxes, labels, matrix, self.input_size, cfg)
        return image, boxes, labels, loaded[0][3]

    def _mixup(self, image, boxes, labels, rng: np.random.Generator):
        other = None
        for _ in range(_MIXUP_TRIES):
            other = int(rng.integers(0, len(self)))
            if self._has_objects(other):
                break
        other_image, other_boxes, other_labels, other_orig = self.load(other)
        return mixup(image, boxes, labels, other_image, other_boxes, other_labels, rng,
                     self.augment, other_orig_size=other_orig)

    def _has_objects(self, index: int) -> bool:
        sample = self.samples[index]
        if self.ignore_mode == "drop":
            return bool((~sample.ignore).any())
        return len(sample.labels) > 0


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 BGR -> ``[3, H, W]`` float32 RGB in [0, 1], in one numpy pass.

    Done in numpy on purpose: torch's ``.float().div_()`` goes through its intra-op thread
    pool, which on a busy 2-core machine measured ~50 ms per 320 px image against 0.5 ms."""
    out = np.empty((3,) + image.shape[:2], np.float32)
    np.multiply(image.transpose(2, 0, 1)[::-1], np.float32(1.0 / 255.0), out=out)
    return torch.from_numpy(out)

