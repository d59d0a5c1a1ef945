"""Exponential moving average of the model weights, with YOLOX's ramp.

decay(n) = decay * (1 - exp(-n / ramp)) for the n-th update: early on the average follows
the (fast-changing) weights closely, and only later becomes a long average. Without the
ramp the first evaluations would score an average dominated by the random init.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") else model


class ModelEMA:
    """Keeps ``self.module``, an averaged copy of ``model`` in eval mode and without grads."""

    def __init__(self, model: nn.Module, decay: float = 0.9998, ramp: float = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.base_decay = decay
        self.ramp = ramp
        self.updates = updates

    def decay(self, updates: int | None = None) -> float:
        n = self.updates if updates is None else updates
        return self.base_decay * (1.0 - math.exp(-n / self.ramp))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = d * ema + (1 - d) * model`` for floating tensors (the same arithmetic as a
        per-tensor ``mul_(d).add_(w, alpha=1 - d)``, in a few multi-tensor kernels: a
        per-tensor loop launches two small kernels per tensor, hundreds per step on CUDA);
        counters such as BatchNorm's ``num_batches_tracked`` are copied. No host sync."""
        self.updates += 1
        d = self.decay()
        msd = unwrap(model).state_dict()
        avg_dst, avg_src, copy_dst, copy_src = [], [], [], []
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                avg_dst.append(v)
                avg_src.append(msd[k].detach())
            else:
                copy_dst.append(v)
                copy_src.append(msd[k])
        if avg_dst:
            torch._foreach_mul_(avg_dst, d)
            torch._foreach_add_(avg_dst, avg_src, alpha=1.0 - d)
        if copy_dst:
            torch._foreach_copy_(copy_dst, copy_src)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
