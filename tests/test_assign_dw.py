"""DW and TAL: batched assigners against the plain per-image references, hand-checked cases
(answers stated below), degenerate inputs, padding, autocast and determinism."""
from __future__ import annotations

import math

import pytest
import torch

from densedet.assign import build_assigner, dw
from densedet.assign.reference import run_per_image
from densedet.priors import feature_sizes, make_priors

CASES = [
    ("dw", {}),
    ("dw", {"sigma": 0.5}),
    ("tal", {}),
    ("tal", {"topk": 3, "alpha": 0.5, "beta": 2.0}),
    ("tal", {"topk": 1, "beta": 4.5}),
]


@pytest.fixture(autouse=True, params=["dense", "packed"])
def dw_path(request, monkeypatch):
    """Every test runs DW on both paths: dense (GPU) and the list of candidate pairs (CPU)."""
    monkeypatch.setattr(dw, "use_packed_pairs", lambda device: request.param == "packed")
    return request.param


def priors_for(hw, strides=(8, 16, 32)):
    return make_priors(feature_sizes(hw, strides), strides)


def make_scene(seed, B=3, G=12, C=5, hw=(96, 128), crowd=False):
    """A padded batch: log-uniform box sizes, centres anywhere (boxes partly outside), one
    zero-area box, one tiny box between prior centres (no candidate), garbage padding rows,
    an image with no objects (B > 1), and predictions that hug the objects for some priors."""
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
    labels = torch.where(valid, labels, -1)
    ltrb = torch.exp(torch.randn(B, A, 4, generator=gen) * 0.8) * priors[:, 2, None] * 1.5
    boxes = priors[:, :2].repeat(1, 2) + ltrb * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    # a third of the priors predict a jittered copy of an object containing them (else of a
    # random object): IoUs above 0.5 occur, so P_neg's normalisation is exercised
    px, py = priors[:, 0], priors[:, 1]
    inside = ((px > gt[..., 0, None]) & (px < gt[..., 2, None]) & (py > gt[..., 1, None])
              & (py < gt[..., 3, None]))  # [B, G, A]
    pick = torch.where(inside.any(1), inside.float().argmax(1),
                       torch.randint(0, G, (B, A), generator=gen))
    target = gt.gather(1, pick[..., None].expand(B, A, 4))
    jitter = target + torch.randn(B, A, 4, generator=gen) * (target[..., 2:] - target[..., :2]
                                                             ).abs().repeat(1, 1, 2) * 0.1
    hug = torch.rand(B, A, generator=gen) < 0.33
    boxes = torch.where(hug[..., None], jitter, boxes)
    boxes = torch.cat([torch.minimum(boxes[..., :2], boxes[..., 2:]),
                       torch.maximum(boxes[..., :2], boxes[..., 2:])], dim=-1)
    scores = torch.rand(B, A, C, generator=gen) * 0.98 + 0.01
    return priors, scores, boxes, gt, labels, valid


def check_against_reference(name, params, scene, C=5):
    out = build_assigner(name, num_classes=C, **params)(*scene)
    ref = run_per_image(name, *scene, num_classes=C, **params)
    assert torch.equal(out.gt_index, ref["gt_index"])
    assert torch.equal(out.labels, ref["labels"])
    torch.testing.assert_close(out.quality, ref["quality"], atol=1e-6, rtol=0)
    assert torch.equal(out.candidate_mask, ref["candidate_mask"])
    if name == "dw":
        torch.testing.assert_close(out.pos_weight, ref["pos_weight"], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(out.neg_weight, ref["neg_weight"], atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(out.align_target, ref["align_target"], atol=1e-6, rtol=1e-4)
    return out


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_random(name, params, seed):
    out = check_against_reference(name, params, make_scene(seed))
    assert out.pos_mask.any()


@pytest.mark.parametrize("name,params", CASES)
def test_matches_reference_sizes_and_crowd(name, params):
    for scene in (make_scene(5, B=1, G=1, hw=(40, 56)),
                  make_scene(6, B=2, G=3, hw=(200, 72)),
                  make_scene(7, B=2, G=120, hw=(128, 128), crowd=True)):
        check_against_reference(name, params, scene)


@pytest.mark.parametrize("name", ["fcos"])
def test_object_slices_do_not_change_the_answer(name, monkeypatch):
    # fcos walks the objects in shape-determined slices; tiny slices must agree (the prior
    # blocks of the other methods are covered by tests/test_assign_blocks.py)
    scene = make_scene(10, B=2, G=30, hw=(64, 64), crowd=True)
    whole = build_assigner(name, num_classes=5)(*scene)
    from densedet.assign import common
    monkeypatch.setattr(common, "MAX_CHUNK_PAIRS", 1)  # one object per chunk
    sliced = build_assigner(name, num_classes=5)(*scene)
    assert torch.equal(whole.gt_index, sliced.gt_index)
    for field in ("quality", "pos_weight", "neg_weight", "align_target"):
        a, b = getattr(whole, field), getattr(sliced, field)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", ["dw", "tal"])
def test_padded_batch_equals_image_by_image(name):
    priors, scores, boxes, gt, labels, valid = make_scene(3, B=4, G=9)
    out = build_assigner(name, num_classes=5)(priors, scores, boxes, gt, labels, valid)
    for b in range(4):
        n = int(valid[b].sum())
        one = build_assigner(name, num_classes=5)(priors, scores[b:b + 1], boxes[b:b + 1],
                                                 gt[b:b + 1, :n], labels[b:b + 1, :n],
                                                 valid[b:b + 1, :n])
        assert torch.equal(out.gt_index[b], one.gt_index[0])
        torch.testing.assert_close(out.quality[b], one.quality[0])
        if name == "dw":
            torch.testing.assert_close(out.pos_weight[b, :n], one.pos_weight[0])
            assert (out.pos_weight[b, n:] == 0).all()
            torch.testing.assert_close(out.neg_weight[b], one.neg_weight[0])
        else:
            torch.testing.assert_close(out.align_target[b], one.align_target[0])


@pytest.mark.parametrize("name", ["dw", "tal"])
def test_padding_rows_never_assigned(name):
    priors, scores, boxes, gt, labels, valid = make_scene(4, B=2, G=8)
    valid[:, 4:] = False
    gt[:, 4:] = torch.tensor([0.0, 0.0, 128.0, 96.0])
    labels[:, 4:] = 2
    out = build_assigner(name, num_classes=5)(*(priors, scores, boxes, gt, labels, valid))
    assert (out.gt_index < 4).all()
    if name == "dw":
        assert (out.pos_weight[:, 4:] == 0).all()


# ------------------------------------------------------------------ hand-checked TAL
def tal_scene():
    # one level, stride 8, 64x64 input; box A (0,0,32,32), box B (16,16,48,48), both class 0.
    # Every prediction is (16,16,40,40): IoU with A = 256/1344 = 0.190476, with B = 576/1024
    # = 0.5625. Class-0 scores: (20,20) 0.9 [in A and B], (28,28) 0.6 [in A and B],
    # (12,12) 0.5 [in A], (44,44) 0.8 [in B], 0 elsewhere.
    priors = make_priors([(8, 8)], [8])
    A = priors.shape[0]
    scores = torch.zeros(1, A, 2)
    for (x, y), s in {(20, 20): 0.9, (28, 28): 0.6, (12, 12): 0.5, (44, 44): 0.8}.items():
        scores[0, prior_index(priors, x, y, 8), 0] = s
    boxes = torch.tensor([16.0, 16.0, 40.0, 40.0]).expand(1, A, 4).clone()
    gt = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 48.0, 48.0]]])
    return priors, scores, boxes, gt, torch.tensor([[0, 0]]), torch.tensor([[True, True]])


def prior_index(priors, x, y, stride):
    hit = (priors[:, 0] == x) & (priors[:, 1] == y) & (priors[:, 2] == stride)
    return int(torch.nonzero(hit)[0, 0])


def test_tal_hand_checked():
    # topk=2: A picks (20,20), (28,28); B picks (20,20), (44,44). (20,20) is contested: B has
    # the higher IoU and keeps it. align_target: A's only positive (28,28) -> A's IoU 0.190476;
    # B: (20,20) has B's largest metric -> 0.5625, (44,44) -> 0.8/0.9 * 0.5625 = 0.5.
    scene = tal_scene()
    priors = scene[0]
    out = build_assigner("tal", num_classes=2, topk=2)(*scene)
    p = {xy: prior_index(priors, *xy, 8) for xy in [(20, 20), (28, 28), (12, 12), (44, 44)]}
    assert out.gt_index[0, p[(20, 20)]] == 1
    assert out.gt_index[0, p[(28, 28)]] == 0
    assert out.gt_index[0, p[(44, 44)]] == 1
    assert out.gt_index[0, p[(12, 12)]] == -1
    assert out.pos_mask.sum() == 3
    # (the 1e-9 in t * IoU_max / (t_max + 1e-9) matters for A, whose t is only ~2.9e-5)
    iou_a, iou_b = 256 / 1344, 0.5625
    t_a, t_b = 0.6 * iou_a ** 6, 0.9 * iou_b ** 6
    expect = {(20, 20): t_b * iou_b / (t_b + 1e-9), (28, 28): t_a * iou_a / (t_a + 1e-9),
              (44, 44): 0.8 * iou_b ** 6 * iou_b / (t_b + 1e-9)}
    assert expect[(44, 44)] == pytest.approx(0.5, rel=1e-6)
    for xy, v in expect.items():
        assert out.align_target[0, p[xy]].item() == pytest.approx(v, rel=1e-5)
    assert out.quality[0, p[(28, 28)]].item() == pytest.approx(256 / 1344, rel=1e-6)
    assert out.labels[0, p[(20, 20)]] == 0


def test_tal_zero_metric_is_never_positive_and_rescue():
    # topk=1: both objects want (20,20); B keeps it, A ends with nothing. With
    # ensure_each_gt A gets (20,20) back (its only matched prior). Zero-score priors inside
    # the boxes never become positives even though topk has room.
    scene = tal_scene()
    p = prior_index(scene[0], 20, 20, 8)
    out = build_assigner("tal", num_classes=2, topk=1)(*scene)
    assert out.pos_mask.sum() == 1 and out.gt_index[0, p] == 1
    rescued = build_assigner("tal", num_classes=2, topk=1, ensure_each_gt=True)(*scene)
    assert rescued.gt_index[0, p] == 0 and rescued.pos_mask.sum() == 1
    assert rescued.quality[0, p].item() == pytest.approx(256 / 1344, rel=1e-6)
    wide = build_assigner("tal", num_classes=2, topk=13)(*scene)
    assert wide.pos_mask.sum() == 4  # only the four priors with a non-zero score


# ------------------------------------------------------------------ hand-checked DW
def test_dw_hand_checked_weights():
    # Box (0,0,16,16) on a 16x16 input, stride 8: the four priors (4|12, 4|12) are inside and
    # all sqrt(0.5) strides from the centre, so the centre prior cancels. Predictions are
    # (0,0,16,h) with h = 16, 12.96, 9.6, 4.8: IoU = GIoU = 1, 0.81, 0.6, 0.3. Class-1 scores
    # s = 0.2, 0.4, 0.6, 0.8. t = s * exp(-5 (1 - IoU));
    # w = e^{5t} t / sum e^{3t} t. P_neg: f = (1 - IoU^2)/0.75 = 0, 0.45853, 0.85333, 1.21333;
    # f_min 0, f_hi = min(1, f_max) = 1 -> P = 0, 0.45853, 0.85333 and 1 (IoU < 0.5).
    priors = make_priors([(2, 2)], [8])
    order = [prior_index(priors, x, y, 8) for x, y in [(4, 4), (12, 4), (4, 12), (12, 12)]]
    heights = [16.0, 12.96, 9.6, 4.8]
    s = [0.2, 0.4, 0.6, 0.8]
    boxes = torch.zeros(1, 4, 4)
    scores = torch.full((1, 4, 3), 0.5)
    for i, a in enumerate(order):
        boxes[0, a] = torch.tensor([0.0, 0.0, 16.0, heights[i]])
        scores[0, a, 1] = s[i]
    gt = torch.tensor([[[0.0, 0.0, 16.0, 16.0]]])
    out = build_assigner("dw", num_classes=3)(priors, scores, boxes, gt, torch.tensor([[1]]),
                                              torch.tensor([[True]]))
    ious = [1.0, 0.81, 0.6, 0.3]
    t = [si * math.exp(-5 * (1 - q)) for si, q in zip(s, ious)]
    den = sum(math.exp(3 * ti) * ti for ti in t)
    expect_w = [math.exp(5 * ti) * ti / den for ti in t]
    got_w = out.pos_weight[0, 0, order].tolist()
    assert got_w == pytest.approx(expect_w, rel=1e-4)
    p_neg = [0.0, (1 - 0.81 ** 2) / 0.75, (1 - 0.36) / 0.75, 1.0]
    assert out.neg_weight[0, order, 1].tolist() == pytest.approx(
        [p * si ** 2 for p, si in zip(p_neg, s)], abs=1e-6)
    # other classes: P_neg = 1 -> score^2
    assert out.neg_weight[0, order, 0].tolist() == pytest.approx([0.25] * 4)
    assert (out.gt_index == 0).all() and (out.labels == 1).all()
    assert out.quality[0, order].tolist() == pytest.approx(ious, rel=1e-5)


def test_dw_same_class_overlap_takes_min_p_neg():
    # A prior inside two boxes of the same class gets the smaller P_neg of the two; a box of
    # another class leaves this class alone. Prior (12,12), prediction = box 0 exactly:
    # IoU 1 with box 0 (2,2,22,22), whose other 8 candidates predict a far box (IoU 0), so
    # f_min = 0, f_hi = 1 and P_neg = 0 at the prior; IoU 280/840 = 1/3 with box 1 -> P_neg 1.
    priors = make_priors([(4, 4)], [8])
    A = priors.shape[0]
    a = prior_index(priors, 12, 12, 8)
    gt = torch.tensor([[[2.0, 2.0, 22.0, 22.0], [8.0, 0.0, 32.0, 30.0]]])
    boxes = torch.tensor([30.0, 30.0, 31.0, 31.0]).expand(1, A, 4).clone()
    boxes[0, a] = gt[0, 0]
    scores = torch.full((1, A, 2), 0.5)
    for labels, expected in (([0, 0], 0.0), ([0, 1], 0.0)):
        out = build_assigner("dw", num_classes=2)(priors, scores, boxes, gt, torch.tensor([labels]),
                                                  torch.tensor([[True, True]]))
        assert out.neg_weight[0, a, 0].item() == pytest.approx(expected, abs=1e-7)
    out = build_assigner("dw", num_classes=2)(priors, scores, boxes, gt, torch.tensor([[0, 1]]),
                                              torch.tensor([[True, True]]))
    assert out.neg_weight[0, a, 1].item() == pytest.approx(0.25)  # box 1: IoU < 0.5 -> P_neg 1


# ------------------------------------------------------------------ degenerate input
@pytest.mark.parametrize("name", ["dw", "tal"])
def test_degenerate_inputs_no_nan(name):
    priors = priors_for((64, 64))
    A = priors.shape[0]
    assigner = build_assigner(name, num_classes=3)
    scores = torch.rand(2, A, 3)
    out = assigner(priors, scores, torch.rand(2, A, 4), torch.zeros(2, 0, 4),
                   torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.bool))
    assert (out.gt_index == -1).all() and (out.quality == 0).all()
    if name == "dw":  # no objects: P_neg = 1 everywhere
        assert out.pos_weight.shape == (2, 0, A)
        assert torch.equal(out.neg_weight, scores * scores)
    gt = torch.tensor([[[10.0, 10.0, 10.0, 30.0], [5.0, 5.0, 5.0, 5.0],
                        [-50.0, -50.0, -10.0, -10.0], [0.0, 0.0, 64.0, 64.0]]]).repeat(2, 1, 1)
    valid = torch.tensor([[True, True, True, True], [False, False, False, False]])
    labels = torch.tensor([[0, 1, 2, 0]]).repeat(2, 1)
    whole_image = torch.tensor([0.0, 0.0, 64.0, 64.0]).expand(2, A, 4)
    for scores, boxes in ((torch.zeros(2, A, 3), torch.zeros(2, A, 4)),
                          (torch.ones(2, A, 3), whole_image)):
        out = assigner(priors, scores, boxes, gt, labels, valid)
        for field in (out.quality, out.pos_weight, out.neg_weight, out.align_target):
            if field is not None:
                assert torch.isfinite(field).all()
        assert set(out.gt_index[0].unique().tolist()) <= {-1, 3}
        assert (out.gt_index[1] == -1).all()


@pytest.mark.parametrize("name", ["dw", "tal"])
def test_autocast_float32_and_deterministic(name):
    scene = make_scene(8)
    assigner = build_assigner(name, num_classes=5)
    plain = assigner(*scene)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = assigner(*scene)
        half_in = assigner(scene[0], scene[1].bfloat16(), scene[2].bfloat16(), *scene[3:])
    for out in (mixed, half_in):
        assert out.quality.dtype == torch.float32
        for field in (out.pos_weight, out.neg_weight, out.align_target):
            assert field is None or field.dtype == torch.float32
    assert torch.equal(plain.gt_index, mixed.gt_index)
    assert torch.equal(plain.quality, mixed.quality)
    again = assigner(*scene)
    assert torch.equal(plain.gt_index, again.gt_index)
    for field in ("quality", "pos_weight", "neg_weight", "align_target"):
        a, b = getattr(plain, field), getattr(again, field)
        assert a is None or torch.equal(a, b)
