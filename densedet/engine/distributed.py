"""torch.distributed glue for runs started by ``torchrun`` (no home-made launcher).

``torchrun --nproc_per_node 2 -m densedet train CONFIG`` sets RANK/WORLD_SIZE/LOCAL_RANK;
:func:`setup` joins the group (nccl on CUDA, gloo on CPU). A plain ``densedet train`` is a
world of one and every helper here is then a no-op.

DistributedDataParallel's ``find_unused_parameters``: with it, every backward pass walks the
autograd graph once more to find parameters that took no part in the loss (and torch warns
at each run when there were none); without it, a parameter that does get no gradient makes
DDP wait for it and fail at the next step. :func:`unused_parameters` finds out which case a
model is in from a training step on a copy of it, so the trainer sets the flag only for a
model that needs it (none of the presets does: see the trainer).
"""
from __future__ import annotations

import copy
import os
from datetime import timedelta
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """Only rank 0 writes files, logs and progress bars."""
    return rank() == 0


def setup(device: torch.device) -> bool:
    """Join the process group if launched by torchrun; returns whether distributed."""
    if is_dist():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return True


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over processes (a copy; ``t`` is untouched)."""
    if not is_dist():
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world_size()


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (e.g. the multi-scale size, so batches agree)."""
    if not is_dist():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier() -> None:
    if is_dist():
        dist.barrier()


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any process (one collective; for decisions taken once at
    setup that every process must take alike). ``flag`` itself in a world of one."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def unused_parameters(model: nn.Module,
                      steps: Iterable[Callable[[nn.Module], torch.Tensor]]) -> list[str]:
    """Names of the trainable parameters of ``model`` that get no gradient in at least one
    of ``steps``: each is called with a fresh copy of ``model`` and returns a loss, whose
    ``backward()`` is run here. ``model`` itself is left untouched (a copy runs the steps:
    BatchNorm statistics, head switches and gradients of the real model stay as they were).
    A parameter that takes part in the graph with a zero gradient counts as used, as DDP
    counts it."""
    unused: dict[str, None] = {}
    for step in steps:
        probe = copy.deepcopy(model)
        for p in probe.parameters():
            p.grad = None
        step(probe).backward()
        for name, p in probe.named_parameters():
            if p.requires_grad and p.grad is None:
                unused[name] = None
        del probe
    return list(unused)
