"""The shared assigner pieces against plain definitions (loops / full tensors) and by hand."""
from __future__ import annotations

import pytest
import torch

from densedet.assign import common
from densedet.boxes import box_iou, box_to_distance


def scene(seed=0, B=2, G=5, A=40, C=4):
    gen = torch.Generator().manual_seed(seed)
    points = torch.rand(A, 2, generator=gen) * 64
    # integer corners put some prior centres exactly on borders (strictness matters there)
    points[: A // 2] = points[: A // 2].round()
    xy = torch.rand(B, G, 2, generator=gen) * 64 - 8
    wh = torch.rand(B, G, 2, generator=gen) * 40
    gt = torch.cat([xy, xy + wh], -1).round()
    gt[0, 0, 2] = gt[0, 0, 0]  # zero width
    scores = torch.rand(B, A, C, generator=gen)
    labels = torch.randint(0, C, (B, G), generator=gen)
    return gen, points, gt, scores, labels


@pytest.mark.parametrize("eps", [0.0, 0.01, 2.0])
def test_points_in_boxes_matches_distance_definition(eps):
    _, points, gt, _, _ = scene()
    expected = box_to_distance(points[None, None], gt[:, :, None]).amin(-1) > eps
    assert torch.equal(common.points_in_boxes(points, gt, eps), expected)
    assert expected.any() and not expected.all()


def test_points_in_centre_region_loop():
    _, points, gt, _, _ = scene()
    radii = torch.rand(points.shape[0], generator=torch.Generator().manual_seed(1)) * 20
    radii[:5] = 8.0
    got = common.points_in_centre_region(points, radii, gt)
    got_clip = common.points_in_centre_region(points, radii, gt, clip_to_box=True)
    # the fused form agrees (integer corners and radii: no rounding at the borders)
    valid = torch.ones(gt.shape[:2], dtype=torch.bool)
    valid[0, -1] = False  # a padding row: both gaps +inf
    box_gap, centre_gap = common.box_and_centre_gaps(points.round(), radii.round(), gt, valid)
    assert torch.equal(box_gap < 0, common.points_in_boxes(points.round(), gt) & valid[..., None])
    assert torch.equal(centre_gap < 0, common.points_in_centre_region(points.round(), radii.round(), gt)
                       & valid[..., None])
    assert (box_gap[0, -1] == float("inf")).all() and (centre_gap[0, -1] == float("inf")).all()
    B, G, _ = gt.shape
    for b in range(B):
        for g in range(G):
            x1, y1, x2, y2 = gt[b, g].tolist()
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            for a, (px, py) in enumerate(points.tolist()):
                r = float(radii[a])
                inside = cx - r < px < cx + r and cy - r < py < cy + r
                assert bool(got[b, g, a]) == inside
                clipped = max(cx - r, x1) < px < min(cx + r, x2) and max(cy - r, y1) < py < min(cy + r, y2)
                assert bool(got_clip[b, g, a]) == clipped
    assert got.any() and got_clip.any()


def test_points_in_centre_region_hand():
    # box [0, 0, 10, 10], centre (5, 5), radius 2: x in (3, 7) exclusive
    pts = torch.tensor([[5.0, 5.0], [3.0, 5.0], [6.9, 6.9], [7.0, 5.0], [5.0, 8.0]])
    got = common.points_in_centre_region(pts, torch.full((5,), 2.0), torch.tensor([[[0.0, 0, 10, 10]]]))
    assert got[0, 0].tolist() == [True, False, True, False, False]


def test_pairwise_iou_chunked_equals_box_iou(monkeypatch):
    gen, _, gt, _, _ = scene(G=7)
    pred = torch.rand(2, 30, 4, generator=gen) * 64
    pred[..., 2:] += pred[..., :2]
    full = box_iou(gt, pred)
    monkeypatch.setattr(common, "IOU_CHUNK_ELEMENTS", 2 * 30 * 3)  # 3 objects per slice
    assert torch.equal(common.pairwise_iou(pred, gt), full)


def test_gather_gt_class_scores():
    _, _, _, scores, labels = scene()
    got = common.gather_gt_class_scores(scores, labels)
    for b in range(2):
        for g in range(labels.shape[1]):
            assert torch.equal(got[b, g], scores[b, :, labels[b, g]])


@pytest.mark.parametrize("cost_fn", [common.bce_cost, common.focal_cost])
@pytest.mark.parametrize("scalar", [True, False])
def test_split_class_cost_equals_full_sum(cost_fn, scalar):
    gen, _, _, scores, labels = scene()
    B, A, C = scores.shape
    G = labels.shape[1]
    target = 1.0 if scalar else torch.rand(B, G, A, generator=gen)
    got = common.split_class_cost(scores, labels, target, cost_fn)
    onehot = torch.nn.functional.one_hot(labels, C).float()[:, :, None]  # [B, G, 1, C]
    t = onehot * (target if scalar else target[..., None])
    expected = cost_fn(scores[:, None].expand(B, G, A, C), t).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_focal_cost_hand_and_finite():
    p = torch.tensor([0.5, 0.0, 1.0, 0.9])
    pos = common.focal_cost(p, 1.0)
    neg = common.focal_cost(p, 0.0)
    # 0.25 * 0.5^2 * log 2 and 0.75 * 0.5^2 * log 2
    torch.testing.assert_close(pos[0], torch.tensor(0.25 * 0.25 * 0.6931472))
    torch.testing.assert_close(neg[0], torch.tensor(0.75 * 0.25 * 0.6931472))
    assert torch.isfinite(pos).all() and torch.isfinite(neg).all()
    assert pos[2] == 0 and neg[1] == 0 and pos[1] == 25.0  # clamp at 100: 0.25 * 1 * 100


def loop_dynamic_k(cost, ious, cand, topk):
    B, G, A = cost.shape
    out = torch.zeros(B, G, A, dtype=torch.bool)
    for b in range(B):
        for g in range(G):
            idx = torch.nonzero(cand[b, g]).flatten()
            if len(idx) == 0:
                continue
            k = max(1, int(ious[b, g, idx].topk(min(topk, len(idx))).values.sum()))
            out[b, g, idx[cost[b, g, idx].argsort()[:k]]] = True
    return out


def taken_mask(sel, A):
    """[B, G, A] bool of a selection's taken pairs."""
    B, G, _ = sel.index.shape
    return torch.zeros(B, G, A, dtype=torch.bool).scatter_(-1, sel.index, sel.taken)


def dynamic_k(cost, ious, cand, topk):
    """select_dynamic_k on pre-masked inputs, as the assigners call it."""
    sel = common.select_dynamic_k(cost.masked_fill(~cand, float("inf")), ious * cand, topk)
    return taken_mask(sel, cost.shape[-1])


def loop_resolve(matched, cost, valid):
    """Per prior: taken once keeps its object, several times the cheapest valid object."""
    B, G, A = matched.shape
    out = torch.full((B, A), -1, dtype=torch.long)
    for b in range(B):
        for a in range(A):
            who = torch.nonzero(matched[b, :, a]).flatten()
            if len(who) == 1:
                out[b, a] = who[0]
            elif len(who) > 1:
                out[b, a] = cost[b, :, a].masked_fill(~valid[b], float("inf")).argmin()
    return out


def test_dynamic_k_loop():
    gen = torch.Generator().manual_seed(3)
    B, G, A = 2, 6, 50
    cost = torch.rand(B, G, A, generator=gen) * 10
    ious = torch.rand(B, G, A, generator=gen)
    cand = torch.rand(B, G, A, generator=gen) < 0.5
    cand[0, 0] = False  # no candidate: takes nothing
    cand[0, 1] = False
    cand[0, 1, 7] = True  # a single candidate: k = 1
    got = dynamic_k(cost, ious, cand, 10)
    assert torch.equal(got, loop_dynamic_k(cost, ious, cand, 10))
    assert got[0, 0].sum() == 0 and got[0, 1].tolist() == [a == 7 for a in range(A)]
    assert (got.sum(-1)[:, 2:] > 1).any()


def test_dynamic_k_hand():
    # IoUs 0.9, 0.8, 0.5 over candidates -> k = floor(2.2) = 2 -> the two cheapest: 3 and 0
    cost = torch.tensor([[[1.0, 5.0, 3.0, 0.5, 0.1]]])
    ious = torch.tensor([[[0.9, 0.8, 0.5, 0.0, 0.99]]])
    cand = torch.tensor([[[True, True, True, True, False]]])
    assert dynamic_k(cost, ious, cand, 10)[0, 0].tolist() == [True, False, False, True, False]


def test_select_cheapest_skips_inf():
    cost = torch.tensor([[[3.0, 1.0, float("inf"), 2.0], [float("inf")] * 4]])
    got = taken_mask(common.select_cheapest(cost, 3), 4)
    assert got.tolist() == [[[True, True, False, True], [False] * 4]]


def test_resolve_selection_hand():
    # prior 0: objects 0 and 1 -> cheaper over ALL valid objects is object 2 (it did not pick
    # it; the whole column counts), prior 1: only object 1, prior 2: nobody, prior 3: objects
    # 0 and 1 -> object 0; object 3 is padding and never wins despite cost 0.
    matched = torch.tensor([[[1, 0, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]]).bool()
    cost = torch.tensor([[[5.0, 9, 9, 1], [4, 2, 9, 2], [3, 9, 9, 9], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, True, True, False]])
    sel = common.Selection(torch.arange(4).expand(1, 4, 4), cost, matched)
    assert common.resolve_selection(sel, cost, valid).tolist() == [[2, 1, -1, 0]]
    assert loop_resolve(matched, cost, valid).tolist() == [[2, 1, -1, 0]]


def test_ensure_each_gt_hand():
    # after resolution object 0 owns nothing; its cheapest matched prior is 1 (cost 2) which
    # object 2 also lost and wants at cost 3: object 0 (cheaper) gets it; object 2 stays
    # without. Object 1 owns prior 0 already. Object 3 was never matched.
    matched = torch.tensor([[[1, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0]]]).bool()
    cost = torch.tensor([[[4.0, 2, 9], [1, 9, 9], [9, 3, 5], [0, 0, 0]]])
    gt_index = torch.tensor([[1, -1, -1]])
    got = common.ensure_each_gt(gt_index, matched, cost)
    assert got.tolist() == [[1, 0, -1]]


def test_build_assignment_and_empty():
    gt_index = torch.tensor([[1, -1, 0]])
    labels = torch.tensor([[7, 3]])
    ious = torch.tensor([[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]])
    out = common.build_assignment(gt_index, labels, ious)
    assert out.labels.tolist() == [[3, -1, 7]]
    torch.testing.assert_close(out.quality, torch.tensor([[0.4, 0.0, 0.3]]))
    empty = common.empty_assignment(2, 3, torch.device("cpu"))
    assert (empty.gt_index == -1).all() and (empty.quality == 0).all()


@pytest.mark.parametrize("G,n", [(6, 3), (12, 8)])  # G*n <= A (gathered columns) and > A
def test_selection_resolution_equals_loops(G, n):
    gen = torch.Generator().manual_seed(G)
    B, A = 3, 40
    cost = torch.rand(B, G, A, generator=gen) * 10
    cost[torch.rand(B, G, A, generator=gen) < 0.3] = float("inf")  # non-candidates
    valid = torch.rand(B, G, generator=gen) < 0.8
    cost.masked_fill_(~valid[..., None], float("inf"))
    k = torch.randint(1, n + 1, (B, G), generator=gen)
    sel = common.select_cheapest(cost, n, k)
    matched = taken_mask(sel, A)
    for b in range(B):  # each row takes its k cheapest finite entries
        for g in range(G):
            finite = torch.isfinite(cost[b, g])
            want = cost[b, g].argsort()[:min(int(k[b, g]), int(finite.sum()))]
            assert set(torch.nonzero(matched[b, g]).flatten().tolist()) == set(want.tolist())
    assert (matched.sum(1) > 1).any()  # conflicts exist
    resolved = common.resolve_selection(sel, cost, valid)
    assert torch.equal(resolved, loop_resolve(matched, cost, valid))
    assert torch.equal(common.rescue_lost(resolved, sel), common.ensure_each_gt(resolved, matched, cost))


@pytest.mark.parametrize("A", [8400, 8437, 3549])  # a multiple of the segment, and not
@pytest.mark.parametrize("largest", [True, False])
def test_row_topk_equals_topk(A, largest):
    gen = torch.Generator().manual_seed(A)
    x = torch.rand(4, 7, A, generator=gen)
    x[0, 0] = float("inf")  # all worst / all best
    x[0, 1] = -float("inf")
    x[1] = x[1].mul(8).floor()  # many ties
    x[2, :, :-3] = float("inf") if not largest else -float("inf")  # best entries at the end
    x[3, :, 3000:] = x[3, :, 3000:] * 0.01  # best entries in a few segments
    n = 13
    want_v, _ = x.topk(n, dim=-1, largest=largest)
    got_v, got_i = common.row_topk(x, n, largest)
    assert got_i.shape == (4, 7, n) and got_i.dtype == torch.long
    assert torch.equal(got_v, want_v)
    assert torch.equal(x.gather(-1, got_i), got_v)  # the indices hold those values
    finite = torch.isfinite(got_v)
    for row_i, row_f in zip(got_i.reshape(-1, n), finite.reshape(-1, n)):
        assert len(set(row_i[row_f].tolist())) == int(row_f.sum())  # no repeats among finite


def test_closed_form_backgrounds():
    from densedet.assign.dsl import soft_label_background, soft_label_correction, soft_label_cost
    p = torch.rand(2, 7, 5, generator=torch.Generator().manual_seed(4))
    p[0, 0, :2] = torch.tensor([0.0, 1.0])  # the clamped ends
    torch.testing.assert_close(common.bce_background(p), common.bce_cost(p, 0.0).sum(-1))
    torch.testing.assert_close(soft_label_background(p), soft_label_cost(p, 0.0).sum(-1))
    torch.testing.assert_close(common.bce_onehot_correction(p),
                               common.bce_cost(p, 1.0) - common.bce_cost(p, 0.0))
    t = torch.rand(2, 7, 5, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(soft_label_correction(p, t), soft_label_cost(p, t) - soft_label_cost(p, 0.0))
    assert common.bce_background(p)[0, 0] >= 100  # p = 1 costs the clamped 100, not inf


def test_log1m_is_the_bce_target_zero_term():
    p = torch.rand(1000, generator=torch.Generator().manual_seed(6))
    p[:2] = torch.tensor([0.0, 1.0])
    assert common.log1m(p)[1] == -common.INF and common.bce_cost(p, 0.0)[1] == 100.0
    p = p.clamp(max=0.999)  # log1m(1) = log1p(-1) = -inf
    torch.testing.assert_close(common.log1m(p), torch.log1p(-p), rtol=2.5e-7,
                               atol=6e-8 / (1 - p.max().item()))
    torch.testing.assert_close(common.bce_cost(p, 0.0), torch.nn.functional.binary_cross_entropy(
        p, torch.zeros_like(p), reduction="none"), rtol=1e-6, atol=1e-7)


def test_assigned_box_iou_is_the_pairwise_entry_bit_for_bit():
    gen = torch.Generator().manual_seed(7)
    B, G, A = 3, 6, 50
    corners = torch.rand(B, A, 2, 2, generator=gen) * 80
    pred = torch.cat([corners.amin(2), corners.amax(2)], -1)
    pred[0, 0] = torch.tensor([5.0, 5.0, 5.0, 9.0])  # zero area
    corners = torch.rand(B, G, 2, 2, generator=gen) * 80
    gt = torch.cat([corners.amin(2), corners.amax(2)], -1)
    gt_index = torch.randint(-1, G, (B, A), generator=gen)
    got = common.assigned_box_iou(pred, gt, gt_index)
    pairwise = box_iou(gt, pred).gather(1, gt_index.clamp(min=0)[:, None]).squeeze(1)
    assert torch.equal(got, torch.where(gt_index >= 0, pairwise, 0.0))
    assert common.assigned_box_iou(pred, gt[:, :0], gt_index.clamp(max=-1)).eq(0).all()


def test_running_arg_best_equals_one_reduction_over_all_objects():
    gen = torch.Generator().manual_seed(8)
    x = torch.rand(2, 11, 30, generator=gen).mul(4).floor()  # many ties
    for largest in (True, False):
        want_v, want_i = x.max(dim=1) if largest else x.min(dim=1)
        run = common.RunningArgBest((2, 30), largest, -common.INF if largest else common.INF,
                                    x.dtype, x.device)
        for part in common.object_chunks(2, 11, 30, max_pairs=3 * 2 * 30):
            v, i = x[:, part].max(dim=1) if largest else x[:, part].min(dim=1)
            run.update(v, i, part.start)
        assert torch.equal(run.value, want_v) and torch.equal(run.index, want_i)


def test_rescue_from_per_object_summaries_equals_ensure_each_gt():
    gen = torch.Generator().manual_seed(9)
    B, G, A = 2, 9, 12
    matched = torch.rand(B, G, A, generator=gen) < 0.3
    cost = torch.rand(B, G, A, generator=gen).mul(5).floor()  # ties
    gt_index = torch.randint(-1, G, (B, A), generator=gen)
    want = common.ensure_each_gt(gt_index, matched, cost)
    parts = [common.matched_summary(matched[:, p], cost[:, p])
             for p in common.object_chunks(B, G, A, max_pairs=2 * B * A)]
    got = common.rescue_matched(gt_index, *(torch.cat(t, dim=1) for t in zip(*parts)))
    assert torch.equal(got, want)


def test_workspace_shares_one_buffer_between_chunks():
    ws = common.Workspace()
    a = ws.get("x", (2, 5, 7), torch.float32, torch.device("cpu"), capacity=2 * 5 * 7)
    b = ws.get("x", (2, 3, 7), torch.float32, torch.device("cpu"), capacity=2 * 5 * 7)
    assert b.is_contiguous() and b.data_ptr() == a.data_ptr()
    c = ws.get("x", (2, 5, 8), torch.float32, torch.device("cpu"))  # another size: reallocated
    assert c.shape == (2, 5, 8) and len(ws._buffers) == 1


def test_per_prior_class_sum_on_candidates_only_is_the_same_float():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 500, 7, generator=gen)
    where = torch.rand(3, 500, generator=gen) < 0.2
    full = common.per_prior_class_sum(scores, common.bce_background)
    part = common.per_prior_class_sum(scores, common.bce_background, where=where)
    assert torch.equal(part[where], full[where])  # bit for bit where the caller reads
    assert (part[~where] == 0).all()
    # most priors wanted: everything is computed
    dense = torch.rand(3, 500, generator=gen) < 0.9
    assert torch.equal(common.per_prior_class_sum(scores, common.bce_background, where=dense), full)
