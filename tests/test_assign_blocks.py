"""The prior-axis blocking of the assigners is an implementation detail: any block size must
give exactly the same assignment."""
from __future__ import annotations

import pytest
import torch

from densedet.assign import ASSIGNERS, build_assigner, common
from densedet.priors import feature_sizes, make_priors


def scene(seed: int = 0, B: int = 3, G: int = 15, C: int = 4, hw=(96, 128)):
    gen = torch.Generator().manual_seed(seed)
    strides = (8, 16, 32)
    priors = make_priors(feature_sizes(hw, strides), strides)
    A = priors.shape[0]
    xy = torch.rand(B, G, 2, generator=gen) * torch.tensor([hw[1], hw[0]])
    wh = torch.rand(B, G, 2, generator=gen) * 60 + 2
    gt_boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=-1)
    gt_labels = torch.randint(0, C, (B, G), generator=gen)
    gt_valid = torch.rand(B, G, generator=gen) > 0.2
    scores = torch.rand(B, A, C, generator=gen)
    centre = priors[:, :2].expand(B, A, 2)
    size = torch.rand(B, A, 2, generator=gen) * 50 + 4
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
    return priors, scores, boxes, gt_boxes, gt_labels, gt_valid, C


@pytest.mark.parametrize("ensure", [False, True])
@pytest.mark.parametrize("name", sorted(ASSIGNERS))
def test_tiny_blocks_give_the_same_assignment(name, ensure, monkeypatch):
    priors, scores, boxes, gt_boxes, gt_labels, gt_valid, C = scene()
    args = (priors, scores, boxes, gt_boxes, gt_labels, gt_valid)
    default = build_assigner(name, C, ensure_each_gt=ensure)(*args)
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(common, "MIN_BLOCK_PRIORS", 1)
    tiny = build_assigner(name, C, ensure_each_gt=ensure)(*args)
    assert torch.equal(default.gt_index, tiny.gt_index)
    assert torch.equal(default.labels, tiny.labels)
    assert torch.allclose(default.quality, tiny.quality, atol=1e-6)
    for field in ("pos_weight", "neg_weight", "centerness", "align_target"):
        a, b = getattr(default, field), getattr(tiny, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6), field
