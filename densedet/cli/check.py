"""``densedet check ROOT``: decode every image and validate every annotation."""
from __future__ import annotations

import argparse

from densedet.data.check import check_dataset, format_problems, summarize
from densedet.data.readers import read_dataset


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
