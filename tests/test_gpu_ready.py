"""GPU readiness of the training loop (issue 14).

On the CPU (always run):

* between two log steps the trainer asks nothing of a tensor that would make the host wait
  for a CUDA device (``.item()``, ``.tolist()``, ``bool()``, ``float()``, ...,
  ``torch.cuda.synchronize``): those calls are counted while ``Trainer.train_epoch`` runs
  and must all come from the log step / checkpoint (the calls the log step does make are
  counted too, which shows the counting works);
* a step whose loss is not finite is skipped on the device and reported at the next read,
  naming the term and the iteration; a float32 step with NaN gradients but a finite loss
  is skipped and reported too;
* the float32 GradScaler (scale fixed at 1) with the fused optimizer computes what a plain
  ``optimizer.step()`` does;
* DDP's ``find_unused_parameters``: the probe finds an unused parameter where there is one,
  and none in any preset (per family, in its first and last epoch, with and without
  objects).

On a CUDA device (marker ``cuda``, skipped without one; ``scripts/gpu_check.sh``): an AMP
training step against the CPU in float32, every assigner on CUDA against the CPU, and
``torch.cuda.set_sync_debug_mode`` around the training loop.
"""
from __future__ import annotations

import copy
import functools
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densedet.config import load_config, preset_path
from densedet.engine.build import build_detector
from densedet.engine.trainer import (NonFiniteLossError, Trainer, build_optimizer, make_scaler)
from densedet.models.detector import LossOutput

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ENGINE = str(REPO / "densedet" / "engine")
DATA_CODE = str(REPO / "densedet" / "data")  # host tensors of the input pipeline: no device

HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- helpers
def make_tiny_dataset(root: Path, n_train: int) -> Path:
    from densedet.data.synth import make_synth

    make_synth(root, images=n_train, size=96, seed=0, workers=1)
    stems = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(s + "\n" for s in stems))
    return root


@pytest.fixture(scope="module")
def data12(tmp_path_factory) -> Path:
    """12 training images: 6 iterations of batch 2."""
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "synth", 12)


def overrides(data: Path, out: Path, **extra) -> list[str]:
    opts = {"data.root": str(data), "output_dir": str(out), "input_size": 64,
            "train.batch_size": 2, "train.epochs": 1, "train.warmup_epochs": 0,
            "train.no_aug_epochs": 0, "train.device": "cpu", "data.num_workers": 0,
            "train.log_interval": 3, "data.val_split": "null", "train.checkpoint_interval": 0}
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


#: what makes the host wait for a CUDA tensor's value (or for the device outright)
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
#: the trainer's sanctioned sync points: the log step, the check before a checkpoint, the
#: checkpoint itself, evaluation
SYNC_POINTS = ("_read_interval", "_log_interval", "save_last", "evaluate_epoch")


class SyncCounter:
    """Counts calls of :data:`SYNC_METHODS` and ``torch.cuda.synchronize`` by their caller,
    split into calls inside ``Trainer.train_epoch`` but outside :data:`SYNC_POINTS` (the
    hot path) and calls inside a sync point."""

    def __init__(self, monkeypatch):
        self.depth = {"epoch": 0, "sync": 0}
        self.hot: list[tuple[str, str, int]] = []
        self.at_sync_points: list[tuple[str, str, int]] = []
        self.log_steps = 0
        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.cuda, "synchronize",
                            self._counting("torch.cuda.synchronize", torch.cuda.synchronize))
        self._around(monkeypatch, "train_epoch", "epoch")
        for name in SYNC_POINTS:
            self._around(monkeypatch, name, "sync")

    def _counting(self, name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self.depth["epoch"]:
                caller = sys._getframe(1)
                site = (name, caller.f_code.co_filename, caller.f_lineno)
                (self.at_sync_points if self.depth["sync"] else self.hot).append(site)
            return fn(*args, **kwargs)
        return wrapper

    def _around(self, monkeypatch, method: str, key: str) -> None:
        original = getattr(Trainer, method)
        counter = self

        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            counter.depth[key] += 1
            if method == "_log_interval":
                counter.log_steps += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counter.depth[key] -= 1
        monkeypatch.setattr(Trainer, method, wrapper)


# ----------------------------------------------------------------------------- no host sync (CPU)
@pytest.mark.parametrize("preset,extra", [
    ("yolox_nano", {}),  # SGD
    ("nanodet_plus_m", {"train.grad_clip": 10.0}),  # AdamW, gradient clipping (unscale_)
])
def test_no_host_sync_between_log_steps(preset, extra, data12, tmp_path, monkeypatch):
    from densedet.assign import common
    # The assigners' CPU-only shortcuts list pairs with a host read (free on a CPU; never
    # taken on CUDA, test_assign_dynamic checks that): off here, so that this CPU run walks
    # the code a CUDA run takes.
    assert not common.use_near_pairs(torch.device("cuda"), 80, 20)
    monkeypatch.setattr(common, "use_near_pairs", lambda *args, **kwargs: False)
    counter = SyncCounter(monkeypatch)
    cfg = load_config(CONFIGS / f"{preset}.yaml", overrides(data12, tmp_path / "run", **extra))
    trainer = Trainer(cfg, log=lambda s: None)
    trainer.train()
    assert trainer.global_iter == 6 and counter.log_steps == 2  # log_interval 3
    assert trainer.optimizer.defaults.get("fused")  # the GradScaler's skip stays on the device

    def ours(sites):  # densedet's code, not the input pipeline's host tensors
        return [s for s in sites if s[1].startswith(str(REPO / "densedet")) and not s[1].startswith(DATA_CODE)]

    hot = ours(counter.hot)
    assert not hot, f"host syncs between log steps: {hot}"
    # the counting sees what the log step reads: one transfer per log step from the trainer
    reads = [s for s in counter.at_sync_points if s[1].startswith(ENGINE) and s[0] == "tolist"]
    assert len(reads) == counter.log_steps, counter.at_sync_points


# ----------------------------------------------------------------------------- non-finite steps (CPU)
def _poison_yolox(monkeypatch, at_call: int, how):
    from densedet.models.yolox import YOLOXHead

    original = YOLOXHead.loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        terms, num_pos = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_call:
            terms = how(dict(terms))
        return terms, num_pos

    monkeypatch.setattr(YOLOXHead, "loss", poisoned)


def _track_parameters(monkeypatch) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Parameters before and after every ``Trainer._train_step``."""
    steps = []
    original = Trainer._train_step

    def wrapper(self, model, *args, **kwargs):
        before = [p.detach().clone() for p in model.parameters()]
        original(self, model, *args, **kwargs)
        steps.append((before, [p.detach().clone() for p in model.parameters()]))
    monkeypatch.setattr(Trainer, "_train_step", wrapper)
    return steps


def _unchanged(step) -> bool:
    return all(torch.equal(a, b) for a, b in zip(*step))


def test_non_finite_loss_skips_the_step_and_stops_at_the_next_read(data12, tmp_path, monkeypatch):
    def nan_cls(terms):
        terms["cls"] = terms["cls"] * float("nan")
        return terms

    _poison_yolox(monkeypatch, 2, nan_cls)
    steps = _track_parameters(monkeypatch)
    cfg = load_config(CONFIGS / "yolox_nano.yaml", overrides(data12, tmp_path / "run"))
    trainer = Trainer(cfg, log=lambda s: None)
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    msg = str(e.value)
    # found at the first read (after iteration 3), naming the step it happened in
    assert "loss term 'cls' is nan at epoch 1, iteration 2/6 (global iteration 2)" in msg, msg
    assert "between global iterations 1 and 3" in msg and "train.log_interval=3" in msg
    assert len(steps) == 3
    assert not _unchanged(steps[0]) and not _unchanged(steps[2])
    assert _unchanged(steps[1])  # the NaN step was not applied
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(v).all() for v in trainer.ema.module.state_dict().values())


def test_float32_step_with_nan_gradients_is_skipped_and_reported(data12, tmp_path, monkeypatch):
    def nan_gradient(terms):  # d sqrt(x)/dx at 0 is inf: a finite loss, NaN gradients
        terms["iou"] = terms["iou"] + torch.sqrt(terms["iou"] * 0.0)
        return terms

    _poison_yolox(monkeypatch, 4, nan_gradient)
    steps = _track_parameters(monkeypatch)
    cfg = load_config(CONFIGS / "yolox_nano.yaml", overrides(data12, tmp_path / "run"))
    with pytest.raises(NonFiniteLossError, match=r"1 training step\(s\) between global iterations 4 and 6 "
                                                 r"\(epoch 1\) had NaN/inf gradients while the loss was finite"):
        Trainer(cfg, log=lambda s: None).train()
    assert len(steps) == 6 and _unchanged(steps[3]) and not _unchanged(steps[4])


def test_float32_scaler_and_fused_step_equal_a_plain_step():
    """The float32 path (GradScaler at scale 1, fused SGD) computes what the previous one
    (no scaler, the default SGD implementation) did."""
    cfg = load_config(CONFIGS / "yolox_nano.yaml", ["input_size=64"])
    torch.manual_seed(0)
    a = build_detector(cfg, 3).train()
    b = copy.deepcopy(a)
    opt_a = build_optimizer(a, cfg, 0.01)
    opt_b = build_optimizer(b, cfg, 0.01, fused=False)
    assert opt_a.defaults["fused"] and not opt_b.defaults["fused"]
    scaler = make_scaler(torch.device("cpu"), amp=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        images = torch.rand(2, 3, 64, 64, generator=g)
        targets = {"gt_boxes": torch.tensor([[[4., 6., 30., 40.]], [[10., 12., 50., 30.]]]),
                   "gt_labels": torch.tensor([[0], [2]]), "gt_valid": torch.ones(2, 1, dtype=torch.bool)}
        opt_a.zero_grad()
        scaler.scale(a.loss(a(images), targets).total).backward()
        scaler.step(opt_a)
        scaler.update()
        opt_b.zero_grad()
        b.loss(b(images), targets).total.backward()
        opt_b.step()
    assert scaler.get_scale() == 1.0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- DDP find_unused_parameters
def test_unused_parameter_probe_finds_one():
    from densedet.engine.distributed import unused_parameters

    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(2, 1), nn.Linear(2, 1)
            self.frozen = nn.Linear(2, 1).requires_grad_(False)

    model = TwoBranches()
    assert unused_parameters(model, [lambda m: m.used(torch.ones(1, 2)).sum()]) == ["spare.weight", "spare.bias"]
    # a parameter in the graph with a zero gradient counts as used, as it does for DDP
    assert unused_parameters(model, [lambda m: (m.used(torch.ones(1, 2)) + 0 * m.spare(torch.ones(1, 2))).sum()]) == []
    assert model.used.weight.grad is None  # the model itself is untouched


#: the model families' presets behind the decision (the trainer probes any model anyway)
FAMILY_PRESETS = ["yolox_nano", "yolox_tiny", "yolox_s", "fcos_r18", "nanodet_plus_m", "dw_r18", "lla_r18"]


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_no_preset_leaves_a_parameter_without_gradient(preset):
    """The evidence behind DDP's find_unused_parameters=False: every family, in its first and
    its last epoch (YOLOX's L1 term on, NanoDet-Plus's guidance head detached), with objects
    in the batch and without, gives every trainable parameter a gradient."""
    cfg = load_config(preset_path(preset), ["input_size=64"])
    tr = Trainer.__new__(Trainer)  # only what the probe reads
    tr.cfg, tr.classes, tr.device = cfg, ["a", "b", "c"], torch.device("cpu")
    tr.model = build_detector(cfg, 3)
    state = copy.deepcopy(tr.model.state_dict())
    assert tr._probe_unused_parameters() == []
    assert all(torch.equal(v, state[k]) for k, v in tr.model.state_dict().items())  # untouched


# ----------------------------------------------------------------------------- CUDA
# 256 px: no 1x1 feature maps, where train-mode normalisation amplifies rounding
CUDA_HW = 256
CUDA_TARGETS = {"gt_boxes": torch.tensor([[[8., 12., 60., 80.], [40., 40., 120., 116.]],
                                          [[20., 24., 100., 60.], [0., 0., 0., 0.]]]) * 2,
                "gt_labels": torch.tensor([[0, 2], [1, 0]]),
                "gt_valid": torch.tensor([[True, True], [True, False]])}


def _head_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().double() for n, p in model.named_parameters()
                      if n.startswith("head.") and p.grad is not None])


@pytest.mark.parametrize("preset", ["yolox_nano", "fcos_r18", "nanodet_plus_m"])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_amp_step_matches_cpu_float32(preset):
    """One training step as the trainer takes it on CUDA (float16 autocast, GradScaler with
    unscale_, fused optimizer, channels-last) against the CPU in float32, with the CPU's
    assignment (a dynamic assigner may flip a borderline prior under float16, which moves a
    loss of two objects by 10 %): every loss term within 2 %, the head's gradient in
    direction (cosine > 0.95) and size (within 20 %), the step applied and finite.

    Only the head's gradient: in a random-init network of train-mode BatchNorms over a
    two-image batch, rounding differences grow through the backbone (see
    tests/test_engine.py's channels-last test); emulating float16 autocast on the CPU gave
    head cosines 0.97-0.999 and norm ratios 0.998-1.07 for these presets, backbone ones
    down to 0.75."""
    cfg = load_config(preset_path(preset), [f"input_size={CUDA_HW}"])
    torch.manual_seed(0)
    cpu = build_detector(cfg, 3).train()
    images = torch.rand(2, 3, CUDA_HW, CUDA_HW, generator=torch.Generator().manual_seed(0))
    out = cpu.loss(cpu(images), CUDA_TARGETS)
    out.total.backward()
    assignment = out.assignment
    ref_terms = {k: float(v.detach()) for k, v in out.terms.items()}
    ref_grad = _head_grad(cpu)

    dev = torch.device("cuda")
    targets = {k: v.to(dev) for k, v in CUDA_TARGETS.items()}
    scaler = make_scaler(dev, amp=True)
    for _ in range(12):  # the first scales may overflow float16: those steps are skipped
        model = copy.deepcopy(cpu).to(dev).to(memory_format=torch.channels_last)
        model.assign = lambda raw, targets: assignment.to(dev)
        before = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(model, cfg, 1e-3)
        assert opt.defaults["fused"]
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            out = model.loss(model(images.to(dev)), targets)
        scaler.scale(out.total).backward()
        scaler.unscale_(opt)
        grad = _head_grad(model).cpu()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() >= scale:  # not skipped
            break
    else:
        pytest.fail("every AMP step overflowed")
    for k, v in out.terms.items():
        assert math.isclose(float(v), ref_terms[k], rel_tol=0.02, abs_tol=1e-3), (k, float(v), ref_terms[k])
    cos = float(F.cosine_similarity(grad, ref_grad, dim=0))
    ratio = float(grad.norm() / ref_grad.norm())
    assert cos > 0.95 and 0.8 < ratio < 1.25, (cos, ratio)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_assigners_match_cpu():
    """Every assigner on the benchmark's training-batch scene (16 images x 20 objects, 8400
    priors, 80 classes): the same decisions on CUDA as on the CPU, up to a few ties."""
    from densedet.bench.assign import ALL_METHODS, SCENES
    from densedet.assign import build_assigner

    scene = SCENES["B16 G20"]()
    on_cuda = scene.to("cuda")
    failures = []
    for method in ALL_METHODS:
        a = build_assigner(method, num_classes=80)(*scene.args())
        b = build_assigner(method, num_classes=80)(*on_cuda.args()).to("cpu")
        n_pos = max(1, int((a.gt_index >= 0).sum()))
        differ = int((a.gt_index != b.gt_index).sum())
        same = (a.gt_index == b.gt_index) & (a.gt_index >= 0)
        if differ > max(2, 0.005 * n_pos):
            failures.append(f"{method}: {differ} of {n_pos} positives assigned differently")
            continue
        if not torch.equal(a.labels[same], b.labels[same]):
            failures.append(f"{method}: labels differ")
        if not torch.allclose(a.quality[same], b.quality[same].to(a.quality.dtype), atol=1e-3):
            failures.append(f"{method}: quality differs by {(a.quality[same] - b.quality[same]).abs().max():.2g}")
        for field in ("centerness", "align_target"):
            x, y = getattr(a, field), getattr(b, field)
            if x is not None and not torch.allclose(x[same], y[same].to(x.dtype), atol=1e-3):
                failures.append(f"{method}: {field} differs")
    assert not failures, failures


class SyncFreeDetector(nn.Module):
    """A detector-shaped stand-in whose forward and loss never sync (no boolean indexing):
    isolates the trainer's own hot path for ``set_sync_debug_mode("error")``."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.SiLU(),
                                  nn.Conv2d(16, num_classes + 4, 1))

    def set_epoch(self, epoch, max_epochs, no_aug=False):
        return None

    def forward(self, images):
        return {"out": self.body(images)}

    def loss(self, raw, targets):
        out = raw["out"].float().mean(dim=(2, 3))  # [B, C + 4]
        valid = targets["gt_valid"]
        classes = torch.arange(self.num_classes, device=out.device)
        present = ((targets["gt_labels"][..., None] == classes) & valid[..., None]).any(1).float()
        cls = F.binary_cross_entropy_with_logits(out[:, :self.num_classes], present)
        mean_box = (targets["gt_boxes"] * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        box = F.smooth_l1_loss(out[:, self.num_classes:], mean_box / 64.0)
        return LossOutput(total=cls + box, terms={"cls": cls, "box": box}, num_pos=valid.sum().float(),
                          assign_seconds=0.0, assignment=None)


def _sync_mode_between_log_steps(monkeypatch, mode: str) -> None:
    """``torch.cuda.set_sync_debug_mode(mode)`` inside ``Trainer.train_epoch``, off at the
    sanctioned sync points."""
    def around(method, inner):
        original = getattr(Trainer, method)

        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(inner)
            try:
                return original(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        monkeypatch.setattr(Trainer, method, wrapper)

    for name in SYNC_POINTS:
        around(name, "default")
    around("train_epoch", mode)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_training_loop_never_syncs_between_log_steps(data12, tmp_path, monkeypatch):
    """The trainer's own hot path under ``set_sync_debug_mode("error")`` (any sync raises):
    data transfer, AMP forward and loss, the non-finite bookkeeping, GradScaler with
    unscale_ and clipping, the fused step, EMA, CUDA-event timing. The model is a sync-free
    stand-in: the detectors' own syncs are the next test's subject."""
    import densedet.engine.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "build_detector", lambda cfg, n, *a, **kw: SyncFreeDetector(n))
    _sync_mode_between_log_steps(monkeypatch, "error")
    cfg = load_config(CONFIGS / "yolox_nano.yaml",
                      overrides(data12, tmp_path / "run", **{"train.device": "cuda", "train.amp": "true",
                                                            "train.grad_clip": 10.0, "train.ema": "true"}))
    trainer = Trainer(cfg, log=lambda s: None)
    trainer.train()
    assert trainer.use_amp and trainer.global_iter == 6
    import csv
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["global_iter"]) for r in rows] == [3, 6]
    assert all(float(r["step_ms"]) > 0 and math.isfinite(float(r["loss"])) for r in rows)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["yolox_nano", "fcos_r18"])
def test_cuda_real_detector_syncs_only_in_model_code(preset, data12, tmp_path, monkeypatch):
    """A real detector under ``set_sync_debug_mode("warn")``: every sync between log steps
    is charged to the innermost densedet frame on the Python stack when it happens (a sync
    inside torch's optimizer or GradScaler is the trainer's); none may be the engine's. The
    sites in the models, losses and assigners (boolean-mask indexing and the like) are
    printed for the record (``pytest -rP``)."""
    import traceback

    _sync_mode_between_log_steps(monkeypatch, "warn")
    cfg = load_config(CONFIGS / f"{preset}.yaml",
                      overrides(data12, tmp_path / "run", **{"train.device": "cuda", "train.amp": "true"}))
    root = str(REPO / "densedet") + "/"
    sites: dict[tuple[str, int], int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        # called while the op that synced is still on the stack
        ours = [f for f in traceback.extract_stack() if f.filename.startswith(root)]
        key = (ours[-1].filename[len(root):], ours[-1].lineno) if ours else (filename, lineno)
        sites[key] = sites.get(key, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", record)
        Trainer(cfg, log=lambda s: None).train()
    print(f"{preset}: host syncs between log steps (6 iterations), by densedet line:")
    for (path, line), n in sorted(sites.items()):
        print(f"  {n:3d}x densedet/{path}:{line}")
    engine = [k for k in sites if str(k[0]).startswith("engine/")]
    assert not engine, engine
