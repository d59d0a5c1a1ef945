"""Batching: padded collate, a seeded sampler, the DataLoader factory, batch resizing.

Determinism: :class:`SeededSampler` yields ``(index, sample_seed)`` pairs; the seeds come
from ``(seed, epoch, rank)`` only, and :class:`~densedet.data.dataset.DetectionDataset`
draws a sample's whole augmentation from its seed. So the same seed gives the same batches
whatever ``num_workers`` is (0, 2, ...), and resuming at epoch ``e`` after
``loader.sampler.set_epoch(e)`` replays that epoch. Workers are also seeded
(:func:`seed_worker`) for any other randomness they meet.

Epochs: the sampler advances its epoch by itself after every pass; callers that resume or
run distributed call ``loader.sampler.set_epoch(epoch)`` before each epoch (it is forwarded
to the ``DistributedSampler``, which needs it to reshuffle).
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

__all__ = ["SeededSampler", "build_loader", "collate", "resize_batch", "seed_worker"]


def collate(batch: list) -> tuple[torch.Tensor, dict, list]:
    """``[(image [3,H,W], target, meta)] * B`` -> ``(images [B,3,H,W], targets, metas)``.

    ``targets``: ``gt_boxes [B, G, 4]`` float32 xyxy, ``gt_labels [B, G]`` int64,
    ``gt_valid [B, G]`` bool, with ``G = max(1, most objects in an image)``: a batch without
    any object still has one all-invalid row, so no tensor is 0-sized. Padding rows hold
    zero boxes and label 0 (a valid class index, so careless gathers cannot crash) and are
    marked False in ``gt_valid``.

    Images of different sizes (``preprocess.resize=shorter_side``) are padded at the
    bottom-right to the largest, with their meta's ``fill`` (RGB in [0, 1]; 0 without one),
    as torchvision batches them.
    """
    shapes = {tuple(item[0].shape) for item in batch}
    if len(shapes) > 1:
        H = max(item[0].shape[-2] for item in batch)
        W = max(item[0].shape[-1] for item in batch)
        padded = []
        for image, _, meta in batch:
            fill = torch.tensor(meta.get("fill", (0.0, 0.0, 0.0)), dtype=image.dtype).view(3, 1, 1)
            out = fill.expand(3, H, W).clone()
            out[:, : image.shape[-2], : image.shape[-1]] = image
            padded.append(out)
        images = torch.stack(padded)
    else:
        images = torch.stack([item[0] for item in batch])
    counts = [len(item[1]["labels"]) for item in batch]
    B, G = len(batch), max([1] + counts)
    gt_boxes = torch.zeros(B, G, 4, dtype=torch.float32)
    gt_labels = torch.zeros(B, G, dtype=torch.int64)
    gt_valid = torch.zeros(B, G, dtype=torch.bool)
    for b, ((_, target, _), n) in enumerate(zip(batch, counts)):
        gt_boxes[b, :n] = target["boxes"]
        gt_labels[b, :n] = target["labels"]
        gt_valid[b, :n] = True
    targets = dict(gt_boxes=gt_boxes, gt_labels=gt_labels, gt_valid=gt_valid)
    return images, targets, [item[2] for item in batch]


class SeededSampler(Sampler):
    """Yields ``(index, sample_seed)`` for every index of an epoch.

    Args:
        size: dataset length.
        shuffle: random order (a permutation drawn from ``(seed, epoch)``).
        seed: non-negative base seed.
        base: a sampler to take the order from instead (``DistributedSampler``); its
            ``set_epoch`` is called and its ``rank`` enters the sample seeds.

    The order and the per-sample augmentation seeds of an epoch depend only on (seed, epoch,
    rank), so a mid-epoch resume replays exactly the batches not trained yet:
    ``set_epoch(epoch, skip)`` leaves out the first ``skip`` items of that epoch.
    """

    def __init__(self, size: int, shuffle: bool, seed: int, base: Sampler | None = None):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.size, self.shuffle, self.seed, self.base = size, shuffle, int(seed), base
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = int(epoch), int(skip)

    def _order(self, epoch: int) -> list[int]:
        if self.base is not None:
            if hasattr(self.base, "set_epoch"):
                self.base.set_epoch(epoch)
            return list(self.base)
        if not self.shuffle:
            return list(range(self.size))
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(2)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1  # callers that never call set_epoch still get a new epoch each pass
        order = self._order(epoch)
        rank = int(getattr(self.base, "rank", 0))
        seeds = np.random.default_rng([self.seed, epoch, rank]).integers(
            0, 2**63 - 1, size=len(order), dtype=np.int64)
        skip, self.skip = self.skip, 0  # a skip applies to the epoch it was set for
        return iter(list(zip(order, seeds.tolist()))[skip:])

    def __len__(self) -> int:
        full = len(self.base) if self.base is not None else self.size
        return max(0, full - self.skip)


def seed_worker(worker_id: int):
    """``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed (which
    PyTorch derives from the loader's generator and the worker id).

    It must not call ``cv2.setNumThreads``: in a forked child that reconfigures the thread
    pool inherited from the parent, whose threads do not exist there, and now and then hangs
    forever (seen here once in 80 two-worker start-ups). ``DetectionDataset`` sets OpenCV
    to one thread in the parent instead, before any worker exists."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                 drop_last: bool = False, world: int | None = None, rank: int = 0,
                 persistent_workers: bool | None = None, pin_memory: bool | None = None,
                 prefetch_factor: int | None = None,
                 multiprocessing_context: str | None = None) -> DataLoader:
    """A DataLoader over a :class:`DetectionDataset` with :func:`collate`.

    Args:
        shuffle: random order per epoch (from ``seed`` and the epoch).
        num_workers: worker processes (0: load in the calling process).
        seed: base seed; same seed -> same batches, independent of ``num_workers``.
        drop_last: drop the last incomplete batch.
        world, rank: shard over ``world`` processes with ``DistributedSampler`` (the trainer
            always shards, ``world=1`` included, so one process and several see the same
            order scheme). Call ``loader.sampler.set_epoch(epoch[, skip])`` every epoch.
        persistent_workers: keep workers between epochs (default: when ``num_workers > 0``);
            ``dataset.close_mosaic()`` still reaches them (shared flags).
        pin_memory: default only when CUDA is available.
        multiprocessing_context: e.g. ``"spawn"``; default PyTorch's (fork on Linux).
    """
    base = None
    if world is not None:  # the loader's drop_last drops the incomplete last batch
        base = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                  drop_last=False)
    sampler = SeededSampler(len(dataset), shuffle, seed, base)
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {}
    if num_workers > 0:
        extra = dict(worker_init_fn=seed_worker, persistent_workers=persistent_workers,
                     prefetch_factor=prefetch_factor or 2,
                     multiprocessing_context=multiprocessing_context)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed), **extra)


def resize_batch(images: torch.Tensor, targets: dict, new_size: int | tuple[int, int]
                 ) -> tuple[torch.Tensor, dict]:
    """Multi-scale training: resize a whole batch (bilinear) and scale its boxes.

    Args:
        images: ``[B, 3, H, W]``.
        targets: collated targets (``gt_boxes [B, G, 4]`` xyxy is scaled, the rest kept).
        new_size: int (square) or ``(height, width)``.
    Returns:
        ``[B, 3, h, w]`` images and a new targets dict.
    """
    if isinstance(new_size, int):
        new_size = (new_size, new_size)
    H, W = images.shape[-2:]
    if (H, W) == tuple(new_size):
        return images, targets
    resized = F.interpolate(images, size=tuple(new_size), mode="bilinear", align_corners=False)
    factor = torch.tensor([new_size[1] / W, new_size[0] / H] * 2, dtype=targets["gt_boxes"].dtype,
                          device=targets["gt_boxes"].device)
    return resized, {**targets, "gt_boxes": targets["gt_boxes"] * factor}
