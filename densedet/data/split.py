"""``densedet split``: write ``ImageSets/Main/{trainval,train,val,test}.txt`` for a VOC root.

From the ``n`` annotated images (``Annotations/*.xml``): ``trainval`` gets
``floor(n * trainval)`` of them chosen at random, ``train`` gets ``floor(len(trainval) * train)``
of those, ``val = trainval - train`` and ``test`` the rest. The choice depends only on the
sorted list of stems and the seed (``random.Random(seed)``), so a rerun reproduces it. Each list
is written sorted by stem, so files diff cleanly; membership is what is random.
"""
from __future__ import annotations

import argparse
import math
import os
import random
from pathlib import Path

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
    stems = [p.stem for p in ann_dir.glob("*.xml")]
    if not stems:
        raise DensedetError(f"{ann_dir}: no .xml annotation files")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="VOC dataset root (with Annotations/)")
    parser.add_argument("--trainval", type=float, default=0.9, help="fraction of all images in trainval (default 0.9)")
    parser.add_argument("--train", type=float, default=1.0, help="fraction of trainval in train (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="overwrite existing lists")


def run(args: argparse.Namespace) -> int:
    lists = split_dataset(args.data, args.trainval, args.train, args.seed, args.force)
    out_dir = Path(args.data) / "ImageSets" / "Main"
    print(f"wrote {out_dir}: " + ", ".join(f"{k} {len(v)}" for k, v in lists.items()))
    return 0
