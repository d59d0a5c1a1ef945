"""``densedet export --weights W --format onnx [--out FILE] [--input-size N]`` (see :mod:`densedet.export`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from densedet.engine.build import model_from_weights
from densedet.errors import DensedetError
from densedet.export import check_onnx, export_onnx


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="a densedet checkpoint (best.pt / last.pt)")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    parser.add_argument("--out", default=None, help="output file (default: next to the weights, .onnx)")
    parser.add_argument("--input-size", type=int, nargs="+", default=None, metavar="N",
                        help="input size N or H W (default: the config's input_size)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--atol", type=float, default=1e-3,
                        help="largest allowed onnxruntime-vs-PyTorch difference (scores; boxes "
                             "relative to the input size) (default 1e-3)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the stored config")


def run(args: argparse.Namespace) -> int:
    model, cfg, classes = model_from_weights(args.weights, None, list(args.overrides), device="cpu")
    if args.input_size:
        if len(args.input_size) not in (1, 2) or min(args.input_size) < 32:
            raise DensedetError("--input-size takes N or H W (each >= 32)")
        hw = (args.input_size[0], args.input_size[-1])
    else:
        hw = cfg.input_hw
    out = Path(args.out) if args.out else Path(args.weights).with_suffix(".onnx")
    nms, max_det = cfg.eval.nms, cfg.eval.max_det
    export_onnx(model, out, hw, opset=args.opset, nms=nms, max_det=max_det)
    if model.inference_branch(nms) == "o2o":  # end-to-end: docs/end2end.md
        what = (f"output detections [B, {max_det}, 6] (x1, y1, x2, y2 input px, score, class) "
                "from the one-to-one branch, top-k by score, no NMS")
    else:
        what = (f"outputs scores [B, A, {len(classes)}], boxes [B, A, 4] xyxy input px (no NMS)")
    print(f"wrote {out}: input images [B, 3, {hw[0]}, {hw[1]}] RGB in [0, 1]; {what}; classes: "
          f"{', '.join(classes)}")
    diff = check_onnx(model, out, hw, atol=args.atol, nms=nms, max_det=max_det)
    if diff is None:
        print("onnxruntime not installed: parity check skipped (pip install onnxruntime)")
    else:
        print(f"onnxruntime vs PyTorch: max abs difference {diff:.2e} (tolerance {args.atol:g})")
    return 0
