"""CSPDarknet, YOLOX's backbone (the YOLOv5 design: Focus stem, CSP stages, SPP bottleneck).

Channel widths are ``64 * width`` times 1, 2, 4, 8, 16 for the stem and the four stages; each
CSP layer holds ``max(round(3 * depth), 1)`` bottlenecks (three times that in stages 3 and 4).
Outputs are the last three stages, strides 8, 16, 32.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from densedet.models.common import ConvNormAct, DepthwiseSeparableConv

__all__ = ["Bottleneck", "CSPDarknet", "CSPLayer", "Focus", "SPPBottleneck"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, depthwise: bool = False,
            act: str = "silu") -> nn.Module:
    """The 3x3 conv of the family: dense, or depthwise separable for the Nano size."""
    if depthwise:
        return DepthwiseSeparableConv(in_channels, out_channels, 3, stride, act=act)
    return ConvNormAct(in_channels, out_channels, 3, stride, act=act)


class Focus(nn.Module):
    """Space-to-depth then conv: ``[B, C, H, W] -> [B, out, H/2, W/2]``.

    Each 2x2 pixel block becomes 4 channels, so the first downsampling loses no pixel
    (a stride-2 conv on 3 channels would skip three quarters of them).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, act: str = "silu"):
        super().__init__()
        self.conv = ConvNormAct(in_channels * 4, out_channels, kernel_size, act=act)

    def forward(self, x: Tensor) -> Tensor:
        # order: top-left, bottom-left, top-right, bottom-right (YOLOv5's)
        x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        return self.conv(x)


class Bottleneck(nn.Module):
    """1x1 conv (to ``expansion * out``) -> 3x3 conv, with a residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, shortcut: bool = True,
                 expansion: float = 0.5, depthwise: bool = False, act: str = "silu"):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormAct(in_channels, hidden, 1, act=act)
        self.conv2 = conv3x3(hidden, out_channels, 1, depthwise, act)
        self.use_add = shortcut and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.use_add else y


class CSPLayer(nn.Module):
    """Cross-stage partial layer: half the channels go through ``n`` bottlenecks, the other
    half skip them; a 1x1 conv fuses both. Cheaper than running all channels through the
    bottlenecks and keeps a short gradient path."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 1, shortcut: bool = True,
                 expansion: float = 0.5, depthwise: bool = False, act: str = "silu"):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormAct(in_channels, hidden, 1, act=act)
        self.conv2 = ConvNormAct(in_channels, hidden, 1, act=act)
        self.conv3 = ConvNormAct(2 * hidden, out_channels, 1, act=act)
        self.m = nn.Sequential(*[Bottleneck(hidden, hidden, shortcut, 1.0, depthwise, act) for _ in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(torch.cat([self.m(self.conv1(x)), self.conv2(x)], dim=1))


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling: max-pools of several sizes (stride 1) concatenated, which
    widens the receptive field of the last stage at almost no cost."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes=(5, 9, 13), act: str = "silu"):
        super().__init__()
        hidden = in_channels // 2
        self.conv1 = ConvNormAct(in_channels, hidden, 1, act=act)
        self.pools = nn.ModuleList([nn.MaxPool2d(k, 1, k // 2) for k in kernel_sizes])
        self.conv2 = ConvNormAct(hidden * (len(kernel_sizes) + 1), out_channels, 1, act=act)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [p(x) for p in self.pools], dim=1))


class CSPDarknet(nn.Module):
    """``[B, 3, H, W] -> [dark3 [B, 4c, H/8, W/8], dark4 [B, 8c, H/16, W/16], dark5 [B, 16c, H/32, W/32]]``
    with ``c = int(64 * width)``."""

    def __init__(self, depth: float = 0.33, width: float = 0.5, depthwise: bool = False, act: str = "silu"):
        super().__init__()
        c = int(64 * width)
        d = max(round(3 * depth), 1)
        self.stem = Focus(3, c, 3, act)

        def stage(cin: int, cout: int, n: int, last: bool = False) -> nn.Sequential:
            layers = [conv3x3(cin, cout, 2, depthwise, act)]
            if last:
                layers.append(SPPBottleneck(cout, cout, act=act))
            layers.append(CSPLayer(cout, cout, n, shortcut=not last, depthwise=depthwise, act=act))
            return nn.Sequential(*layers)

        self.dark2 = stage(c, 2 * c, d)
        self.dark3 = stage(2 * c, 4 * c, 3 * d)
        self.dark4 = stage(4 * c, 8 * c, 3 * d)
        self.dark5 = stage(8 * c, 16 * c, d, last=True)
        self.out_channels = [4 * c, 8 * c, 16 * c]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.dark2(self.stem(x))
        c3 = self.dark3(x)
        c4 = self.dark4(c3)
        c5 = self.dark5(c4)
        return [c3, c4, c5]
