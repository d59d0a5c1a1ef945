"""The training loop: YOLOX's recipe around any densedet detector.

One run, top to bottom (:class:`Trainer`):

1. validate everything that can fail fast: an ``output_dir`` already holding a run (refused
   unless ``--resume`` or ``--force``), model/assigner names and compatibility, the dataset
   root, class list, every annotation and image of the train and val splits
   (``check_dataset``; ``data.val_split=null`` is the explicit way to train without
   validation); leftovers of saves killed mid-write are removed;
2. build model, optimizer (SGD with nesterov, no weight decay on norm weights and biases;
   or AdamW), EMA, GradScaler (AMP only on CUDA), the warmup-cosine schedule;
3. resume from ``OUTPUT_DIR/last.pt`` or start from ``train.init_weights`` / ``--weights``
   (tensors of another shape, e.g. another class count, are skipped and listed; a file
   whose backbone/neck mostly does not fit is refused unless ``train.init_weights_partial``);
4. per epoch: in the last ``no_aug_epochs`` mosaic/mixup are closed; ``model.set_epoch``
   tells the head (its ``on_epoch``: YOLOX's L1 term, NanoDet-Plus's guidance detach); per iteration: lr from the schedule, forward + loss
   (the assigner runs in float32 inside), NaN/inf check naming the term, backward, optional
   gradient clipping, step, EMA update, logs, and ``last.pt`` every ``checkpoint_interval``
   iterations so a killed run resumes close to where it stopped;
5. evaluation of the EMA model every ``eval_interval`` epochs (every epoch in the
   no-augmentation tail, and at the end); ``best.pt`` by COCO AP; ``metrics.json``.

Multi-process runs come from ``torchrun``: DistributedSampler, DDP, the loss normaliser
averaged over processes, only rank 0 writes.
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
from densedet.engine.checkpoint import (inference_state_dict, load_checkpoint, load_matching,
                                        remove_stale_tmp, rng_state, save_atomic, set_rng_state)
from densedet.engine.ema import ModelEMA, unwrap
from densedet.engine.inference import evaluate_on, headline
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


def build_optimizer(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=t.momentum, nesterov=t.nesterov)
    return torch.optim.AdamW(groups, lr=lr, betas=(t.momentum, 0.999))


def _use_tqdm() -> bool:
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true", "yes")


class Trainer:
    """Train ``cfg``; see the module docstring. ``log`` receives human-readable lines."""

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

        # --- model
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
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_amp)
        self.ema = ModelEMA(self.model, t.ema_decay) if t.ema else None

        self.start_epoch, self.start_iter, self.global_iter = 0, 0, 0
        self.best_ap, self.best_epoch, self.best_metrics = -1.0, -1, None
        self.history: list[dict] = []
        if self.resume:
            self._load_resume()
        elif self.weights:
            self.log(f"initial weights: {self.weights}")
            ckpt = load_checkpoint(self.weights)
            # the EMA weights when the file has them: what was evaluated (YOLOX's too)
            load_matching(self.model, inference_state_dict(ckpt), log=self.log, source=self.weights,
                          allow_partial=t.init_weights_partial)
            if self.ema is not None:
                self.ema = ModelEMA(self.model, t.ema_decay)

        if self.distributed:
            ids = [device.index] if device.type == "cuda" else None
            # find_unused_parameters: some heads leave parameters out of the loss for whole
            # epochs (NanoDet-Plus's auxiliary guidance head once it is detached); without
            # the flag DDP would wait forever for their gradients.
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                           find_unused_parameters=True)
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
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
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
        lo, hi = self.cfg.train.multiscale
        if self.global_iter % self.cfg.train.multiscale_interval == 0 or not hasattr(self, "_ms_size"):
            # a random multiple of 32 for the whole batch, the same on every rank
            choices = list(range(int(math.ceil(lo / 32)) * 32, hi + 1, 32)) or [self.cfg.input_hw[0]]
            size = random.choice(choices) if dist_utils.is_main() else 0
            self._ms_size = dist_utils.broadcast_int(size, self.device)
        h, w = self.cfg.input_hw
        # keep the configured aspect ratio; sides stay multiples of 32 (the largest stride)
        new_h = max(32, int(round(h * self._ms_size / max(h, w) / 32)) * 32)
        new_w = max(32, int(round(w * self._ms_size / max(h, w) / 32)) * 32)
        return resize_batch(images, targets, (new_h, new_w))

    def _check_finite(self, out, epoch: int, it: int) -> None:
        bad = ~torch.isfinite(out.total.detach())
        if self.distributed:  # every rank must stop together, or the others hang
            bad = dist_utils.all_reduce_mean(bad.float()) > 0
        if not bool(bad):
            return
        culprit = next((k for k, v in out.terms.items() if not torch.isfinite(v.detach()).all()), None)
        value = float(out.terms[culprit].detach()) if culprit else float(out.total.detach())
        what = f"loss term {culprit!r}" if culprit else "the total loss (on another process)"
        last = self.out / "last.pt"
        keep = f"; the last good checkpoint is {last}" if last.is_file() else ""
        raise NonFiniteLossError(
            f"{what} is {value} at epoch {epoch + 1}, iteration {it + 1}/{self.iters_per_epoch} "
            f"(global iteration {self.global_iter + 1}); stopping{keep}. Try a lower train.lr, train.grad_clip, or "
            f"check the boxes of that batch")

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
        acc: dict[str, float] = {}
        n_acc = 0
        seen = 0
        it = skip
        t_data = time.perf_counter()
        for images, targets, _ in self.loader:
            if it >= total:
                break
            images = images.to(self.device, non_blocking=True)
            targets = {k: v.to(self.device, non_blocking=True) for k, v in targets.items()}
            if t.multiscale:
                images, targets = self._multiscale(images, targets)
            data_s = time.perf_counter() - t_data

            t_step = time.perf_counter()
            lr = self.schedule(self.global_iter)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            with torch.autocast(self.device.type, enabled=self.use_amp):
                raw = self.ddp(images)
                out = model.loss(raw, targets)
            self._check_finite(out, epoch, it)
            loss = out.total
            if self.distributed:
                # the heads normalise by their own positive count; rescale so every process
                # divides by the mean count (a batch with few objects would otherwise weigh
                # as much as a crowded one)
                local = out.num_pos.detach().float().clamp(min=1.0)
                mean = dist_utils.all_reduce_mean(local).clamp(min=1.0)
                loss = loss * (local / mean)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if t.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(model)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            step_s = time.perf_counter() - t_step

            it += 1
            self.global_iter += 1
            seen += images.shape[0] * self.world
            # accumulate the logged values over log_interval steps
            vals = {"loss": float(out.total.detach())}
            vals.update({k: float(v.detach()) for k, v in out.terms.items()})
            vals.update(num_pos=float(out.num_pos), assign_ms=out.assign_seconds * 1e3,
                        data_ms=data_s * 1e3, step_ms=step_s * 1e3)
            for k, v in vals.items():
                acc[k] = acc.get(k, 0.0) + v
            n_acc += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{vals['loss']:.3f}", lr=f"{lr:.2g}")
            if it % t.log_interval == 0 or it == total:
                row = {"epoch": epoch + 1, "iter": it, "global_iter": self.global_iter, "lr": lr}
                row.update({k: v / n_acc for k, v in acc.items()})
                self._write_log(row, bar is None)
                acc, n_acc = {}, 0
            if t.checkpoint_interval and self.global_iter % t.checkpoint_interval == 0 and it < total:
                self.save_last(epoch, it)
            t_data = time.perf_counter()
        if bar is not None:
            bar.close()
        return seen

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
