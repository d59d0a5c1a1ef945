"""``densedet train CONFIG [key=value ...] [--resume | --force] [--weights W]``.

Multi-GPU / multi-process: ``torchrun --nproc_per_node N -m densedet train CONFIG ...``
(``train.batch_size`` is the total over all processes).
"""
from __future__ import annotations

import argparse

from densedet.config import load_config
from densedet.engine import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML experiment config, or a preset's name (configs/: yolox_nano, ...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.epochs=50 data.root=data/voc "
                             "data.classes=cat,dog")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/last.pt (model, EMA, optimizer, epoch and "
                             "iteration, RNG)")
    parser.add_argument("--weights", metavar="W", default=None,
                        help="initial weights (a checkpoint); tensors whose shape differs, such as "
                             "the classifier of another class count, are skipped and listed; "
                             "weights whose backbone/neck mostly does not fit are refused unless "
                             "train.init_weights_partial=true")
    parser.add_argument("--force", action="store_true",
                        help="start afresh in an output_dir that already holds a run (best.pt, "
                             "last.pt, metrics.json, log.csv), deleting those and its TensorBoard "
                             "events; without it (or --resume) such a folder is an error")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, list(args.overrides))
    train(cfg, resume=args.resume, weights=args.weights, force=args.force)
    return 0
