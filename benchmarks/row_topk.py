"""A/B of ``densedet.assign.common.row_topk`` against plain ``torch.topk`` inside the assigners
that use it, on the two benchmark scenes of ``benchmarks/assign.py``.

    python benchmarks/row_topk.py [--repeats 7] [--threads 1]

Each assigner is called alternately with ``row_topk`` and with ``torch.topk`` patched in its
place, so both see the same machine state; prints the medians of CPU time and their ratio.
"""
import argparse
import statistics
import time

import torch

from densedet.assign import build_assigner, common
from densedet.bench.assign import standard_scenes


def plain_topk(x, n, largest=True):
    return x.topk(n, dim=-1, largest=largest)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    segmented = common.row_topk
    print("| scene | method | torch.topk ms | row_topk ms | speed-up |\n|---|---|---|---|---|")
    try:
        for scene in standard_scenes():
            for name in ("simota", "dsl", "lla", "tal"):
                assigner = build_assigner(name, 80)
                assigner(*scene.args())  # warm-up (scratch buffers)
                times = {"row_topk": [], "torch.topk": []}
                for _ in range(args.repeats):
                    for label, fn in (("row_topk", segmented), ("torch.topk", plain_topk)):
                        common.row_topk = fn
                        t0 = time.process_time()
                        assigner(*scene.args())
                        times[label].append(time.process_time() - t0)
                    common.row_topk = segmented
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                print(f"| {scene.name} | {name} | {med['torch.topk']:.1f} | {med['row_topk']:.1f} | "
                      f"{med['torch.topk'] / med['row_topk']:.2f}x |")
    finally:
        common.row_topk = segmented


if __name__ == "__main__":
    main()
