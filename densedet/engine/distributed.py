"""torch.distributed glue for runs started by ``torchrun`` (no home-made launcher).

``torchrun --nproc_per_node 2 -m densedet train CONFIG`` sets RANK/WORLD_SIZE/LOCAL_RANK;
:func:`setup` joins the group (nccl on CUDA, gloo on CPU). A plain ``densedet train`` is a
world of one and every helper here is then a no-op.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


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
