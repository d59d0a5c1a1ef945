"""OTA (optimal transport assignment): the batched assigner against the float64 per-image
reference, hand-checked cases, the Sinkhorn solver, degenerate inputs, padding, memory,
determinism, and one training step of the heads that accept it."""
from __future__ import annotations

import math

import pytest
import torch
from test_assign_dynamic import grid_case, make_scene, priors_for

from densedet.assign import build_assigner, ota
from densedet.assign.ota import LOG2_E, OTAAssigner, sinkhorn_prior_potentials
from densedet.assign.reference import run_per_image
from densedet.models import build_model

@pytest.fixture(autouse=True, params=["dense", "packed"])
def kernel_layout(request, monkeypatch):
    """Every test runs on both layouts of the kernel: dense (everyday GPU batches) and packed
    object rows (CPU, huge scenes)."""
    monkeypatch.setattr(ota, "use_packed_rows", lambda *shape: request.param == "packed")
    return request.param


def test_layout_choice_and_packed_rows_keep_no_dense_kernel(kernel_layout, monkeypatch):
    priors, scores, boxes, gt, labels, valid = make_scene(3)
    assigner = build_assigner("ota", num_classes=5)
    assigner(priors, scores, boxes, gt, labels, valid)
    kept = {name for name, _ in assigner._workspace._buffers}
    assert kept == ({"kernel", "ious", "scratch"} if kernel_layout == "dense" else set())
    monkeypatch.undo()
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert ota.use_packed_rows(cpu, 16, 20, 8400)
    assert not ota.use_packed_rows(gpu, 16, 20, 8400) and not ota.use_packed_rows(gpu, 2, 500, 8400)
    assert ota.use_packed_rows(gpu, 1, 5000, 8400)  # huge scenes on any device


def test_background_cost_does_not_change_the_plan():
    # a constant per prior (column) is absorbed by the prior potential
    priors, scores, boxes, gt, labels, valid = make_scene(5)
    G, A = gt.shape[1], priors.shape[0]
    cost = torch.rand(2, G + 1, A, dtype=torch.float64) * 3
    shift = torch.rand(2, 1, A, dtype=torch.float64) * 50
    log_mu = torch.rand(2, G + 1, dtype=torch.float64).add_(0.5).log2_()
    rows = torch.ones(2, G + 1, dtype=torch.bool)
    plans = []
    for c in (cost, cost + shift):
        k = -c * LOG2_E / 0.1
        g = sinkhorn_prior_potentials(k.clone(), log_mu, rows, rows, 30, torch.empty_like(k))
        x = k + g[:, None, :]
        plans.append(x - x.amax(dim=2, keepdim=True))
    torch.testing.assert_close(plans[0], plans[1], rtol=0, atol=1e-9)


PARAMS = [{}, {"candidate_topk": 5, "reg_weight": 3.0}, {"center_radius": 1.0},
          {"sinkhorn_eps": 0.5, "sinkhorn_iters": 7, "focal_alpha": 0.5, "focal_gamma": 1.0}]


def check_against_reference(params, scene, C):
    priors, scores, boxes, gt, labels, valid = scene
    out = build_assigner("ota", num_classes=C, **params)(priors, scores, boxes, gt, labels, valid)
    ref = run_per_image("ota", priors, scores, boxes, gt, labels, valid, C, **params)
    torch.testing.assert_close(out.gt_index, ref["gt_index"], rtol=0, atol=0)
    torch.testing.assert_close(out.labels, ref["labels"], rtol=0, atol=0)
    torch.testing.assert_close(out.quality, ref["quality"], rtol=0, atol=1e-5)
    assert torch.equal(out.candidate_mask, ref["candidate_mask"].bool())
    assert out.pos_weight is None and out.neg_weight is None
    # padding rows never win, images without objects stay background
    assert not (out.gt_index[~valid.any(1)] >= 0).any()
    won = out.gt_index.clamp(min=0)
    assert valid.gather(1, won)[out.gt_index >= 0].all()
    assert torch.isfinite(out.quality).all()
    return out


@pytest.mark.parametrize("ensure", [False, True])
@pytest.mark.parametrize("params", PARAMS)
def test_matches_reference_random_scenes(params, ensure):
    # make_scene: zero-area and tiny boxes, boxes partly outside the image, padding rows with
    # garbage labels, one image without objects
    for seed in range(3):
        out = check_against_reference({**params, "ensure_each_gt": ensure}, make_scene(seed), C=5)
        assert (out.gt_index >= 0).any()


@pytest.mark.parametrize("ensure", [False, True])
def test_matches_reference_crowd(ensure):
    # 120 objects on 189 priors: the objects ask for more units than there are priors, so the
    # background supplies nothing (its supply is clamped at 0)
    scene = make_scene(100, B=2, G=120, C=3, hw=(96, 96), crowd=True)
    out = check_against_reference({"ensure_each_gt": ensure}, scene, C=3)
    assert out.gt_index[0].unique().numel() > 20


def test_matches_reference_many_seeds():
    # float32 log-domain batched vs float64 penalty-form reference: no near-tie flips
    for seed in range(10, 16):
        check_against_reference({}, make_scene(seed, B=2, G=8, C=4), C=4)


def test_padded_batch_equals_image_by_image():
    priors, scores, boxes, gt, labels, valid = make_scene(3, B=3, G=10)
    assigner = build_assigner("ota", num_classes=5)
    batched = assigner(priors, scores, boxes, gt, labels, valid)
    for b in range(3):
        g = int(valid[b].sum())  # valid rows come first in make_scene
        one = assigner(priors, scores[b:b + 1], boxes[b:b + 1], gt[b:b + 1, :g],
                       labels[b:b + 1, :g], valid[b:b + 1, :g])
        assert torch.equal(one.gt_index, batched.gt_index[b:b + 1])
        assert torch.equal(one.quality, batched.quality[b:b + 1])


def test_hand_checked_grid():
    # one object over a 3x3 grid (see test_assign_dynamic.grid_case): every prior is inside
    # the box and the 2.5-stride square. k = floor(1 + 8 * 0.2708) = 3, background 6 units.
    # The transport sends the object's 3 units to the priors where (object cost - background
    # cost) is lowest, cost = focal(p, 1) + 1.5 * -log IoU vs focal(p, 0):
    #   centre (IoU 1, p 0.5): -0.09; p 0.9: 0.56; p 0.8: 1.19; next p 0.7: 1.52 (gap 0.34 >> eps)
    out = build_assigner("ota", num_classes=1)(*grid_case())
    assert torch.nonzero(out.gt_index[0] >= 0).flatten().tolist() == [0, 4, 7]
    assert out.labels[0].tolist() == [0, -1, -1, -1, 0, -1, -1, 0, -1]
    torch.testing.assert_close(out.quality[0, [0, 4, 7]], torch.tensor([156 / 576, 1.0, 156 / 576]))
    assert out.candidate_mask.all()


def two_object_scene():
    """Two well-separated objects on a 128 px image; priors inside an object's box predict it
    exactly with a high score on its class, all others predict a small box around themselves
    with low scores."""
    priors = priors_for((128, 128))
    A = priors.shape[0]
    gt = torch.tensor([[[8.0, 8.0, 56.0, 60.0], [70.0, 64.0, 124.0, 120.0]]])
    labels = torch.tensor([[2, 0]])
    valid = torch.tensor([[True, True]])
    xy = priors[:, :2]
    boxes = torch.cat([xy - priors[:, 2:3], xy + priors[:, 2:3]], dim=1)[None].clone()
    scores = torch.full((1, A, 3), 0.02)
    for g in range(2):
        x1, y1, x2, y2 = gt[0, g]
        inside = (xy[:, 0] > x1) & (xy[:, 0] < x2) & (xy[:, 1] > y1) & (xy[:, 1] < y2)
        boxes[0, inside] = gt[0, g]
        scores[0, inside, labels[0, g]] = 0.9
    return priors, scores, boxes, gt, labels, valid


def test_two_separated_objects_take_their_own_priors():
    scene = two_object_scene()
    priors, gt, labels = scene[0], scene[3], scene[4]
    out = build_assigner("ota", num_classes=3)(*scene)
    for g in range(2):
        mine = out.gt_index[0] == g
        assert mine.sum() >= 2  # k = floor(sum of 20 IoUs of 1) = 20 units, several priors
        x1, y1, x2, y2 = gt[0, g]
        xy = priors[mine, :2]
        assert ((xy[:, 0] > x1) & (xy[:, 0] < x2) & (xy[:, 1] > y1) & (xy[:, 1] < y2)).all()
        assert (out.labels[0, mine] == labels[0, g]).all()
        torch.testing.assert_close(out.quality[0, mine], torch.ones(int(mine.sum())))
    ref = run_per_image("ota", *scene, 3)
    assert torch.equal(out.gt_index, ref["gt_index"])


def test_duplicate_objects_and_ensure_each_gt():
    # two identical objects have identical rows: every tie goes to the lower index, so the
    # second owns nothing; with ensure_each_gt it takes its favourite prior back
    priors, scores, boxes, gt, labels, _ = two_object_scene()
    gt2, labels2 = gt[:, [0, 0, 1]], labels[:, [0, 0, 1]]
    valid2 = torch.ones(1, 3, dtype=torch.bool)
    plain = build_assigner("ota", num_classes=3)(priors, scores, boxes, gt2, labels2, valid2)
    fixed = build_assigner("ota", num_classes=3, ensure_each_gt=True)(
        priors, scores, boxes, gt2, labels2, valid2)
    assert (plain.gt_index[0] == 1).sum() == 0 and (plain.gt_index[0] == 0).sum() >= 2
    for g in range(3):
        assert (fixed.gt_index[0] == g).sum() >= 1
    for ensure in (False, True):
        ref = run_per_image("ota", priors, scores, boxes, gt2, labels2, valid2, 3,
                            ensure_each_gt=ensure)
        assert torch.equal((fixed if ensure else plain).gt_index, ref["gt_index"])


def test_ensure_each_gt_in_a_crowd():
    scene = make_scene(7, B=1, G=150, C=2, hw=(64, 64), crowd=True)
    plain = build_assigner("ota", num_classes=2)(*scene)
    fixed = build_assigner("ota", num_classes=2, ensure_each_gt=True)(*scene)
    n_plain = plain.gt_index[0][plain.gt_index[0] >= 0].unique().numel()
    n_fixed = fixed.gt_index[0][fixed.gt_index[0] >= 0].unique().numel()
    assert n_fixed > n_plain


def test_object_without_penalty_free_prior_still_supplies_its_unit():
    # a zero-area box (no prior strictly inside) is penalised at every prior; the penalty is
    # constant over its row, so it sends its one unit where it is cheapest (score 0.9)
    priors, scores, boxes, _, labels, valid = grid_case()
    for gt in ([5.0, 5.0, 5.0, 20.0], [-50.0, -50.0, -40.0, -40.0]):
        gt = torch.tensor([[gt]])
        out = build_assigner("ota", num_classes=1)(priors, scores, boxes, gt, labels, valid)
        assert out.gt_index[0].tolist() == [0] + [-1] * 8
        assert out.quality[0, 0] == 0.0 and not out.candidate_mask.any()
        ref = run_per_image("ota", priors, scores, boxes, gt, labels, valid, 1)
        assert torch.equal(out.gt_index, ref["gt_index"])


@pytest.mark.parametrize("G", [0, 3])
def test_empty_and_all_padding(G):
    priors = priors_for((32, 32))
    A = priors.shape[0]
    out = build_assigner("ota", num_classes=4)(
        priors, torch.rand(2, A, 4), torch.rand(2, A, 4) * 32, torch.rand(2, G, 4) * 32,
        torch.zeros(2, G, dtype=torch.long), torch.zeros(2, G, dtype=torch.bool))
    assert (out.gt_index == -1).all() and (out.labels == -1).all() and (out.quality == 0).all()
    assert out.quality.dtype == torch.float32 and out.gt_index.shape == (2, A)


def test_no_nan_on_degenerate_input():
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
    for params in PARAMS:
        for ensure in (False, True):
            out = build_assigner("ota", num_classes=3, ensure_each_gt=ensure, **params)(
                priors, scores, boxes, gt, labels, valid)
            assert torch.isfinite(out.quality).all()
            assert ((out.gt_index >= -1) & (out.gt_index < 3)).all()
            ref = run_per_image("ota", priors, scores, boxes, gt, labels, valid, 3,
                                ensure_each_gt=ensure, **params)
            assert torch.isfinite(ref["quality"]).all()


def test_float32_under_bf16_autocast_and_deterministic():
    scene = make_scene(5)
    assigner = build_assigner("ota", num_classes=5)
    plain = assigner(*scene)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = assigner(*scene)
    half = assigner(*(t.bfloat16() if t.is_floating_point() else t for t in scene))
    assert auto.quality.dtype == torch.float32 and half.quality.dtype == torch.float32
    assert torch.equal(auto.gt_index, plain.gt_index) and torch.equal(auto.quality, plain.quality)
    again = build_assigner("ota", num_classes=5)(*scene)  # fresh workspace
    assert torch.equal(again.gt_index, plain.gt_index) and torch.equal(again.quality, plain.quality)


def test_memory_is_pairs_not_pairs_times_classes():
    # G * C large: no op may see a tensor bigger than the inputs' [B, A, C] or the
    # [B, G + 1, A] kernel (a [B, G, A, C] tensor would be 30x both)
    B, G, C = 2, 30, 40
    priors, scores, boxes, gt, labels, valid = make_scene(1, B=B, G=G, C=C)
    A = priors.shape[0]
    assigner = build_assigner("ota", num_classes=C)
    with torch.profiler.profile(record_shapes=True) as prof:
        assigner(priors, scores, boxes, gt, labels, valid)
    biggest = max(math.prod(s) for e in prof.events() for s in (e.input_shapes or []) if s)
    assert biggest <= max(B * A * C, B * (G + 1) * A)
    # the scratch kept between calls: the kernel, its scratch and the IoUs
    assert all(t.numel() <= B * (G + 1) * A for t in assigner._workspace._buffers.values())


def test_sinkhorn_solves_the_transport_problem():
    # enough iterations: the plan 2**(K + f + g) has the prescribed row and column sums;
    # -inf entries carry nothing and a padding row stays empty
    gen = torch.Generator().manual_seed(0)
    B, R, A = 2, 5, 40
    cost = torch.rand(B, R, A, generator=gen) * 3
    kernel = -cost * LOG2_E / 0.1
    kernel[:, 1, ::3] = -math.inf
    kernel[1, 2] = -math.inf  # a padding row
    supply = torch.tensor([[3.0, 4.0, 2.0, 5.0, 26.0], [6.0, 2.0, 0.0, 7.0, 25.0]])
    row_valid = torch.tensor([[True] * 5, [True, True, False, True, True]])
    g = sinkhorn_prior_potentials(kernel, supply.add(1e-8).log2(), row_valid, row_valid, 500,
                                  torch.empty_like(kernel))
    k64, g64 = kernel.double(), g.double()
    f = (supply.double() + 1e-8).log2() - torch.logsumexp((k64 + g64[:, None]) / LOG2_E, 2) * LOG2_E
    f = f.masked_fill(~row_valid, -math.inf)
    plan = torch.exp2(k64 + f[..., None] + g64[:, None])
    ones = torch.ones(B, A, dtype=torch.float64)
    torch.testing.assert_close(plan.sum(1), ones, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plan.sum(2), supply.double(), rtol=1e-3, atol=1e-3)
    assert (plan[:, 1, ::3] == 0).all() and (plan[1, 2] == 0).all()


def test_parameters_validated_and_repr():
    with pytest.raises(ValueError):
        OTAAssigner(3, sinkhorn_iters=0)
    with pytest.raises(ValueError):
        OTAAssigner(3, sinkhorn_eps=0.0)
    with pytest.raises(TypeError, match="ota"):
        build_assigner("ota", num_classes=3, topk=9)
    r = repr(build_assigner("ota", num_classes=3))
    for key in ("candidate_topk=20", "reg_weight=1.5", "center_radius=2.5", "sinkhorn_eps=0.1",
                "sinkhorn_iters=50", "focal_alpha=0.25", "focal_gamma=2.0"):
        assert key in r


# ------------------------------------------------------------------- training with OTA
@pytest.fixture(scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("family,kw", [("yolox", {"size": "nano"}), ("nanodet", {"size": "m"}),
                                       ("fcos", {"width": 32}), ("lla", {"width": 32})])
def test_models_train_one_step_with_ota(family, kw):
    torch.manual_seed(0)
    C = 3
    model = build_model(family, C, build_assigner("ota", num_classes=C), **kw).train()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = {"gt_boxes": torch.tensor([[[6., 8., 50., 58.], [0., 0., 0., 0.]],
                                         [[20., 16., 62., 60.], [2., 30., 30., 62.]]]),
               "gt_labels": torch.tensor([[1, 0], [2, 0]]),
               "gt_valid": torch.tensor([[True, False], [True, True]])}
    out = model.loss(model(images), targets)
    assert torch.isfinite(out.total)
    assert (out.assignment.gt_index >= 0).any()
    assert not (out.assignment.gt_index[0] == 1).any()  # the padding row
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt.zero_grad()
    out.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
