"""``densedet <verb>``: the command line mirrors the Python API.

Each verb is one small module of this package with ``add_arguments(parser)`` and
``run(args) -> int``; the work itself lives in the library layers below. A plain dict maps
verbs to modules, imported only when their verb runs (a verb's help costs no torch import).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from densedet.assign import ASSIGNERS
from densedet.errors import DensedetError

# verb -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("densedet.cli.synth", "write the offline synthetic benchmark dataset (VOC layout)"),
    "split": ("densedet.cli.split", "write ImageSets/Main/{trainval,train,val,test}.txt"),
    "check": ("densedet.cli.check", "decode every image and validate every annotation"),
    "train": ("densedet.cli.train", "train a detector from a YAML config"),
    "eval": ("densedet.cli.eval", "score detections (or a trained model) with COCO and VOC metrics"),
    "predict": ("densedet.cli.predict", "run a trained model on images or folders"),
    "export": ("densedet.cli.export", "export a trained model (ONNX)"),
    "convert": ("densedet.cli.convert", "official YOLOX / NanoDet-Plus / FCOS weights as a densedet checkpoint"),
    "assign-viz": ("densedet.cli.assign_viz", "draw what each assigner decides on one image"),
    "shootout": ("densedet.cli.shootout", "train once per assigner and compare"),
    "bench": ("densedet.cli.bench", "benchmarks (assign, train speed)"),
}


def parse_assigners(text: str) -> list[str]:
    """``--assigners a,b,c`` as registry names (an unknown one is an error naming the choices)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ASSIGNERS]
    if unknown:
        raise DensedetError(f"--assigners: unknown assigner(s) {', '.join(unknown)}; "
                            f"choose from {', '.join(ASSIGNERS)}")
    return names


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="densedet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    subparsers = {}
    for verb, (_, help_) in COMMANDS.items():
        subparsers[verb] = sub.add_parser(verb, help=help_, description=help_)
    return parser, subparsers


def route_words(args: argparse.Namespace, words: list[str], more: str | None) -> list[str]:
    """Place the bare words argparse left after the options; return what is left unknown.

    argparse fills positionals from the first run of bare words only, so in
    ``CONFIG --weights W a=1`` the ``a=1`` comes back unparsed. Every verb takes such words
    the same way: ``key=value`` joins ``args.overrides`` (verbs that take config overrides),
    any other bare word joins the positional the verb names in ``MORE_WORDS`` (predict's
    sources; eval's optional config, which gives back an override it caught).
    """
    has_overrides = isinstance(getattr(args, "overrides", None), list)
    if more == "config" and has_overrides and isinstance(args.config, str) \
            and "=" in args.config and not Path(args.config).is_file():
        args.config, args.overrides = None, [args.config, *args.overrides]
    unknown = []
    for word in words:
        if word.startswith("-"):
            unknown.append(word)
        elif has_overrides and "=" in word and not Path(word).exists():
            args.overrides = [*args.overrides, word]
        elif more is not None and isinstance(getattr(args, more), list):
            setattr(args, more, [*getattr(args, more), word])
        elif more is not None and getattr(args, more) is None:
            setattr(args, more, word)
        else:
            unknown.append(word)
    return unknown


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
    args, words = parser.parse_known_args(argv)
    unknown = route_words(args, words, getattr(module, "MORE_WORDS", None))
    if unknown:
        subparsers[verb].error(f"unrecognized arguments: {' '.join(unknown)}")
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
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
