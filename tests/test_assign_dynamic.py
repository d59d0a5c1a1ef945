"""SimOTA, DSL and LLA: batched assigners against the plain per-image references, hand-checked
cases, degenerate inputs, padding, autocast and determinism."""
from __future__ import annotations

import math

import pytest
import torch

from densedet.assign import build_assigner
from densedet.assign.reference import run_per_image
from densedet.priors import feature_sizes, make_priors

METHODS = {
    "simota": [{}, {"center_only": True, "center_radius": 1.5}, {"center_radius": 0.3},
               {"candidate_topk": 3, "iou_weight": 1.0}],
    "dsl": [{}, {"soft_center_prior": True}, {"candidate_topk": 4}],
    "lla": [{}, {"topk": 3, "reg_weight": 3.0}],
}
CASES = [(name, params) for name, plist in METHODS.items() for params in plist]


def priors_for(hw, strides=(8, 16, 32)):
    return make_priors(feature_sizes(hw, strides), strides)


def random_boxes(gen, n, hw, min_size=1.0, max_size=None):
    """``[n, 4]`` xyxy with log-uniform sizes, centres anywhere (some boxes leave the image)."""
    H, W = hw
    max_size = max_size or max(H, W)
    c = torch.rand(n, 2, generator=gen) * torch.tensor([W + 20.0, H + 20.0]) - 10
    wh = torch.exp(torch.empty(n, 2).uniform_(math.log(min_size), math.log(max_size), generator=gen))
    return torch.cat([c - wh / 2, c + wh / 2], dim=1)


def make_scene(seed, B=3, G=12, C=5, hw=(96, 128), crowd=False):
    """A padded batch: many box sizes, zero-area and tiny boxes, boxes partly outside, padding
    rows with garbage, one image with no objects. Scores are continuous (no cost ties)."""
    gen = torch.Generator().manual_seed(seed)
    priors = priors_for(hw)
    A = priors.shape[0]
    if crowd:  # many overlapping objects of similar size
        gt = random_boxes(gen, B * G, hw, min_size=12, max_size=40).reshape(B, G, 4)
    else:
        gt = random_boxes(gen, B * G, hw, min_size=1.0).reshape(B, G, 4)
        gt[:, 0, 2] = gt[:, 0, 0]  # zero width
        gt[:, 1] = torch.tensor([9.0, 9.0, 11.0, 11.0])  # tiny, between stride-8 prior centres
    labels = torch.randint(0, C, (B, G), generator=gen)
    n_valid = torch.randint(G // 2, G + 1, (B,), generator=gen)
    n_valid[-1] = 0 if B > 1 else n_valid[-1]
    valid = torch.arange(G)[None] < n_valid[:, None]
    labels = torch.where(valid, labels, -1)  # padding rows hold garbage labels
    # predictions: distances from the prior centre, some negative (box misses its prior)
    ltrb = torch.exp(torch.randn(B, A, 4, generator=gen) * 0.8) * priors[:, 2, None] * 1.5
    ltrb = ltrb - (torch.rand(B, A, 4, generator=gen) < 0.05) * priors[:, 2, None] * 4
    pts = priors[:, :2].repeat(1, 2)
    boxes = pts + ltrb * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    scores = torch.rand(B, A, C, generator=gen) * 0.98 + 0.01
    return priors, scores, boxes, gt, labels, valid


def check_against_reference(name, params, scene, C):
    priors, scores, boxes, gt, labels, valid = scene
    out = build_assigner(name, num_classes=C, **params)(priors, scores, boxes, gt, labels, valid)
    ref = run_per_image(name, priors, scores, boxes, gt, labels, valid, C, **params)
    torch.testing.assert_close(out.gt_index, ref["gt_index"], rtol=0, atol=0)
    torch.testing.assert_close(out.labels, ref["labels"], rtol=0, atol=0)
    torch.testing.assert_close(out.quality, ref["quality"], rtol=0, atol=1e-5)
    assert torch.equal(out.candidate_mask, ref["candidate_mask"].bool())
    assert not (out.gt_index[~valid.any(1)] >= 0).any()
    return out


@pytest.mark.parametrize("ensure", [False, True])
@pytest.mark.parametrize("name,params", CASES)
def test_matches_reference_random_scenes(name, params, ensure):
    for seed in range(3):
        out = check_against_reference(name, {**params, "ensure_each_gt": ensure},
                                      make_scene(seed), C=5)
        assert (out.gt_index >= 0).any()


@pytest.mark.parametrize("ensure", [False, True])
@pytest.mark.parametrize("name,params", CASES)
def test_matches_reference_more_classes_than_objects(name, params, ensure):
    """C >= G is where the CPU paths change (SimOTA/DSL compute the candidate union first,
    LLA tries its near pairs, ``common.union_first`` / ``lla.use_packed_pairs``)."""
    for seed in range(3):
        out = check_against_reference(name, {**params, "ensure_each_gt": ensure},
                                      make_scene(seed, G=6, C=8), C=8)
        assert (out.gt_index >= 0).any()


@pytest.mark.parametrize("ensure", [False, True])
@pytest.mark.parametrize("name,params", CASES)
def test_matches_reference_crowd(name, params, ensure):
    scene = make_scene(100, B=2, G=120, C=3, hw=(96, 96), crowd=True)
    out = check_against_reference(name, {**params, "ensure_each_gt": ensure}, scene, C=3)
    assert out.gt_index[0].unique().numel() > 20  # many objects really got priors


@pytest.mark.parametrize("name", METHODS)
def test_ensure_each_gt_rescues_lost_objects(name):
    """In the crowd some objects lose every prior; with the option each matched object owns one."""
    scene = make_scene(7, B=1, G=150, C=2, hw=(64, 64), crowd=True)
    priors, scores, boxes, gt, labels, valid = scene
    plain = build_assigner(name, num_classes=2)(*scene)
    fixed = build_assigner(name, num_classes=2, ensure_each_gt=True)(*scene)
    n_plain = plain.gt_index[0][plain.gt_index[0] >= 0].unique().numel()
    n_fixed = fixed.gt_index[0][fixed.gt_index[0] >= 0].unique().numel()
    assert n_fixed > n_plain


@pytest.mark.parametrize("name,params", CASES)
def test_padded_batch_equals_image_by_image(name, params):
    priors, scores, boxes, gt, labels, valid = make_scene(3, B=3, G=10)
    assigner = build_assigner(name, num_classes=5, **params)
    batched = assigner(priors, scores, boxes, gt, labels, valid)
    for b in range(3):
        g = int(valid[b].sum())  # valid rows come first in make_scene
        one = assigner(priors, scores[b:b + 1], boxes[b:b + 1], gt[b:b + 1, :g], labels[b:b + 1, :g],
                       valid[b:b + 1, :g])
        assert torch.equal(one.gt_index, batched.gt_index[b:b + 1])
        assert torch.equal(one.quality, batched.quality[b:b + 1])


def grid_case():
    """One object [0, 0, 24, 24] over a 3x3 grid of stride-8 priors (centres 4, 12, 20).

    The centre prior (index 4) predicts the object exactly (IoU 1); the others predict
    [0, 0, 12, 13] (IoU 156/576 = 0.2708). Scores on the single class, row-major."""
    priors = make_priors([(3, 3)], [8])
    scores = torch.tensor([0.9, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.35])[None, :, None]
    boxes = torch.tensor([0.0, 0.0, 12.0, 13.0]).repeat(1, 9, 1)
    boxes[0, 4] = torch.tensor([0.0, 0.0, 24.0, 24.0])
    gt = torch.tensor([[[0.0, 0.0, 24.0, 24.0]]])
    return priors, scores, boxes, gt, torch.tensor([[0]]), torch.tensor([[True]])


def test_simota_hand_checked():
    # k = floor(1 + 8 * 0.2708) = 3. cost = -log p + 3 * -log IoU: the centre prior
    # (0.69) and then the two highest scores among IoU-0.27 priors: index 0 (0.9), 7 (0.8).
    out = build_assigner("simota", num_classes=1)(*grid_case())
    assert torch.nonzero(out.gt_index[0] >= 0).flatten().tolist() == [0, 4, 7]
    assert out.labels[0].tolist() == [0, -1, -1, -1, 0, -1, -1, 0, -1]
    torch.testing.assert_close(out.quality[0, [0, 4, 7]], torch.tensor([156 / 576, 1.0, 156 / 576]))


def test_dsl_hand_checked():
    # soft target = IoU; BCE(p, t) * (t - p)^2 is smallest where the score is closest to the
    # IoU 0.27: p = 0.3 (index 2, 5e-4), p = 0.2 (index 1, 3e-3), then p = 0.35 (index 8,
    # 4e-3); the centre prior costs 0.17 but IoU 1 removes its 3.9 IoU cost. k = 3 -> {1, 2, 4}.
    out = build_assigner("dsl", num_classes=1)(*grid_case())
    assert torch.nonzero(out.gt_index[0] >= 0).flatten().tolist() == [1, 2, 4]


def test_lla_hand_checked():
    # fixed k = 3; focal(p, 1) = 0.25 (1-p)^2 (-log p) is smallest for high scores, so the
    # centre (IoU 1) and the two highest scores (indices 0 and 7) win.
    out = build_assigner("lla", num_classes=1, topk=3)(*grid_case())
    assert torch.nonzero(out.gt_index[0] >= 0).flatten().tolist() == [0, 4, 7]
    # a box [5, 5, 11, 11] holds no prior centre: LLA still gives it its 3 cheapest priors,
    # all outside (penalised), the nearest ones by prediction quality.
    priors, scores, boxes, _, labels, valid = grid_case()
    out = build_assigner("lla", num_classes=1, topk=3)(
        priors, scores, boxes, torch.tensor([[[5.0, 5.0, 11.0, 11.0]]]), labels, valid)
    assert int((out.gt_index >= 0).sum()) == 3


def test_conflict_goes_to_cheaper_object():
    # two identical boxes of classes 0 and 1, class-1 score p, class-0 score p/2: object 1 is
    # cheaper at every prior ((1 - p/2) p > (p/2)(1 - p)), so every prior both objects pick
    # goes to object 1, and priors only one object picks stay with it.
    priors, scores, boxes, gt, _, _ = grid_case()
    scores = torch.cat([scores * 0.5, scores], dim=-1)
    gt2 = gt.repeat(1, 2, 1)
    for name in METHODS:
        assigner = build_assigner(name, num_classes=2)
        alone = [assigner(priors, scores, boxes, gt, torch.tensor([[c]]), torch.tensor([[True]]))
                 .gt_index[0] >= 0 for c in (0, 1)]
        both = assigner(priors, scores, boxes, gt2, torch.tensor([[0, 1]]), torch.tensor([[True, True]]))
        expected = torch.where(alone[1], 1, torch.where(alone[0], 0, -1))
        assert (alone[0] & alone[1]).any(), name  # the case really has conflicts
        assert torch.equal(both.gt_index[0], expected), name


def test_simota_object_without_candidate_region():
    # with center_radius 0.3 a tiny box between prior centres has no own candidate; alone in
    # the image there are no candidates at all, so nothing is assigned.
    priors, scores, boxes, _, labels, valid = grid_case()
    gt = torch.tensor([[[7.0, 7.0, 9.0, 9.0]]])
    out = build_assigner("simota", num_classes=1, center_radius=0.3)(priors, scores, boxes, gt, labels, valid)
    assert (out.gt_index == -1).all() and (out.quality == 0).all()
    dsl = build_assigner("dsl", num_classes=1)(priors, scores, boxes, gt, labels, valid)
    assert (dsl.gt_index == -1).all()


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("G", [0, 3])
def test_empty_and_all_padding(name, G):
    priors = priors_for((32, 32))
    A = priors.shape[0]
    out = build_assigner(name, num_classes=4)(
        priors, torch.rand(2, A, 4), torch.rand(2, A, 4) * 32, torch.rand(2, G, 4) * 32,
        torch.zeros(2, G, dtype=torch.long), torch.zeros(2, G, dtype=torch.bool))
    assert (out.gt_index == -1).all() and (out.labels == -1).all() and (out.quality == 0).all()
    assert out.quality.dtype == torch.float32 and out.gt_index.shape == (2, A)


@pytest.mark.parametrize("name", METHODS)
def test_no_nan_on_degenerate_input(name):
    priors = priors_for((32, 32))
    A = priors.shape[0]
    scores = torch.zeros(2, A, 3)
    scores[0, ::2] = 1.0  # saturated probabilities
    boxes = torch.zeros(2, A, 4)  # zero-area predictions at the origin
    boxes[1] = torch.tensor([20.0, 20.0, 10.0, 10.0])  # inverted
    gt = torch.tensor([[[5.0, 5.0, 5.0, 20.0], [-50, -50, -40, -40], [0, 0, 32, 32]],
                       [[8.0, 8.0, 8.0, 8.0], [1e4, 1e4, 2e4, 2e4], [0, 0, 1e-3, 1e-3]]])
    labels = torch.tensor([[0, 1, 2], [2, 1, 0]])
    valid = torch.ones(2, 3, dtype=torch.bool)
    for params in METHODS[name]:
        for ensure in (False, True):
            out = build_assigner(name, num_classes=3, ensure_each_gt=ensure, **params)(
                priors, scores, boxes, gt, labels, valid)
            assert torch.isfinite(out.quality).all()
            assert ((out.gt_index >= -1) & (out.gt_index < 3)).all()
            ref = run_per_image(name, priors, scores, boxes, gt, labels, valid, 3,
                                ensure_each_gt=ensure, **params)
            assert torch.isfinite(ref["quality"]).all()


@pytest.mark.parametrize("name", METHODS)
def test_float32_under_bf16_autocast_and_deterministic(name):
    scene = make_scene(5)
    assigner = build_assigner(name, num_classes=5)
    plain = assigner(*scene)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = assigner(*scene)
    half = assigner(*(t.bfloat16() if t.is_floating_point() else t for t in scene))
    assert auto.quality.dtype == torch.float32 and half.quality.dtype == torch.float32
    assert torch.equal(auto.gt_index, plain.gt_index) and torch.equal(auto.quality, plain.quality)
    again = assigner(*scene)
    assert torch.equal(again.gt_index, plain.gt_index) and torch.equal(again.quality, plain.quality)


# --------------------------------------------- near pairs (CPU): lla, simota, dsl
ASSIGNER_CLASSES = {"lla": "LLAAssigner", "simota": "SimOTAAssigner", "dsl": "DSLAssigner"}


class PackedSpy:
    """Counts how often a method's near-pair path answered and how often it fell back."""

    def __init__(self, monkeypatch, name):
        import importlib
        cls = getattr(importlib.import_module(f"densedet.assign.{name}"), ASSIGNER_CLASSES[name])
        self.answered = self.fell_back = 0
        original = cls._assign_packed

        def spy(assigner, *args):
            out = original(assigner, *args)
            if out is None:
                self.fell_back += 1
            else:
                self.answered += 1
            return out

        monkeypatch.setattr(cls, "_assign_packed", spy)


def assert_same_assignment(a, b):
    for field in ("gt_index", "labels", "quality", "candidate_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


@pytest.mark.parametrize("ensure", [False, True])
@pytest.mark.parametrize("name,params", CASES)
def test_near_pairs_equal_every_pair(name, params, ensure, monkeypatch):
    """The near-pair path (or its fallback) gives the dense path's assignment bit for bit, on
    scenes where it answers and on scenes where some object needs pairs that are not near."""
    from densedet.assign import common
    spy = PackedSpy(monkeypatch, name)
    monkeypatch.setattr(common, "use_near_pairs", lambda *args, **kwargs: True)  # also with C < G
    for seed in range(6):
        for crowd in (False, True):
            scene = make_scene(seed, crowd=crowd)
            assigner = build_assigner(name, num_classes=5, ensure_each_gt=ensure, **params)
            packed = assigner(*scene)
            with monkeypatch.context() as m:
                m.setattr(common, "use_near_pairs", lambda *args, **kwargs: False)
                dense = assigner(*scene)
            assert_same_assignment(packed, dense)
    assert spy.answered >= 2, (spy.answered, spy.fell_back)
    if name == "lla":  # the test scenes' tiny boxes need pairs beyond the near ones
        assert spy.fell_back >= 2, (spy.answered, spy.fell_back)


def test_near_pairs_only_on_cpu_and_with_classes_for_every_slot():
    """The near pairs' host sync (listing them) is free on a CPU only; with more object slots
    than classes the one-hot methods' dense paths are faster (docs/benchmarks.md)."""
    from densedet.assign import common
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert common.use_near_pairs(cpu, 80, 20) and common.use_near_pairs(cpu, 20, 20)
    assert not common.use_near_pairs(cpu, 80, 500)
    assert common.use_near_pairs(cpu, 80, 500, per_pair_class_cost=True)  # dsl's soft target
    for G in (20, 500):
        for per_pair in (False, True):
            assert not common.use_near_pairs(gpu, 80, G, per_pair_class_cost=per_pair)


@pytest.mark.parametrize("name,params", CASES)
def test_near_pairs_answer_in_a_realistic_batch(name, params, monkeypatch):
    """A training-like batch (predicted boxes near their priors, objects of 8-300 px, more
    classes than object slots): the fast path answers, and agrees with the reference."""
    from densedet.bench.assign import random_scene
    spy = PackedSpy(monkeypatch, name)
    scene = random_scene(batch=4, max_objects=12, num_classes=20, image_size=320, seed=3)
    check_against_reference(name, params, scene.args(), 20)
    assert (spy.answered, spy.fell_back) == (1, 0)


@pytest.mark.parametrize("name", METHODS)
def test_near_pairs_fall_back_for_an_object_no_prediction_touches(name, monkeypatch):
    """A 2 px object between prior centres that no predicted box overlaps has no near pair:
    whatever it takes is a pair that is not near, so the near-pair path declines and the
    dense path answers (checked against the reference)."""
    spy = PackedSpy(monkeypatch, name)
    priors = priors_for((64, 64))
    A = priors.shape[0]
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([40.0, 40.0, 60.0, 60.0]).expand(1, A, 4).clone()  # all far away
    gt = torch.tensor([[[9.0, 9.0, 11.0, 11.0], [38.0, 38.0, 62.0, 62.0]]])
    labels = torch.tensor([[0, 1]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    scores = torch.rand(1, A, 3, generator=gen)
    out = check_against_reference(name, {}, (priors, scores, boxes, gt, labels, valid), 3)
    assert (spy.answered, spy.fell_back) == (0, 1)
    if name != "dsl":  # (dsl: its one pick is a prior of the big box, which wins it)
        assert (out.gt_index == 0).sum() > 0  # the tiny object still gets priors


def test_near_pair_bounds_hold_for_pairs_that_are_not_near():
    """The bounds the near-pair paths rely on, from the reference's definitions: a pair the
    path leaves out (no overlap, so IoU 0; for lla and simota also outside the penalty-free
    region) costs at least the method's bound, even with saturated scores (0 and 1, the
    extremes of the class terms)."""
    from densedet.assign import common, dsl, lla, simota
    from densedet.assign.reference.lla import focal
    from torch.nn.functional import binary_cross_entropy as bce
    C = 4
    zero = torch.tensor(0.0)
    for p in (torch.zeros(C), torch.ones(C), torch.tensor([1.0, 0.0, 1.0, 0.0]),
              torch.rand(C, generator=torch.Generator().manual_seed(1))):
        for label in range(C):
            onehot = torch.nn.functional.one_hot(torch.tensor(label), C).float()
            for w in (0.0, 1.5, 3.0):
                lla_cost = focal(p, onehot).sum() + w * -torch.log(zero + 1e-7) + 1e3
                assert lla_cost >= (lla.OUTSIDE_PENALTY + w * -math.log(lla.IOU_EPS)
                                    - common.BOUND_SLACK)
                for centre_only in (False, True):
                    penalty = simota.SimOTAAssigner(C, center_only=centre_only).penalty
                    simota_cost = bce(p, onehot, reduction="sum") + w * -torch.log(zero + 1e-8)
                    assert simota_cost + penalty >= (penalty + w * -math.log(simota.IOU_EPS)
                                                     - common.BOUND_SLACK)
                # dsl: the soft target is the IoU, 0 here, at every class
                dsl_cost = (bce(p, torch.zeros(C), reduction="none") * p * p).sum()
                assert dsl_cost + w * -torch.log(zero + 1e-7) >= (
                    w * -math.log(dsl.IOU_EPS) - common.BOUND_SLACK)
