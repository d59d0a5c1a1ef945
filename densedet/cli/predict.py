"""``densedet predict --weights W SOURCE...``: detections for images or folders (see :mod:`densedet.predict`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from densedet.errors import DensedetError
from densedet.predict import predict, print_summary

MORE_WORDS = "sources"  # SOURCE words may also follow the options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="a densedet checkpoint (best.pt / last.pt)")
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="image files or folders; key=value items override the stored config")
    parser.add_argument("--out", default="runs/predict", help="output folder (default runs/predict)")
    parser.add_argument("--score-thresh", type=float, default=0.3, help="minimum score (default 0.3)")
    parser.add_argument("--config", default=None, help="use this YAML instead of the checkpoint's config")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--no-draw", action="store_true", help="only write detections.json")


def run(args: argparse.Namespace) -> int:
    # key=value items among the sources are config overrides (unless such a file exists)
    overrides = [w for w in args.sources if "=" in w and not Path(w).exists()]
    sources = [w for w in args.sources if w not in overrides]
    if not sources:
        raise DensedetError("no SOURCE image or folder given")
    written = predict(args.weights, sources, args.out, args.score_thresh, overrides, args.config,
                      args.device, draw=not args.no_draw)
    return print_summary(written, args.out, drawn=not args.no_draw)
