"""Small-object widening (``stal``, YOLO26's small-target-aware assignment; issue 14): box sides
below ``stal_small_side`` px are widened to ``stal_widen_to`` px about the box centre for the
"prior centre inside the box" tests only. Batched == per-image reference with it on, a 4x4 px
object between prior centres gets a positive only with it on, and off is today's result."""
from __future__ import annotations

import math

import pytest
import torch

from densedet.assign import build_assigner
from densedet.assign.base import widen_small_boxes
from densedet.assign.reference import run_per_image
from densedet.priors import feature_sizes, make_priors

STAL = {"stal": True}
CASES = [
    ("fcos", {}), ("fcos", {"center_sampling": False}), ("fcos", {"stal_small_side": 12.0,
                                                                  "stal_widen_to": 24.0}),
    ("atss", {}), ("atss", {"topk": 3}),
    ("simota", {}), ("simota", {"center_only": True, "center_radius": 1.5}),
    ("dsl", {}), ("dsl", {"soft_center_prior": True}),
    ("lla", {}), ("dw", {}), ("tal", {}), ("tal", {"topk": 5, "stal_widen_to": 24.0}),
    ("ota", {}), ("ota", {"center_radius": 1.0}),
]
NAMES = ("fcos", "atss", "simota", "dsl", "lla", "dw", "tal", "ota")


def priors_for(hw, strides=(8, 16, 32)):
    return make_priors(feature_sizes(hw, strides), strides)


def make_scene(seed, B=3, G=12, C=5, hw=(96, 128)):
    """Mostly small objects (1-24 px sides, log-uniform, some thin), a few large ones, one
    4x4 box between stride-8 prior centres, garbage padding rows, an image without objects."""
    gen = torch.Generator().manual_seed(seed)
    priors = priors_for(hw)
    A = priors.shape[0]
    H, W = hw
    wh = torch.exp(torch.empty(B, G, 2).uniform_(math.log(1.0), math.log(24.0), generator=gen))
    wh[:, -2:] *= 4.0  # a few large objects
    centre = torch.rand(B, G, 2, generator=gen) * torch.tensor([W + 10.0, H + 10.0]) - 5
    gt = torch.cat([centre - wh / 2, centre + wh / 2], dim=-1)
    gt[:, 0] = torch.tensor([30.0, 30.0, 34.0, 34.0])  # 4x4 between prior centres
    labels = torch.randint(0, C, (B, G), generator=gen)
    n_valid = torch.randint(G // 2, G + 1, (B,), generator=gen)
    if B > 1:
        n_valid[-1] = 0
    valid = torch.arange(G)[None] < n_valid[:, None]
    labels = torch.where(valid, labels, -1)
    ltrb = torch.exp(torch.randn(B, A, 4, generator=gen) * 0.8) * priors[:, 2, None] * 1.5
    boxes = priors[:, :2].repeat(1, 2) + ltrb * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    scores = torch.rand(B, A, C, generator=gen) * 0.98 + 0.01
    return priors, scores, boxes, gt, labels, valid


def check_against_reference(name, params, scene, C=5):
    out = build_assigner(name, num_classes=C, **params)(*scene)
    ref = run_per_image(name, *scene, num_classes=C, **params)
    assert torch.equal(out.gt_index, ref["gt_index"])
    assert torch.equal(out.labels, ref["labels"])
    torch.testing.assert_close(out.quality, ref["quality"], atol=1e-5, rtol=0)
    assert torch.equal(out.candidate_mask, ref["candidate_mask"].bool())
    if name == "fcos":
        torch.testing.assert_close(out.centerness, ref["centerness"], atol=1e-6, rtol=0)
    if name == "dw":
        torch.testing.assert_close(out.pos_weight, ref["pos_weight"], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(out.neg_weight, ref["neg_weight"], atol=1e-6, rtol=1e-5)
    if name == "tal":
        torch.testing.assert_close(out.align_target, ref["align_target"], atol=1e-6, rtol=1e-4)
    return out


@pytest.mark.parametrize("name,params", CASES)
def test_matches_reference_with_stal(name, params):
    for seed in range(2):
        check_against_reference(name, {**params, **STAL}, make_scene(seed))


@pytest.mark.parametrize("name", ["simota", "tal", "dsl"])
def test_matches_reference_with_stal_and_rescue(name):
    check_against_reference(name, {**STAL, "ensure_each_gt": True}, make_scene(7))


@pytest.mark.parametrize("name", NAMES)
def test_stal_with_object_chunks_and_prior_blocks(name, monkeypatch):
    """Huge-scene paths (several object chunks, small prior blocks) give the same answer."""
    from densedet.assign import common

    scene = make_scene(4)
    whole = build_assigner(name, num_classes=5, **STAL)(*scene)
    A = scene[0].shape[0]
    monkeypatch.setattr(common, "MAX_CHUNK_PAIRS", 3 * 3 * A)  # 3 objects per chunk
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(common, "MIN_BLOCK_PRIORS", 1)
    chunked = build_assigner(name, num_classes=5, **STAL)(*scene)
    assert torch.equal(whole.gt_index, chunked.gt_index)
    assert torch.equal(whole.candidate_mask, chunked.candidate_mask)


def test_o2o_over_tal_with_stal_matches_reference():
    params = {"base": "tal", "base_params": STAL}
    scene = make_scene(3)
    out = build_assigner("o2o", num_classes=5, **params)(*scene)
    ref = run_per_image("o2o", *scene, num_classes=5, **params)
    assert torch.equal(out.gt_index, ref["gt_index"])


# ----------------------------------------------------------- a 4x4 object between priors
def tiny_scene(C=3):
    """One 4x4 px object centred at (32, 32): the nearest prior centres (stride 8: 28 and 36,
    stride 16: 24 and 40, stride 32: 16 and 48 on each axis) lie outside it; its 16x16 widening
    (24, 24)-(40, 40) holds the four stride-8 ones. Perfect predictions, flat scores."""
    priors = priors_for((128, 128))
    A = priors.shape[0]
    box = [30.0, 30.0, 34.0, 34.0]
    boxes = torch.tensor(box).expand(1, A, 4).clone()
    return (priors, torch.full((1, A, C), 0.5), boxes, torch.tensor([[box]]),
            torch.tensor([[1]]), torch.tensor([[True]]))


def widened_priors(priors):
    """Priors whose centre lies strictly inside the widened box (24, 24)-(40, 40)."""
    x, y = priors[:, 0], priors[:, 1]
    return (x > 24) & (x < 40) & (y > 24) & (y < 40)


@pytest.mark.parametrize("name", ["fcos", "atss", "tal", "dsl", "dw"])
def test_tiny_object_positive_only_with_stal(name):
    scene = tiny_scene()
    off = build_assigner(name, num_classes=3)(*scene)
    on = build_assigner(name, num_classes=3, **STAL)(*scene)
    assert int(off.pos_mask.sum()) == 0
    n = int(on.pos_mask.sum())
    assert n >= 1
    assert widened_priors(scene[0])[on.pos_mask[0]].all()  # positives in the widened box
    assert (on.labels[on.pos_mask] == 1).all()
    torch.testing.assert_close(on.quality[on.pos_mask], torch.ones(n))  # the real box's IoU


@pytest.mark.parametrize("name", ["simota", "lla", "ota"])
def test_tiny_object_penalty_free_only_with_stal(name):
    """Methods that always give an object priors (penalised ones when its box holds no prior
    centre): with stal the penalty-free priors in the widened box are all positives (the
    cheapest; with perfect predictions simota's dynamic k and lla's topk are 10, so penalised
    priors fill the rest)."""
    scene = tiny_scene()
    off = build_assigner(name, num_classes=3)(*scene)
    on = build_assigner(name, num_classes=3, **STAL)(*scene)
    inside = widened_priors(scene[0])
    if name != "simota":  # lla / ota: candidate_mask is the penalty-free region
        assert not off.candidate_mask.any()
        assert torch.equal(on.candidate_mask[0, 0], inside)
    assert on.pos_mask[0][inside].all()
    if name == "ota":  # k = the sum of its IoUs over the penalty-free priors = 4
        assert torch.equal(on.pos_mask[0], inside)


# --------------------------------------------------------------------- off is unchanged
@pytest.mark.parametrize("name", NAMES)
def test_off_is_bit_identical(name):
    scene = make_scene(1)
    default = build_assigner(name, num_classes=5)
    assert default.stal is False
    assert default.candidate_boxes(scene[3], scene[5]) is scene[3]  # no copy, no widening
    a = default(*scene)
    b = build_assigner(name, num_classes=5, stal=False)(*scene)
    for field in ("gt_index", "labels", "quality", "pos_weight", "neg_weight", "centerness",
                  "align_target", "candidate_mask"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None and y is None) or torch.equal(x, y), field


@pytest.mark.parametrize("name", NAMES)
def test_no_small_boxes_means_no_change(name):
    """With every side >= stal_small_side, stal on gives today's result bit for bit."""
    priors, scores, boxes, gt, labels, valid = make_scene(2)
    centre = (gt[..., :2] + gt[..., 2:]) / 2
    half = ((gt[..., 2:] - gt[..., :2]) / 2).clamp(min=5.0)
    gt = torch.cat([centre - half, centre + half], dim=-1)
    scene = (priors, scores, boxes, gt, labels, valid)
    a = build_assigner(name, num_classes=5)(*scene)
    b = build_assigner(name, num_classes=5, **STAL)(*scene)
    assert torch.equal(a.gt_index, b.gt_index)
    assert torch.equal(a.quality, b.quality)
    assert torch.equal(a.candidate_mask, b.candidate_mask)


def test_widen_small_boxes_definition():
    boxes = torch.tensor([[[10.0, 10.0, 14.0, 30.0], [0.0, 0.0, 8.0, 7.9], [5.0, 5.0, 5.0, 5.0]]])
    valid = torch.tensor([[True, True, False]])
    out = widen_small_boxes(boxes, valid, 8.0, 16.0)
    # 4 px wide -> 16 about x = 12; 8 px wide stays; 7.9 px tall -> 16 about y = 3.95;
    # padding rows are never widened
    torch.testing.assert_close(out, torch.tensor([[[4.0, 10.0, 20.0, 30.0],
                                                   [0.0, -4.05, 8.0, 11.95],
                                                   [5.0, 5.0, 5.0, 5.0]]]))
    with pytest.raises(ValueError):
        build_assigner("tal", num_classes=2, stal=True, stal_small_side=20.0, stal_widen_to=16.0)
    with pytest.raises(TypeError):
        build_assigner("tal", num_classes=2, stal_typo=True)
