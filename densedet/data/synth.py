"""``densedet synth``: a deterministic, offline benchmark dataset in VOC layout.

Output (``OUT/``)::

    Annotations/000001.xml ...      VOC xml, one per image
    JPEGImages/000001.jpg ...       the images (square, --size px)
    ImageSets/Main/{trainval,train,val,test}.txt   80 / 10 / 10 % split (densedet.data.split rules)
    classes.txt                     one class name per line (read_dataset finds it)
    annotations.json                the same boxes as COCO json, plus annotations_<list>.json per list

COCO ids: image id = int(stem) (1..N), category id = class index + 1 (COCO's convention of
not using 0). Boxes have integer pixel-edge coordinates, so VOC, COCO and the YOLO export all
read back to the same xyxy boxes.

Default mode: ``SYNTH_CLASSES`` shapes/glyphs with random size (log-uniform from 8 px to 60 %
of the image), aspect (up to 2:1), rotation, colour and shading, on textured backgrounds
(gradients, low-frequency colour noise, lines and blobs as clutter, pixel noise, JPEG).
Occlusion: objects are placed front to back, each new one *behind* those already placed, and
a placement is rejected when less than ``MIN_VISIBLE`` of it would show; so no object is more
than 70 % hidden and visibility of placed objects never changes. Boxes are the extent of the
*visible* pixels (the VOC annotation guideline).

``--crowd``: pedestrian-like figures (``CROWD_CLASSES``) standing on a ground plane with
perspective, aiming at 15-60 per image in a few dense groups (the 70 % rule may leave a few
less), heavy overlap; boxes are the *full* figure
(CrowdHuman "full body" style), which is where overlap-aware assignment such as LLA matters.

Every image is generated from its own seed ``SeedSequence([seed, index])``, so the output does
not depend on the number of worker processes.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from densedet.data.coco import coco_dict
from densedet.data.index import DatasetIndex
from densedet.data.sample import Sample
from densedet.data.split import LIST_NAMES, split_stems
from densedet.data.voc import write_voc_xml
from densedet.errors import DensedetError

SYNTH_CLASSES = ["circle", "square", "triangle", "star", "cross", "hexagon", "ring", "letter_E",
                 "arrow", "crescent"]
CROWD_CLASSES = ["person"]

MIN_VISIBLE = 0.3          # drop placements hidden by more than 70 %
MIN_SIZE = 8.0             # smallest nominal object size (px)
MAX_FRACTION = 0.6         # largest nominal object size, as a fraction of the image
MIN_BOX_SIDE = 3           # a visible box thinner than this is not a fair target
SPLIT_FRACTIONS = (0.9, 8 / 9)   # trainval of all, train of trainval -> 80/10/10


# ----------------------------------------------------------------------------- shapes

def _regular(k: int, r: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + np.arange(k) * 2 * math.pi / k
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer, inn = _regular(points), _regular(points, inner, -math.pi / 2 + math.pi / points)
    return np.stack([outer, inn], 1).reshape(-1, 2)


def _unit_shapes() -> dict[str, list[tuple[np.ndarray, int]]]:
    """Each class as (polygon in [-1, 1]^2, fill) pairs drawn in order; fill 0 cuts holes."""
    cross_w = 0.33
    plus = np.array([[-cross_w, -1], [cross_w, -1], [cross_w, -cross_w], [1, -cross_w], [1, cross_w],
                     [cross_w, cross_w], [cross_w, 1], [-cross_w, 1], [-cross_w, cross_w], [-1, cross_w],
                     [-1, -cross_w], [-cross_w, -cross_w]], float)
    letter_e = np.array([[-0.8, -1], [0.8, -1], [0.8, -0.6], [-0.3, -0.6], [-0.3, -0.2], [0.6, -0.2],
                         [0.6, 0.2], [-0.3, 0.2], [-0.3, 0.6], [0.8, 0.6], [0.8, 1], [-0.8, 1]], float)
    arrow = np.array([[-1, -0.3], [0.1, -0.3], [0.1, -0.85], [1, 0], [0.1, 0.85], [0.1, 0.3], [-1, 0.3]], float)
    circle = _regular(48)
    return {
        "circle": [(circle, 1)],
        "square": [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), 1)],
        "triangle": [(_regular(3) * [1.0, 1.0] + [0, 0.25], 1)],
        "star": [(_star(), 1)],
        "cross": [(plus, 1)],
        "hexagon": [(_regular(6, phase=0.0), 1)],
        "ring": [(circle, 1), (circle * 0.55, 0)],
        "letter_E": [(letter_e, 1)],
        "arrow": [(arrow, 1)],
        "crescent": [(circle, 1), (circle * 0.85 + [0.5, -0.15], 0)],
    }


UNIT_SHAPES = _unit_shapes()


def render_shape(name: str, size: float, aspect: float, angle: float) -> np.ndarray:
    """Binary mask (uint8 0/1) of a shape ``size`` px across, stretched by ``aspect`` (w/h) and
    rotated by ``angle`` radians, cropped to its pixels."""
    sx, sy = size / 2 * math.sqrt(aspect), size / 2 / math.sqrt(aspect)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    polys = [((poly * [sx, sy]) @ rot.T, fill) for poly, fill in UNIT_SHAPES[name]]
    lo = np.min([p.min(0) for p, _ in polys], 0)
    hi = np.max([p.max(0) for p, _ in polys], 0)
    w, h = int(math.ceil(hi[0] - lo[0])) + 2, int(math.ceil(hi[1] - lo[1])) + 2
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly, fill in polys:
        draw.polygon([tuple(p) for p in (poly - lo + 1)], fill=fill)
    return _crop(np.asarray(canvas))


def render_person(width: float, height: float) -> np.ndarray:
    """Mask of a standing figure, parts labelled 1 head, 2 torso, 3 legs (for colouring)."""
    w, h = max(int(round(width)), 4), max(int(round(height)), 10)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    head = 0.16 * h
    hx0 = (w - head * 0.85) / 2
    draw.rounded_rectangle([0, head * 0.95, w - 1, 0.62 * h], radius=max(1, int(0.3 * w)), fill=2)
    leg_w = 0.42 * w
    draw.rectangle([0.06 * w, 0.55 * h, 0.06 * w + leg_w, h - 1], fill=3)
    draw.rectangle([0.94 * w - leg_w, 0.55 * h, 0.94 * w, h - 1], fill=3)
    draw.ellipse([hx0, 0, hx0 + head * 0.85, head], fill=1)
    return np.asarray(canvas)


def _crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return mask[:1, :1]
    return mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]


# ----------------------------------------------------------------------------- images

def _random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None, min_dist: float = 70.0) -> np.ndarray:
    """A saturated-ish RGB colour, far from ``avoid`` (the background under the object)."""
    for _ in range(8):
        hsv = np.uint8([[[rng.integers(0, 180), rng.integers(90, 256), rng.integers(70, 256)]]])
        rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
        if avoid is None or np.linalg.norm(rgb - avoid) >= min_dist:
            break
    return rgb


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float32 HxWx3 texture: gradient + low-frequency colour noise + clutter lines/blobs."""
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    a = rng.uniform(0, 2 * math.pi)
    r = np.arange(size, dtype=np.float32) / size - 0.5
    t = np.clip(0.5 + r[None, :] * math.cos(a) + r[:, None] * math.sin(a), 0, 1)[..., None]
    bg = (c0 * (1 - t) + c1 * t).astype(np.float32)
    k = int(rng.integers(3, 8))
    low = rng.normal(0, rng.uniform(8, 30), (k, k, 3)).astype(np.float32)
    bg = bg + cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    mean = bg.reshape(-1, 3).mean(0)
    # Blobs are blurred afterwards: soft-edged, low-contrast ellipses must not pass for circles.
    for _ in range(int(rng.integers(2, 8))):
        col = tuple(int(v) for v in np.clip(mean + rng.normal(0, 25, 3), 0, 255))
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.02, 0.15, 2) * size
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=col)
    img = Image.fromarray(cv2.GaussianBlur(np.asarray(img), (0, 0), rng.uniform(2.0, 5.0)))
    draw = ImageDraw.Draw(img)
    # Thin sharp lines near the background colour: edges a detector must learn to ignore.
    for _ in range(int(rng.integers(3, 12))):
        col = tuple(int(v) for v in np.clip(mean + rng.normal(0, 45, 3), 0, 255))
        pts = [tuple(rng.uniform(-0.1, 1.1, 2) * size) for _ in range(int(rng.integers(2, 5)))]
        draw.line(pts, fill=col, width=int(rng.integers(1, 3)))
    return np.asarray(img).astype(np.float32)


def _shade(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A linear brightness ramp across the object (so objects are not flat colour)."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    ramp = (xx / max(w, 1) - 0.5) * math.cos(a) + (yy / max(h, 1) - 0.5) * math.sin(a)
    return 1.0 + rng.uniform(0.0, 0.5) * ramp


class Canvas:
    """Image under construction plus an owner map: which object shows at each pixel."""

    def __init__(self, background: np.ndarray) -> None:
        self.img = background
        self.owner = np.full(background.shape[:2], -1, np.int32)

    def place_behind(self, mask: np.ndarray, x0: int, y0: int, colours: np.ndarray, k: int,
                     rng: np.random.Generator, min_visible: float = MIN_VISIBLE) -> tuple[np.ndarray, np.ndarray] | None:
        """Put object ``k`` (mask values index ``colours``) at (x0, y0) behind everything already
        placed. Returns (visible box, full box) as integer xyxy pixel edges, or None (rejected)
        when less than ``min_visible`` of it would show."""
        h, w = mask.shape
        region = self.owner[y0: y0 + h, x0: x0 + w]
        obj = mask > 0
        vis = obj & (region < 0)
        if vis.sum() < min_visible * obj.sum():
            return None
        ys, xs = np.nonzero(vis)
        vbox = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
        if min(vbox[2] - vbox[0], vbox[3] - vbox[1]) < MIN_BOX_SIDE:
            return None
        region[vis] = k
        pix = colours[mask] * _shade(mask, rng)[..., None]
        self.img[y0: y0 + h, x0: x0 + w][vis] = pix[vis]
        oys, oxs = np.nonzero(obj)
        full = np.array([x0 + oxs.min(), y0 + oys.min(), x0 + oxs.max() + 1, y0 + oys.max() + 1])
        return vbox, full

    def finish(self, rng: np.random.Generator) -> np.ndarray:
        noisy = self.img + rng.standard_normal(self.img.shape, dtype=np.float32) * rng.uniform(2, 8)
        return np.clip(noisy, 0, 255).astype(np.uint8)


def generate_shapes(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One default-mode image: (uint8 HxWx3, boxes [N,4] int, labels [N])."""
    canvas = Canvas(make_background(rng, size))
    boxes, labels = [], []
    target = int(rng.integers(2, 11))
    lo, hi = math.log(MIN_SIZE), math.log(MAX_FRACTION * size)
    for _ in range(target * 4):
        if len(boxes) >= target:
            break
        label = int(rng.integers(len(SYNTH_CLASSES)))
        s = math.exp(rng.uniform(lo, hi))
        # Small glyphs stay closer to square so that they remain recognisable.
        max_aspect = 1.5 if s < 16 else 2.0
        aspect = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))
        mask = render_shape(SYNTH_CLASSES[label], s, aspect, rng.uniform(0, 2 * math.pi))
        h, w = mask.shape
        if h > size or w > size:
            continue
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        under = canvas.img[y0: y0 + h, x0: x0 + w].reshape(-1, 3).mean(0)
        colours = np.stack([np.zeros(3, np.float32), _random_colour(rng, under)])
        placed = canvas.place_behind(mask, x0, y0, colours, len(boxes), rng)
        if placed is not None:
            boxes.append(placed[0])
            labels.append(label)
    return canvas.finish(rng), _as_boxes(boxes), np.array(labels, np.int64)


def generate_crowd(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One ``--crowd`` image: figures on a ground plane, nearest first (in front)."""
    canvas = Canvas(make_background(rng, size))
    horizon = rng.uniform(0.15, 0.4) * size
    # Height of a figure whose feet touch the bottom edge; others shrink linearly towards the horizon.
    near_h = rng.uniform(0.35, 0.6) * size
    groups = rng.uniform(0.1, 0.9, int(rng.integers(1, 4))) * size
    target = int(rng.integers(15, 61))
    feet = np.sort(rng.uniform(horizon + 0.2 * (size - horizon), size, target * 3))[::-1]
    boxes = []
    for y_feet in feet:
        if len(boxes) >= target:
            break
        h = near_h * (y_feet - horizon) / (size - horizon)
        w = h / rng.uniform(2.4, 3.4)
        if h < 12:
            continue
        mask = render_person(w, h)
        mh, mw = mask.shape
        skin = np.array([rng.uniform(120, 240), rng.uniform(80, 190), rng.uniform(60, 160)], np.float32)
        colours = np.stack([np.zeros(3, np.float32), skin, _random_colour(rng, None), _random_colour(rng, None)])
        y0 = min(max(int(round(y_feet - mh)), 0), size - mh)
        for _ in range(4):  # a few positions in the crowd before giving this figure up
            cx = rng.choice(groups) + rng.normal(0, 0.1 * size)
            x0 = min(max(int(round(cx - mw / 2)), 0), size - mw)
            placed = canvas.place_behind(mask, x0, y0, colours, len(boxes), rng)
            if placed is not None:
                boxes.append(placed[1])
                break
    return canvas.finish(rng), _as_boxes(boxes), np.zeros(len(boxes), np.int64)


def _as_boxes(boxes: list[np.ndarray]) -> np.ndarray:
    return np.array(boxes, np.int64).reshape(-1, 4)


# ----------------------------------------------------------------------------- dataset

def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for image ``index``: independent of worker count and order."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _init_worker() -> None:
    """One OpenCV thread per worker: the workers already fill the cores."""
    cv2.setNumThreads(1)


def _write_one(job: tuple[str, int, int, int, bool]) -> tuple[str, np.ndarray, np.ndarray]:
    """Worker: generate image ``index`` and write its jpg and xml; return (stem, boxes, labels)."""
    out, index, size, seed, crowd = job
    rng = image_rng(seed, index)
    img, boxes, labels = (generate_crowd if crowd else generate_shapes)(rng, size)
    stem = f"{index + 1:06d}"
    Image.fromarray(img).save(Path(out) / "JPEGImages" / f"{stem}.jpg", quality=90)
    names = CROWD_CLASSES if crowd else SYNTH_CLASSES
    write_voc_xml(Path(out) / "Annotations" / f"{stem}.xml", f"{stem}.jpg", size, size, boxes,
                  [names[i] for i in labels])
    return stem, boxes, labels


def make_synth(out: str | os.PathLike, images: int = 2000, size: int = 320, seed: int = 0,
               crowd: bool = False, workers: int = 2, force: bool = False) -> DatasetIndex:
    """Write the dataset (see the module doc) and return its index (VOC image ids)."""
    out = Path(out)
    if images < 1 or size < 64:
        raise DensedetError(f"need --images >= 1 and --size >= 64 (got {images}, {size})")
    if out.exists() and not out.is_dir():
        raise DensedetError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise DensedetError(f"{out} is not empty; pass --force to overwrite")
        for sub in ("Annotations", "JPEGImages", "ImageSets"):
            shutil.rmtree(out / sub, ignore_errors=True)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), i, size, seed, crowd) for i in range(images)]
    if workers <= 1 or images < 32:
        results = [_write_one(j) for j in jobs]
    else:
        # fork: workers inherit the imported modules, no re-import cost per worker.
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers, initializer=_init_worker) as pool:
            results = pool.map(_write_one, jobs, chunksize=max(1, images // (workers * 8)))
    classes = CROWD_CLASSES if crowd else SYNTH_CLASSES
    (out / "classes.txt").write_text("".join(c + "\n" for c in classes), encoding="utf-8")
    samples = [Sample(image_id=stem, path=str(out / "JPEGImages" / f"{stem}.jpg"), width=size, height=size,
                      boxes=boxes, labels=labels, ignore=np.zeros(len(labels), bool),
                      source=str(out / "Annotations" / f"{stem}.xml")) for stem, boxes, labels in results]
    lists = split_stems([s.image_id for s in samples], *SPLIT_FRACTIONS, seed=seed)
    for name in LIST_NAMES:
        (out / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(s + "\n" for s in lists[name]))
    _write_coco(out, samples, classes, lists)
    return DatasetIndex(samples=samples, classes=list(classes), category_ids=list(range(len(classes))),
                        root=str(out), fmt="voc")


def _write_coco(out: Path, samples: list[Sample], classes: list[str], lists: dict[str, list[str]]) -> None:
    """annotations.json (all images) and annotations_<list>.json; paths relative to ``out``."""
    coco_samples = [Sample(image_id=int(s.image_id), path=f"JPEGImages/{s.image_id}.jpg", width=s.width,
                           height=s.height, boxes=s.boxes, labels=s.labels, ignore=s.ignore) for s in samples]
    cat_ids = [i + 1 for i in range(len(classes))]
    (out / "annotations.json").write_text(json.dumps(coco_dict(coco_samples, classes, cat_ids)))
    for name, stems in lists.items():
        keep = set(int(s) for s in stems)
        subset = [s for s in coco_samples if s.image_id in keep]
        (out / f"annotations_{name}.json").write_text(json.dumps(coco_dict(subset, classes, cat_ids)))
