"""GhostPAN, NanoDet-Plus's neck: a PAN (top-down then bottom-up) whose fusion blocks are
GhostNet bottlenecks, plus extra coarser levels.

Ghost module: a 1x1 conv makes half the output channels, a cheap depthwise 3x3 conv on
those makes the other half ("ghost" features), so a layer costs about half a 1x1 conv.

``[B, c_i, H/s_i, W/s_i]`` for the backbone levels -> ``out_channels`` maps at the same
strides, then ``num_extra_levels`` maps at twice the previous stride each.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.models.common import ConvNormAct, DepthwiseSeparableConv

__all__ = ["GhostBlocks", "GhostBottleneck", "GhostModule", "GhostPAN"]


class GhostModule(nn.Module):
    """``[B, Cin, H, W] -> [B, Cout, H, W]``: 1x1 conv to ``ceil(Cout / 2)`` channels, a
    depthwise ``dw_size`` conv on them for the rest, concatenated."""

    def __init__(self, in_channels: int, out_channels: int, dw_size: int = 3, act: str | None = "leaky_relu"):
        super().__init__()
        self.out_channels = out_channels
        init = math.ceil(out_channels / 2)
        self.primary = ConvNormAct(in_channels, init, 1, act=act)
        self.cheap = ConvNormAct(init, init, dw_size, groups=init, act=act)

    def forward(self, x: Tensor) -> Tensor:
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], dim=1)[:, : self.out_channels]


class GhostBottleneck(nn.Module):
    """Ghost module (with activation) -> ghost module (linear), plus a shortcut: identity when
    the shapes match, else a depthwise ``k x k`` conv and a 1x1 projection (stride 1 only;
    the PAN needs no strided one)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, kernel_size: int = 3,
                 act: str = "leaky_relu"):
        super().__init__()
        self.ghost1 = GhostModule(in_channels, mid_channels, act=act)
        self.ghost2 = GhostModule(mid_channels, out_channels, act=None)
        if in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                ConvNormAct(in_channels, in_channels, kernel_size, groups=in_channels, act=None),
                ConvNormAct(in_channels, out_channels, 1, act=None),
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.ghost2(self.ghost1(x)) + self.shortcut(x)


class GhostBlocks(nn.Module):
    """``num_blocks`` ghost bottlenecks (hidden width ``expand * out_channels``), optionally
    with a 1x1-projected residual."""

    def __init__(self, in_channels: int, out_channels: int, expand: float = 1.0, kernel_size: int = 5,
                 num_blocks: int = 1, use_res: bool = False, act: str = "leaky_relu"):
        super().__init__()
        mid = int(out_channels * expand)
        self.blocks = nn.Sequential(*[
            GhostBottleneck(in_channels if i == 0 else out_channels, mid, out_channels, kernel_size, act)
            for i in range(num_blocks)])
        self.reduce = ConvNormAct(in_channels, out_channels, 1, act=act) if use_res else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.blocks(x)
        return y + self.reduce(x) if self.reduce is not None else y


class GhostPAN(nn.Module):
    """NanoDet-Plus's neck.

    Args:
        in_channels: backbone channels per level (finest first).
        out_channels: channels of every output level.
        kernel_size: kernel of the depthwise convs (5 in NanoDet-Plus).
        num_extra_levels: coarser levels appended, each ``down(last input) + down(last output)``.
        expand, num_blocks, use_res: :class:`GhostBlocks` options.
    """

    def __init__(self, in_channels: list[int], out_channels: int, kernel_size: int = 5,
                 num_extra_levels: int = 1, expand: float = 1.0, num_blocks: int = 1,
                 use_res: bool = False, act: str = "leaky_relu"):
        super().__init__()
        n = len(in_channels)
        c = out_channels

        def down() -> nn.Module:
            return DepthwiseSeparableConv(c, c, kernel_size, stride=2, act=act)

        def blocks() -> nn.Module:
            return GhostBlocks(2 * c, c, expand, kernel_size, num_blocks, use_res, act)

        self.reduce = nn.ModuleList([ConvNormAct(ci, c, 1, act=act) for ci in in_channels])
        self.top_down = nn.ModuleList([blocks() for _ in range(n - 1)])
        self.downsamples = nn.ModuleList([down() for _ in range(n - 1)])
        self.bottom_up = nn.ModuleList([blocks() for _ in range(n - 1)])
        self.extra_in = nn.ModuleList([down() for _ in range(num_extra_levels)])
        self.extra_out = nn.ModuleList([down() for _ in range(num_extra_levels)])
        self.out_channels = [c] * (n + num_extra_levels)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        x = [r(f) for r, f in zip(self.reduce, feats)]
        # top-down: inner[i] fuses level i with the (upsampled) coarser inner[i + 1]
        inner = [x[-1]]
        for i in range(len(x) - 2, -1, -1):
            up = F.interpolate(inner[0], size=x[i].shape[-2:], mode="bilinear", align_corners=False)
            inner.insert(0, self.top_down[len(x) - 2 - i](torch.cat([up, x[i]], dim=1)))
        # bottom-up: out[i] fuses inner[i] with the downsampled finer out[i - 1]
        outs = [inner[0]]
        for i in range(1, len(x)):
            outs.append(self.bottom_up[i - 1](torch.cat([self.downsamples[i - 1](outs[-1]), inner[i]], dim=1)))
        # extra levels: from both the last reduced input and the last output
        last_in = x[-1]
        for conv_in, conv_out in zip(self.extra_in, self.extra_out):
            last_in = conv_in(last_in)
            outs.append(last_in + conv_out(outs[-1]))
        return outs
