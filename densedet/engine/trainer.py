"""The training loop: YOLOX's recipe around any densedet detector.

One run, top to bottom (:class:`Trainer`):

1. validate everything that can fail fast: an ``output_dir`` already holding a run (refused
   unless ``--resume`` or ``--force``), model/assigner names and compatibility, the dataset
   root, class list, every annotation and image of the train and val splits
   (``check_dataset``; ``data.val_split=null`` is the explicit way to train without
   validation); leftovers of saves killed mid-write are removed;
2. build model, optimizer (SGD with nesterov, no weight decay on norm weights and biases;
   or AdamW; torch's fused kernels on CUDA and CPU), EMA, GradScaler (loss scaling for AMP,
   which is on CUDA only; in float32 a fixed scale of 1 that only skips non-finite steps),
   the warmup-cosine schedule;
3. resume from ``OUTPUT_DIR/last.pt`` or start from ``train.init_weights`` / ``--weights``
   (tensors of another shape, e.g. another class count, are skipped and listed; a file
   whose backbone/neck mostly does not fit is refused unless ``train.init_weights_partial``);
4. per epoch: in the last ``no_aug_epochs`` mosaic/mixup are closed; ``model.set_epoch``
   tells the head (its ``on_epoch``: YOLOX's L1 term, NanoDet-Plus's guidance detach); per
   iteration: lr from the schedule, forward + loss (the assigner runs in float32 inside),
   backward, optional gradient clipping, step, EMA update; and every ``log_interval``
   iterations the logs and the NaN/inf check naming the term, and ``last.pt`` every
   ``checkpoint_interval`` iterations so a killed run resumes close to where it stopped;
5. evaluation of the EMA model every ``eval_interval`` epochs (every epoch in the
   no-augmentation tail, and at the end); ``best.pt`` by COCO AP; ``metrics.json``.

Multi-process runs come from ``torchrun``: DistributedSampler, DDP, the loss normaliser
averaged over processes, only rank 0 writes. DDP's ``find_unused_parameters`` is on only for
a model that leaves trainable parameters without a gradient (a one-step probe at setup,
:meth:`Trainer._probe_unused_parameters`); no preset does.

The loop makes the host wait for the device only at a log step (every ``train.log_interval``
iterations), a checkpoint or an evaluation, never in between, so that a CUDA device is kept
busy: the loss terms, the positive count and a record of the first step with a non-finite
loss are accumulated on the device (:class:`IntervalStats`) and read at once; step times come
from CUDA events (:class:`StepTimer`); the optimizers are fused, so the GradScaler's skip
needs no host read either. A step whose loss is not finite is not applied: its gradients
are made NaN on the device and the GradScaler skips it, as it skips float16 overflows; the
next read stops training with :class:`NonFiniteLossError`, naming the term and the
iteration. The log columns are then interval means. ``tests/test_gpu_ready.py`` checks the
loop for syncs (on the CPU by counting ``.item()``-like calls; on CUDA with
``torch.cuda.set_sync_debug_mode``), and lists the detectors' own (boolean-mask indexing in
heads and assigners), which are outside this module.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
from torch import nn

from densedet.config import Config, config_from_dict, config_to_dict, load_config
from densedet.data.dataset import DetectionDataset
from densedet.data.loader import build_loader, resize_batch
from densedet.data.transforms import Augmentation
from densedet.engine import distributed as dist_utils
from densedet.engine.build import (assigner_name, build_detector, check_index, count_gflops,
                                   count_params, read_split, resolve_device)
from densedet.engine.checkpoint import (load_checkpoint,
                                        remove_stale_tmp, rng_state, save_atomic, set_rng_state)
from densedet.engine.ema import ModelEMA, unwrap
from densedet.engine.inference import evaluate_on, headline
from densedet.engine.official import load_backbone_weights, load_init, prepare_init
from densedet.engine.plots import plot_losses
from densedet.engine.runlog import CsvLog, tensorboard_writer
from densedet.engine.schedule import WarmCosSchedule
from densedet.errors import DensedetError
from densedet.evaluate import metrics_to_json

if TYPE_CHECKING:
    from densedet.data.index import DatasetIndex


class NonFiniteLossError(DensedetError):
    """A loss became NaN/inf; the message names the term, epoch and iteration."""


# What a training run writes into output_dir: their presence means the folder holds a run.
RUN_FILES = ("best.pt", "last.pt", "metrics.json", "log.csv")


def existing_run_files(out: Path) -> list[str]:
    """The :data:`RUN_FILES` present in ``out`` (empty when ``out`` does not exist)."""
    return [name for name in RUN_FILES if (out / name).is_file()]


def split_source(index: DatasetIndex, split: str) -> str:
    """The file that defines ``split`` of a read dataset, for messages: the VOC list file,
    else the dataset path (COCO json, YOLO yaml or folder)."""
    if index.fmt == "voc":
        return str(Path(index.root) / "ImageSets" / "Main" / f"{split}.txt")
    return str(index.root)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying norm scales and biases pulls them
    towards 0 for no regularisation benefit (YOLOX's three groups, as two)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


#: device types whose fused SGD/AdamW kernels the trainer uses
FUSED_DEVICES = ("cuda", "cpu")


def fused_ok(model: nn.Module) -> bool:
    """Whether torch's fused optimizer kernels take ``model``'s trainable parameters: all
    floating point, all on one device of a :data:`FUSED_DEVICES` type."""
    params = [p for p in model.parameters() if p.requires_grad]
    return (bool(params) and len({p.device for p in params}) == 1
            and params[0].device.type in FUSED_DEVICES and all(p.is_floating_point() for p in params))


def build_optimizer(model: nn.Module, cfg: Config, lr: float,
                    fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """SGD (nesterov) or AdamW over :func:`param_groups`. ``fused`` (default: where
    :func:`fused_ok`): one kernel for the whole update, which also takes a GradScaler's scale
    and found-inf flag on the device, so ``GradScaler.step`` skips a non-finite step
    without reading the flag on the host (an unfused optimizer makes it call ``.item()``;
    AdamW's step counters would sync as well)."""
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    if fused is None:
        fused = fused_ok(model)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=t.momentum, nesterov=t.nesterov,
                               fused=fused or None)
    return torch.optim.AdamW(groups, lr=lr, betas=(t.momentum, 0.999), fused=fused or None)


#: a float32 run's GradScaler keeps its scale at 1 (its growth would take this many finite
#: steps in a row): it is there to skip non-finite steps on the device, not to scale
FLOAT32_GROWTH_INTERVAL = 2**30


def make_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """The run's GradScaler. AMP: float16 loss scaling as usual. Float32: a scale fixed at 1
    (multiplying by 1 is exact: the same numbers as without a scaler), kept for its
    device-side skip of a step whose gradients are not finite; its scale dropping below 1
    means a step was skipped (:meth:`Trainer._check_skipped_steps`). Device types without
    a GradScaler get a disabled one (non-finite steps are then applied, and reported at the
    next log step)."""
    if amp:
        return torch.amp.GradScaler(device.type)
    if device.type not in FUSED_DEVICES:
        return torch.amp.GradScaler(device.type, enabled=False)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=FLOAT32_GROWTH_INTERVAL)


class StepTimer:
    """Summed training-step time over a log interval, without waiting for the device at
    every step: on CUDA a pair of events around each step (the device's own time from the
    step's first kernel to its last), read when the interval is read; elsewhere the host
    clock (CPU ops run synchronously)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.host_s = 0.0
        self._start = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(self.device))
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            self.events.append((self._start, end))
        else:
            self.host_s += time.perf_counter() - self._start

    def read(self) -> float:
        """Seconds summed since the last read (waits for the last step's end on CUDA)."""
        if self.cuda:
            if self.events:
                self.events[-1][1].synchronize()
            seconds = sum(a.elapsed_time(b) for a, b in self.events) / 1e3
            self.events = []
            return seconds
        seconds, self.host_s = self.host_s, 0.0
        return seconds


class IntervalStats:
    """What the loop logs, accumulated between two reads: device values on the device.

    :meth:`add` queues only device ops (no host sync): each step's loss, terms and positive
    count (and assignment time when a head reports it as a tensor) are stacked into one
    vector and summed; the first step whose loss is not finite leaves its global iteration
    and its values. :meth:`read` moves everything to the host in one transfer. Host values
    (data wait, a host-clock assignment time) are summed on the host. Steps whose terms
    have other names (a term switched on mid-interval) go to a group of their own."""

    def __init__(self, device: torch.device):
        self.device = device
        self.groups: dict[tuple[str, ...], dict] = {}
        self.host: dict[str, float] = {}
        self.n = 0

    def add(self, keys: tuple[str, ...], values: torch.Tensor, n_loss: int, bad: torch.Tensor,
            global_iter: int, host: dict[str, float]) -> None:
        """``values``: float32 vector for ``keys``, its first ``n_loss`` entries the loss
        values; ``bad``: device bool, this step's loss is not finite (on any process);
        ``global_iter``: this step's number, counted from 1."""
        g = self.groups.get(keys)
        if g is None:
            g = self.groups[keys] = {
                "sum": torch.zeros(len(keys), device=self.device), "n": 0, "n_loss": n_loss,
                "first_bad": torch.full((), -1.0, dtype=torch.float64, device=self.device),
                "bad_values": torch.zeros(len(keys), device=self.device)}
        g["sum"].add_(values)
        g["n"] += 1
        newly = bad & (g["first_bad"] < 0)
        g["first_bad"] = torch.where(newly, float(global_iter), g["first_bad"])
        g["bad_values"] = torch.where(newly, values, g["bad_values"])
        for k, v in host.items():
            self.host[k] = self.host.get(k, 0.0) + v
        self.n += 1

    def read(self, reset: bool = True) -> tuple[dict[str, float], Optional[tuple[int, dict[str, float]]]]:
        """``(means, bad)``: the interval means per key; ``bad`` is None or the first
        non-finite step's global iteration and its values. One host transfer."""
        groups = list(self.groups.items())
        if groups:
            flat = torch.cat([torch.cat([g["sum"].double(), g["first_bad"].view(1), g["bad_values"].double()])
                              for _, g in groups]).tolist()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        bad = None
        pos = 0
        for keys, g in groups:
            k = len(keys)
            total, first_bad, bad_values = flat[pos:pos + k], flat[pos + k], flat[pos + k + 1:pos + 2 * k + 1]
            pos += 2 * k + 1
            for key, v in zip(keys, total):
                sums[key] = sums.get(key, 0.0) + v
                counts[key] = counts.get(key, 0) + g["n"]
            if first_bad >= 0 and (bad is None or first_bad < bad[0]):
                bad = (int(first_bad), dict(zip(keys[:g["n_loss"]], bad_values[:g["n_loss"]])))
        means = {k: sums[k] / counts[k] for k in sums}
        means.update({k: v / self.n for k, v in self.host.items()} if self.n else {})
        if reset:
            self.groups, self.host, self.n = {}, {}, 0
        return means, bad


def _use_tqdm() -> bool:
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true", "yes")


class Trainer:
    """Train ``cfg``; see the module docstring. ``log`` receives human-readable lines."""

    #: DDP's find_unused_parameters: None decides by :meth:`_probe_unused_parameters`;
    #: True/False force it (tests compare the two)
    find_unused_parameters: Optional[bool] = None
    #: the global iteration up to which the loss was last read and found finite
    _checked_until: int = 0

    def __init__(self, cfg: Config, resume: bool = False, weights: Optional[str] = None,
                 log: Callable[[str], None] = print, force: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.force = force  # overwrite a previous run in output_dir (without resume)
        self.weights = weights or cfg.train.init_weights
        self._log = log
        self.out = Path(cfg.output_dir)

    def log(self, msg: str) -> None:
        if dist_utils.is_main():
            self._log(msg)

    # ------------------------------------------------------------------ setup
    def _check_output_dir(self) -> None:
        """Refuse to train over a previous run: its checkpoints and metrics would be replaced
        (or worse, mixed with the new run's) without anyone having asked for that.

        Runs on every process before the process group forms, so all refuse together."""
        if self.resume and self.force:
            raise DensedetError("--resume continues the run in output_dir, --force replaces it: "
                                "pass one of them")
        if self.resume or self.force:
            return
        found = existing_run_files(self.out)
        if found:
            raise DensedetError(
                f"output_dir {self.out} already holds a run ({', '.join(found)}); pass --resume to "
                f"continue it, --force to overwrite it (train(..., force=True)), or set "
                f"output_dir=ANOTHER_FOLDER")

    def _clear_previous_run(self) -> None:
        """``--force``: delete the previous run's results so none outlives the new run
        (a best.pt of the old run next to the new last.pt, TensorBoard curves of both)."""
        if self.resume or not self.force:
            return
        old = [self.out / name for name in existing_run_files(self.out)]
        old += sorted((self.out / "tb").glob("events.out.tfevents.*"))
        for p in old:
            p.unlink(missing_ok=True)
        if old:
            self.log(f"--force: removed the previous run's {', '.join(str(p.relative_to(self.out)) for p in old)} "
                     f"in {self.out}")

    def _read_val(self) -> Optional[DatasetIndex]:
        """The validation index, or None when ``data.val_split`` is null. Any problem with a
        configured split is an error, like the train split's: validation silently dropped
        would leave best.pt the last epoch while looking selected by AP."""
        cfg = self.cfg
        split = cfg.data.val_split
        if split is None:
            self.log("validation off (data.val_split=null): no evaluation during training; "
                     "best.pt will hold the last evaluated epoch's weights and metrics.json no AP")
            return None
        off = "or set data.val_split=null to train without validation"
        try:
            index = read_split(cfg, split, classes=self.classes)
        except DensedetError as e:
            raise DensedetError(f"{e} (validation split {split!r}, data.val_split: fix it, {off})") from None
        if not index.samples:
            raise DensedetError(f"{split_source(index, split)}: validation split {split!r} "
                                f"(data.val_split) has no images; fill it, {off}")
        return index

    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self._check_output_dir()  # first: seconds, before any dataset read or model build
        device = resolve_device(t.device)
        if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", dist_utils.local_rank())
        self.distributed = dist_utils.setup(device)
        self.device = device
        self.world = dist_utils.world_size()
        self.rank = dist_utils.rank()
        if t.batch_size % self.world:
            raise DensedetError(f"train.batch_size={t.batch_size} is not divisible by the "
                                f"{self.world} processes")
        seed_everything(t.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        if dist_utils.is_main():
            removed = remove_stale_tmp(self.out)
            if removed:
                self.log(f"removed {len(removed)} temporary file(s) of interrupted saves in "
                         f"{self.out}: {', '.join(p.name for p in removed)}")

        # --- data: read and check before anything slow happens
        self.train_index = read_split(cfg, cfg.data.train_split)
        self.classes = list(self.train_index.classes)
        if not self.train_index.samples:
            where = (split_source(self.train_index, cfg.data.train_split) if cfg.data.train_split
                     else cfg.data.root)
            raise DensedetError(f"{where}: split {cfg.data.train_split!r} (data.train_split) has no "
                                f"images; fill it or point data.train_split at another split")
        self.val_index = self._read_val()
        if dist_utils.is_main():
            check_index(self.train_index, f"{cfg.data.root} split {cfg.data.train_split}")
            if self.val_index is not None:
                try:
                    check_index(self.val_index, f"{cfg.data.root} split {cfg.data.val_split}")
                except DensedetError as e:
                    raise DensedetError(f"{e}\n(validation split, data.val_split: fix it, or set "
                                        f"data.val_split=null to train without validation)") from None
        if self.train_index.skipped:
            self.log(f"skipped objects of unknown classes: {self.train_index.skipped}")

        # --- model (initial weights are read first: official files bring the input
        # conventions the model must be built with, densedet.engine.official)
        self.init = None if self.resume else prepare_init(cfg, self.weights, log=self.log)
        self.model = build_detector(cfg, len(self.classes)).to(device)
        if t.channels_last:  # inputs need no conversion: a channels-last weight sets the layout
            self.model.to(memory_format=torch.channels_last)
        n_params = count_params(self.model)
        self.gflops = count_gflops(self.model, cfg.input_hw)
        gf = f"{self.gflops:.2f}" if self.gflops is not None else "?"
        self.log(f"model {cfg.model.name} size={cfg.model.size} assigner={assigner_name(cfg)}: "
                 f"{n_params / 1e6:.2f} M params, {gf} GFLOPs at {cfg.input_hw[0]}x{cfg.input_hw[1]}")
        self.n_params = n_params

        # --- data pipeline

        aug = Augmentation(**cfg.augment.model_dump())
        self.dataset = DetectionDataset(self.train_index.samples, cfg.input_hw, augment=aug)
        self.local_batch = t.batch_size // self.world
        n = len(self.dataset)
        # keep at least one step per epoch on tiny datasets
        drop_last = n >= t.batch_size
        # persistent workers (no start-up per epoch); close_mosaic() reaches them anyway
        self.loader = build_loader(self.dataset, self.local_batch, shuffle=True,
                                   num_workers=cfg.data.num_workers, seed=t.seed, drop_last=drop_last,
                                   world=self.world, rank=self.rank, pin_memory=device.type == "cuda")
        self.sampler = self.loader.sampler
        per_rank = len(self.sampler.base)
        self.iters_per_epoch = per_rank // self.local_batch if drop_last else math.ceil(per_rank / self.local_batch)
        self.iters_per_epoch = max(1, self.iters_per_epoch)

        # --- optimisation
        self.base_lr = t.lr * t.batch_size / 64.0  # YOLOX: lr is given per 64 images
        self.optimizer = build_optimizer(self.model, cfg, self.base_lr)
        self.schedule = WarmCosSchedule.from_epochs(
            self.base_lr, self.iters_per_epoch, t.epochs, t.warmup_epochs, t.no_aug_epochs,
            t.warmup_lr_ratio, t.min_lr_ratio)
        self.use_amp = t.amp and device.type == "cuda"
        self.scaler = make_scaler(device, self.use_amp)
        self.ema = ModelEMA(self.model, t.ema_decay) if t.ema else None

        self.start_epoch, self.start_iter, self.global_iter = 0, 0, 0
        self.best_ap, self.best_epoch, self.best_metrics = -1.0, -1, None
        self.history: list[dict] = []
        if self.resume:
            self._load_resume()
        elif self.init is not None or cfg.model.backbone_weights:
            if cfg.model.backbone_weights:  # ImageNet backbone; init_weights load over it
                load_backbone_weights(self.model, cfg, cfg.model.backbone_weights, log=self.log)
            if self.init is not None:
                # densedet checkpoints (their EMA weights when present: what was evaluated) or
                # official YOLOX / NanoDet-Plus / torchvision / mmdet files, counts per part
                load_init(self.model, self.init, cfg, log=self.log)
            if self.ema is not None:
                self.ema = ModelEMA(self.model, t.ema_decay)

        if self.distributed:
            ids = [device.index] if device.type == "cuda" else None
            # find_unused_parameters costs an extra autograd-graph traversal every step; it
            # is needed only when a trainable parameter gets no gradient, which a training
            # step on a copy of the model shows (every preset uses all its parameters, also
            # YOLOX with its L1 term and NanoDet-Plus with its guidance head detached)
            find_unused = self.find_unused_parameters
            if find_unused is None:
                unused = self._probe_unused_parameters()
                find_unused = dist_utils.any_process(bool(unused), device)
                if unused:
                    self.log(f"DDP: {len(unused)} parameter(s) get no gradient in a training step "
                             f"(e.g. {', '.join(unused[:3])}): find_unused_parameters on")
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                           find_unused_parameters=find_unused)
        else:
            self.ddp = self.model

        # --- logs (rank 0 only)
        self.writer = None
        self.csv = None
        if dist_utils.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            self._clear_previous_run()  # only now: a refusal above keeps the old run intact
            (self.out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
            self.csv = CsvLog(self.out / "log.csv", resume=self.resume, keep_until=self.global_iter)
            self.writer = tensorboard_writer(self.out / "tb")

    def _probe_unused_parameters(self) -> list[str]:
        """Trainable parameters that a training step leaves without a gradient (DDP needs
        ``find_unused_parameters`` for them), on copies of the model
        (:func:`~densedet.engine.distributed.unused_parameters`): in the first epoch's and
        the last epoch's configuration (heads switch terms per epoch: YOLOX's L1 term,
        NanoDet-Plus's detached guidance head), with objects in the batch and without. The
        synthetic batch is fixed, so every process finds the same."""
        t = self.cfg.train
        h, w = (min(s, 128) for s in self.cfg.input_hw)  # small: the graph, not the numbers
        g = torch.Generator().manual_seed(0)
        images = torch.rand(2, 3, h, w, generator=g).to(self.device)
        boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.6], [0.3, 0.3, 0.9, 0.9]],
                              [[0.2, 0.2, 0.8, 0.5], [0.0, 0.0, 0.0, 0.0]]]) * torch.tensor([w, h, w, h])
        full = {"gt_boxes": boxes, "gt_labels": torch.tensor([[0, 1], [2, 0]]) % len(self.classes),
                "gt_valid": torch.tensor([[True, True], [True, False]])}
        empty = dict(full, gt_valid=torch.zeros(2, 2, dtype=torch.bool))
        last = t.epochs - 1
        states = [(0, t.no_aug_epochs >= t.epochs), (last, last >= t.epochs - t.no_aug_epochs)]

        def step(epoch: int, no_aug: bool, targets: dict):
            def run(model: nn.Module) -> torch.Tensor:
                model.train()
                model.set_epoch(epoch, t.epochs, no_aug)
                return model.loss(model(images), {k: v.to(self.device) for k, v in targets.items()}).total
            return run

        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the run's random streams stay untouched
            return dist_utils.unused_parameters(
                self.model, [step(e, na, tg) for e, na in states for tg in (full, empty)])

    def _load_resume(self) -> None:
        path = self.out / "last.pt"
        if not path.is_file():
            raise DensedetError(f"--resume: {path} does not exist (nothing to resume; "
                                f"drop --resume or set output_dir)")
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt.get("classes") and list(ckpt["classes"]) != self.classes:
            raise DensedetError(f"--resume: {path} was trained on classes {ckpt['classes']}, "
                                f"the config has {self.classes}")
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        saved, mine = ckpt.get("scaler") or {}, self.scaler.state_dict()
        # an AMP scaler's state into an AMP run, a float32 one's (scale fixed at 1) into a
        # float32 run; across the two (another device) the new run's own initial state
        if saved and mine and saved.get("growth_interval") == mine.get("growth_interval"):
            self.scaler.load_state_dict(saved)
        self.start_epoch, self.start_iter = int(ckpt["epoch"]), int(ckpt["iter"])
        self.global_iter = int(ckpt["global_iter"])
        self.best_ap = float(ckpt.get("best_ap", -1.0))
        self.best_epoch = int(ckpt.get("best_epoch", -1))
        self.best_metrics = ckpt.get("best_metrics")
        self.history = list(ckpt.get("history", []))
        set_rng_state(ckpt.get("rng"))
        self.log(f"resumed from {path}: epoch {self.start_epoch + 1}, iteration {self.start_iter} "
                 f"(global {self.global_iter})")

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, epoch: int, it: int) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch, "iter": it, "global_iter": self.global_iter,
            "best_ap": self.best_ap, "best_epoch": self.best_epoch, "best_metrics": self.best_metrics,
            "history": self.history,
            "rng": rng_state(),
            "config": config_to_dict(self.cfg),
            "classes": self.classes,
        }

    def save_last(self, epoch: int, it: int) -> None:
        """``last.pt`` at the position *after* ``it`` iterations of ``epoch`` (0-based)."""
        if not dist_utils.is_main():
            return
        if it >= self.iters_per_epoch:
            epoch, it = epoch + 1, 0
        save_atomic(self._checkpoint(epoch, it), self.out / "last.pt")

    # ------------------------------------------------------------------ training
    def _eval_due(self, epoch: int) -> bool:
        t = self.cfg.train
        last = epoch + 1 == t.epochs
        in_tail = epoch >= t.epochs - t.no_aug_epochs
        return last or in_tail or (epoch + 1) % t.eval_interval == 0

    def _multiscale(self, images: torch.Tensor, targets: dict) -> tuple[torch.Tensor, dict]:
        t = self.cfg.train
        lo, hi = t.multiscale
        window = self.global_iter // t.multiscale_interval
        if getattr(self, "_ms_window", None) != window:
            # a random multiple of 32 for the whole batch, the same on every rank without a
            # message (a broadcast would make the host wait for the device): drawn from
            # (seed, window), so a resumed run also draws what the killed one did
            choices = list(range(int(math.ceil(lo / 32)) * 32, hi + 1, 32)) or [self.cfg.input_hw[0]]
            self._ms_size = random.Random(t.seed * 1_000_003 + window).choice(choices)
            self._ms_window = window
        h, w = self.cfg.input_hw
        # keep the configured aspect ratio; sides stay multiples of 32 (the largest stride)
        new_h = max(32, int(round(h * self._ms_size / max(h, w) / 32)) * 32)
        new_w = max(32, int(round(w * self._ms_size / max(h, w) / 32)) * 32)
        return resize_batch(images, targets, (new_h, new_w))

    # ------------------------------------------------------------------ non-finite steps
    def _stop_message_tail(self) -> str:
        last = self.out / "last.pt"
        keep = f"; the last good checkpoint is {last}" if last.is_file() else ""
        return f"stopping{keep}"

    def _raise_if_non_finite(self, bad: Optional[tuple[int, dict]], epoch: int, it: int) -> None:
        """Stop on the first step of the interval whose loss was not finite (the record of
        :class:`IntervalStats`), naming the term, its value and the iteration."""
        if bad is None:
            return
        g_bad, values = bad
        it_bad = it - (self.global_iter - g_bad)
        culprit = next((k for k, v in values.items() if k != "loss" and not math.isfinite(v)), None)
        if culprit is not None:
            what = f"loss term {culprit!r} is {values[culprit]}"
        elif not math.isfinite(values.get("loss", 0.0)):  # finite terms, a sum that overflowed
            what = f"the total loss is {values['loss']}"
        else:
            what = "the loss of another process is NaN/inf"
        raise NonFiniteLossError(
            f"{what} at epoch {epoch + 1}, iteration {it_bad}/{self.iters_per_epoch} (global iteration "
            f"{g_bad}), the first non-finite loss between global iterations {self._checked_until + 1} and "
            f"{self.global_iter} (the loss is checked every train.log_interval={self.cfg.train.log_interval} "
            f"iterations and before each checkpoint); steps with a non-finite loss were skipped, not "
            f"applied; {self._stop_message_tail()}. Try a lower train.lr, train.grad_clip, or check the "
            f"boxes of that batch")

    def _check_skipped_steps(self, epoch: int) -> None:
        """Float32 runs: the GradScaler's scale (fixed at 1) halves for each step it skipped
        because of NaN/inf gradients. Under AMP such skips are routine loss-scale calibration."""
        if self.use_amp or not self.scaler.is_enabled():
            return
        scale = self.scaler.get_scale()
        if scale >= 1.0:
            return
        n = max(1, round(-math.log2(scale))) if scale > 0 else "some"
        raise NonFiniteLossError(
            f"{n} training step(s) between global iterations {self._checked_until + 1} and "
            f"{self.global_iter} (epoch {epoch + 1}) had NaN/inf gradients while the loss was finite; "
            f"they were skipped, not applied; {self._stop_message_tail()}. Try a lower train.lr or "
            f"train.grad_clip")

    def _read_interval(self, stats: IntervalStats, epoch: int, it: int,
                       reset: bool = True) -> dict[str, float]:
        """The host's one wait for the device in an interval: the means of the logged values
        (``reset``: and a fresh interval), after the checks that stop a non-finite run."""
        means, bad = stats.read(reset=reset)
        self._raise_if_non_finite(bad, epoch, it)
        self._check_skipped_steps(epoch)
        self._checked_until = self.global_iter
        return means

    def _log_interval(self, stats: IntervalStats, timer: StepTimer, epoch: int, it: int, lr: float,
                      bar) -> None:
        """A log step: read and check the interval, write its means (CSV, TensorBoard, a line
        or the progress bar); ``step_ms`` is the interval's mean step time."""
        n = stats.n
        means = self._read_interval(stats, epoch, it)
        step_s = timer.read()
        row = {"epoch": epoch + 1, "iter": it, "global_iter": self.global_iter, "lr": lr}
        row.update(means)
        row["step_ms"] = step_s * 1e3 / max(n, 1)
        self._write_log(row, bar is None)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2g}")

    def train(self) -> dict:
        self.setup()
        t = self.cfg.train
        self.log(f"training {t.epochs} epochs x {self.iters_per_epoch} iterations, batch "
                 f"{t.batch_size} ({self.world} process(es)), base lr {self.base_lr:g}, "
                 f"device {self.device}, amp {self.use_amp}; output {self.out}")
        t_start = time.perf_counter()
        images_seen = 0
        try:
            for epoch in range(self.start_epoch, t.epochs):
                skip = self.start_iter if epoch == self.start_epoch else 0
                images_seen += self.train_epoch(epoch, skip)
                if self._eval_due(epoch):
                    self.evaluate_epoch(epoch)
                self.save_last(epoch, self.iters_per_epoch)
                dist_utils.barrier()
            summary = self.finish(time.perf_counter() - t_start, images_seen)
        finally:
            if self.writer is not None:
                self.writer.close()
        return summary

    def train_epoch(self, epoch: int, skip: int) -> int:
        t = self.cfg.train
        model = unwrap(self.model)
        no_aug = epoch >= t.epochs - t.no_aug_epochs
        if no_aug:
            self.dataset.close_mosaic()
        note = model.set_epoch(epoch, t.epochs, no_aug)
        if self.ema is not None:  # the averaged copy evaluates with the same loss switches
            self.ema.module.set_epoch(epoch, t.epochs, no_aug)
        if no_aug and (epoch == t.epochs - t.no_aug_epochs or skip or epoch == self.start_epoch):
            self.log("no mosaic/mixup from now on")
        if note:
            self.log(f"epoch {epoch + 1}: {note}")
        self.sampler.set_epoch(epoch, skip * self.local_batch)
        self.ddp.train()
        total = self.iters_per_epoch
        bar = None
        if dist_utils.is_main() and _use_tqdm():
            from tqdm import tqdm
            bar = tqdm(total=total, initial=skip, desc=f"epoch {epoch + 1}/{t.epochs}", leave=False,
                       dynamic_ncols=True)
        # between two log steps nothing here waits for the device (see the module docstring)
        stats, timer = IntervalStats(self.device), StepTimer(self.device)
        self._checked_until = self.global_iter
        seen = 0
        it = skip
        lr = self.schedule(self.global_iter)
        t_data = time.perf_counter()
        for images, targets, _ in self.loader:
            if it >= total:
                break
            images = images.to(self.device, non_blocking=True)
            targets = {k: v.to(self.device, non_blocking=True) for k, v in targets.items()}
            if t.multiscale:
                images, targets = self._multiscale(images, targets)
            data_s = time.perf_counter() - t_data

            lr = self.schedule(self.global_iter)
            timer.start()
            self._train_step(model, images, targets, lr, stats, data_s)
            timer.stop()
            it += 1
            self.global_iter += 1
            seen += images.shape[0] * self.world
            if bar is not None:
                bar.update(1)
            ckpt_due = bool(t.checkpoint_interval) and self.global_iter % t.checkpoint_interval == 0 and it < total
            if it % t.log_interval == 0 or it == total:
                self._log_interval(stats, timer, epoch, it, lr, bar)
            elif ckpt_due:  # a checkpoint is written only after its steps were checked
                self._read_interval(stats, epoch, it, reset=False)
            if ckpt_due:
                self.save_last(epoch, it)
            t_data = time.perf_counter()
        if stats.n:  # the loader ended before iters_per_epoch: log and check the rest
            self._log_interval(stats, timer, epoch, it, lr, bar)
        if bar is not None:
            bar.close()
        return seen

    def _train_step(self, model: nn.Module, images: torch.Tensor, targets: dict, lr: float,
                    stats: IntervalStats, data_s: float) -> None:
        """One iteration, queued on the device with no host sync in the trainer: forward,
        assignment and loss, backward, optional clipping, step, EMA update, and the logged
        values into ``stats``. A step whose loss is not finite (on any process) is not
        applied: its loss is multiplied by NaN, so every gradient is NaN and the GradScaler
        (with a fused optimizer: on the device) skips the update."""
        t = self.cfg.train
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with torch.autocast(self.device.type, enabled=self.use_amp):
            raw = self.ddp(images)
            out = model.loss(raw, targets)
        keys = ("loss", *out.terms)
        values = [out.total, *out.terms.values()]
        n_loss = len(values)
        keys, values = keys + ("num_pos",), values + [out.num_pos]
        host = {"data_ms": data_s * 1e3}
        if isinstance(out.assign_seconds, torch.Tensor):
            keys, values = keys + ("assign_ms",), values + [out.assign_seconds * 1e3]
        else:  # the host clock around the assigner (on CUDA: the time to queue its work)
            host["assign_ms"] = out.assign_seconds * 1e3
        vec = torch.stack([v.detach().float().reshape(()) for v in values])
        bad = ~torch.isfinite(vec[:n_loss]).all()
        if self.distributed:
            # the heads normalise by their own positive count; rescale so every process
            # divides by the mean count (a batch with few objects would otherwise weigh as
            # much as a crowded one). One all-reduce also tells every process whether any
            # process's loss is not finite, so all skip that step alike.
            local = out.num_pos.detach().float().clamp(min=1.0)
            mean_pos, bad_share = dist_utils.all_reduce_mean(torch.stack([local, bad.float()])).unbind()
            bad = bad_share > 0
            factor = local / mean_pos.clamp(min=1.0)
        else:
            factor = torch.ones((), device=vec.device)
        if self.scaler.is_enabled():  # a NaN factor: NaN gradients, which the scaler skips
            factor = torch.where(bad, float("nan"), factor)
        loss = out.total * factor
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if t.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(model)
        stats.add(keys, vec, n_loss, bad, self.global_iter + 1, host)

    def _write_log(self, row: dict, print_line: bool) -> None:
        if not dist_utils.is_main():
            return
        if self.csv is not None:
            self.csv.write(row)
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("epoch", "iter", "global_iter"):
                    self.writer.add_scalar(f"train/{k}", v, row["global_iter"])
        if print_line:
            terms = " ".join(f"{k} {v:.3f}" for k, v in row.items()
                             if k not in ("epoch", "iter", "global_iter", "lr", "num_pos",
                                          "assign_ms", "data_ms", "step_ms"))
            self.log(f"epoch {row['epoch']}/{self.cfg.train.epochs} iter {row['iter']}/"
                     f"{self.iters_per_epoch} lr {row['lr']:.3g} {terms} pos {row['num_pos']:.0f} "
                     f"assign {row['assign_ms']:.0f}ms step {row['step_ms']:.0f}ms")

    # ------------------------------------------------------------------ evaluation
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else unwrap(self.model)

    def evaluate_epoch(self, epoch: int) -> None:
        if dist_utils.is_main():
            if self.val_index is not None and self.val_index.samples:
                metrics, _ = evaluate_on(self.eval_model(), self.val_index, self.cfg, self.device,
                                         batch_size=max(1, self.local_batch), progress=_use_tqdm())
                metrics = metrics_to_json(metrics)
                ap = metrics.get("AP")
                ap = -1.0 if ap is None else float(ap)
                self.log(f"epoch {epoch + 1}: val {headline(metrics)}")
                if self.writer is not None:
                    for k in ("AP", "AP50", "AP75", "VOC_mAP50"):
                        if metrics.get(k) is not None:
                            self.writer.add_scalar(f"val/{k}", metrics[k], epoch + 1)
            else:
                metrics, ap = None, 0.0  # no val split: the latest epoch is the best we know
            self.history.append({"epoch": epoch + 1, "AP": None if metrics is None else metrics.get("AP"),
                                 "AP50": None if metrics is None else metrics.get("AP50")})
            if ap >= self.best_ap:
                self.best_ap, self.best_epoch, self.best_metrics = ap, epoch + 1, metrics
                save_atomic(self._checkpoint(epoch + 1, 0), self.out / "best.pt")
        dist_utils.barrier()

    def finish(self, seconds: float, images_seen: int) -> dict:
        """Write ``metrics.json``: the evaluation of ``best.pt`` plus training facts."""
        summary = {
            "model": self.cfg.model.name, "size": self.cfg.model.size,
            "assigner": assigner_name(self.cfg), "classes": self.classes,
            "epochs": self.cfg.train.epochs, "iterations": self.global_iter,
            "best_epoch": self.best_epoch, "train_seconds": round(seconds, 2),
            "train_images_per_second": round(images_seen / seconds, 3) if seconds > 0 else None,
            "params": self.n_params, "gflops": self.gflops,
            "input_size": list(self.cfg.input_hw), "history": self.history,
        }
        if dist_utils.is_main():
            # best_metrics was computed on exactly the weights stored in best.pt
            metrics = dict(self.best_metrics or {})
            metrics["train"] = summary
            tmp = self.out / f".metrics.json.{os.getpid()}.tmp"  # pid: see remove_stale_tmp
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
            os.replace(tmp, self.out / "metrics.json")
            plot_losses(self.out / "log.csv", self.out / "loss.png", self.out / "metrics.json")
            self.log(f"done in {seconds:.0f}s; best epoch {self.best_epoch}: {headline(self.best_metrics)}; "
                     f"wrote {self.out / 'best.pt'}, {self.out / 'last.pt'}, {self.out / 'metrics.json'}")
            return metrics
        return {"train": summary}


def train(cfg: Config | str | Path, overrides: Optional[list[str]] = None, resume: bool = False,
          weights: Optional[str] = None, log: Callable[[str], None] = print,
          force: bool = False) -> dict:
    """Train from a :class:`Config` or a YAML path (+ overrides); returns what
    ``metrics.json`` holds (the best checkpoint's metrics plus a ``train`` summary).

    ``resume`` continues ``OUTPUT_DIR/last.pt``; ``force`` starts afresh in an ``output_dir``
    that already holds a run, deleting its results (without either, that is an error)."""
    if not isinstance(cfg, Config):
        cfg = load_config(cfg, overrides or [])
    elif overrides:
        cfg = config_from_dict(config_to_dict(cfg), overrides)
    try:
        return Trainer(cfg, resume=resume, weights=weights, log=log, force=force).train()
    finally:
        dist_utils.cleanup()
