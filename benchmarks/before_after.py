"""Run the assignment benchmark on another source tree of densedet, for before/after tables
measured side by side in one environment.

    git archive <commit> densedet | tar -x -C /tmp/before
    python benchmarks/before_after.py /tmp/before --scenes "B16 G20" --methods lla
    python benchmarks/assign.py --scenes "B16 G20" --methods lla      # the current tree

An editable install maps ``densedet`` to the checkout through an import hook that runs before
``sys.path``, so putting the other tree on ``PYTHONPATH`` is not enough: the hook is removed
here, and the benchmark's own arguments follow the tree's path.
"""
import sys


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    src = sys.argv.pop(1)
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()
                        and "editable" not in type(f).__module__.lower()]
    sys.path.insert(0, src)
    import densedet
    if not densedet.__file__.startswith(src):
        print(f"densedet was imported from {densedet.__file__}, not from {src}", file=sys.stderr)
        return 1
    from densedet.bench.assign import main as bench_main
    return bench_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
