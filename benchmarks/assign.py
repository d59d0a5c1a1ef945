"""Time every assigner against its per-image reference and Ultralytics' TAL.

    python benchmarks/assign.py [--methods fcos atss ...] [--repeats N] [--threads T]

Same as ``densedet bench assign``; the logic lives in :mod:`densedet.bench.assign`.
"""
import sys

from densedet.bench.assign import main

if __name__ == "__main__":
    sys.exit(main())
