"""``densedet bench assign|train``: the benchmarks of :mod:`densedet.bench`."""
from __future__ import annotations

import argparse

from densedet.bench import assign, train_speed

BENCHMARKS = {"assign": (assign, "time the assigners"), "train": (train_speed, "time training steps")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_) in BENCHMARKS.items():
        module.add_arguments(sub.add_parser(name, help=help_, description=help_))


def run(args: argparse.Namespace) -> int:
    return BENCHMARKS[args.bench][0].run(args)
