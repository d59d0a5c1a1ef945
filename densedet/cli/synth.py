"""``densedet synth OUT``: write the offline synthetic benchmark dataset (VOC layout)."""
from __future__ import annotations

import argparse
import os
import time

from densedet.data.check import summarize
from densedet.data.synth import make_synth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="output directory (VOC layout)")
    parser.add_argument("--images", type=int, default=2000, help="number of images (default 2000)")
    parser.add_argument("--size", type=int, default=320, help="image side in px (default 320)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--crowd", action="store_true", help="dense overlapping pedestrian-like figures")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (default 2)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT (replaces its dataset)")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    index = make_synth(args.out, args.images, args.size, args.seed, args.crowd, args.workers, args.force)
    print(summarize(index))
    print(f"wrote {len(index.samples)} images to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0
