"""``densedet convert SRC [--from LAYOUT] [--size S] --out DST.pt``: official weights (YOLOX,
NanoDet-Plus, torchvision / mmdet FCOS) as a densedet checkpoint (see :mod:`densedet.convert`)."""
from __future__ import annotations

import argparse

from densedet.convert import LAYOUTS, convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="the official weights file (.pth / .ckpt)")
    parser.add_argument("--from", dest="layout", default=None, choices=LAYOUTS,
                        help="the file's layout (default: recognised from its tensor names; "
                             "yolox-legacy must be named: RGB + ImageNet mean/std weights)")
    parser.add_argument("--size", type=int, nargs="+", default=None, metavar="S",
                        help="test input size N or H W (default: the official one: YOLOX nano/tiny "
                             "416, s-x 640; NanoDet-Plus-m 320; FCOS shorter side 800)")
    parser.add_argument("--classes", default=None,
                        help="comma-separated class names (default: COCO's for an 80/91-class head)")
    parser.add_argument("--out", required=True, help="the densedet checkpoint to write (.pt)")


def run(args: argparse.Namespace) -> int:
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    convert(args.src, args.out, layout=args.layout, size=args.size, classes=classes)
    return 0
