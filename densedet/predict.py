"""``densedet predict --weights W SOURCE [SOURCE ...] [--out DIR] [--score-thresh 0.3] [key=value ...]``.

SOURCE: image files or folders (searched recursively for images). Writes, under ``--out``:
one drawn copy of every image (boxes, class names, scores) and ``detections.json``: per
image its path, size and detections with boxes ``[x1, y1, x2, y2]`` in original-image pixels.
The model, its input size and the class names come from the checkpoint (``key=value``
overrides apply to its stored config, e.g. ``input_size=640``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from densedet.errors import DensedetError

TRAILING_ARGS = True  # SOURCE and key=value may also follow the options
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
    import cv2

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
                   score_thresh: float, batch_size: int = 4) -> list[dict]:
    """Run ``model`` on image files; boxes mapped back to original-image pixels."""
    from PIL import Image

    from densedet.data.dataset import DetectionDataset
    from densedet.data.loader import collate
    from densedet.data.sample import Sample
    from densedet.data.transforms import unletterbox_boxes

    samples = []
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                w, h = im.size
        except Exception as e:
            raise DensedetError(f"{p}: cannot read image: {e}") from None
        samples.append(Sample(image_id=i, path=str(p), width=w, height=h))
    # the evaluation transform (letterbox), exactly what the model was evaluated with
    dataset = DetectionDataset(samples, cfg.input_hw, augment=None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    results = []
    for images, _, metas in loader:
        raw = model(images.to(device))
        dets = model.postprocess(raw, score_thresh=score_thresh, nms_iou=cfg.eval.nms_iou,
                                 max_det=cfg.eval.max_det)
        for det, meta in zip(dets, metas):
            s = samples[meta["image_id"]]
            boxes = unletterbox_boxes(det.boxes.float().cpu(), meta)
            results.append({
                "image": s.path, "width": s.width, "height": s.height,
                "detections": [{"box": [round(float(v), 2) for v in b], "score": round(float(sc), 4),
                                "label": int(c), "class": classes[int(c)]}
                               for b, sc, c in zip(boxes.tolist(), det.scores.tolist(), det.labels.tolist())],
            })
    return results


def predict(weights: str, sources: list[str], out: str | Path = "runs/predict", score_thresh: float = 0.3,
            overrides: Optional[list[str]] = None, config: Optional[str] = None, device: str = "auto",
            draw: bool = True) -> list[dict]:
    """Predict on ``sources`` and write drawn images + ``detections.json`` into ``out``."""
    import cv2

    from densedet.engine.build import model_from_weights, resolve_device

    dev = resolve_device(device)
    model, cfg, classes = model_from_weights(weights, config, overrides, device=dev)
    paths = collect_images(sources)
    results = predict_images(model, cfg, classes, paths, dev, score_thresh)
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
        image = cv2.imread(r["image"], cv2.IMREAD_COLOR)
        target = out / f"{unique}.jpg"
        cv2.imwrite(str(target), draw_detections(image, r["detections"]))
        r["drawn"] = str(target)
    (out / "detections.json").write_text(json.dumps(
        {"weights": str(weights), "classes": classes, "score_thresh": score_thresh, "images": results},
        indent=1) + "\n")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="a densedet checkpoint (best.pt / last.pt)")
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="image files or folders; key=value items override the stored config")
    parser.add_argument("--out", default="runs/predict", help="output folder (default runs/predict)")
    parser.add_argument("--score-thresh", type=float, default=0.3, help="minimum score (default 0.3)")
    parser.add_argument("--config", default=None, help="use this YAML instead of the checkpoint's config")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--no-draw", action="store_true", help="only write detections.json")


def run(args: argparse.Namespace) -> int:
    # key=value items among the sources are config overrides (unless such a file exists)
    words = list(args.sources) + list(getattr(args, "trailing", None) or [])
    unknown = [w for w in words if w.startswith("-") and not Path(w).exists()]
    if unknown:
        raise DensedetError(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = [w for w in words if "=" in w and not Path(w).exists()]
    sources = [w for w in words if w not in overrides]
    if not sources:
        raise DensedetError("no SOURCE image or folder given")
    results = predict(args.weights, sources, args.out, args.score_thresh, overrides, args.config,
                      args.device, draw=not args.no_draw)
    n = sum(len(r["detections"]) for r in results)
    print(f"{len(results)} image(s), {n} detection(s) >= {args.score_thresh}; wrote {args.out}/detections.json"
          + ("" if args.no_draw else " and the drawn images"))
    return 0
