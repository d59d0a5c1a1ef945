"""Small building blocks shared by the detector families.

Convolutions here are always followed by a normalisation and an activation unless told
otherwise; the conv has no bias when a normalisation follows (the norm's shift replaces it).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ConvNormAct", "DepthwiseSeparableConv", "Scale", "flatten_levels", "make_act",
           "prior_bias", "set_bn"]


def make_act(name: Optional[str]) -> nn.Module:
    """Activation by name: ``"silu"``, ``"relu"``, ``"leaky_relu"`` (slope 0.1, NanoDet's),
    ``"hardswish"`` or None (identity)."""
    if name is None or name == "none":
        return nn.Identity()
    if name == "silu":
        return nn.SiLU(inplace=True)
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1, inplace=True)
    if name == "hardswish":
        return nn.Hardswish(inplace=True)
    raise ValueError(f"unknown activation {name!r}")


def _make_norm(norm: Optional[str], channels: int) -> nn.Module:
    if norm is None:
        return nn.Identity()
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        # 32 groups (GroupNorm paper) when the channels allow, else as many as divide them.
        groups = math.gcd(32, channels)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {norm!r}")


class ConvNormAct(nn.Sequential):
    """``k x k`` conv -> norm -> activation, 'same' padding. ``[B, Cin, H, W] -> [B, Cout, H/s, W/s]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, act: Optional[str] = "silu", norm: Optional[str] = "bn",
                 bias: Optional[bool] = None):
        # bias None: only without a norm. True before GroupNorm is not redundant (a per-channel
        # shift changes the group statistics): torchvision's and mmdet's FCOS towers have one.
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                         groups=groups, bias=norm is None if bias is None else bias)
        super().__init__(conv, _make_norm(norm, out_channels), make_act(act))
        self.in_channels, self.out_channels = in_channels, out_channels


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise ``k x k`` conv -> norm -> act, then pointwise 1x1 conv -> norm -> act.

    The cheap replacement of a dense ``k x k`` conv used by YOLOX-Nano and NanoDet:
    ``k²·Cin + Cin·Cout`` weights instead of ``k²·Cin·Cout``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 act: Optional[str] = "silu", norm: Optional[str] = "bn"):
        super().__init__(
            ConvNormAct(in_channels, in_channels, kernel_size, stride, groups=in_channels, act=act, norm=norm),
            ConvNormAct(in_channels, out_channels, 1, act=act, norm=norm),
        )
        self.in_channels, self.out_channels = in_channels, out_channels


class Scale(nn.Module):
    """A learnable scalar multiplier (per-level regression scale of shared heads)."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def prior_bias(prob: float = 0.01) -> float:
    """Classifier bias so that ``sigmoid(bias) = prob`` at init (RetinaNet's prior): with
    thousands of background priors per object, a 0.5 start would flood the loss."""
    return -math.log((1 - prob) / prob)


def flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """Per-level maps ``[B, K, H_l, W_l]`` -> ``[B, A, K]``, levels in order, row-major inside
    a level (the order of :func:`densedet.priors.make_priors`)."""
    return torch.cat([m.flatten(2) for m in maps], dim=2).transpose(1, 2)


def set_bn(module: nn.Module, eps: float, momentum: float) -> None:
    """Set every BatchNorm's ``eps`` and ``momentum`` (YOLOX trains with 1e-3 / 0.03)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps, m.momentum = eps, momentum
