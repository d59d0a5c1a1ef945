"""Ultralytics' YOLOv8n on the same data, threads and wall-clock budget as a densedet preset.

Used by ``densedet bench train --ultralytics-budget S`` (needs the ``compare`` extra:
``pip install -e .[compare]``). Both sides are scored by densedet's own evaluator on the val
split, so the comparison measures the training, not two evaluators.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from densedet.data.readers import read_dataset
from densedet.data.yolo import write_yolo
from densedet.errors import DensedetError
from densedet.evaluate import evaluate, metrics_to_json

# the metrics both sides of a comparison report
SCORE_KEYS = ("AP", "AP50", "VOC_mAP50")


def train_yolov8n(yaml_path: Path, size: int, budget_s: float, out: Path, threads: int) -> Path:
    """Train Ultralytics YOLOv8n from scratch (``yolov8n.yaml``) for ``budget_s`` seconds of
    wall clock (its ``time`` option, in hours, overrides ``epochs``) with ``threads`` torch
    threads. Returns the run folder."""
    import ultralytics.utils.torch_utils as ultralytics_torch_utils
    from ultralytics import YOLO

    # its device selection calls torch.set_num_threads(NUM_THREADS) (min(8, cores - 1))
    ultralytics_torch_utils.NUM_THREADS = threads

    model = YOLO("yolov8n.yaml")
    # an absolute project path: Ultralytics puts relative ones under its own runs folder
    model.train(data=str(yaml_path), imgsz=size, epochs=1000, time=budget_s / 3600.0, device="cpu",
                workers=1, pretrained=False, amp=False, project=str(out.resolve()), name="yolov8n",
                exist_ok=True, plots=False, val=False, verbose=False)
    return Path(model.trainer.save_dir)


def score_yolov8n(run: Path, val_idx, size: int, num_train: int) -> dict:
    """Score a finished YOLOv8n run (``run/weights/last.pt``) with densedet's evaluator on
    ``val_idx``; epochs and seconds come from the run's ``results.csv`` (cumulative time at
    the end of its last epoch, final validation included)."""
    import csv

    from ultralytics import YOLO

    rows = list(csv.DictReader(open(run / "results.csv")))
    if not rows:
        raise DensedetError(f"{run / 'results.csv'}: no finished epoch")
    epochs, seconds = int(rows[-1]["epoch"]), float(rows[-1]["time"])
    model = YOLO(str(run / "weights" / "last.pt"))
    dets = []
    for s in val_idx.samples:
        r = model.predict(s.path, imgsz=size, conf=0.001, iou=0.65, max_det=100, verbose=False)[0]
        for (x1, y1, x2, y2), sc, c in zip(r.boxes.xyxy.tolist(), r.boxes.conf.tolist(), r.boxes.cls.tolist()):
            dets.append({"image_id": s.image_id, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": float(sc)})
    metrics = metrics_to_json(evaluate(val_idx, dets))
    return {"run": str(run), "seconds": round(seconds, 1), "epochs": epochs,
            "images_per_s": round(epochs * num_train / max(seconds, 1e-9), 2),
            **{k: metrics.get(k) for k in SCORE_KEYS}}


def compare_ultralytics(data: Path, size: int, budget_s: float, out: Path,
                        train_ours: Callable[..., dict], threads: Optional[int] = None,
                        yolov8n_run: Optional[Path] = None, preset: str = "yolox_nano",
                        overrides: tuple[str, ...] = ()) -> Optional[dict]:
    """YOLOv8n (Ultralytics, from scratch) vs densedet's ``preset``, same images, image size,
    torch threads (``threads``, default Ultralytics' own CPU choice ``min(8, cores - 1)``), one
    loader worker each and the same wall-clock budget, both scored by densedet's evaluator on
    the val split. ``train_ours(data, size, budget_s, out, preset, overrides) -> dict`` trains
    the densedet side. ``yolov8n_run``: score that finished run instead of training one (same
    budget and threads assumed).
    Returns None when ``ultralytics`` is not installed."""
    try:
        # Ultralytics' own CPU choice is min(8, cores - 1) torch threads (NUM_THREADS)
        from ultralytics.utils import NUM_THREADS
    except ImportError:
        return None
    threads = threads or NUM_THREADS

    classes = (data / "classes.txt").read_text().split()
    train_idx = read_dataset(data, "voc", classes, split="train")
    val_idx = read_dataset(data, "voc", classes, split="val")
    if yolov8n_run is None:
        yolo_root = out / "yolo"
        write_yolo(train_idx, yolo_root, "train")
        yolov8n_run = train_yolov8n(write_yolo(val_idx, yolo_root, "val"), size, budget_s, out, threads)
    ultra = score_yolov8n(Path(yolov8n_run), val_idx, size, len(train_idx.samples))
    torch.set_num_threads(threads)  # Ultralytics' predict resets it to NUM_THREADS
    ours = train_ours(data, size, budget_s, out, preset, overrides)
    return {"threads": threads, "loader_workers": 1, "imgsz": size, "budget_s": budget_s,
            "ultralytics_yolov8n": ultra, f"densedet_{preset}": ours,
            "images_per_s_ratio": round(ours["images_per_s"] / max(ultra["images_per_s"], 1e-9), 2)}


