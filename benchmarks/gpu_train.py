"""AMP training throughput and peak memory of a preset on one CUDA device.

    python benchmarks/gpu_train.py [--preset yolox_s] [--size 640] [--batch 64] [--iters 200]
        [--warmup 20] [--batches 4] [--data DIR] [--json OUT]

What is timed is the trainer's own iteration, :meth:`densedet.engine.trainer.Trainer._train_step`
(float16 autocast, forward, assignment and loss, backward, GradScaler, fused optimizer, EMA,
the on-device log accumulators), with the trainer's one host read per ``train.log_interval``
iterations, on ``--batches`` augmented batches (mosaic, mixup: the preset's augmentation) made
beforehand from a synthetic dataset and kept on the device. The data loader is left out: its
speed is the host's (cores, disk), not the device's.

Prints one table row: images/s over ``--iters`` iterations after ``--warmup`` untimed ones;
the mean iteration by the wall clock and by CUDA events (device time from a step's first
kernel to its last: close to the wall time when the host keeps the device busy); peak memory
(``torch.cuda.max_memory_allocated``). ``scripts/gpu_check.sh`` runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="yolox_s")
    p.add_argument("--size", type=int, default=640, help="input size (px)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=200, help="timed iterations")
    p.add_argument("--warmup", type=int, default=20, help="untimed iterations first")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--data", default=None, help="synthetic dataset folder (made when missing)")
    p.add_argument("--device", default="cuda", help="cuda[:i]; cpu only to try the script itself")
    p.add_argument("--json", default=None, help="also write the row here")
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"gpu_train: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})",
              file=sys.stderr)
        return 2

    from densedet.config import load_config, preset_path
    from densedet.data.loader import collate
    from densedet.data.synth import make_synth
    from densedet.engine.trainer import IntervalStats, StepTimer, Trainer

    work = Path(tempfile.mkdtemp(prefix="densedet_gpu_train_"))
    data = Path(args.data) if args.data else work / "synth"
    if not (data / "Annotations").is_dir():
        t0 = time.perf_counter()
        make_synth(data, images=max(64, args.batch), size=args.size, seed=0,
                   workers=max(1, min(16, (os.cpu_count() or 2) - 1)))
        print(f"synthetic data: {data} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    cfg = load_config(preset_path(args.preset), [
        f"data.root={data}", f"output_dir={work / 'run'}", f"input_size={args.size}",
        f"train.batch_size={args.batch}", f"train.device={args.device}", "train.amp=true",
        "data.val_split=null", "data.num_workers=0", "data.train_split=trainval"])
    trainer = Trainer(cfg, log=lambda s: print(s, file=sys.stderr))
    trainer.setup()
    dev = trainer.device
    model = trainer.model

    g = torch.Generator().manual_seed(0)
    batches = []
    t0 = time.perf_counter()
    for _ in range(args.batches):
        idx = torch.randint(len(trainer.dataset), (args.batch,), generator=g).tolist()
        images, targets, _ = collate([trainer.dataset[(i, s)] for s, i in enumerate(idx)])
        batches.append((images.to(dev), {k: v.to(dev) for k, v in targets.items()}))
    print(f"{args.batches} batches of {args.batch} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)

    stats, timer = IntervalStats(dev), StepTimer(dev)
    log_every = cfg.train.log_interval

    def run(n: int) -> float:
        """``n`` iterations as the trainer runs them; the device time they took (s)."""
        device_s = 0.0
        for k in range(n):
            images, targets = batches[trainer.global_iter % len(batches)]
            lr = trainer.schedule(trainer.global_iter)
            timer.start()
            trainer._train_step(model, images, targets, lr, stats, 0.0)
            timer.stop()
            trainer.global_iter += 1
            if (k + 1) % log_every == 0 or k + 1 == n:
                trainer._read_interval(stats, 0, trainer.global_iter)  # the log step's one read
                device_s += timer.read()
        return device_s

    run(args.warmup)
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    device_s = run(args.iters)
    if cuda:
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    row = {
        "preset": args.preset, "input": args.size, "batch": args.batch, "iters": args.iters,
        "images_per_s": round(args.iters * args.batch / wall, 1),
        "step_ms_wall": round(wall / args.iters * 1e3, 1),
        "step_ms_device": round(device_s / args.iters * 1e3, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if cuda else None,
        "gpu": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
    }
    head = ["preset", "input", "batch", "iters", "images_per_s", "step_ms_wall", "step_ms_device",
            "peak_gib", "gpu"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print("| " + " | ".join(str(row[h]) for h in head) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
