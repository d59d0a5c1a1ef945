"""``densedet assign-viz CONFIG [--image ID]``: what each assigner decides on one image."""
from __future__ import annotations

import argparse

from densedet.assign import ASSIGNERS
from densedet.cli import parse_assigners
from densedet.viz import assign_viz


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (its data and model are used)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--image", default=None,
                        help="image id (the image file's stem); default: the split's image with "
                             "several objects of the most different sizes")
    parser.add_argument("--assigners", default=",".join(ASSIGNERS),
                        help="comma-separated assigner names")
    parser.add_argument("--weights", help="checkpoint whose predictions the dynamic assigners see")
    parser.add_argument("--out", default="assign_viz.png", help="output PNG (a .md table is written beside it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stand-in predictions")


def run(args: argparse.Namespace) -> int:
    png, table = assign_viz(args.config, args.overrides, args.image, parse_assigners(args.assigners),
                            args.weights, args.out, args.seed)
    print(table)
    print(f"wrote {png} and {png.with_suffix('.md')}")
    return 0
