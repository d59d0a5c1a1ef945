"""``densedet check``: decode every image, validate every annotation, summarise the dataset.

``check_dataset(index)`` is the part training reuses at start-up: it decodes each image fully
with :func:`densedet.data.image.read_image`, the decoder training, evaluation and predict use
(so it also catches truncated JPEGs, which a header read would not), compares the decoded
size with the annotated one, and re-validates every box. Problems the reader found
(``read_dataset(strict=False)``) are listed together with these.

EXIF orientation is ignored, as everywhere in densedet (see :mod:`densedet.data.image`): an
EXIF-tagged image whose annotated size is its stored size is fine; one annotated with the
rotated size was labelled in a viewer that rotated it, and is reported.
"""
from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from densedet.data.image import EXIF_TRANSPOSED, ImageError, exif_orientation, read_image
from densedet.data.index import DatasetIndex, Problem, Reporter, validate_box
from densedet.data.sample import Sample

# COCO's size buckets (sqrt(area) < 32 small, < 96 medium).
SMALL, MEDIUM = 32.0, 96.0


def decode_problems(sample: Sample) -> list[Problem]:
    """Decode the image fully; report undecodable or truncated files and a decoded size that
    differs from the annotation (with a hint when the annotation has the EXIF-rotated size)."""
    try:
        h, w = read_image(sample.path).shape[:2]
    except ImageError as e:
        if e.missing:
            return [Problem(sample.path, "", f"image not found (annotated in {sample.source})")]
        return [Problem(sample.path, "", e.reason)]
    if (w, h) == (sample.width, sample.height):
        return []
    message = (f"decoded size {w}x{h} differs from the annotated {sample.width}x{sample.height} "
               f"in {sample.source}")
    orientation = exif_orientation(sample.path) if (h, w) == (sample.width, sample.height) else 1
    if orientation in EXIF_TRANSPOSED:
        # the annotation tool showed the photo rotated; densedet reads the stored grid
        message += (f"; the annotation has the size after EXIF orientation {orientation}, so it was "
                    "probably drawn on the rotated view, while densedet ignores EXIF orientation "
                    "(annotations refer to the stored pixels): rotate the stored pixels to match "
                    "(e.g. PIL ImageOps.exif_transpose, or exiftran -ai)")
    return [Problem(sample.path, "", message)]


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

    Decoding runs on ``workers`` threads: OpenCV releases the GIL while decoding.
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
