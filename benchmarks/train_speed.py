"""Training images/s per preset and the share of step time spent in label assignment.

    python benchmarks/train_speed.py [--presets yolox_nano fcos_r18 ...] [--size 320] [--batch 8]
        [--iters 5] [--threads 2] [--json OUT] [--ultralytics-budget SECONDS]

The logic lives in :mod:`densedet.bench.train_speed` (see its docstring for what is timed).
"""
import sys

from densedet.bench.train_speed import main

if __name__ == "__main__":
    sys.exit(main())
