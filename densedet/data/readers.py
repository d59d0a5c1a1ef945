"""Dataset readers: one entry point for Pascal VOC, COCO json and YOLO txt datasets.

``read_dataset`` detects the format, reads every annotation into :class:`Sample` objects and
validates each box. Every problem goes through one reporter: in strict mode (the default)
the first problem raises :class:`DensedetError` with a message naming the file and the
line/object; with ``strict=False`` the problems are collected in ``DatasetIndex.problems``
and the offending object (or file) is left out, so ``densedet check`` can list them all.
Both modes share the same parsing code.

Box conventions (all readers produce float32 xyxy in continuous pixel coordinates, where
pixel ``i`` covers ``[i, i+1)``):

* VOC stores 1-based inclusive pixel indices, so ``(xmin, ymin, xmax, ymax)`` becomes
  ``(xmin - 1, ymin - 1, xmax, ymax)``: width ``xmax - xmin + 1`` as in the VOC devkit.
  Float coordinates are accepted and converted the same way.
* COCO ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]``.
* YOLO normalised ``cx cy w h`` is multiplied by the image size read from the image header.

Boxes reaching past the image by at most ``BOX_TOLERANCE`` pixels are clipped silently
(VOC's ``xmin = 0`` is common); further out, or of zero/negative size, is a problem.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from densedet.data.coco import coco_json_in_dir, read_coco
from densedet.data.index import DatasetIndex, Reporter, check_unique_ids
from densedet.data.voc import read_voc
from densedet.data.yolo import read_yolo
from densedet.errors import DensedetError

FORMATS = ("voc", "coco", "yolo")


def detect_format(path: str | os.PathLike) -> str:
    """"voc" (dir with Annotations/), "coco" (a .json) or "yolo" (a .yaml, or a dir with
    a data yaml or images/ + labels/)."""
    p = Path(path)
    if not p.exists():
        raise DensedetError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix.lower() == ".json":
            return "coco"
        if p.suffix.lower() in (".yaml", ".yml"):
            return "yolo"
        raise DensedetError(f"{p}: cannot tell the dataset format (expected a COCO .json or a "
                            "YOLO data .yaml); pass fmt / --format")
    if (p / "Annotations").is_dir():
        return "voc"
    if (p / "images").is_dir() or list(p.glob("*.yaml")) or list(p.glob("*.yml")):
        return "yolo"
    raise DensedetError(f"{p}: cannot tell the dataset format (no Annotations/ for VOC, no "
                        "images/ or data yaml for YOLO); pass fmt / --format")


def read_dataset(path: str | os.PathLike, fmt: str | None = None, classes: Sequence[str] | None = None,
                 split: str | None = None, skip_unknown: bool = False, strict: bool = True,
                 image_root: str | os.PathLike | None = None, cache: bool = False) -> DatasetIndex:
    """Read a VOC / COCO / YOLO dataset into a :class:`DatasetIndex`.

    Args:
        path: VOC root (with ``Annotations/``), COCO ``.json``, YOLO data ``.yaml`` or dir.
        fmt: "voc", "coco", "yolo" or None to detect.
        classes: class names. VOC: required (or a ``classes.txt`` in the root). YOLO/COCO:
            default the yaml ``names`` / json categories; when given, objects are mapped by name.
        split: VOC: an ``ImageSets/Main/<split>.txt`` list (None = every annotation file);
            YOLO: the yaml key ``train``/``val``/``test`` (None = all of them); COCO: ignored for a
            json file; for a directory (``synth`` output) it picks ``annotations_<split>.json``.
        skip_unknown: skip (and count in ``skipped``) objects of classes not in ``classes``.
        strict: raise on the first problem; False collects them in ``problems`` and leaves the
            offending objects / files out.
        image_root: COCO only: the image directory (default: found next to the json).
        cache: VOC only: cache parsed xml texts keyed by each file's size and mtime
            (see :mod:`densedet.data.voc`); results are identical with and without it.
    """
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DensedetError(f"unknown dataset format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "coco" and Path(path).is_dir():
        path = coco_json_in_dir(Path(path), split)
    report = Reporter(strict)
    if fmt == "voc":
        index = read_voc(path, classes, split, skip_unknown, report, cache)
    elif fmt == "coco":
        index = read_coco(path, classes, skip_unknown, report, image_root)
    else:
        index = read_yolo(path, classes, split, skip_unknown, report)
    check_unique_ids(index.samples, report)
    index.problems = report.problems
    return index
