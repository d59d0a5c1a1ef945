"""``densedet predict --weights W SOURCE [SOURCE ...] [--out DIR] [--score-thresh 0.3] [key=value ...]``.

SOURCE: image files or folders (searched recursively for images). Writes, under ``--out``:
one drawn copy of every image (boxes, class names, scores) and ``detections.json``::

    {"weights": ..., "classes": [...], "score_thresh": ..., "branch": "o2m" | "o2o",
     "images": [{"image": path, "width": w, "height": h, "detections": [...], "drawn": path}],
     "errors": [{"file": path, "error": "truncated JPEG: ..."}]}

with boxes ``[x1, y1, x2, y2]`` in original-image pixels. Images are decoded with
:func:`densedet.data.image.read_image`, the decoder training uses: the stored pixel grid, EXIF
orientation ignored, so boxes, ``width``/``height`` and the drawn copy share one grid. An image
that cannot be read (missing, truncated, undecodable) does not stop the others: it is named on
stderr, listed under ``errors`` (a top-level key added next to ``images``, always present, so
readers of ``images`` are unaffected) and makes the command exit 1.

The model, its input size and the class names come from the checkpoint (``key=value``
overrides apply to its stored config, e.g. ``input_size=640``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch

from densedet.data.dataset import DetectionDataset
from densedet.data.image import ImageError, read_image
from densedet.data.index import image_size
from densedet.data.loader import collate
from densedet.data.preprocess import Fit
from densedet.data.sample import Sample
from densedet.data.transforms import unletterbox_boxes
from densedet.engine.build import model_from_weights, resolve_device
from densedet.errors import DensedetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def collect_images(sources: list[str]) -> list[Path]:
    """Image files named or found (recursively, sorted) in the named folders."""
    found: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            found.append(p)
        else:
            raise DensedetError(f"{p}: no such image or folder")
    if not found:
        raise DensedetError(f"no images found in {', '.join(sources)}")
    return found


def _colour(label: int) -> tuple[int, int, int]:
    # a fixed, well-spread colour per class (golden-ratio hue steps)
    import colorsys
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_detections(image_bgr: np.ndarray, dets: list[dict]) -> np.ndarray:
    """Boxes and ``class score`` labels drawn on a copy of a BGR image."""
    out = image_bgr.copy()
    thick = max(1, round(min(out.shape[:2]) / 300))
    for d in dets:
        x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
        colour = _colour(d["label"])
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick)
        text = f"{d['class']} {d['score']:.2f}"
        scale = 0.35 * thick
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else y1 + th + 2
        cv2.rectangle(out, (x1, ty - th - base + 1), (x1 + tw + 2, ty + base - 1), colour, -1)
        cv2.putText(out, text, (x1 + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


@torch.no_grad()
def predict_images(model, cfg, classes: list[str], paths: list[Path], device: torch.device,
                   score_thresh: float, batch_size: int = 4) -> tuple[list[dict], list[dict]]:
    """Run ``model`` on image files; boxes mapped back to original-image pixels.

    Returns ``(results, errors)``: a result per image that decoded, in ``paths`` order, and
    ``{"file", "error"}`` per image that did not, so one bad file does not stop the others.
    """

    samples = []
    for i, p in enumerate(paths):
        try:
            w, h = image_size(p)  # the header only: lets the loader decode JPEGs reduced
        except Exception:  # Pillow raises assorted types; the decoder below has the last word
            w = h = 0  # 0: "size unknown", the dataset then decodes fully and trusts the file
        samples.append(Sample(image_id=i, path=str(p), width=w, height=h))
    # the evaluation transform (letterbox), exactly what the model was evaluated with
    dataset = DetectionDataset(samples, cfg.input_hw, augment=None, fit=Fit.from_config(cfg))
    results, errors, batch = [], [], []
    model.set_branch(cfg.eval.nms)  # end-to-end: only the branch predicted with (eval.nms)
    for i in range(len(dataset)):
        try:
            batch.append(dataset[i])
        except DensedetError as e:
            errors.append(_error_record(samples[i].path, e))
        if batch and (len(batch) == batch_size or i == len(dataset) - 1):
            images, _, metas = collate(batch)
            batch = []
            raw = model(images.to(device))
            dets = model.postprocess(raw, score_thresh=score_thresh, nms_iou=cfg.eval.nms_iou,
                                     max_det=cfg.eval.max_det, nms=cfg.eval.nms)
            for det, meta in zip(dets, metas):
                (h, w), path = meta["orig_size"], samples[meta["image_id"]].path
                boxes = unletterbox_boxes(det.boxes.float().cpu(), meta)
                results.append({
                    "image": path, "width": int(w), "height": int(h),
                    "detections": [{"box": [round(float(v), 2) for v in b], "score": round(float(sc), 4),
                                    "label": int(c), "class": classes[int(c)]}
                                   for b, sc, c in zip(boxes.tolist(), det.scores.tolist(), det.labels.tolist())],
                })
    return results, errors


def _error_record(path: str, err: DensedetError) -> dict:
    """``{"file", "error"}`` for detections.json; the message without the leading path."""

    message = err.reason if isinstance(err, ImageError) else str(err)
    if message.startswith(f"{path}: "):
        message = message[len(path) + 2:]
    return {"file": str(path), "error": message}


def predict(weights: str, sources: list[str], out: str | Path = "runs/predict", score_thresh: float = 0.3,
            overrides: Optional[list[str]] = None, config: Optional[str] = None, device: str = "auto",
            draw: bool = True) -> dict:
    """Predict on ``sources`` and write drawn images + ``detections.json`` into ``out``.

    Returns what was written to ``detections.json`` (layout in the module doc); images that
    could not be read are in its ``errors`` list, not raised.
    """
    dev = resolve_device(device)
    model, cfg, classes = model_from_weights(weights, config, overrides, device=dev)
    paths = collect_images(sources)
    results, errors = predict_images(model, cfg, classes, paths, dev, score_thresh)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for r in results:
        if not draw:
            continue
        name = Path(r["image"]).stem
        k, unique = 1, name
        while unique in used:  # same file name in two folders
            k += 1
            unique = f"{name}_{k}"
        used.add(unique)
        try:
            image = read_image(r["image"])  # the grid the boxes refer to (EXIF ignored)
        except ImageError as e:  # changed on disk since it was predicted
            errors.append(_error_record(r["image"], e))
            continue
        target = out / f"{unique}.jpg"
        # imencode + write_bytes: cv2.imwrite cannot write non-ASCII paths on Windows
        ok, encoded = cv2.imencode(".jpg", draw_detections(image, r["detections"]))
        if ok:
            target.write_bytes(encoded.tobytes())
            r["drawn"] = str(target)
    # branch: "o2o" (an end-to-end model's one-to-one branch, no NMS) or "o2m" (NMS), eval.nms
    payload = {"weights": str(weights), "classes": classes, "score_thresh": score_thresh,
               "branch": model.inference_branch(cfg.eval.nms), "images": results, "errors": errors}
    (out / "detections.json").write_text(json.dumps(payload, indent=1) + "\n")
    return payload


def print_summary(written: dict, out: str | Path, drawn: bool = True) -> int:
    """Print what :func:`predict` did (failed images on stderr, each named with its reason)
    and return the exit status: 1 when any image failed, else 0."""
    results, errors = written["images"], written["errors"]
    for e in errors:
        print(f"{e['file']}: {e['error']}", file=sys.stderr)
    n = sum(len(r["detections"]) for r in results)
    print(f"{len(results)} image(s), {n} detection(s) >= {written['score_thresh']}; wrote "
          f"{out}/detections.json" + (" and the drawn images" if drawn else ""))
    if errors:
        print(f"FAILED: {len(errors)} image(s) could not be read (named above and under \"errors\" "
              "in detections.json); exit status 1")
        return 1
    return 0
