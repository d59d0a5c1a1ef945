"""ResNet + FPN (P3-P7): the backbone and neck shared by the FCOS family (FCOS, DW, LLA).

Both come from torchvision; this module only wires them together and names the sizes:

| size  | backbone  | C3/C4/C5 channels | FPN/head width | note |
|-------|-----------|-------------------|----------------|------|
| `r18` | ResNet-18 | 128/256/512       | 128            | light: CPU-trainable (default) |
| `r50` | ResNet-50 | 512/1024/2048     | 256            | the papers' setting |

``width`` can be overridden (e.g. 64 for tests or very small CPU runs).

Levels: P3-P5 from the FPN over C3-C5, P6 = 3x3/2 conv on P5, P7 = 3x3/2 conv on ReLU(P6)
(torchvision's ``LastLevelP6P7`` built with ``in_channels == out_channels`` takes the P5
*output*, i.e. mmdet's ``add_extra_convs="on_output"`` with ``relu_before_extra_convs``).
Strides 8, 16, 32, 64, 128.

No pretrained weights are loaded (none are available offline); the ResNet keeps its
ordinary trainable BatchNorm, since freezing statistics only makes sense for a pretrained net.
"""
from __future__ import annotations

from collections import OrderedDict

import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

#: size name -> (torchvision resnet constructor name, default FPN/head width)
SIZES: dict[str, tuple[str, int]] = {
    "r18": ("resnet18", 128),
    "r50": ("resnet50", 256),
}
STRIDES = (8, 16, 32, 64, 128)


class ResNetBackbone(nn.Module):
    """torchvision ResNet returning C3, C4, C5.

    Args:
        arch: ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ... (torchvision name).
    Shapes: ``[B, 3, H, W]`` -> ``[C3 [B, c3, H/8, W/8], C4 [.., H/16, ..], C5 [.., H/32, ..]]``.
    """

    def __init__(self, arch: str = "resnet18"):
        super().__init__()
        resnet = getattr(torchvision.models, arch)(weights=None)
        self.body = IntermediateLayerGetter(resnet, {"layer2": "c3", "layer3": "c4", "layer4": "c5"})
        expansion = 4 if arch in ("resnet50", "resnet101", "resnet152") else 1
        self.out_channels = [128 * expansion, 256 * expansion, 512 * expansion]

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x).values())


class FPN(nn.Module):
    """torchvision FPN over C3-C5 plus P6/P7: list of 3 maps -> list of 5 maps of ``width`` channels."""

    def __init__(self, in_channels: list[int], width: int):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(in_channels, width, extra_blocks=LastLevelP6P7(width, width))
        self.out_channels = width

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        return list(out.values())


def build_resnet_fpn(size: str = "r18", width: int | None = None) -> tuple[ResNetBackbone, FPN, int]:
    """Backbone, neck and the channel width of the neck's outputs for ``size`` (see module doc)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for the FCOS family; choose one of {', '.join(SIZES)}")
    arch, default_width = SIZES[size]
    width = int(width or default_width)
    backbone = ResNetBackbone(arch)
    return backbone, FPN(backbone.out_channels, width), width
