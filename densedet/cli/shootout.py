"""``densedet shootout CONFIG --assigners a,b``: train once per assigner (and seed) and compare."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from densedet.cli import parse_assigners
from densedet.errors import DensedetError
from densedet.shootout import markdown_table, shootout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config: the model, data and budget every assigner gets")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--assigners", required=True, help="comma-separated assigner names")
    parser.add_argument("--epochs", type=int, help="train.epochs for every run")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (each assigner runs once per seed)")
    parser.add_argument("--out", default="runs/shootout", help="output folder")


def run(args: argparse.Namespace) -> int:
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise DensedetError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    command = "densedet " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = shootout(args.config, parse_assigners(args.assigners), args.overrides, args.epochs,
                       seeds, args.out, command=command)
    print(markdown_table(summary))
    print(f"wrote {Path(args.out) / 'shootout.md'}, shootout.json, shootout.png")
    return 0
