"""PAFPN, YOLOX's neck: a top-down FPN path followed by a bottom-up path (PANet), with CSP
layers fusing each concatenation.

``[c3 [B, 256w, H/8], c4 [B, 512w, H/16], c5 [B, 1024w, H/32]]`` ->
``[p3 [B, 256w, H/8], p4 [B, 512w, H/16], p5 [B, 1024w, H/32]]`` (``w`` = width).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.models.common import ConvNormAct
from densedet.models.cspdarknet import CSPLayer, conv3x3

__all__ = ["PAFPN"]


def _upsample_to(x: Tensor, ref: Tensor) -> Tensor:
    # Nearest upsampling to the finer map's exact size (not a fixed x2), so that inputs
    # whose side is not a multiple of 32 still line up.
    return F.interpolate(x, size=ref.shape[-2:], mode="nearest")


class PAFPN(nn.Module):
    def __init__(self, in_channels: list[int], depth: float = 0.33, depthwise: bool = False,
                 act: str = "silu"):
        super().__init__()
        c3, c4, c5 = in_channels
        n = round(3 * depth)
        # top-down
        self.lateral5 = ConvNormAct(c5, c4, 1, act=act)
        self.td4 = CSPLayer(2 * c4, c4, n, shortcut=False, depthwise=depthwise, act=act)
        self.lateral4 = ConvNormAct(c4, c3, 1, act=act)
        self.td3 = CSPLayer(2 * c3, c3, n, shortcut=False, depthwise=depthwise, act=act)
        # bottom-up
        self.down3 = conv3x3(c3, c3, 2, depthwise, act)
        self.bu4 = CSPLayer(2 * c3, c4, n, shortcut=False, depthwise=depthwise, act=act)
        self.down4 = conv3x3(c4, c4, 2, depthwise, act)
        self.bu5 = CSPLayer(2 * c4, c5, n, shortcut=False, depthwise=depthwise, act=act)
        self.out_channels = [c3, c4, c5]

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        c3, c4, c5 = feats
        lat5 = self.lateral5(c5)                                      # [B, c4, H/32]
        t4 = self.td4(torch.cat([_upsample_to(lat5, c4), c4], 1))     # [B, c4, H/16]
        lat4 = self.lateral4(t4)                                      # [B, c3, H/16]
        p3 = self.td3(torch.cat([_upsample_to(lat4, c3), c3], 1))     # [B, c3, H/8]
        p4 = self.bu4(torch.cat([self.down3(p3), lat4], 1))           # [B, c4, H/16]
        p5 = self.bu5(torch.cat([self.down4(p4), lat5], 1))           # [B, c5, H/32]
        return [p3, p4, p5]
