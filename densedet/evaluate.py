"""Score detections against a ground-truth ``DatasetIndex``: COCO metrics and VOC AP.

Two families of numbers come out of :func:`evaluate`:

* **COCO bbox metrics** (``AP``, ``AP50``, ``AP75``, ``APs/m/l``, ``AR1/10/100``,
  ``ARs/m/l``) computed by ``COCOeval`` (pycocotools, or faster-coco-eval when installed:
  same algorithm, much faster) on a COCO ground truth built in memory.
  Ground-truth ``area`` is the box area (``Sample`` keeps no segmentation area), so on real
  COCO annotations ``APs/APm/APl`` can differ slightly from the official numbers, which
  bucket by mask area; ``AP``/``AP50``/``AP75``/``AR`` over all areas are unaffected.
  Ignored objects (``Sample.ignore``: COCO ``iscrowd``, VOC ``difficult``) become
  ``iscrowd=1``: pycocotools' only way to ignore a ground truth. For a VOC difficult object
  this means crowd semantics: a detection whose box lies mostly inside it (intersection over
  the *detection's* area >= threshold) is ignored rather than counted as a false positive.

* **VOC AP at IoU >= ``iou_thr_voc``** (default 0.5), written by hand here because no
  maintained library takes these structures. It follows the PASCAL VOC devkit
  definition (``VOCevaldet``):

  - per class, detections are sorted by descending score; ties keep the input order
    (the devkit's MATLAB ``sort`` is stable too);
  - each detection is compared with the ground truths of its class in its image and takes
    the one of highest IoU (first one on IoU ties), *matched or not*, as the devkit does;
    if that IoU >= threshold: a difficult/ignored ground truth makes the detection neither
    TP nor FP (it is dropped from the curve), an unmatched one makes it a TP, an already
    matched one a FP (duplicate); below the threshold it is a FP;
  - recall = TP / (number of non-ignored ground truths), precision = TP / (TP + FP);
  - ``VOC07`` AP: mean over recall thresholds 0, 0.1, ..., 1 of the highest precision at
    recall >= threshold (0 when none); ``VOC`` AP (VOC2010+): area under the precision
    envelope at every recall change (all-points interpolation).

Box frames (see also ``docs/eval.md``). Both metric families score boxes in one frame, the
*continuous* frame of the readers: pixel ``i`` covers ``[i, i+1)``, widths are ``x2 - x1`` with
no ``+1`` (COCO's own convention). A detection is read in one of :data:`DET_FRAMES`:

* ``"continuous"`` (default): ``[x, y, w, h]`` is already in that frame. Model predictions
  (training validation, ``densedet eval CONFIG --weights``) are, since the model learns from
  the readers' boxes; COCO and YOLO detection files are too.
* ``"voc"``: the frame of the VOC annotation itself, the devkit's. The corners
  ``(x, y, x + w, y + h)`` are read as an XML ``<bndbox>``: 1-based inclusive pixel indices
  ``(xmin, ymin, xmax, ymax)``. They are moved into the continuous frame exactly as the VOC
  reader moves ground truth, ``(xmin - 1, ymin - 1, xmax, ymax)``, so the plain IoU computed
  afterwards is (up to float rounding) the devkit's inclusive-pixel IoU on the unshifted boxes
  (widths ``xmax - xmin + 1`` for detections *and* ground truth), and the VOC AP is
  ``VOCevaldet``'s / py-faster-rcnn ``voc_eval``'s. ``w``/``h`` down to -1 are legal here
  (``xmax = xmin - 1`` is a zero-width box). ``densedet eval --ann VOC --detections D.json``
  uses this frame; ``densedet eval CONFIG --weights W --save-detections D.json`` writes VOC
  detections in it (:func:`continuous_to_voc_results`), so that file re-scores to the same
  numbers.

Ground truth is never moved: the VOC reader keeps its continuous boxes (what training uses),
and ``voc`` only changes how a detection file is read. One difference with the devkit remains:
the reader clips ground truth reaching past the image by at most one pixel (``xmin = 0``,
``xmax = width + 1``) to the image, the devkit scores such boxes as written.

Undefined values are ``nan``: a class without non-ignored ground truth has no AP (COCO and
VOC alike) and is left out of the means, as pycocotools does; ``APs`` is ``nan`` when there
is no small object. :func:`metrics_to_json` turns ``nan`` into ``null``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from densedet.data.coco import read_coco_ground_truth
from densedet.data.index import DatasetIndex
from densedet.data.readers import detect_format, read_dataset
from densedet.data.sample import Sample
from densedet.errors import DensedetError

# COCOeval.stats order -> our flat keys.
COCO_STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                  "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
REQUIRED_DET_KEYS = ("image_id", "category_id", "bbox", "score")
VOC07_RECALL_POINTS = np.linspace(0.0, 1.0, 11)
# How a detection's [x, y, w, h] is read (module docstring, "Box frames").
DET_FRAMES = ("continuous", "voc")
# Smallest legal w/h per frame: a VOC box with xmax = xmin - 1 is zero pixels wide.
_MIN_WH = {"continuous": 0.0, "voc": -1.0}


class GroundTruth(Protocol):
    """What the evaluator needs from ``densedet.data.readers.DatasetIndex``."""

    samples: list[Sample]
    classes: list[str]
    category_ids: list[int]


@dataclass
class DetectionArrays:
    """Validated detections as arrays (one row per input entry, input order kept).

    Attributes:
        image: ``[D]`` index into ``gt.samples``.
        label: ``[D]`` class index into ``gt.classes``.
        xywh: ``[D, 4]`` COCO ``[x, y, w, h]`` in the continuous frame: as given for
            ``det_frame="continuous"``, moved from the VOC frame for ``"voc"``.
        scores: ``[D]`` confidences.
    """

    image: np.ndarray
    label: np.ndarray
    xywh: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def xyxy(self) -> np.ndarray:
        """``[D, 4]`` corners, for the VOC matching."""
        x, y, w, h = self.xywh.T
        return np.stack([x, y, x + w, y + h], axis=1)


# --------------------------------------------------------------------------- parsing


def _image_lookup(samples: Sequence[Sample]) -> tuple[dict, dict]:
    """Maps from a detection's ``image_id`` to a sample index: exact, then by ``str(id)``.

    The ``str`` fallback lets a COCO id written as ``"42"`` (or a VOC stem as a number-like
    string) match without guessing further, e.g. ``5`` never matches the stem ``"000005"``.
    """
    exact: dict = {}
    loose: dict = {}
    for i, s in enumerate(samples):
        if s.image_id in exact:
            raise DensedetError(f"ground truth: image id {s.image_id!r} appears twice "
                                f"({samples[exact[s.image_id]].path}, {s.path})")
        exact[s.image_id] = i
        loose.setdefault(str(s.image_id), i)
    return exact, loose


def _is_number(v: Any) -> bool:
    """A finite real number (bools are rejected: ``True`` is not a coordinate)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_entry(d: Any, where: str, min_wh: float = 0.0) -> None:
    """Structure of one COCO-results entry; raises naming ``where`` (file and index).

    ``min_wh`` is the smallest legal width/height: 0, or -1 in the VOC frame.
    """
    if not isinstance(d, dict):
        raise DensedetError(f"{where}: expected an object with keys {list(REQUIRED_DET_KEYS)}, "
                            f"got {type(d).__name__}")
    missing = [k for k in REQUIRED_DET_KEYS if k not in d]
    if missing:
        raise DensedetError(f"{where}: missing key(s) {missing}")
    bbox = d["bbox"]
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(map(_is_number, bbox))):
        raise DensedetError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    if bbox[2] < min_wh or bbox[3] < min_wh:
        what = ("a negative width or height" if min_wh == 0
                else f"a width or height below {min_wh:g}")
        raise DensedetError(f"{where}: 'bbox' has {what}: {bbox!r}")
    if not _is_number(d["score"]):
        raise DensedetError(f"{where}: 'score' must be a finite number, got {d['score']!r}")
    cat = d["category_id"]
    if not (isinstance(cat, numbers.Integral) and not isinstance(cat, bool)):
        raise DensedetError(f"{where}: 'category_id' must be an integer, got {cat!r}")


def parse_detections(gt: GroundTruth, detections: Sequence[dict],
                     source: str = "detections", det_frame: str = "continuous") -> DetectionArrays:
    """Validate COCO-results entries against ``gt`` and turn them into arrays.

    ``det_frame`` (one of :data:`DET_FRAMES`) says how the boxes are read; the result is in
    the continuous frame either way.

    Raises:
        DensedetError: naming ``source`` and the entry index for a malformed entry, an
            ``image_id`` not in the ground truth, or a ``category_id`` not in its class list.
    """
    if det_frame not in DET_FRAMES:
        raise DensedetError(f"unknown detection box frame {det_frame!r} (choose from {DET_FRAMES})")
    exact, loose = _image_lookup(gt.samples)
    cat_to_class = {int(c): k for k, c in enumerate(gt.category_ids)}
    n = len(detections)
    image = np.empty(n, np.int64)
    label = np.empty(n, np.int64)
    xywh = np.empty((n, 4), np.float64)
    scores = np.empty(n, np.float64)
    for i, d in enumerate(detections):
        where = f"{source}: entry {i}"
        _check_entry(d, where, _MIN_WH[det_frame])
        img = d["image_id"]
        idx = exact.get(img) if isinstance(img, (str, numbers.Integral)) else None
        idx = loose.get(str(img)) if idx is None else idx
        if idx is None:
            raise DensedetError(
                f"{where}: image_id {img!r} is not in the ground truth ({len(gt.samples)} "
                f"images; check the split / annotation path, VOC/YOLO ids are file stems)")
        cls = cat_to_class.get(int(d["category_id"]))
        if cls is None:
            raise DensedetError(
                f"{where}: category_id {d['category_id']!r} is not one of the ground truth's "
                f"{len(gt.classes)} categories {_short_list(gt.category_ids)} "
                f"(VOC/YOLO use the 0-based class index)")
        image[i], label[i], xywh[i], scores[i] = idx, cls, d["bbox"], d["score"]
    if det_frame == "voc":
        xywh = voc_to_continuous_xywh(xywh)
    return DetectionArrays(image, label, xywh, scores)


def voc_to_continuous_xywh(xywh: np.ndarray) -> np.ndarray:
    """``[D, 4]`` VOC-frame ``[x, y, w, h]`` -> the continuous frame, ``[D, 4]``.

    The corners ``(x, y, x + w, y + h)`` are 1-based inclusive pixel indices (an XML
    ``<bndbox>``); like the VOC reader, ``(xmin - 1, ymin - 1, xmax, ymax)``. The right/bottom
    edge ``x + w`` is kept as computed, so only ``x`` and ``y`` are rounded by the shift.
    """
    x, y, w, h = np.asarray(xywh, np.float64).T
    x1, y1 = x - 1.0, y - 1.0
    return np.stack([x1, y1, (x + w) - x1, (y + h) - y1], axis=1)


def continuous_to_voc_results(detections: Sequence[dict]) -> list[dict]:
    """COCO-results entries in the continuous frame -> the VOC frame (other keys kept).

    The inverse of :func:`voc_to_continuous_xywh`: ``[x + 1, y + 1, w - 1, h - 1]``, so
    ``evaluate(gt, out, det_frame="voc")`` scores the same boxes as
    ``evaluate(gt, detections)`` (up to float rounding).
    """
    out = []
    for d in detections:
        x, y, w, h = (float(v) for v in d["bbox"])
        out.append({**d, "bbox": [x + 1.0, y + 1.0, w - 1.0, h - 1.0]})
    return out


def _short_list(values: Sequence, limit: int = 8) -> str:
    """``[a, b, ...]`` capped so error messages stay one line."""
    values = list(values)
    head = ", ".join(map(str, values[:limit]))
    return f"[{head}{', ...' if len(values) > limit else ''}]"


# --------------------------------------------------------------------------- COCO


def _coco_image_ids(samples: Sequence[Sample]) -> list[int]:
    """Integer image ids for pycocotools: COCO's own ids when all are ints, else 1..N.

    Keeping COCO ids keeps pycocotools' image order (it sorts ids), hence its tie-breaking
    between equal scores, identical to running it on the original json.
    """
    ids = [s.image_id for s in samples]
    if all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        return [int(i) for i in ids]
    return list(range(1, len(ids) + 1))


def _xyxy_to_xywh(box: np.ndarray) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def build_coco_gt(gt: GroundTruth) -> dict:
    """The ground truth as a COCO json dict (box areas, ignored objects as ``iscrowd=1``)."""
    img_ids = _coco_image_ids(gt.samples)
    images, anns = [], []
    for img_id, s in zip(img_ids, gt.samples):
        images.append({"id": img_id, "width": int(s.width), "height": int(s.height),
                       "file_name": str(s.path)})
        for box, lab, ign in zip(s.boxes, s.labels, s.ignore):
            xywh = _xyxy_to_xywh(box)
            # ids start at 1: COCOeval stores the matched gt id and reads 0 as "unmatched".
            anns.append({"id": len(anns) + 1, "image_id": img_id,
                         "category_id": int(gt.category_ids[int(lab)]), "bbox": xywh,
                         "area": xywh[2] * xywh[3], "iscrowd": int(bool(ign))})
    cats = [{"id": int(c), "name": str(n)} for c, n in zip(gt.category_ids, gt.classes)]
    return {"images": images, "annotations": anns, "categories": cats}


def _coco_results(gt: GroundTruth, dets: DetectionArrays) -> list[dict]:
    img_ids = _coco_image_ids(gt.samples)
    return [{"image_id": img_ids[i], "category_id": int(gt.category_ids[c]),
             "bbox": [float(v) for v in box], "score": float(s)}
            for i, c, box, s in zip(dets.image, dets.label, dets.xywh, dets.scores)]


def _nan_if_negative(v: float) -> float:
    """pycocotools writes -1 for 'undefined'; -1 must never be averaged as a score."""
    return float(v) if v > -1 else float("nan")


COCO_BACKENDS = ("auto", "pycocotools", "faster_coco_eval")


def _coco_classes(backend: str) -> tuple[str, type, type]:
    """``(name, COCO, COCOeval)`` of the chosen backend.

    ``auto`` prefers faster-coco-eval (a C++ re-implementation of the same algorithm, about
    8x faster on a few hundred images, which matters for per-epoch validation) and falls
    back to pycocotools, the declared dependency. Both are checked against pycocotools in
    the tests.
    """
    if backend not in COCO_BACKENDS:
        raise DensedetError(f"unknown COCO backend {backend!r} (choose from {COCO_BACKENDS})")
    if backend in ("auto", "faster_coco_eval"):
        try:
            from faster_coco_eval import COCO, COCOeval_faster
            return "faster_coco_eval", COCO, COCOeval_faster
        except ImportError:
            if backend == "faster_coco_eval":
                raise DensedetError("COCO backend faster_coco_eval is not installed "
                                    "(pip install faster-coco-eval)") from None
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    return "pycocotools", COCO, COCOeval


def coco_metrics(gt: GroundTruth, dets: DetectionArrays,
                 backend: str = "auto") -> tuple[dict, np.ndarray, np.ndarray]:
    """Run ``COCOeval`` (bbox) from pycocotools or faster-coco-eval (see ``backend``).

    Returns:
        (flat stats keyed by :data:`COCO_STAT_KEYS` plus ``coco_backend``,
        per-class AP@[.5:.95] ``[C]``, per-class AP@.5 ``[C]``), ``nan`` where undefined.
    """
    name, COCO, COCOeval = _coco_classes(backend)
    quiet = io.StringIO()  # pycocotools prints progress and its own table
    with contextlib.redirect_stdout(quiet):
        coco_gt = COCO()
        coco_gt.dataset = build_coco_gt(gt)
        coco_gt.createIndex()
        results = _coco_results(gt, dets)
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # pycocotools' loadRes reads results[0]; no detections is still an evaluation
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "annotations": [],
                               "categories": coco_gt.dataset["categories"]}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: _nan_if_negative(v) for k, v in zip(COCO_STAT_KEYS, ev.stats[:12])}
    stats["coco_backend"] = name
    # precision [T, R, K, A, M]: area "all" (0), maxDets 100 (last); K follows sorted catIds.
    precision = ev.eval["precision"][:, :, :, 0, -1]
    cat_pos = {int(c): k for k, c in enumerate(ev.params.catIds)}
    per_ap = np.full(len(gt.classes), np.nan)
    per_ap50 = np.full(len(gt.classes), np.nan)
    for cls, cat in enumerate(gt.category_ids):
        p = precision[:, :, cat_pos[int(cat)]]
        if (p > -1).any():
            per_ap[cls] = p[p > -1].mean()
        p50 = p[0]  # iouThrs[0] == 0.5
        if (p50 > -1).any():
            per_ap50[cls] = p50[p50 > -1].mean()
    return stats, per_ap, per_ap50


# --------------------------------------------------------------------------- VOC


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[len(a), len(b)]`` of xyxy boxes in continuous coordinates (no +1)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    # Two degenerate (zero-area) boxes have no meaningful overlap: IoU 0, not 0/0.
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _best_gt(gt: GroundTruth, dets: DetectionArrays) -> tuple[np.ndarray, np.ndarray]:
    """For each detection, its highest-IoU same-class ground truth in its image.

    Returns:
        (global gt index ``[D]``, -1 when the image has no gt of that class; IoU ``[D]``).
        Global gt indices enumerate ``gt.samples[i].boxes`` rows in sample order.
    """
    offsets = np.cumsum([0] + [len(s.boxes) for s in gt.samples])
    best = np.full(len(dets), -1, np.int64)
    best_iou = np.full(len(dets), -1.0)
    boxes = dets.xyxy
    order = np.argsort(dets.image, kind="stable")
    images, starts = np.unique(dets.image[order], return_index=True)
    for img, idx in zip(images, np.split(order, starts[1:])):
        s = gt.samples[img]
        if len(s.boxes) == 0:
            continue
        iou = iou_matrix(boxes[idx], s.boxes.astype(np.float64))
        iou[dets.label[idx][:, None] != s.labels[None, :]] = -1.0  # other classes never match
        j = iou.argmax(axis=1)  # first maximum on ties, like the devkit's max()
        ov = iou[np.arange(len(idx)), j]
        best[idx] = np.where(ov > -1, offsets[img] + j, -1)
        best_iou[idx] = ov
    return best, best_iou


def voc_match(gt: GroundTruth, dets: DetectionArrays, iou_thr: float = 0.5) -> np.ndarray:
    """Devkit status of every detection: 1 TP, 0 FP, -1 ignored (matched a difficult gt).

    The greedy devkit pass "in score order, claim the best gt if still free" is written
    without a loop: the best gt of each detection does not depend on what earlier ones
    claimed, so a gt's TP is simply the first detection (in score order) choosing it.
    Sorting all classes together is fine: a gt is only ever chosen by its own class.
    """
    status = np.zeros(len(dets), np.int8)
    if len(dets) == 0:
        return status
    gt_ignore = np.concatenate([s.ignore for s in gt.samples] + [np.zeros(0, bool)])
    best, best_iou = _best_gt(gt, dets)
    order = np.argsort(-dets.scores, kind="stable")
    hits = order[(best[order] >= 0) & (best_iou[order] >= iou_thr)]
    ignored = gt_ignore[best[hits]]
    status[hits[ignored]] = -1
    claims = hits[~ignored]
    _, first = np.unique(best[claims], return_index=True)  # first claim of each gt
    status[claims[first]] = 1
    return status


def voc_ap_area(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ AP: area under the monotone precision envelope, all recall points."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: best precision to the right
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def voc_ap_11point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 AP: mean of the best precision at recall >= 0, 0.1, ..., 1 (0 if none)."""
    total = 0.0
    for t in VOC07_RECALL_POINTS:
        reached = precision[recall >= t]
        total += float(reached.max()) if reached.size else 0.0
    return total / len(VOC07_RECALL_POINTS)


@dataclass
class PRCurve:
    """One class's VOC precision-recall curve (detections in score order, ignored ones out).

    ``ap``/``ap07`` are ``nan`` when ``num_gt == 0``; ``recall`` is then all ``nan`` too.
    """

    name: str
    recall: np.ndarray
    precision: np.ndarray
    scores: np.ndarray
    num_gt: int
    ap: float
    ap07: float

    def to_json(self, decimals: int = 5) -> dict:
        """Compact JSON form (rounded lists) for plotting elsewhere."""
        def arr(a: np.ndarray) -> list:
            return [None if not math.isfinite(v) else round(float(v), decimals) for v in a]
        return {"name": self.name, "num_gt": self.num_gt, "ap": _json_float(self.ap),
                "ap07": _json_float(self.ap07), "recall": arr(self.recall),
                "precision": arr(self.precision), "scores": arr(self.scores)}


def voc_pr_curves(gt: GroundTruth, dets: DetectionArrays, iou_thr: float = 0.5) -> list[PRCurve]:
    """Per-class VOC precision-recall curves and APs (see the module docstring)."""
    status = voc_match(gt, dets, iou_thr)
    all_labels = np.concatenate([s.labels for s in gt.samples] + [np.zeros(0, np.int64)])
    all_ignore = np.concatenate([s.ignore for s in gt.samples] + [np.zeros(0, bool)])
    order = np.argsort(-dets.scores, kind="stable")
    curves = []
    for cls, name in enumerate(gt.classes):
        sel = order[(dets.label[order] == cls) & (status[order] >= 0)]
        tp = np.cumsum(status[sel] == 1, dtype=np.float64)
        fp = np.cumsum(status[sel] == 0, dtype=np.float64)
        num_gt = int(np.sum((all_labels == cls) & ~all_ignore))
        precision = tp / np.maximum(tp + fp, 1.0)  # tp + fp >= 1 once ignored ones are out
        if num_gt == 0:
            recall, ap, ap07 = np.full(len(sel), np.nan), float("nan"), float("nan")
        else:
            recall = tp / num_gt
            ap, ap07 = voc_ap_area(recall, precision), voc_ap_11point(recall, precision)
        curves.append(PRCurve(str(name), recall, precision, dets.scores[sel], num_gt, ap, ap07))
    return curves


# --------------------------------------------------------------------------- API


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate(gt: GroundTruth, detections: Sequence[dict], iou_thr_voc: float = 0.5,
             source: str = "detections", coco_backend: str = "auto",
             det_frame: str = "continuous") -> dict:
    """COCO and VOC metrics of COCO-format ``detections`` against ``gt``.

    Args:
        gt: a ``DatasetIndex`` (``samples``, ``classes``, ``category_ids``).
        detections: COCO results entries ``{"image_id", "category_id", "bbox": [x, y, w, h],
            "score"}``. VOC/YOLO ground truth: ``image_id`` is the image file stem and
            ``category_id`` the 0-based class index; COCO: the json's own ids.
        iou_thr_voc: IoU threshold of the VOC AP (devkit: >= 0.5).
        source: name used in error messages (e.g. the detections file).
        coco_backend: ``auto`` (faster-coco-eval when installed, else pycocotools),
            ``pycocotools`` or ``faster_coco_eval``; same numbers, different speed.
        det_frame: how detection boxes are read (:data:`DET_FRAMES`): ``continuous`` (model
            predictions, COCO/YOLO files) or ``voc`` (a VOC detections file in the
            annotation's 1-based inclusive pixels; the devkit's VOC AP). See the module
            docstring.

    Returns:
        A flat dict of fractions in [0, 1] (``nan`` when undefined): ``AP AP50 AP75 APs APm
        APl AR1 AR10 AR100 ARs ARm ARl VOC07_mAP50 VOC_mAP50``, counts ``num_images num_gt
        num_det``, ``iou_thr_voc``, ``coco_backend``, ``det_frame``, ``gt_format`` (the
        ground truth's ``fmt`` when it has one, else ``None``), ``per_class`` (list of ``{name,
        category_id, AP, AP50, VOC_AP, VOC07_AP, num_gt, num_det}``) and ``pr_curves``
        (list of :class:`PRCurve`, left out of :func:`metrics_to_json` unless asked for).
        ``VOC*_mAP50`` keep their names whatever ``iou_thr_voc`` is; the threshold is
        recorded beside them.

    Raises:
        DensedetError: malformed detections, unknown image ids or category ids, or a ground
            truth without images.
    """
    if not gt.samples:
        raise DensedetError("ground truth has no images to evaluate on")
    if len(gt.category_ids) != len(gt.classes):
        raise DensedetError(f"ground truth: {len(gt.classes)} classes but "
                            f"{len(gt.category_ids)} category ids")
    dets = parse_detections(gt, detections, source, det_frame)
    coco, per_ap, per_ap50 = coco_metrics(gt, dets, coco_backend)
    curves = voc_pr_curves(gt, dets, iou_thr_voc)
    per_class = [
        {"name": c.name, "category_id": int(cat), "AP": float(per_ap[k]),
         "AP50": float(per_ap50[k]), "VOC_AP": c.ap, "VOC07_AP": c.ap07, "num_gt": c.num_gt,
         "num_det": int(np.sum(dets.label == k))}
        for k, (c, cat) in enumerate(zip(curves, gt.category_ids))]
    return {
        **coco,
        "VOC07_mAP50": _nanmean([c.ap07 for c in curves]),
        "VOC_mAP50": _nanmean([c.ap for c in curves]),
        "iou_thr_voc": float(iou_thr_voc),
        "det_frame": det_frame,
        # lets a caller holding only the metrics (``densedet eval``'s model mode) know VOC ground truth
        "gt_format": getattr(gt, "fmt", None) or None,
        "num_images": len(gt.samples),
        "num_gt": sum(c.num_gt for c in curves),
        "num_det": len(dets),
        "per_class": per_class,
        "pr_curves": curves,
    }


# --------------------------------------------------------------------------- output


def _json_float(v: Any) -> Any:
    """``nan``/``inf`` -> ``None`` (strict JSON has no NaN); numpy scalars -> Python."""
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def metrics_to_json(metrics: dict, include_curves: bool = False) -> dict:
    """A strict-JSON-safe copy of :func:`evaluate`'s result (``nan`` -> ``null``).

    ``pr_curves`` is dropped unless ``include_curves`` (then as rounded lists).
    """
    out: dict = {}
    for key, value in metrics.items():
        if key == "pr_curves":
            if include_curves:
                out[key] = [c.to_json() if isinstance(c, PRCurve) else c for c in value]
        elif key == "per_class":
            out[key] = [{k: _json_float(v) for k, v in row.items()} for row in value]
        else:
            out[key] = _json_float(value)
    return out


def write_metrics_json(metrics: dict, path: str | Path, include_curves: bool = False) -> None:
    """Write :func:`metrics_to_json` to ``path`` (parent folders created)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics_to_json(metrics, include_curves), indent=2) + "\n")
    except OSError as e:
        raise DensedetError(f"{path}: cannot write metrics: {e.strerror or e}") from e


def _pct(v: Any) -> str:
    """A fraction as a percentage with one decimal; ``-`` when undefined."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100.0 * float(v):.1f}"


HEADLINE = (("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("APs", "APs"), ("APm", "APm"),
            ("APl", "APl"), ("AR100", "AR100"), ("VOC07_mAP50", "VOC07"), ("VOC_mAP50", "VOC"))


def format_report(metrics: dict) -> str:
    """The printed table: headline metrics, then one row per class (percentages)."""
    thr = metrics.get("iou_thr_voc", 0.5)
    backend = metrics.get("coco_backend", "pycocotools")
    lines = [f"COCO bbox AP@[.50:.95] ({backend}) and VOC AP@{thr:g} "
             f"(VOC07 11-point, VOC2010+ area), in %"]
    lines.append("  ".join(f"{label:>6}" for _, label in HEADLINE))
    lines.append("  ".join(f"{_pct(metrics.get(key)):>6}" for key, _ in HEADLINE))
    counts = [f"{k}={metrics[k]}" for k in ("num_images", "num_gt", "num_det") if k in metrics]
    if counts:
        lines.append("  ".join(counts))
    if metrics.get("det_frame") == "voc":
        lines.append("detection boxes read in the VOC annotation frame (1-based inclusive "
                     "pixels, devkit IoU)")
    rows = metrics.get("per_class") or []
    if rows:
        width = max(12, *(len(str(r["name"])) for r in rows))
        cols = ("num_gt", "num_det", "AP", "AP50", "VOC_AP", "VOC07_AP")
        lines.append("")
        lines.append(f"{'class':<{width}}  " + "  ".join(f"{c:>8}" for c in cols))
        for r in rows:
            cells = [f"{r['num_gt']:>8d}", f"{r['num_det']:>8d}"]
            cells += [f"{_pct(r[c]):>8}" for c in cols[2:]]
            lines.append(f"{str(r['name']):<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def load_detections(path: str | Path) -> list[dict]:
    """Read a COCO results json (a list of entries); entries are validated by ``evaluate``.

    Raises:
        DensedetError: unreadable file, invalid JSON (with line/column), or not a list.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DensedetError(f"{path}: cannot read detections: {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DensedetError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: "
                            f"{e.msg}") from e
    if not isinstance(data, list):
        raise DensedetError(f"{path}: expected a JSON list of detections (COCO results "
                            f"format), got {type(data).__name__}")
    return data


def read_ground_truth(ann: str, fmt: str | None = None, classes: list[str] | None = None,
                      split: str | None = None) -> DatasetIndex:
    """The ``DatasetIndex`` to score against: ``read_dataset``, except that a COCO json is
    read without its images (it carries every image's size; pycocotools needs none either)."""
    fmt = fmt or detect_format(ann)
    if fmt == "coco":
        return read_coco_ground_truth(ann, classes, split)
    return read_dataset(ann, fmt=fmt, classes=classes, split=split)
