"""``densedet split ROOT``: write ImageSets/Main/{trainval,train,val,test}.txt for a VOC tree."""
from __future__ import annotations

import argparse
from pathlib import Path

from densedet.data.split import split_dataset


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
