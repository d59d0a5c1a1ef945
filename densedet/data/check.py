"""``densedet check``: decode every image, validate every annotation, summarise the dataset.

``check_dataset(index)`` is the part training reuses at start-up: it decodes each image with
Pillow (a full ``load()``, which catches truncated files that a header read would not),
compares the decoded size with the annotated one, and re-validates every box. Problems the
reader found (``read_dataset(strict=False)``) are listed together with these.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from densedet.data.readers import DatasetIndex, Problem, Reporter, read_dataset, validate_box
from densedet.data.sample import Sample

# COCO's size buckets (sqrt(area) < 32 small, < 96 medium).
SMALL, MEDIUM = 32.0, 96.0
# EXIF orientations 5-8 swap width and height in loaders that honour EXIF (cv2.imread does).
_EXIF_TRANSPOSED = {5, 6, 7, 8}


def decode_problems(sample: Sample) -> list[Problem]:
    """Decode the image fully; report undecodable files and a size that differs from the
    annotation (or that EXIF rotation would change)."""
    try:
        with Image.open(sample.path) as im:
            im.load()
            size = im.size
            orientation = im.getexif().get(0x0112, 1)
    except FileNotFoundError:
        return [Problem(sample.path, "", f"image not found (annotated in {sample.source})")]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return [Problem(sample.path, "", f"cannot decode image ({e})")]
    problems = []
    if size != (sample.width, sample.height):
        problems.append(Problem(sample.path, "", f"decoded size {size[0]}x{size[1]} differs from the "
                                f"annotated {sample.width}x{sample.height} in {sample.source}"))
    elif orientation in _EXIF_TRANSPOSED and size[0] != size[1]:
        problems.append(Problem(sample.path, "", f"EXIF orientation {orientation} rotates the image to "
                                f"{size[1]}x{size[0]}; loaders honouring EXIF disagree with the annotation"))
    return problems


def box_problems(sample: Sample, num_classes: int) -> list[Problem]:
    """Re-validate the boxes and labels of a sample (boxes may come from anywhere)."""
    report = Reporter(strict=False)
    for k, (box, label) in enumerate(zip(sample.boxes, sample.labels), start=1):
        where = f"object {k}"
        if not 0 <= int(label) < num_classes:
            report(sample.source or sample.path, where, f"label {int(label)} out of range 0..{num_classes - 1}")
        validate_box(box, sample.width, sample.height, sample.source or sample.path, where, report)
    return report.problems


def check_dataset(index: DatasetIndex, decode_images: bool = True, workers: int = 2) -> list[Problem]:
    """All problems of an already-read dataset: boxes, labels and (optionally) image decoding.

    Decoding runs on ``workers`` threads: Pillow releases the GIL while decoding.
    """
    problems = []
    for s in index.samples:
        problems += box_problems(s, len(index.classes))
    if decode_images:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for found in pool.map(decode_problems, index.samples):
                problems += found
    return problems


def size_stats(index: DatasetIndex) -> dict[str, float | int]:
    """sqrt(area) percentiles and COCO small/medium/large counts over non-ignored boxes."""
    boxes = [s.boxes[~s.ignore] for s in index.samples]
    b = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    side = np.sqrt(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None))
    stats: dict[str, float | int] = {"small": int((side < SMALL).sum()),
                                      "medium": int(((side >= SMALL) & (side < MEDIUM)).sum()),
                                      "large": int((side >= MEDIUM).sum())}
    for q in (5, 25, 50, 75, 95):
        stats[f"p{q}"] = float(np.percentile(side, q)) if len(side) else 0.0
    return stats


def summarize(index: DatasetIndex) -> str:
    """Human-readable summary: images, objects per class, size spread, empties, skips."""
    n_obj = np.zeros(len(index.classes), np.int64)
    n_ign = np.zeros(len(index.classes), np.int64)
    for s in index.samples:
        n_obj += np.bincount(s.labels, minlength=len(index.classes))[: len(index.classes)]
        n_ign += np.bincount(s.labels[s.ignore], minlength=len(index.classes))[: len(index.classes)]
    empty = sum(1 for s in index.samples if len(s.boxes) == 0)
    lines = [f"{index.fmt} dataset {index.root}: {len(index.samples)} images, {int(n_obj.sum())} objects "
             f"({int(n_ign.sum())} ignored); images without objects: {empty}"]
    width = max([len(c) for c in index.classes] + [5])
    lines.append("  objects per class:")
    for name, n, ign in zip(index.classes, n_obj, n_ign):
        lines.append(f"    {name:<{width}} {int(n):>7}" + (f"  ({int(ign)} ignored)" if ign else ""))
    st = size_stats(index)
    lines.append(f"  box size sqrt(area) px: p5 {st['p5']:.1f}  p25 {st['p25']:.1f}  p50 {st['p50']:.1f}  "
                 f"p75 {st['p75']:.1f}  p95 {st['p95']:.1f}")
    lines.append(f"  small (<{SMALL:g}) {st['small']}  medium {st['medium']}  large (>={MEDIUM:g}) {st['large']}")
    if index.skipped:
        lines.append("  skipped unknown-class objects: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(index.skipped.items())))
    return "\n".join(lines)


def format_problems(problems: list[Problem]) -> str:
    """Problems grouped per file, files in sorted order."""
    per_file: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        per_file[p.file].append(p)
    lines = []
    for f in sorted(per_file):
        lines.append(f"{f}:")
        for p in per_file[f]:
            lines.append(f"  {p.where + ': ' if p.where else ''}{p.message}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="VOC root, COCO .json, or YOLO .yaml/dir")
    parser.add_argument("--format", choices=("voc", "coco", "yolo"), default=None, help="dataset format (default: detect)")
    parser.add_argument("--classes", default=None, help="comma-separated class names (VOC: required unless classes.txt)")
    parser.add_argument("--split", default=None, help="VOC ImageSets/Main list or YOLO yaml key (default: all)")
    parser.add_argument("--skip-unknown", action="store_true", help="skip (and count) objects of unknown classes")
    parser.add_argument("--images", default=None, help="COCO only: image directory (default: found next to the json)")
    parser.add_argument("--no-decode", action="store_true", help="do not decode images (annotations only)")
    parser.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2)")


def run(args: argparse.Namespace) -> int:
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    index = read_dataset(args.data, args.format, classes, args.split, args.skip_unknown, strict=False,
                         image_root=args.images)
    problems = index.problems + check_dataset(index, not args.no_decode, args.workers)
    print(summarize(index))
    if problems:
        n_files = len({p.file for p in problems})
        print(f"\n{len(problems)} problems in {n_files} files:")
        print(format_problems(problems))
        return 1
    print("no problems found")
    return 0
