"""Assignment speed and memory: every batched assigner against its per-image reference.

    densedet bench assign [--methods fcos atss ...] [--scenes "B16 G20" ...] [--repeats N]
                          [--ref-repeats R] [--threads T]
    python benchmarks/assign.py ...   (the same)

``assign`` times every batched assigner against its per-image reference loop (and against
Ultralytics' ``TaskAlignedAssigner`` when ``ultralytics`` is installed) on realistic random
scenes (:data:`SCENES`: a training batch, a crowd, and one image with 5,000 small objects at
640 and 1280 px), and prints a table with each call's peak extra memory. The code lives in the package so that it runs the
same from a checkout and when installed.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from densedet.assign import ASSIGNERS, build_assigner
from densedet.assign.reference import run_per_image
from densedet.priors import feature_sizes, make_priors

ALL_METHODS = tuple(ASSIGNERS)
STRIDES = (8, 16, 32)
IMAGE_SIZE = 640


# ----------------------------------------------------------------------------- scenes
@dataclass
class Scene:
    """A padded batch as the assigners see it."""

    name: str
    priors: Tensor  # [A, 4]
    scores: Tensor  # [B, A, C]
    boxes: Tensor  # [B, A, 4]
    gt_boxes: Tensor  # [B, G, 4]
    gt_labels: Tensor  # [B, G]
    gt_valid: Tensor  # [B, G]

    def args(self) -> tuple[Tensor, ...]:
        return (self.priors, self.scores, self.boxes, self.gt_boxes, self.gt_labels, self.gt_valid)

    def to(self, device: torch.device | str) -> "Scene":
        return Scene(self.name, *(t.to(device) for t in self.args()))


def random_scene(batch: int, max_objects: int, num_classes: int = 80, image_size: int = IMAGE_SIZE,
                 strides: tuple[int, ...] = STRIDES, min_size: float = 8.0, max_size: float = 300.0,
                 full: bool = False, seed: int = 0, name: str = "") -> Scene:
    """A realistic random padded batch.

    Objects have log-uniform sides in ``[min_size, max_size]`` px, centres anywhere in the
    image (so some boxes stick out; they are clipped to the image like a data pipeline would).
    Image ``b`` holds ``max_objects`` objects when ``full``, else a random count in
    ``[0, max_objects]`` (so padding rows and empty images occur). Scores are uniform noise
    below 0.3, raised on the object's class at priors inside an object; predicted boxes are
    the object jittered by up to 20 % of its size for priors inside an object, else a random
    box of a few strides around the prior.
    """

    g = torch.Generator().manual_seed(seed)
    priors = make_priors(feature_sizes((image_size, image_size), strides), strides)
    A = priors.shape[0]
    B, G, C = batch, max_objects, num_classes

    if full:
        counts = torch.full((B,), G, dtype=torch.long)
    else:
        counts = torch.randint(0, G + 1, (B,), generator=g)
    gt_valid = torch.arange(G)[None] < counts[:, None]
    log_lo, log_hi = math.log(min_size), math.log(max_size)
    wh = torch.exp(torch.rand(B, G, 2, generator=g) * (log_hi - log_lo) + log_lo)
    centre = torch.rand(B, G, 2, generator=g) * image_size
    gt_boxes = torch.cat([centre - wh / 2, centre + wh / 2], dim=-1).clamp(0, image_size)
    gt_boxes = gt_boxes * gt_valid[..., None]  # padding rows are zeros
    gt_labels = torch.randint(0, C, (B, G), generator=g) * gt_valid

    # which object (if any) each prior sits in: the first one, enough for fake predictions;
    # a slice of objects at a time so that huge scenes do not build [B, G, A] tensors
    px, py = priors[:, 0], priors[:, 1]
    owner = torch.full((B, A), -1, dtype=torch.long)  # [B, A]
    step = max(1, (1 << 22) // max(1, B * A))
    for start in range(0, G, step):
        part = slice(start, start + step)
        box = gt_boxes[:, part]
        inside = ((px > box[..., 0, None]) & (px < box[..., 2, None])
                  & (py > box[..., 1, None]) & (py < box[..., 3, None])
                  & gt_valid[:, part, None])  # [B, g, A]
        first = torch.where(inside.any(1), inside.float().argmax(1) + start, -1)
        owner = torch.where(owner >= 0, owner, first)
    has = owner >= 0
    own = owner.clamp(min=0)

    scores = torch.rand(B, A, C, generator=g) * 0.3
    own_label = gt_labels.gather(1, own)  # [B, A]
    boost = 0.3 + 0.7 * torch.rand(B, A, generator=g)
    cur = scores.gather(2, own_label[..., None]).squeeze(-1)
    scores.scatter_(2, own_label[..., None], torch.where(has, boost, cur)[..., None])

    own_box = gt_boxes.gather(1, own[..., None].expand(B, A, 4))
    size = (own_box[..., 2:] - own_box[..., :2]).repeat(1, 1, 2)
    jittered = own_box + (torch.rand(B, A, 4, generator=g) - 0.5) * 0.4 * size
    half = priors[:, 2:].repeat(1, 2) * (0.5 + 3 * torch.rand(B, A, 4, generator=g))
    random_box = torch.cat([priors[:, :2], priors[:, :2]], dim=-1) + half * torch.tensor(
        [-1.0, -1.0, 1.0, 1.0])
    boxes = torch.where(has[..., None], jittered, random_box)
    boxes = torch.cat([torch.minimum(boxes[..., :2], boxes[..., 2:]),
                       torch.maximum(boxes[..., :2], boxes[..., 2:])], dim=-1)
    return Scene(name, priors, scores, boxes, gt_boxes, gt_labels, gt_valid)


#: scene name -> how to make it. "huge" scenes (aerial / retail images with thousands of
#: small objects) skip the per-image reference (a Python loop over 5,000 objects) and are
#: timed with fewer repeats (see :data:`HUGE_REPEATS`).
SCENES: dict[str, Callable[[], Scene]] = {
    "B16 G20": lambda: random_scene(16, 20, name="B16 G20", seed=1),
    "B2 G500 crowd": lambda: random_scene(2, 500, full=True, name="B2 G500 crowd", seed=2),
    "B1 G5000 640px": lambda: random_scene(1, 5000, full=True, min_size=7.0, max_size=90.0,
                                           name="B1 G5000 640px", seed=3),
    "B1 G5000 1280px": lambda: random_scene(1, 5000, full=True, image_size=1280, min_size=7.0,
                                            max_size=90.0, name="B1 G5000 1280px", seed=4),
}
HUGE_SCENES = ("B1 G5000 640px", "B1 G5000 1280px")
#: at most this many timed runs per method in a huge scene (each call takes seconds).
HUGE_REPEATS = 3


def standard_scenes(names: Optional[tuple[str, ...]] = None) -> list[Scene]:
    """The named scenes of :data:`SCENES`; by default the two everyday ones, (a) a training
    batch and (b) a crowd (the benchmark itself also runs the two huge scenes)."""
    return [SCENES[n]() for n in (names or ("B16 G20", "B2 G500 crowd"))]


# ----------------------------------------------------------------------------- measuring
def _read_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Hand memory freed by earlier runs back to the OS (glibc ``malloc_trim``), so that the
    next run's allocations raise the RSS instead of silently reusing the heap; otherwise the
    high-water mark under-reports. A no-op where glibc is not available."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory above the starting level while ``fn()`` runs, in MB; None if unknown.

    CUDA: the allocator's high-water mark. CPU on Linux: reset the process high-water mark
    (``5`` into ``/proc/self/clear_refs``), run, and read ``VmHWM`` minus the RSS before.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _read_status_kb("VmRSS")
    fn()
    peak = _read_status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) / 1024


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device,
              warmup: int = 1, clock: str = "wall") -> float:
    """Median time of ``fn()`` over ``repeats`` runs after ``warmup`` runs, in ms.

    ``clock="wall"``: elapsed time. ``clock="cpu"``: CPU time of this process
    (``time.process_time``), which does not count time the process spent waiting for a core
    on a shared machine; it equals wall time for one thread on an idle machine and sums
    the threads otherwise. CUDA always uses wall time.
    """
    use_cpu_clock = clock == "cpu" and device.type != "cuda"
    now = time.process_time if use_cpu_clock else time.perf_counter

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        sync()
        t0 = now()
        fn()
        sync()
        times.append((now() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- callables
def batched_callable(method: str, scene: Scene, num_classes: int) -> Callable[[], object]:
    assigner = build_assigner(method, num_classes=num_classes)
    args = scene.args()
    return lambda: assigner(*args)


def reference_callable(method: str, scene: Scene, num_classes: int) -> Callable[[], object]:
    args = scene.args()
    return lambda: run_per_image(method, *args, num_classes=num_classes)


def ultralytics_callable(scene: Scene, num_classes: int) -> Optional[Callable[[], object]]:
    """Ultralytics' ``TaskAlignedAssigner`` (topk 13, alpha 1, beta 6) on the same inputs."""
    try:
        from ultralytics.utils.tal import TaskAlignedAssigner
    except Exception:  # not installed, or a broken install: the row is skipped
        return None
    assigner = TaskAlignedAssigner(topk=13, num_classes=num_classes, alpha=1.0, beta=6.0)
    anchor_points = scene.priors[:, :2].contiguous()
    labels = scene.gt_labels[..., None]
    mask = scene.gt_valid[..., None].float()
    return lambda: assigner(scene.scores, scene.boxes, anchor_points, labels, scene.gt_boxes, mask)


# ----------------------------------------------------------------------------- the benchmark
@dataclass
class Row:
    scene: str
    method: str
    ms: Optional[float] = None
    peak_mb: Optional[float] = None
    ref_ms: Optional[float] = None
    note: str = ""

    def speedup(self) -> Optional[float]:
        return self.ref_ms / self.ms if self.ms and self.ref_ms else None


def run_assign_benchmark(methods: tuple[str, ...] = ALL_METHODS, repeats: int = 5,
                         ref_repeats: int = 1, threads: Optional[int] = None,
                         device: str = "cpu", num_classes: int = 80, with_reference: bool = True,
                         clock: str = "wall", scenes: Optional[tuple[str, ...]] = None,
                         out=sys.stdout) -> list[Row]:
    """Time every method on the standard scenes (or the named ones) and print a table to
    ``out``."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    rows: list[Row] = []
    for name in scenes or tuple(SCENES):
        scene = SCENES[name]().to(dev)  # one scene in memory at a time
        huge = name in HUGE_SCENES
        for method in methods:
            row = Row(scene.name, method)
            try:
                fn = batched_callable(method, scene, num_classes)
                row.ms = median_ms(fn, min(repeats, HUGE_REPEATS) if huge else repeats, dev,
                                   clock=clock)
                del fn  # and its scratch buffers
                # the first call of a fresh assigner: scratch buffers an assigner keeps for
                # its next call (``common.Workspace``) count towards its memory
                row.peak_mb = peak_extra_mb(batched_callable(method, scene, num_classes), dev)
                if with_reference and not huge:
                    row.ref_ms = median_ms(reference_callable(method, scene, num_classes),
                                           ref_repeats, dev, warmup=0, clock=clock)
            except Exception as e:  # one broken method must not sink the whole table
                row = Row(scene.name, method, note=f"failed: {type(e).__name__}: {e}")
            rows.append(row)
            print(f"  {scene.name}: {method} done", file=sys.stderr, flush=True)
        ult = ultralytics_callable(scene, num_classes)
        if ult is None:
            rows.append(Row(scene.name, "ultralytics-tal",
                            note="skipped: ultralytics not installed"))
        else:
            ms = median_ms(ult, min(repeats, HUGE_REPEATS) if huge else repeats, dev,
                           clock=clock)
            rows.append(Row(scene.name, "ultralytics-tal", ms=ms, peak_mb=peak_extra_mb(ult, dev)))
        del scene
    print(format_table(rows, threads=torch.get_num_threads(), device=dev,
                       clock=clock if dev.type != "cuda" else "wall"), file=out)
    return rows


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[Row], threads: int, device: torch.device, clock: str = "wall") -> str:
    """Markdown table; 'vs ult. TAL' = Ultralytics TAL ms / method ms in the same scene."""
    ult = {r.scene: r.ms for r in rows if r.method == "ultralytics-tal" and r.ms}
    head = (f"| scene | method | batched ms (median, {clock}) | peak extra MB | per-image ref ms | "
            "speed-up vs ref | faster than ult. TAL by |")
    lines = [f"device: {device}, torch threads: {threads}, torch {torch.__version__}, "
             f"clock: {clock}", "",
             head, "|" + "---|" * 7]
    for r in rows:
        if r.note:
            lines.append(f"| {r.scene} | {r.method} | {r.note} | | | | |")
            continue
        vs = ult.get(r.scene) / r.ms if r.ms and r.scene in ult and r.method != "ultralytics-tal" \
            else None
        speedup = r.speedup()
        lines.append(f"| {r.scene} | {r.method} | {_fmt(r.ms, '.1f')} | {_fmt(r.peak_mb, '.0f')} | "
                     f"{_fmt(r.ref_ms, '.0f')} | {_fmt(speedup, '.1f')}{'x' if speedup else ''} | "
                     f"{_fmt(vs, '.2f')}{'x' if vs else ''} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- options
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``benchmarks/assign.py`` and ``densedet bench assign``."""
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS,
                   help="assigners to time (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each batched assigner")
    p.add_argument("--ref-repeats", type=int, default=1,
                   help="timed runs of the slow per-image reference loop")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--no-reference", action="store_true", help="skip the per-image loop")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (steadier on a shared machine)")
    p.add_argument("--scenes", nargs="+", default=list(SCENES), choices=list(SCENES),
                   metavar="SCENE", help="scenes to run (default: all): "
                   + ", ".join(repr(n) for n in SCENES))


def run(args: argparse.Namespace) -> int:
    run_assign_benchmark(tuple(dict.fromkeys(args.methods)), repeats=args.repeats,
                         ref_repeats=args.ref_repeats, threads=args.threads, device=args.device,
                         with_reference=not args.no_reference, clock=args.clock,
                         scenes=tuple(dict.fromkeys(args.scenes)))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="time the assigners")
    add_arguments(parser)
    return run(parser.parse_args(argv))
