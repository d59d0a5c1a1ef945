"""Training engine: trainer, EMA, LR schedule, checkpoints, distributed glue.

    from densedet.engine import train, evaluate_model
    metrics = train("configs/yolox_nano.yaml", ["train.epochs=5"])
    metrics = evaluate_model("configs/yolox_nano.yaml", "runs/exp/best.pt", "val", [], None)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from densedet.engine.build import model_from_weights, read_split, resolve_device
from densedet.engine.inference import evaluate_on
from densedet.engine.trainer import NonFiniteLossError, Trainer, train
from densedet.evaluate import continuous_to_voc_results


def evaluate_model(config_path: Optional[str | Path], weights: str | Path, split: Optional[str] = None,
                   overrides: Optional[list[str]] = None, detections_out: Optional[str | Path] = None,
                   device: str = "auto") -> dict:
    """Evaluate trained ``weights`` on a split of the configured dataset.

    Args:
        config_path: YAML config; None uses the config stored in the checkpoint.
        weights: a densedet checkpoint (``best.pt``/``last.pt``); its EMA weights are used.
        split: dataset split (default ``data.val_split``).
        overrides: ``dotted.key=value`` applied to the config (e.g. ``data.root=...``).
        detections_out: where to write the detections (COCO results format, original-image
            pixels, in the frame ``densedet eval --ann GT --detections FILE`` reads for that
            dataset: a VOC annotation's own 1-based pixels, else COCO's). None writes nothing.
        device: ``auto``, ``cpu``, ``cuda``...
    Returns:
        :func:`densedet.evaluate.evaluate`'s dict.
    """
    dev = resolve_device(device)
    model, cfg, classes = model_from_weights(weights, config_path, overrides, device=dev)
    index = read_split(cfg, split if split is not None else cfg.data.val_split, classes=classes)
    metrics, results = evaluate_on(model, index, cfg, dev, batch_size=8)
    if detections_out is not None:
        write_detections(results, index.fmt, detections_out)
    return metrics


def write_detections(results: list[dict], gt_format: str, path: str | Path) -> Path:
    """Write model detections (COCO results, continuous frame) in the frame that
    ``densedet eval --ann GT --detections FILE`` reads for ``gt_format``: a VOC annotation's
    own 1-based pixels for ``voc`` (docs/eval.md), so the file re-scores to the same numbers."""
    if gt_format == "voc":
        results = continuous_to_voc_results(results)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results) + "\n")
    return path


__all__ = ["NonFiniteLossError", "Trainer", "evaluate_model", "train", "write_detections"]
