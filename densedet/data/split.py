"""``densedet split``: write ``ImageSets/Main/{trainval,train,val,test}.txt`` for a VOC root.

From the ``n`` annotated images (``Annotations/*.xml``): ``trainval`` gets
``floor(n * trainval)`` of them chosen at random, ``train`` gets ``floor(len(trainval) * train)``
of those, ``val = trainval - train`` and ``test`` the rest. The choice depends only on the
sorted list of stems and the seed (``random.Random(seed)``), so a rerun reproduces it. Each list
is written sorted by stem, so files diff cleanly; membership is what is random.

Lists are UTF-8, one stem per line, written as is: stems with spaces or non-ASCII characters
(``im 0002 é``) read back whole (:func:`densedet.data.voc.parse_split_line`). Stems a line
cannot carry (leading/trailing whitespace, line breaks, bytes that are not UTF-8) are refused
with the file to rename, rather than written into a list that training would misread.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

from densedet.data.voc import parse_split_line
from densedet.errors import DensedetError

LIST_NAMES = ("trainval", "train", "val", "test")


def split_stems(stems: list[str], trainval: float = 0.9, train: float = 1.0, seed: int = 0) -> dict[str, list[str]]:
    """Split ``stems`` into trainval/train/val/test (each sorted); see the module doc."""
    for name, frac in (("trainval", trainval), ("train", train)):
        if not 0.0 <= frac <= 1.0:
            raise DensedetError(f"--{name} must be a fraction in [0, 1], got {frac}")
    pool = sorted(stems)
    rng = random.Random(seed)
    # 1e-9: fractions like 8/9 must not lose an image to float rounding (1800 * 8/9 = 1599.99...).
    n_tv = math.floor(len(pool) * trainval + 1e-9)
    tv = rng.sample(pool, n_tv)
    n_tr = math.floor(n_tv * train + 1e-9)
    tr = set(rng.sample(tv, n_tr))
    tv_set = set(tv)
    return {"trainval": sorted(tv_set), "train": sorted(tr), "val": sorted(tv_set - tr),
            "test": sorted(set(pool) - tv_set)}


def split_dataset(root: str | os.PathLike, trainval: float = 0.9, train: float = 1.0, seed: int = 0,
                  force: bool = False) -> dict[str, list[str]]:
    """Write the four lists under ``root/ImageSets/Main``; refuse to overwrite unless ``force``."""
    root = Path(root)
    ann_dir = root / "Annotations"
    if not ann_dir.is_dir():
        raise DensedetError(f"{root}: not a VOC dataset root (no Annotations/ directory)")
    xml_files = sorted(ann_dir.glob("*.xml"))
    if not xml_files:
        raise DensedetError(f"{ann_dir}: no .xml annotation files")
    _check_list_safe(xml_files)
    stems = [p.stem for p in xml_files]
    out_dir = root / "ImageSets" / "Main"
    if not force:
        for name in LIST_NAMES:
            f = out_dir / f"{name}.txt"
            if f.exists():
                raise DensedetError(f"{f} already exists; pass --force to overwrite")
    lists = split_stems(stems, trainval, train, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in LIST_NAMES:
        (out_dir / f"{name}.txt").write_text("".join(s + "\n" for s in lists[name]), encoding="utf-8")
    return lists


def _check_list_safe(xml_files: list[Path]) -> None:
    """Refuse stems that would not read back from a list line as themselves (the readers of
    train, eval and check parse the lines with :func:`parse_split_line`)."""
    stems = {p.stem for p in xml_files}
    for xml in xml_files:
        stem = xml.stem
        try:
            stem.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes in the name (surrogate escapes)
            raise DensedetError(f"{str(xml)!r}: file name is not valid UTF-8, so no UTF-8 list "
                                "can name it; rename the annotation and its image") from None
        if "\n" in stem or "\r" in stem or parse_split_line(stem, stems.__contains__) != stem:
            raise DensedetError(f"{str(xml)!r}: a file name with line breaks or leading/trailing "
                                "whitespace cannot be written into a list; rename the annotation "
                                "and its image")
