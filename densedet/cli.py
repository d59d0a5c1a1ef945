"""``densedet <verb>``: the command line mirrors the Python API.

Each verb lives in the module that implements it, which provides
``add_arguments(parser)`` and ``run(args) -> int``. A plain dict maps verbs to modules;
modules are imported only when their verb runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from densedet.errors import DensedetError

# verb -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("densedet.data.synth", "write the offline synthetic benchmark dataset (VOC layout)"),
    "split": ("densedet.data.split", "write ImageSets/Main/{trainval,train,val,test}.txt"),
    "check": ("densedet.data.check", "decode every image and validate every annotation"),
    "eval": ("densedet.eval_cli", "score detections (or a trained model) with COCO and VOC metrics"),
    "train": ("densedet.engine.train_cli", "train a detector from a YAML config"),
    "predict": ("densedet.predict", "run a trained model on images or folders"),
    "export": ("densedet.export", "export a trained model (ONNX)"),
    "bench": ("densedet.bench", "benchmarks (assign, train speed)"),
    "assign-viz": ("densedet.viz", "draw what each assigner decides on one image"),
    "shootout": ("densedet.shootout", "train once per assigner and compare"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="densedet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    subparsers = {}
    for verb, (_, help_) in COMMANDS.items():
        subparsers[verb] = sub.add_parser(verb, help=help_, description=help_)
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, subparsers = build_parser()
    verb = argv[0] if argv and argv[0] in COMMANDS else None
    if verb is None:
        parser.parse_args(argv)  # prints help / the "invalid choice" error
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[verb][0])
    module.add_arguments(subparsers[verb])
    if getattr(module, "TRAILING_ARGS", False):
        # argparse cannot take positionals after options ("SOURCE --out D key=value"): such
        # verbs receive the leftover words in args.trailing and validate them themselves
        args, trailing = parser.parse_known_args(argv)
        args.trailing = trailing
    else:
        args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except DensedetError as e:
        print(f"densedet {verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"densedet {verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into e.g. `head` that closed early: not an error of ours
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
