"""A/B of ``train.channels_last``: one training step per preset with NCHW and with NHWC weights.

    python benchmarks/memory_format.py [--presets yolox_nano ...] [--size 256] [--batch 16]
        [--repeats 3] [--threads 2] [--data DIR] [--overrides KEY=VALUE ...]

Both models start from the same weights and step on the same augmented batches; the two
layouts alternate batch by batch so they see the same machine state. Prints the median step
time (forward, assignment, loss, backward, SGD step) of each and their ratio.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from densedet.bench.train_speed import PRESETS, ensure_synth, sample_batches, train_step
from densedet.config import preset_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS)
    p.add_argument("--data", default="data/synth_bench", help="VOC dataset (synthetic one made when missing)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed batches per layout")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from densedet.config import load_config
    from densedet.engine.build import build_detector, read_split
    from densedet.engine.trainer import build_optimizer

    data = ensure_synth(Path(args.data), 64, 320)
    print(f"{args.threads} threads, {args.size} px, batch {args.batch}, overrides {args.overrides}")
    print("| preset | NCHW ms | NHWC ms | speed-up |\n|---|---|---|---|")
    for preset in args.presets:
        cfg = load_config(preset_path(preset),
                          [f"data.root={data}", f"input_size={args.size}", *args.overrides])
        index = read_split(cfg, cfg.data.train_split)
        batches, _ = sample_batches(cfg, index, args.batch, args.repeats + 1)  # the first: warm-up
        torch.manual_seed(0)
        nchw = build_detector(cfg, len(index.classes)).train()
        nhwc = build_detector(cfg, len(index.classes)).train()
        nhwc.load_state_dict(nchw.state_dict())
        nhwc.to(memory_format=torch.channels_last)
        runs = [(label, model, build_optimizer(model, cfg, lr=1e-4)) for label, model in
                (("NCHW", nchw), ("NHWC", nhwc))]
        times = {"NCHW": [], "NHWC": []}
        for k, (images, targets, _) in enumerate(batches):
            for label, model, optimizer in runs:
                t0 = time.perf_counter()
                train_step(model, optimizer, images, targets)
                if k:
                    times[label].append(time.perf_counter() - t0)
        a, b = (statistics.median(times[k]) * 1e3 for k in ("NCHW", "NHWC"))
        print(f"| {preset} | {a:.0f} | {b:.0f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
