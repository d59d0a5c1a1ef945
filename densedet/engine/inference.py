"""Batched inference over a dataset split -> COCO results entries, and the metrics on them.

Used by the trainer's periodic evaluation and by ``densedet eval CONFIG --weights W``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader
from torch import nn

from densedet.config import Config
from densedet.data.dataset import DetectionDataset
from densedet.data.loader import collate
from densedet.data.preprocess import Fit
from densedet.data.transforms import unletterbox_boxes
from densedet.evaluate import evaluate


def letterbox_dataset(samples, input_hw: tuple[int, int], fit: Optional[Fit] = None):
    """The evaluation view of ``samples``: letterboxed to ``input_hw`` (or fitted as ``fit``
    says: an official model's resize, config ``preprocess``), no augmentation."""
    return DetectionDataset(samples, input_hw, augment=None, fit=fit)


@torch.no_grad()
def predict_index(model: nn.Module, index, cfg: Config, device: torch.device,
                  batch_size: int = 8, num_workers: int = 0, progress: bool = False) -> list[dict]:
    """Detections of ``model`` on every image of ``index`` in COCO results format
    (``image_id``, ``category_id`` from ``index.category_ids``, ``bbox`` xywh in original
    image pixels, ``score``)."""
    was_training = model.training
    model.eval()
    nms = cfg.eval.nms
    model.set_branch(nms)  # an end-to-end model computes only the branch it is scored on
    dataset = letterbox_dataset(index.samples, cfg.input_hw, Fit.from_config(cfg))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate)
    results: list[dict] = []
    iterator = loader
    if progress:
        from tqdm import tqdm
        iterator = tqdm(loader, desc="eval", leave=False)
    for images, _, metas in iterator:
        raw = model(images.to(device, non_blocking=True))
        dets = model.postprocess(raw, score_thresh=cfg.eval.score_thresh, nms_iou=cfg.eval.nms_iou,
                                 max_det=cfg.eval.max_det, nms=nms)
        for det, meta in zip(dets, metas):
            boxes = unletterbox_boxes(det.boxes.float().cpu(), meta)
            boxes = torch.as_tensor(boxes)
            for b, s, c in zip(boxes.tolist(), det.scores.float().cpu().tolist(), det.labels.cpu().tolist()):
                results.append({"image_id": meta["image_id"], "category_id": int(index.category_ids[c]),
                                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
    model.train(was_training)
    return results


def evaluate_detections(index, results: list[dict]) -> dict:
    return evaluate(index, results)


def evaluate_on(model: nn.Module, index, cfg: Config, device: torch.device, batch_size: int = 8,
                num_workers: int = 0, progress: bool = False) -> tuple[dict, list[dict]]:
    """``(metrics, detections)`` of ``model`` on ``index``."""
    results = predict_index(model, index, cfg, device, batch_size, num_workers, progress)
    return evaluate_detections(index, results), results


def headline(metrics: Optional[dict]) -> str:
    if not metrics:
        return "no metrics"
    parts = []
    for k in ("AP", "AP50", "VOC_mAP50"):
        v = metrics.get(k)
        if v is not None:
            parts.append(f"{k} {100 * v:.1f}")
    return " ".join(parts)
