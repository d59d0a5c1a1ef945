"""FCOS and ATSS: batched assigners against the plain per-image references, hand-checked
cases (answers stated below), degenerate inputs, padding, autocast and determinism."""
from __future__ import annotations

import math

import pytest
import torch

from densedet.assign import build_assigner
from densedet.assign.fcos import prior_levels
from densedet.assign.reference import run_per_image
from densedet.priors import feature_sizes, make_priors

INF = float("inf")
CASES = [
    ("fcos", {}),
    ("fcos", {"center_sampling": False}),
    ("fcos", {"center_radius": 0.6, "regress_ranges": ((-1, 32), (32, 64), (64, INF))}),
    ("fcos", {"regress_ranges": ((-1, 48),)}),  # fewer ranges than levels: last one reused
    ("atss", {}),
    ("atss", {"topk": 3, "anchor_scale": 4.0}),
    ("atss", {"topk": 1}),  # one candidate per level
]


def priors_for(hw, strides=(8, 16, 32)):
    return make_priors(feature_sizes(hw, strides), strides)


def make_scene(seed, B=3, G=12, C=5, hw=(96, 128), crowd=False):
    """A padded batch: log-uniform box sizes, centres anywhere (boxes partly outside), one
    zero-area box, one tiny box between prior centres (no candidate), garbage padding rows,
    and (for B > 1) an image with no objects."""
    gen = torch.Generator().manual_seed(seed)
    priors = priors_for(hw)
    A = priors.shape[0]
    H, W = hw
    lo, hi = (10.0, 40.0) if crowd else (1.0, float(max(H, W)))
    wh = torch.exp(torch.empty(B, G, 2).uniform_(math.log(lo), math.log(hi), generator=gen))
    centre = torch.rand(B, G, 2, generator=gen) * torch.tensor([W + 20.0, H + 20.0]) - 10
    gt = torch.cat([centre - wh / 2, centre + wh / 2], dim=-1)
    if not crowd and G >= 2:
        gt[:, 0, 2] = gt[:, 0, 0]  # zero width
        gt[:, 1] = torch.tensor([9.0, 9.0, 11.0, 11.0])  # contains no prior centre
    labels = torch.randint(0, C, (B, G), generator=gen)
    n_valid = torch.randint(G // 2, G + 1, (B,), generator=gen)
    if B > 1:
        n_valid[-1] = 0
    valid = torch.arange(G)[None] < n_valid[:, None]
    labels = torch.where(valid, labels, -1)  # padding rows: garbage labels, real-looking boxes
    ltrb = torch.exp(torch.randn(B, A, 4, generator=gen) * 0.8) * priors[:, 2, None] * 1.5
    boxes = priors[:, :2].repeat(1, 2) + ltrb * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    scores = torch.rand(B, A, C, generator=gen) * 0.98 + 0.01
    return priors, scores, boxes, gt, labels, valid


def check_against_reference(name, params, scene, C=5):
    out = build_assigner(name, num_classes=C, **params)(*scene)
    ref = run_per_image(name, *scene, num_classes=C, **params)
    assert torch.equal(out.gt_index, ref["gt_index"])
    assert torch.equal(out.labels, ref["labels"])
    torch.testing.assert_close(out.quality, ref["quality"], atol=1e-6, rtol=0)
    assert torch.equal(out.candidate_mask, ref["candidate_mask"])
    if name == "fcos":
        torch.testing.assert_close(out.centerness, ref["centerness"], atol=1e-6, rtol=0)
    return out


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_random(name, params, seed):
    out = check_against_reference(name, params, make_scene(seed))
    assert out.pos_mask.any()  # the scenes are not trivially empty


@pytest.mark.parametrize("name,params", CASES)
def test_matches_reference_sizes_and_crowd(name, params):
    for scene in (make_scene(5, B=1, G=1, hw=(40, 56)),  # top level smaller than topk
                  make_scene(6, B=2, G=3, hw=(200, 72)),
                  make_scene(7, B=2, G=120, hw=(128, 128), crowd=True)):
        check_against_reference(name, params, scene)


@pytest.mark.parametrize("name", ["fcos", "atss"])
def test_padded_batch_equals_image_by_image(name):
    priors, scores, boxes, gt, labels, valid = make_scene(3, B=4, G=9)
    out = build_assigner(name, num_classes=5)(priors, scores, boxes, gt, labels, valid)
    for b in range(4):
        n = int(valid[b].sum())  # valid rows come first in make_scene
        one = build_assigner(name, num_classes=5)(priors, scores[b:b + 1], boxes[b:b + 1],
                                                 gt[b:b + 1, :n], labels[b:b + 1, :n],
                                                 valid[b:b + 1, :n])
        assert torch.equal(out.gt_index[b], one.gt_index[0])
        assert torch.equal(out.quality[b], one.quality[0])
    assert (out.gt_index[~valid.any(1)] == -1).all()  # the empty image


@pytest.mark.parametrize("name", ["fcos", "atss"])
def test_padding_rows_never_assigned(name):
    priors, scores, boxes, gt, labels, valid = make_scene(4, B=2, G=8)
    valid[:, 4:] = False
    gt[:, 4:] = torch.tensor([0.0, 0.0, 128.0, 96.0])  # padding covering the whole image
    out = build_assigner(name, num_classes=5)(priors, scores, boxes, gt, labels, valid)
    assert (out.gt_index < 4).all()
    assert not out.candidate_mask[:, 4:].any()


# ------------------------------------------------------------------ hand-checked FCOS
def single_box_scene(box, hw=(128, 128), C=3, label=1):
    priors = priors_for(hw)
    A = priors.shape[0]
    scores = torch.full((1, A, C), 0.5)
    boxes = torch.tensor(box, dtype=torch.float32).expand(1, A, 4).clone()  # perfect predictions
    return (priors, scores, boxes, torch.tensor([[box]], dtype=torch.float32),
            torch.tensor([[label]]), torch.tensor([[True]]))


def prior_index(priors, x, y, stride):
    hit = (priors[:, 0] == x) & (priors[:, 1] == y) & (priors[:, 2] == stride)
    return int(torch.nonzero(hit)[0, 0])


def test_fcos_hand_checked_40px_box():
    # Box (20,20)-(60,60), centre (40,40), on a 128 px input with strides 8/16/32 (prior
    # centres at 4, 12, 20, ... on stride 8). Centre sampling 1.5: the stride-8 square is
    # (28,52), so x, y in {36, 44}: 4 priors, their largest side distance is 24 -> level 0
    # range [-1, 64] holds. Stride 16/32 priors have largest distances <= 36 < 64: none.
    scene = single_box_scene([20.0, 20.0, 60.0, 60.0])
    priors = scene[0]
    out = build_assigner("fcos", num_classes=3)(*scene)
    expected = sorted(prior_index(priors, x, y, 8) for x in (36, 44) for y in (36, 44))
    assert torch.nonzero(out.pos_mask[0])[:, 0].tolist() == expected
    assert (out.labels[0, expected] == 1).all()
    # (36,36): l=t=16, r=b=24 -> sqrt(16/24 * 16/24) = 2/3, the same for all four
    torch.testing.assert_close(out.centerness[0, expected], torch.full((4,), 2 / 3))
    assert (out.centerness[0][~out.pos_mask[0]] == 0).all()
    torch.testing.assert_close(out.quality[0, expected], torch.ones(4))  # perfect predictions


def test_fcos_hand_checked_without_centre_sampling():
    # Same box, no centre sampling: the 16 stride-8 priors with x, y in {28,36,44,52}
    # (largest distance 32 <= 64); the 9 stride-16 priors inside have distances < 64.
    scene = single_box_scene([20.0, 20.0, 60.0, 60.0])
    out = build_assigner("fcos", num_classes=3, center_sampling=False)(*scene)
    expected = sorted(prior_index(scene[0], x, y, 8) for x in (28, 36, 44, 52)
                      for y in (28, 36, 44, 52))
    assert torch.nonzero(out.pos_mask[0])[:, 0].tolist() == expected


def test_fcos_regress_range_is_inclusive():
    # Prior (36,36) on stride 8 with l = 64 exactly (box x1 = -28): 64 <= hi = 64 -> positive;
    # with x1 = -28.5 the largest distance is 64.5 -> not on level 0.
    idx = prior_index(priors_for((128, 128)), 36, 36, 8)
    fcos = build_assigner("fcos", num_classes=3, center_sampling=False)
    assert fcos(*single_box_scene([-28.0, 20.0, 60.0, 60.0])).gt_index[0, idx] == 0
    assert fcos(*single_box_scene([-28.5, 20.0, 60.0, 60.0])).gt_index[0, idx] == -1


def test_fcos_smallest_area_wins():
    priors = priors_for((128, 128))
    A = priors.shape[0]
    gt = torch.tensor([[[0.0, 0.0, 100.0, 100.0], [20.0, 20.0, 60.0, 60.0]]])
    out = build_assigner("fcos", num_classes=3, center_sampling=False)(
        priors, torch.rand(1, A, 3), torch.zeros(1, A, 4), gt, torch.tensor([[0, 2]]),
        torch.tensor([[True, True]]))
    idx = prior_index(priors, 36, 36, 8)  # inside both; the 40x40 box is smaller
    assert out.gt_index[0, idx] == 1 and out.labels[0, idx] == 2
    assert out.quality[0, idx] == 0  # zero-size predictions: IoU 0, no NaN


def test_prior_levels_rank_distinct_strides():
    priors = torch.tensor([[0, 0, 16, 16], [0, 0, 8, 8], [0, 0, 64, 64], [0, 0, 8, 8.0]])
    assert prior_levels(priors).tolist() == [1, 0, 2, 0]


# ------------------------------------------------------------------ hand-checked ATSS
def test_atss_hand_checked_threshold():
    # One level, stride 8, 64x64 input (centres 4..60). Box (16,16)-(56,48), centre (36,32).
    # topk=6 nearest: (36,28), (36,36) at distance 4 and (28|44, 28|36) at sqrt(80).
    # anchor_scale 4 -> 32 px anchors. IoUs: 896/1408 = 0.63636 (x2), 784/1520 = 0.51579 (x4);
    # mean 0.55598 + unbiased std 0.06226 = 0.61824 -> only (36,28) and (36,36) are positive.
    priors = make_priors([(8, 8)], [8])
    A = priors.shape[0]
    gt = torch.tensor([[[16.0, 16.0, 56.0, 48.0]]])
    out = build_assigner("atss", num_classes=2, topk=6, anchor_scale=4.0)(
        priors, torch.rand(1, A, 2), gt.expand(1, A, 4).clone(), gt, torch.tensor([[1]]),
        torch.tensor([[True]]))
    expected = sorted([prior_index(priors, 36, 28, 8), prior_index(priors, 36, 36, 8)])
    assert torch.nonzero(out.pos_mask[0])[:, 0].tolist() == expected
    assert out.candidate_mask[0, 0].sum() == 6
    ious = torch.tensor([896 / 1408] * 2 + [784 / 1520] * 4)
    assert ious.std() == pytest.approx(0.06226, abs=1e-4)  # the unbiased std of the text


def test_atss_centre_must_be_inside_by_margin():
    # One level, topk=1: the only candidate is prior (28,28) (box centre x ~ 31.99, nearer to
    # 28 than to 36), its IoU is its own threshold (std of one value taken as 0), so it is
    # positive exactly when its centre is inside by more than 0.01: the left edge at 27.98
    # leaves 0.02 (positive), at 27.995 only 0.005 (background).
    priors = make_priors([(8, 8)], [8])
    A = priors.shape[0]
    idx = prior_index(priors, 28, 28, 8)
    atss = build_assigner("atss", num_classes=2, topk=1, anchor_scale=2.0)
    for x1, expected in ((27.98, 0), (27.995, -1)):
        gt = torch.tensor([[[x1, 20.0, 36.0, 36.0]]])
        out = atss(priors, torch.rand(1, A, 2), torch.zeros(1, A, 4), gt, torch.tensor([[0]]),
                   torch.tensor([[True]]))
        assert out.gt_index[0, idx] == expected
        assert out.pos_mask[0].sum() == (1 if expected == 0 else 0)


# ------------------------------------------------------------------ degenerate input
@pytest.mark.parametrize("name", ["fcos", "atss"])
def test_degenerate_inputs_no_nan(name):
    priors = priors_for((64, 64))
    A = priors.shape[0]
    assigner = build_assigner(name, num_classes=3)
    # no objects at all (G = 0)
    out = assigner(priors, torch.rand(2, A, 3), torch.rand(2, A, 4), torch.zeros(2, 0, 4),
                   torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.bool))
    assert (out.gt_index == -1).all() and (out.quality == 0).all()
    # all padding, zero-area boxes, boxes fully outside, degenerate predictions
    gt = torch.tensor([[[10.0, 10.0, 10.0, 30.0], [5.0, 5.0, 5.0, 5.0],
                        [-50.0, -50.0, -10.0, -10.0], [0.0, 0.0, 64.0, 64.0]]]).repeat(2, 1, 1)
    valid = torch.tensor([[True, True, True, True], [False, False, False, False]])
    out = assigner(priors, torch.zeros(2, A, 3), torch.zeros(2, A, 4), gt,
                   torch.tensor([[0, 1, 2, 0]]).repeat(2, 1), valid)
    for field in (out.quality, out.centerness):
        if field is not None:
            assert torch.isfinite(field).all()
    assert set(out.gt_index[0].unique().tolist()) <= {-1, 3}  # only the real box gets priors
    assert (out.gt_index[1] == -1).all()


@pytest.mark.parametrize("name", ["fcos", "atss"])
def test_autocast_float32_and_deterministic(name):
    scene = make_scene(8)
    assigner = build_assigner(name, num_classes=5)
    plain = assigner(*scene)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = assigner(*scene)
        half_in = assigner(scene[0], scene[1].bfloat16(), scene[2].bfloat16(), *scene[3:])
    assert mixed.quality.dtype == torch.float32 and half_in.quality.dtype == torch.float32
    assert torch.equal(plain.gt_index, mixed.gt_index)
    assert torch.equal(plain.quality, mixed.quality)
    again = assigner(*scene)
    assert torch.equal(plain.gt_index, again.gt_index) and torch.equal(plain.quality, again.quality)


def test_atss_layout_cache_follows_priors():
    # the cached level layout must not leak between different priors tensors
    atss = build_assigner("atss", num_classes=5)
    for hw in ((96, 128), (128, 96), (48, 64)):
        scene = make_scene(9, hw=hw)
        check_against_reference("atss", {}, scene)
        assert torch.equal(atss(*scene).gt_index,
                           run_per_image("atss", *scene, num_classes=5)["gt_index"])


@pytest.mark.parametrize("name", ["fcos", "atss"])
def test_ensure_each_gt_rescues_lost_objects(name):
    # two identical boxes: the first wins every prior; with ensure_each_gt the second one gets
    # its best prior back
    priors = priors_for((64, 64))
    A = priors.shape[0]
    gt = torch.tensor([[[8.0, 8.0, 40.0, 40.0], [8.0, 8.0, 40.0, 40.0]]])
    args = (priors, torch.rand(1, A, 3), torch.zeros(1, A, 4), gt, torch.tensor([[0, 1]]),
            torch.tensor([[True, True]]))
    plain = build_assigner(name, num_classes=3)(*args)
    assert (plain.gt_index[0] != 1).all() and (plain.gt_index[0] == 0).any()
    rescued = build_assigner(name, num_classes=3, ensure_each_gt=True)(*args)
    assert (rescued.gt_index[0] == 1).sum() == 1 and (rescued.gt_index[0] == 0).any()


def test_centerness_target_by_hand():
    """The one FCOS centerness definition (models import it from here)."""
    from densedet.assign.fcos import centerness_target
    points = torch.tensor([[4.0, 4.0], [12.0, 4.0], [0.0, 0.0], [20.0, 4.0]])
    boxes = torch.tensor([[0.0, 0.0, 16.0, 8.0]]).expand(1, 4, 4)
    got = centerness_target(points, boxes)
    want = torch.tensor([[math.sqrt(4 / 12), math.sqrt(4 / 12), 0.0, 0.0]])  # border, outside
    torch.testing.assert_close(got, want)
