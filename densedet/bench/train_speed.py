"""Training throughput per preset, and the share of a step spent in label assignment.

    python benchmarks/train_speed.py [--presets yolox_nano fcos_r18 ...] [--size 320]
        [--batch 8] [--iters 5] [--threads 2] [--data DIR] [--json OUT]
        [--ultralytics-budget SECONDS [--ultralytics-run DIR] [--compare-preset P]
         [--compare-overrides KEY=VALUE ...]]

For each preset: real augmented batches from the synthetic set (generated into ``--data``
when missing) are loaded first, then ``--iters`` timed training steps (forward, assignment,
loss, backward, optimizer step; after ``--warmup`` untimed ones) give

* ``images_per_s``: batch / median step time (the model's side; data loading excluded),
* ``data_ms``: median time to produce one augmented batch in this process,
* ``assign_share``: summed ``LossOutput.assign_seconds`` / summed step time.

``--ultralytics-budget S`` (only when ``ultralytics`` is installed, the ``compare`` extra;
:mod:`densedet.bench.ultralytics`) also trains YOLOv8n from
scratch (``YOLO("yolov8n.yaml")``) on the same images exported with
:func:`densedet.data.yolo.write_yolo`, at the same image size and thread count, for ``S``
seconds of wall clock, and densedet's ``--compare-preset`` (YOLOX-Nano) for the same budget, both
with ``--threads`` torch threads (default: Ultralytics' own CPU choice, ``min(8, cores - 1)``);
both are scored on the val split with :func:`densedet.evaluate.evaluate`.
``--ultralytics-run DIR`` scores a finished YOLOv8n run instead of training another one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from densedet.bench.ultralytics import SCORE_KEYS, compare_ultralytics
from densedet.config import PRESETS as CONFIG_PRESETS
from densedet.config import load_config, preset_path
from densedet.data.dataset import DetectionDataset
from densedet.data.loader import collate
from densedet.data.synth import make_synth
from densedet.data.transforms import Augmentation
from densedet.engine import evaluate_model, train
from densedet.engine.build import assigner_name, build_detector, count_params, read_split
from densedet.engine.trainer import build_optimizer
from densedet.errors import DensedetError
from densedet.evaluate import metrics_to_json

PRESETS = list(CONFIG_PRESETS)


def ensure_synth(root: Path, images: int, size: int) -> Path:
    if not (root / "Annotations").is_dir():
        make_synth(root, images=images, size=size, seed=0)
    return root


def sample_batches(cfg, index, batch: int, n: int, seed: int = 0) -> tuple[list, list[float]]:
    """``n`` collated augmented batches of ``batch`` training images (drawn with ``seed``) and
    the seconds each took to produce."""

    dataset = DetectionDataset(index.samples, cfg.input_hw, augment=Augmentation(**cfg.augment.model_dump()))
    g = torch.Generator().manual_seed(seed)
    batches, seconds = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        idx = torch.randint(len(dataset), (batch,), generator=g).tolist()
        batches.append(collate([dataset[(i, s)] for s, i in enumerate(idx)]))
        seconds.append(time.perf_counter() - t0)
    return batches, seconds


def train_step(model, optimizer, images, targets):
    """One training step: forward, assignment and loss, backward, optimizer step. Returns the
    model's ``LossOutput``."""
    out = model.loss(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    out.total.backward()
    optimizer.step()
    return out


def measure_preset(preset: str, data: Path, size: int = 320, batch: int = 8, iters: int = 5,
                   warmup: int = 2, device: str = "cpu") -> dict:
    """Time ``iters`` training steps of ``configs/<preset>.yaml`` (see the module doc)."""

    cfg = load_config(preset_path(preset),
                      [f"data.root={data}", f"input_size={size}", f"train.batch_size={batch}"])
    dev = torch.device(device)
    index = read_split(cfg, cfg.data.train_split)
    model = build_detector(cfg, len(index.classes)).to(dev).train()
    if cfg.train.channels_last:  # as the trainer does
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg, lr=1e-4)  # small lr: timing only, keep it finite
    batches, data_s = sample_batches(cfg, index, batch, warmup + iters)
    step_s, assign_s = [], []
    for k, (images, targets, _) in enumerate(batches):
        images, targets = images.to(dev), {key: v.to(dev) for key, v in targets.items()}
        t0 = time.perf_counter()
        out = train_step(model, optimizer, images, targets)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if k >= warmup:
            step_s.append(time.perf_counter() - t0)
            assign_s.append(out.assign_seconds)
    med = statistics.median(step_s)
    return {"preset": preset, "model": cfg.model.name, "size": cfg.model.size,
            "assigner": assigner_name(cfg), "input": size, "batch": batch,
            "params_M": round(count_params(model) / 1e6, 2),
            "images_per_s": round(batch / med, 2), "step_ms": round(med * 1e3, 1),
            "data_ms": round(statistics.median(data_s[warmup:] or data_s) * 1e3, 1),
            "assign_ms": round(statistics.median(assign_s) * 1e3, 1),
            "assign_share": round(sum(assign_s) / sum(step_s), 3)}


def format_table(rows: list[dict]) -> str:
    head = ["preset", "assigner", "params_M", "images_per_s", "step_ms", "assign_ms", "assign_share", "data_ms"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join(str(r.get(h, "")) for h in head))
    return "\n".join(lines)


def _budget_epochs(budget_s: float, epoch_s: float, eval_s: float) -> int:
    """Most epochs whose training plus evaluations fit ``budget_s`` (nearest; at least 1):
    the trainer evaluates at the end and every epoch of the no-aug tail (``epochs // 6``)."""
    def total(n: int) -> float:
        return n * epoch_s + (1 + n // 6) * eval_s
    n = 1
    while total(n + 1) <= budget_s:
        n += 1
    # the nearest count: one more when that overshoots by less than this one undershoots
    return n + 1 if total(n + 1) - budget_s < budget_s - total(n) else n


def _calibrate(cfg_path: Path, overrides: list[str], out: Path) -> tuple[float, float]:
    """Seconds per epoch of the training loop and per evaluation, from one real epoch."""
    import csv

    t0 = time.perf_counter()
    train(load_config(cfg_path, [*overrides, f"output_dir={out}", "train.epochs=1", "train.no_aug_epochs=0"]))
    seconds = time.perf_counter() - t0
    rows = list(csv.DictReader(open(out / "log.csv")))
    # each row averages the steps since the previous one
    loop_s, last = 0.0, 0
    for r in rows:
        n = int(r["iter"]) - last
        last = int(r["iter"])
        loop_s += n * (float(r["step_ms"]) + float(r["data_ms"])) / 1e3
    return loop_s, max(0.0, seconds - loop_s)


def train_densedet_budget(data: Path, size: int, budget_s: float, out: Path, preset: str = "yolox_nano",
                          overrides: tuple[str, ...] = ()) -> dict:
    """densedet's ``preset`` for the epochs that fit ``budget_s`` (calibrated on one real epoch
    of the same run, not counted), then scored on the val split; ``overrides`` go after the
    harness's own."""

    cfg_path = preset_path(preset)
    common = [f"data.root={data}", f"input_size={size}", "train.batch_size=16", "train.lr=0.08",
              "train.warmup_epochs=1", "data.num_workers=1"]
    num_train = len(read_split(load_config(cfg_path, common), "train").samples)
    epoch_s, eval_s = _calibrate(cfg_path, [*common, *overrides], out / f"calibrate_{preset}")
    epochs = _budget_epochs(budget_s, epoch_s, eval_s)
    run = out / f"densedet_{preset}"
    t0 = time.perf_counter()
    train(load_config(cfg_path, [*common, f"output_dir={run}", f"train.epochs={epochs}",
                                 f"train.no_aug_epochs={max(1, epochs // 6)}", f"train.eval_interval={epochs}",
                                 *overrides]))
    seconds = time.perf_counter() - t0
    metrics = metrics_to_json(evaluate_model(None, run / "best.pt", "val", [f"data.root={data}"], None,
                                             device="cpu"))
    return {"preset": preset, "overrides": list(overrides), "seconds": round(seconds, 1), "epochs": epochs,
            "calibration": {"epoch_s": round(epoch_s, 1), "eval_s": round(eval_s, 1)},
            "images_per_s": round(epochs * num_train / max(seconds, 1e-9), 2),
            **{k: metrics.get(k) for k in SCORE_KEYS}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``benchmarks/train_speed.py`` and ``densedet bench train``."""
    p.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS)
    p.add_argument("--data", default="data/synth_bench", help="VOC dataset (synthetic one made when missing)")
    p.add_argument("--images", type=int, default=64, help="images to synthesise when --data is missing")
    p.add_argument("--size", type=int, default=320, help="input size (default 320)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=5, help="timed steps per preset")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the rows as JSON")
    p.add_argument("--ultralytics-budget", type=float, default=None, metavar="SECONDS",
                   help="also compare with Ultralytics YOLOv8n for this wall-clock budget")
    p.add_argument("--ultralytics-run", default=None, metavar="DIR",
                   help="score this finished YOLOv8n run (trained with the same budget) instead of training one")
    p.add_argument("--compare-preset", default="yolox_nano", choices=PRESETS,
                   help="the densedet preset trained against YOLOv8n")
    p.add_argument("--compare-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for that densedet run (after the harness's own)")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    data = ensure_synth(Path(args.data), args.images, max(64, args.size))
    rows = []
    for preset in args.presets:
        try:
            row = measure_preset(preset, data, args.size, args.batch, args.iters, args.warmup, args.device)
        except DensedetError as e:
            row = {"preset": preset, "error": str(e)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\ntraining speed at {args.size}px, batch {args.batch}, {threads} thread(s), {args.device}:")
    print(format_table([r for r in rows if "error" not in r]))
    result = {"threads": threads, "device": args.device, "rows": rows}
    if args.ultralytics_budget:
        cmp = compare_ultralytics(data, args.size, args.ultralytics_budget, Path("runs/train_speed"),
                                  train_densedet_budget, args.threads, args.ultralytics_run, args.compare_preset, tuple(args.compare_overrides))
        if cmp is None:
            print("ultralytics not installed: YOLOv8n comparison skipped")
        else:
            print(json.dumps(cmp, indent=2))
            result["ultralytics"] = cmp
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
