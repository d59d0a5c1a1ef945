"""YOLOX's learning-rate schedule ("yoloxwarmcos"), as a pure function of the iteration.

    lr(it) = start + (base - start) * (it / warmup_iters)^2                  it < warmup_iters
           = min + (base - min) / 2 * (1 + cos(pi * (it - W) / (T - W - N)))  until T - N
           = min                                                             the last N iters

with ``start = base * warmup_lr_ratio``, ``min = base * min_lr_ratio``, T total iterations,
W warmup iterations, N the no-augmentation tail. Being a function of the global
iteration (not a stateful object) makes resuming exact: the position is the iteration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmCosSchedule:
    """Quadratic warmup, cosine decay to ``base_lr * min_lr_ratio``, flat tail."""

    base_lr: float
    total_iters: int
    warmup_iters: int = 0
    no_aug_iters: int = 0
    warmup_lr_ratio: float = 0.0
    min_lr_ratio: float = 0.05

    @classmethod
    def from_epochs(cls, base_lr: float, iters_per_epoch: int, epochs: int, warmup_epochs: float,
                    no_aug_epochs: int, warmup_lr_ratio: float = 0.0,
                    min_lr_ratio: float = 0.05) -> "WarmCosSchedule":
        return cls(base_lr=base_lr, total_iters=iters_per_epoch * epochs,
                   warmup_iters=int(round(iters_per_epoch * warmup_epochs)),
                   no_aug_iters=iters_per_epoch * no_aug_epochs,
                   warmup_lr_ratio=warmup_lr_ratio, min_lr_ratio=min_lr_ratio)

    @property
    def min_lr(self) -> float:
        return self.base_lr * self.min_lr_ratio

    def __call__(self, it: int) -> float:
        """Learning rate for global iteration ``it`` (0-based)."""
        base, low = self.base_lr, self.min_lr
        if self.warmup_iters > 0 and it < self.warmup_iters:
            start = base * self.warmup_lr_ratio
            return start + (base - start) * (it / self.warmup_iters) ** 2
        cos_iters = self.total_iters - self.warmup_iters - self.no_aug_iters
        if cos_iters <= 0 or it >= self.total_iters - self.no_aug_iters:
            return low
        t = (it - self.warmup_iters) / cos_iters
        return low + 0.5 * (base - low) * (1.0 + math.cos(math.pi * t))
