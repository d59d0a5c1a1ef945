"""``densedet eval``: score a detections file, or a trained model, with COCO and VOC metrics.

Two modes, exactly one per call:

* files: ``densedet eval --ann GT --detections DETS.json [--classes a,b,...]
  [--format voc|coco|yolo] [--split NAME] [--json OUT]``
* model: ``densedet eval [CONFIG] --weights W [--split val] [--json OUT]
  [--save-detections DETS.json] [--device auto] [key=value ...]``

``--json`` writes the metrics in both modes; in model mode ``--save-detections`` keeps the
model's detections (COCO results format) for re-scoring later with the files mode.

Box frames (:mod:`densedet.evaluate`, ``docs/eval.md``): a detections file scored against VOC
ground truth is read in the VOC annotation's frame (1-based inclusive pixels, like the XML),
which makes the VOC AP the devkit's; against COCO or YOLO ground truth in the continuous frame
(COCO's). ``--save-detections`` writes VOC detections in the VOC frame, so re-scoring the file
gives the model mode's numbers. A COCO json is scored without its images (sizes come from the
json), as pycocotools does.
"""
from __future__ import annotations

import argparse
from typing import Any

from densedet.engine import evaluate_model
from densedet.engine.plots import plot_pr_curves
from densedet.errors import DensedetError
from densedet.evaluate import (evaluate, format_report, load_detections, read_ground_truth,
                               write_metrics_json)

MORE_WORDS = "config"  # `--weights W CONFIG a=1`: a bare word after the options is the config

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
    parser.add_argument("--json", dest="metrics_out", default=None, metavar="OUT",
                        help="also write every metric (and the per-class table) to OUT")


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
    gt = read_ground_truth(args.ann, args.format, _parse_classes(args.classes), args.split)
    # a VOC detections file is in the annotation's own pixel frame (the devkit's)
    frame = "voc" if gt.fmt == "voc" else "continuous"
    return evaluate(gt, load_detections(args.detections), source=str(args.detections),
                    det_frame=frame)


def _run_model(args: argparse.Namespace) -> dict:
    """Model mode: :func:`densedet.engine.evaluate_model` (the config stored in the checkpoint
    when no CONFIG is given)."""
    return evaluate_model(args.config, args.weights, args.split, list(args.overrides),
                          args.save_detections, device=args.device)


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the report, write ``--json``; returns the exit code."""
    mode = _check_mode(args)
    metrics: dict[str, Any] = _run_files(args) if mode == "files" else _run_model(args)
    print(format_report(metrics))
    if args.metrics_out:
        write_metrics_json(metrics, args.metrics_out)
        print(f"metrics written to {args.metrics_out}")
    if args.pr_plot:
        print(f"precision-recall curves written to {plot_pr_curves(metrics, args.pr_plot)}")
    if mode == "model" and args.save_detections:
        print(f"detections written to {args.save_detections}")
    return 0
