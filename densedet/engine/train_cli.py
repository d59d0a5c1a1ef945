"""``densedet train CONFIG [key=value ...] [--resume] [--weights W]``.

Multi-GPU / multi-process: ``torchrun --nproc_per_node N -m densedet train CONFIG ...``
(``train.batch_size`` is the total over all processes).
"""
from __future__ import annotations

import argparse

TRAILING_ARGS = True  # key=value may also follow the options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML experiment config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.epochs=50 data.root=data/voc "
                             "data.classes=cat,dog")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/last.pt (model, EMA, optimizer, epoch and "
                             "iteration, RNG)")
    parser.add_argument("--weights", metavar="W", default=None,
                        help="initial weights (a checkpoint); tensors whose shape differs, such as "
                             "the classifier of another class count, are skipped and listed")


def run(args: argparse.Namespace) -> int:
    from densedet.config import load_config, trailing_overrides
    from densedet.engine import train

    cfg = load_config(args.config, list(args.overrides) + trailing_overrides(args))
    train(cfg, resume=args.resume, weights=args.weights)
    return 0
