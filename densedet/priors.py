"""Grid priors: one point per feature-map cell, over all pyramid levels."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def feature_sizes(input_hw: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """Feature-map ``(h, w)`` per level for an input of ``input_hw`` (ceil division)."""
    h, w = input_hw
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


def make_priors(sizes: Sequence[tuple[int, int]], strides: Sequence[int], offset: float = 0.5,
                device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """Priors for every level, levels in ascending stride, row-major inside a level.

    A prior's centre is ``(i + offset) * stride``: YOLOX and NanoDet use ``offset=0.5``;
    mmdet's FCOS uses ``stride // 2`` (pass ``offset=0.5`` for even strides, the same thing
    except for odd strides, or ``offset=0`` for the corner convention).

    Args:
        sizes: ``(h, w)`` of each level's feature map.
        strides: stride of each level.
    Returns:
        ``[A, 4]`` (cx, cy, stride_w, stride_h), ``A = sum(h * w)``.
    """
    if len(sizes) != len(strides):
        raise ValueError(f"{len(sizes)} feature sizes but {len(strides)} strides")
    out = []
    for (h, w), s in zip(sizes, strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + offset) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + offset) * s
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        stride = torch.full_like(cx, float(s))
        out.append(torch.stack([cx, cy, stride, stride], dim=-1).reshape(-1, 4))
    return torch.cat(out, dim=0)


def level_ids(sizes: Sequence[tuple[int, int]], device: torch.device | str | None = None) -> Tensor:
    """``[A]`` int64 pyramid level (0 = finest) of every prior."""
    counts = torch.tensor([h * w for h, w in sizes], device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)


def priors_for_input(input_hw: tuple[int, int], strides: Sequence[int], offset: float = 0.5,
                     device: torch.device | str | None = None) -> tuple[Tensor, list[tuple[int, int]]]:
    """Priors ``[A, 4]`` and per-level sizes for a network input of ``input_hw``."""
    sizes = feature_sizes(input_hw, strides)
    return make_priors(sizes, strides, offset, device=device), sizes
