"""``densedet eval``: score a detections file, or a trained model, with COCO and VOC metrics.

Two modes, exactly one per call:

* files: ``densedet eval --ann GT --detections DETS.json [--classes a,b,...]
  [--format voc|coco|yolo] [--split NAME] [--json OUT]``
* model: ``densedet eval [CONFIG] --weights W [--split val] [--json OUT]
  [--save-detections DETS.json] [--device auto] [key=value ...]``

``--json`` writes the metrics in both modes; in model mode ``--save-detections`` keeps the
model's detections (COCO results format) for re-scoring later with the files mode.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from densedet.errors import DensedetError
from densedet.evaluate import evaluate, format_report, write_metrics_json

USAGE_ERROR = ("give either --ann GT and --detections DETS.json (score a detections file), "
               "or --weights W with an optional CONFIG and key=value overrides (score a model)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``eval`` options on the verb's sub-parser."""
    parser.add_argument("config", nargs="?", default=None,
                        help="model mode: training config YAML (optional with --weights)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="model mode: config overrides")
    files = parser.add_argument_group("score a detections file")
    files.add_argument("--ann", help="ground truth: VOC root/folder, COCO json or YOLO root")
    files.add_argument("--detections", help="COCO results json: a list of {image_id, "
                       "category_id, bbox [x,y,w,h], score}; VOC/YOLO: image_id is the file "
                       "stem, category_id the 0-based class index")
    files.add_argument("--classes", help="comma-separated class names (order = class index)")
    files.add_argument("--format", choices=("voc", "coco", "yolo"), default=None,
                       help="ground-truth format (default: detected)")
    model = parser.add_argument_group("score a trained model")
    model.add_argument("--weights", help="checkpoint to evaluate")
    model.add_argument("--save-detections", metavar="DETS.json", default=None,
                       help="also write the model's detections (COCO results format)")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--split", default=None,
                        help="files mode: ImageSets/Main list (default: all annotations); "
                             "model mode: dataset split (default: the config's val split)")
    parser.add_argument("--pr-plot", default=None, metavar="PNG",
                        help="also draw per-class precision-recall curves (IoU 0.5) to this PNG")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT",
                        help="also write every metric (and the per-class table) to OUT")
    _accept_late_overrides(parser)


def _accept_late_overrides(parser: argparse.ArgumentParser) -> None:
    """Let ``key=value`` overrides follow the options (``CONFIG --weights W a=1``).

    A bare word containing ``=`` is an override unless it names an existing file.

    argparse fills all positionals from the first run of bare words, so words after an
    option come back as "unrecognized" and ``densedet`` (``parse_args``) would reject them.
    The sub-parser's ``parse_known_args`` is wrapped on this instance only, to move such
    words into ``config``/``overrides``; anything else stays unrecognized and errors as usual.
    """
    plain = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = plain(args, namespace)
        config = getattr(ns, "config", None)
        if config is not None and "=" in config and not Path(config).is_file():
            # the first bare word was an override, not a config (`--weights W a=1`)
            ns.config, ns.overrides = None, [config, *(ns.overrides or [])]
        rest = []
        for word in extras:
            if word.startswith("-"):
                rest.append(word)
            elif "=" in word:
                ns.overrides = [*(ns.overrides or []), word]
            elif getattr(ns, "config", None) is None:
                ns.config = word
            else:
                rest.append(word)
        return ns, rest

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def load_detections(path: str | Path) -> list[dict]:
    """Read a COCO results json (a list of entries); entries are validated by ``evaluate``.

    Raises:
        DensedetError: unreadable file, invalid JSON (with line/column), or not a list.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DensedetError(f"{path}: cannot read detections: {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DensedetError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: "
                            f"{e.msg}") from e
    if not isinstance(data, list):
        raise DensedetError(f"{path}: expected a JSON list of detections (COCO results "
                            f"format), got {type(data).__name__}")
    return data


def _parse_classes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise DensedetError(f"--classes {text!r}: empty class name")
    return names


def _check_mode(args: argparse.Namespace) -> str:
    """'files' or 'model'; anything ambiguous or incomplete is a usage error."""
    file_mode = args.ann is not None or args.detections is not None
    model_mode = args.weights is not None
    if file_mode and model_mode:
        raise DensedetError(f"--ann/--detections and --weights do not mix: {USAGE_ERROR}")
    if model_mode:
        return "model"
    if not file_mode:
        raise DensedetError(USAGE_ERROR)
    if args.ann is None or args.detections is None:
        raise DensedetError(f"--ann and --detections go together: {USAGE_ERROR}")
    if args.save_detections is not None:
        raise DensedetError("--save-detections goes with --weights (model mode)")
    if args.config is not None or args.overrides:
        extra = " ".join([args.config or "", *args.overrides]).strip()
        raise DensedetError(f"unexpected arguments {extra!r} with --ann/--detections "
                            f"(CONFIG and key=value only go with --weights)")
    return "files"


def _run_files(args: argparse.Namespace) -> dict:
    from densedet.data.readers import read_dataset  # lazy: only this mode needs the readers

    gt = read_dataset(args.ann, fmt=args.format, classes=_parse_classes(args.classes),
                      split=args.split)
    return evaluate(gt, load_detections(args.detections), source=str(args.detections))


def _run_model(args: argparse.Namespace) -> dict:
    """Model mode: delegate to the engine.

    Engine API used (``densedet.engine``)::

        evaluate_model(config_path: str | None, weights: str, split: str | None,
                       overrides: list[str], json_out: str | None, device: str) -> dict

    It builds the model from ``config_path`` (or the config stored in the checkpoint when
    ``None``) plus ``key=value`` overrides, predicts on ``split`` (``None``: the config's
    validation split), writes the *detections* to ``json_out`` when given and returns
    :func:`densedet.evaluate.evaluate`'s dict.
    """
    from densedet.engine import evaluate_model  # lazy: torch/model code only for this mode

    return evaluate_model(args.config, args.weights, args.split, list(args.overrides),
                          args.save_detections, device=args.device)


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the report, write ``--json``; returns the exit code."""
    mode = _check_mode(args)
    metrics: dict[str, Any] = _run_files(args) if mode == "files" else _run_model(args)
    print(format_report(metrics))
    if args.json_out:
        write_metrics_json(metrics, args.json_out)
        print(f"metrics written to {args.json_out}")
    if args.pr_plot:
        from densedet.engine.plots import plot_pr_curves
        print(f"precision-recall curves written to {plot_pr_curves(metrics, args.pr_plot)}")
    if mode == "model" and args.save_detections:
        print(f"detections written to {args.save_detections}")
    return 0
