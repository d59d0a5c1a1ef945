"""What every dataset reader produces and shares: the :class:`DatasetIndex` of samples,
the problem :class:`Reporter` (strict: raise on the first; else collect), the
:class:`ClassMapper` from names to indices, and box validation. The format readers
(:mod:`.voc`, :mod:`.coco`, :mod:`.yolo`) build on it; :mod:`.readers` picks one."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from densedet.data.sample import Sample
from densedet.errors import DensedetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# How far (pixels) a box may reach past the image border before it counts as wrong.
BOX_TOLERANCE = 1.0


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset.

    Attributes:
        file: the file at fault (annotation, list or image file).
        where: line / object / id inside the file ("line 3", "object 2", "annotation id 7");
            empty when the whole file is at fault.
        message: what is wrong.
    """

    file: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.message}" if self.where else f"{self.file}: {self.message}"


@dataclass
class DatasetIndex:
    """Everything a reader found.

    Attributes:
        samples: one :class:`Sample` per image (images without objects included).
        classes: class names; ``Sample.labels`` index into this list.
        category_ids: per class index, the COCO json category id (``range(len(classes))`` for
            VOC and YOLO) — what COCO-style result files must use.
        skipped: unknown-class objects left out with ``skip_unknown=True``, per class name.
        root: dataset root (VOC dir, COCO json, YOLO yaml or dir).
        fmt: "voc", "coco" or "yolo".
        problems: what was wrong (only filled with ``strict=False``; strict mode raises).
    """

    samples: list[Sample]
    classes: list[str]
    category_ids: list[int]
    skipped: dict[str, int] = field(default_factory=dict)
    root: str = ""
    fmt: str = ""
    problems: list[Problem] = field(default_factory=list)

    @property
    def num_objects(self) -> int:
        """Total number of objects over all samples (ignored ones included)."""
        return int(sum(len(s.boxes) for s in self.samples))


class Reporter:
    """Routes problems: raise on the first one (strict) or collect them all.

    Readers call it for every problem and then carry on as if the offending object/file did
    not exist; in strict mode the call never returns.
    """

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.problems: list[Problem] = []

    def __call__(self, file: str | os.PathLike, where: str, message: str) -> None:
        problem = Problem(str(file), where, message)
        if self.strict:
            raise DensedetError(str(problem))
        self.problems.append(problem)


class ClassMapper:
    """Maps class names read from a file to indices of the configured class list.

    Unknown names are problems unless ``skip_unknown``; then they are counted in ``skipped``
    (callers print the counts: skipping is never silent).
    """

    def __init__(self, classes: Sequence[str], skip_unknown: bool) -> None:
        self.classes = list(classes)
        self.index = {name: i for i, name in enumerate(self.classes)}
        if len(self.index) != len(self.classes):
            dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
            raise DensedetError(f"class list has duplicate names: {', '.join(dup)}")
        self.skip_unknown = skip_unknown
        self.skipped: dict[str, int] = {}

    def lookup(self, name: str, file: str | os.PathLike, where: str, report: Reporter) -> int | None:
        """Index of ``name``, or None (skipped or reported) when it is not a known class."""
        if name in self.index:
            return self.index[name]
        if self.skip_unknown:
            self.skipped[name] = self.skipped.get(name, 0) + 1
        else:
            report(file, where, f"unknown class {name!r} (known: {', '.join(self.classes)}; "
                                "pass skip_unknown / --skip-unknown to skip such objects)")
        return None


def validate_box(box: Sequence[float], width: int, height: int, file: str | os.PathLike,
                 where: str, report: Reporter) -> np.ndarray | None:
    """Check one xyxy box against its image; return it clipped to the image, or None.

    Boxes past the border by at most ``BOX_TOLERANCE`` px are clipped; more is a problem,
    as are non-finite coordinates and zero/negative width or height.
    """
    b = np.asarray(box, dtype=np.float64)
    if not np.all(np.isfinite(b)):
        report(file, where, f"box {_fmt_box(b)} has non-finite coordinates")
        return None
    if b[2] <= b[0] or b[3] <= b[1]:
        report(file, where, f"box {_fmt_box(b)} has zero or negative size")
        return None
    tol = BOX_TOLERANCE
    if b[0] < -tol or b[1] < -tol or b[2] > width + tol or b[3] > height + tol:
        report(file, where, f"box {_fmt_box(b)} lies outside the {width}x{height} image")
        return None
    clipped = np.array([max(b[0], 0.0), max(b[1], 0.0), min(b[2], width), min(b[3], height)])
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        report(file, where, f"box {_fmt_box(b)} has no area inside the {width}x{height} image")
        return None
    return clipped.astype(np.float32)


def _fmt_box(b: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in b) + "]"


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the image header; Pillow opens lazily, so no pixel is decoded.
    This is the stored pixel grid (Pillow does not apply EXIF orientation on open), the grid
    :func:`densedet.data.image.read_image` decodes and annotations refer to."""
    with Image.open(path) as im:
        return im.size


def find_image(directory: Path, stem: str, filename: str | None = None) -> Path | None:
    """The image for ``stem`` in ``directory``: ``filename`` if it exists, else stem + a
    common extension (annotation files often name the wrong extension)."""
    if filename:
        p = directory / filename
        if p.is_file():
            return p
    for ext in IMAGE_EXTENSIONS:
        for e in (ext, ext.upper()):
            p = directory / (stem + e)
            if p.is_file():
                return p
    return None


def check_unique_ids(samples: list[Sample], report: Reporter) -> None:
    """Evaluation maps detections to images by id, so two images may not share one."""
    seen: dict[str | int, str] = {}
    for s in samples:
        if s.image_id in seen:
            report(s.source, "", f"image id {s.image_id!r} also used by {seen[s.image_id]}")
        else:
            seen[s.image_id] = s.source


def make_sample(image_id: str | int, path: Path, width: int, height: int,
                objects: list[tuple[np.ndarray, int, bool]], source: str | os.PathLike) -> Sample:
    """Build a Sample from validated ``(box, label, ignore)`` triples."""
    if objects:
        boxes = np.stack([o[0] for o in objects])
        labels = [o[1] for o in objects]
        ignore = [o[2] for o in objects]
    else:
        boxes, labels, ignore = np.zeros((0, 4), np.float32), [], []
    return Sample(image_id=image_id, path=str(path), width=int(width), height=int(height),
                  boxes=boxes, labels=labels, ignore=ignore, source=str(source))


def read_class_file(path: str | os.PathLike) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]

