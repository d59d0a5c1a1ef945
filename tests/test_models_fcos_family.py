"""FCOS, DW and LLA detectors: shapes, decoding, losses, DW box refinement (small CPU inputs)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou

from densedet.assign import Assignment, build_assigner
from densedet.losses import dw_loss
from densedet.models import build_model
from densedet.models.dw import DWHead
from densedet.assign.fcos import centerness_target
from densedet.models.fcos import FCOSHead, gather_assigned_boxes
from densedet.models.lla import LLAHead
from densedet.priors import feature_sizes, make_priors

C = 3
STRIDES = [8, 16, 32, 64, 128]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convs on a shared 2-core machine: OpenMP threads spinning against other processes
    cost 10-50x; one thread is fastest at these sizes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _targets(valid=True):
    gt_boxes = torch.tensor([[[6., 8., 50., 58.], [0., 0., 0., 0.]],
                             [[20., 16., 62., 60.], [2., 30., 30., 62.]]])
    gt_labels = torch.tensor([[1, 0], [2, 0]])
    gt_valid = torch.tensor([[True, False], [True, True]]) & valid
    return dict(gt_boxes=gt_boxes, gt_labels=gt_labels, gt_valid=gt_valid)


def _images(size=64, batch=2):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _num_priors(size):
    return sum(h * w for h, w in feature_sizes((size, size), STRIDES))


def _reg_params(model):
    """Parameters that only the box terms may train (regression conv, scales, refinement)."""
    head = model.head
    params = list(head.bbox_reg.parameters()) + list(head.scales.parameters())
    if getattr(head, "box_refine", False):
        params += list(head.refine_offset.parameters())
    return params


@pytest.mark.parametrize("family,quality_key", [("fcos", "centerness_logits"), ("dw", "centerness_logits"),
                                                 ("lla", "iou_logits")])
@pytest.mark.parametrize("size", ["r18", "r50"])
def test_forward_backward_shapes_and_grads(family, quality_key, size):
    torch.manual_seed(0)
    assigner = build_assigner(family, num_classes=C)
    model = build_model(family, C, assigner, size=size, width=32)
    raw = model(_images())
    A = _num_priors(64)
    assert raw["cls_logits"].shape == (2, A, C)
    assert raw["distances"].shape == (2, A, 4)
    assert raw[quality_key].shape == (2, A)
    assert raw["priors"].shape == (A, 4)
    assert (raw["distances"] >= 0).all()
    out = model.loss(raw, _targets())
    assert torch.isfinite(out.total) and out.total > 0
    assert out.num_pos > 0
    assert set(out.terms) == {"fcos": {"cls", "box", "centerness"}, "dw": {"pos_cls", "box", "neg_cls"},
                              "lla": {"cls", "box", "iou"}}[family]
    out.total.backward()
    head_grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in head_grads)
    assert model.head.bbox_reg.weight.grad.abs().sum() > 0
    assert any(scale.scale.grad != 0 for scale in model.head.scales)  # levels without positives: 0
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0
    # inference runs and returns boxes in the image frame
    model.eval()
    with torch.no_grad():
        dets = model.postprocess(model(_images()), score_thresh=0.0, max_det=5)
    assert len(dets) == 2 and dets[0].boxes.shape[-1] == 4 and len(dets[0].scores) <= 5


def test_build_refuses_incompatible_assigner_and_unknown_size():
    with pytest.raises(ValueError, match="cannot train"):
        build_model("dw", C, build_assigner("atss", num_classes=C), width=32)
    with pytest.raises(ValueError, match="unknown size"):
        build_model("fcos", C, None, size="r101")


def test_head_forward_distances_are_relu_scale_times_stride():
    """A zeroed regression conv with bias b gives distances relu(scale_l·b)·stride_l."""
    head = FCOSHead(C, width=64, strides=STRIDES)  # 2 channels per GroupNorm group: 1x1 maps are fine
    with torch.no_grad():
        head.bbox_reg.weight.zero_()
        head.bbox_reg.bias.copy_(torch.tensor([1.5, 0.5, 2.0, -1.0]))
        head.scales[2].scale.fill_(2.0)
    sizes = [(4, 4), (2, 2), (1, 1), (1, 1), (1, 1)]
    raw = head([torch.randn(1, 64, h, w) for h, w in sizes])
    priors = make_priors(sizes, STRIDES, 0.5)
    stride = priors[:, 2:3]
    scale = torch.ones(len(priors), 1)
    scale[16 + 4] = 2.0  # the single prior of level 2
    expected = (scale * torch.tensor([1.5, 0.5, 2.0, -1.0])).clamp(min=0) * stride
    torch.testing.assert_close(raw["distances"][0], expected)
    _, boxes = head.decode(raw, priors)
    torch.testing.assert_close(boxes[0], torch.cat([priors[:, :2] - expected[:, :2],
                                                    priors[:, :2] + expected[:, 2:]], dim=1))


@pytest.mark.parametrize("family", ["fcos", "dw", "lla"])
def test_decode_and_postprocess_round_trip(family):
    """A crafted head output with one confident prior -> exactly its box, class and score."""
    model = build_model(family, C, None, width=32).eval()
    priors = make_priors(feature_sizes((64, 64), STRIDES), STRIDES, model.prior_offset)
    A = len(priors)
    k = 10  # level 0, row 1, column 2: centre (20, 12)
    assert priors[k, :2].tolist() == [20.0, 12.0]
    cls = torch.full((1, A, C), -20.0)
    cls[0, k, 2] = 0.0  # sigmoid = 0.5
    qual = torch.full((1, A), 20.0)
    qual[0, k] = math.log(0.8 / 0.2)  # sigmoid = 0.8
    dist = torch.full((1, A, 4), 4.0)
    dist[0, k] = torch.tensor([5.0, 6.0, 7.0, 8.0])
    raw = {"cls_logits": cls, "distances": dist, model.head.quality_key: qual, "priors": priors}
    dets = model.postprocess(raw, score_thresh=0.05)[0]
    assert len(dets.boxes) == 1
    torch.testing.assert_close(dets.boxes[0], torch.tensor([15.0, 6.0, 27.0, 20.0]))
    assert dets.labels.tolist() == [2]
    expected = math.sqrt(0.5 * 0.8) if family == "lla" else 0.5 * 0.8
    assert dets.scores[0].item() == pytest.approx(expected, rel=1e-5)
    # what the assigner sees: FCOS the classifier alone, DW/LLA the inference score
    scores, boxes = model.head.assigner_inputs(raw, priors)
    expected_assign = 0.5 if family == "fcos" else expected
    assert scores[0, k, 2].item() == pytest.approx(expected_assign, rel=1e-5)
    assert not scores.requires_grad and boxes[0, k].tolist() == [15.0, 6.0, 27.0, 20.0]


@pytest.mark.parametrize("family", ["fcos", "dw", "lla"])
@pytest.mark.parametrize("num_gt", [0, 2])
def test_no_positive_batch_has_finite_loss_and_zero_box_grads(family, num_gt):
    torch.manual_seed(0)
    model = build_model(family, C, build_assigner(family, num_classes=C), width=32)
    t = _targets(valid=False)
    t = {k: v[:, :num_gt] for k, v in t.items()}
    out = model.loss(model(_images()), t)
    assert out.num_pos == 0
    assert all(torch.isfinite(v) for v in out.terms.values())
    assert out.terms["box"] == 0
    out.total.backward()
    for p in _reg_params(model):
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p.grad))
    assert model.head.cls_logits.weight.grad.abs().sum() > 0


def test_fcos_loss_values_on_a_hand_made_assignment():
    """One positive: focal / 1, GIoU loss (centerness weight cancels), centerness BCE / 1."""
    head = FCOSHead(C, width=8)
    priors = torch.tensor([[20., 20., 8., 8.], [30., 20., 8., 8.]])
    raw = {"cls_logits": torch.tensor([[[0.3, -1.0, 2.0], [-2.0, 0.5, 0.0]]]),
           "distances": torch.tensor([[[10., 8., 12., 6.], [3., 3., 3., 3.]]]),
           "centerness_logits": torch.tensor([[0.2, -0.4]])}
    gt = torch.tensor([[[8., 10., 34., 30.]]])
    targets = dict(gt_boxes=gt, gt_labels=torch.tensor([[1]]), gt_valid=torch.tensor([[True]]))
    asg = Assignment(gt_index=torch.tensor([[0, -1]]), labels=torch.tensor([[1, -1]]),
                     quality=torch.zeros(1, 2))
    terms, num_pos = head.loss(raw, priors, asg, targets)
    assert num_pos == 1
    onehot = torch.tensor([[[0., 1., 0.], [0., 0., 0.]]])
    p = raw["cls_logits"].sigmoid()
    pt = torch.where(onehot > 0, p, 1 - p)
    at = torch.where(onehot > 0, 0.25, 0.75)
    torch.testing.assert_close(terms["cls"], (-at * (1 - pt) ** 2 * pt.log()).sum())
    pred = torch.tensor([[10., 12., 32., 26.]])
    torch.testing.assert_close(terms["box"], 1 - generalized_box_iou(pred, gt[0])[0, 0])
    # prior (20, 20) in the gt box: ltrb = (12, 10, 14, 10)
    ctr = math.sqrt(12 / 14 * 10 / 10)
    torch.testing.assert_close(terms["centerness"],
                               F.binary_cross_entropy_with_logits(torch.tensor(0.2), torch.tensor(ctr)))
    # the computed centerness target agrees with the formula; 0 outside the box
    torch.testing.assert_close(centerness_target(priors[:, :2], gt.expand(1, 2, 4)),
                               torch.tensor([[ctr, math.sqrt(4 / 22 * 10 / 10)]]))
    assert centerness_target(torch.tensor([[40., 20.]]), gt)[0, 0] == 0


def test_fcos_centerness_from_assigner_matches_computed_target():
    torch.manual_seed(0)
    model = build_model("fcos", C, build_assigner("fcos", num_classes=C), width=32)
    raw = model(_images())
    asg = model.assign(raw, _targets())
    assert asg.centerness is not None and asg.pos_mask.any()
    assigned = gather_assigned_boxes(_targets()["gt_boxes"], asg.gt_index)
    mine = centerness_target(raw["priors"][:, :2], assigned)
    torch.testing.assert_close(mine[asg.pos_mask], asg.centerness[asg.pos_mask], atol=1e-5, rtol=1e-5)


def test_lla_loss_values_on_a_hand_made_assignment():
    head = LLAHead(C, width=8, box_loss="log_iou")
    priors = torch.tensor([[20., 20., 8., 8.], [36., 20., 8., 8.]])
    raw = {"cls_logits": torch.tensor([[[0.3, -1.0, 2.0], [-2.0, 0.5, 0.0]]]),
           "distances": torch.tensor([[[10., 8., 12., 6.], [3., 3., 3., 3.]]]),
           "iou_logits": torch.tensor([[0.2, -0.4]])}
    gt = torch.tensor([[[8., 10., 34., 30.]]])
    targets = dict(gt_boxes=gt, gt_labels=torch.tensor([[1]]), gt_valid=torch.tensor([[True]]))
    asg = Assignment(gt_index=torch.tensor([[0, -1]]), labels=torch.tensor([[1, -1]]),
                     quality=torch.zeros(1, 2))
    terms, num_pos = head.loss(raw, priors, asg, targets)
    iou = (22 * 14) / (26 * 20)  # pred (10,12,32,26) inside gt (8,10,34,30)
    torch.testing.assert_close(terms["box"], torch.tensor(-2 * math.log(iou)))
    torch.testing.assert_close(terms["iou"], 0.5 * F.binary_cross_entropy_with_logits(
        torch.tensor(0.2), torch.tensor(iou)))


@pytest.mark.parametrize("family,assigners", [("fcos", ["fcos", "atss", "simota", "tal"]),
                                              ("lla", ["lla", "simota", "dsl", "fcos"])])
def test_fcos_and_lla_train_with_several_assigners(family, assigners):
    torch.manual_seed(0)
    model = build_model(family, C, None, width=32)
    for name in assigners:
        model.assigner = build_assigner(name, num_classes=C)
        model.zero_grad()
        out = model.loss(model(_images()), _targets())
        assert out.num_pos > 0, name
        assert torch.isfinite(out.total), name
        out.total.backward()
        assert model.head.bbox_reg.weight.grad.abs().sum() > 0, name


# --- DW ---------------------------------------------------------------------------------------

def _dw_loss_loop(cls, obj, boxes, gt_boxes, gt_labels, gt_valid, pos_w, p_neg):
    """DW's loss written per prior from the formula (the reference for :func:`dw_loss`)."""
    B, A, Cc = cls.shape
    pos = box = neg = norm = 0.0
    n_obj = 0
    for b in range(B):
        for g in range(gt_boxes.shape[1]):
            if not gt_valid[b, g]:
                continue
            n_obj += 1
            for a in range(A):
                s = torch.sigmoid(cls[b, a, gt_labels[b, g]]) * torch.sigmoid(obj[b, a])
                pos = pos - pos_w[b, g, a] * torch.log(s)
                giou = generalized_box_iou(boxes[b, a][None], gt_boxes[b, g][None])[0, 0]
                box = box + pos_w[b, g, a] * (1 - giou)
        for a in range(A):
            for c in range(Cc):
                s = torch.sigmoid(cls[b, a, c]) * torch.sigmoid(obj[b, a])
                neg = neg - p_neg[b, a, c] * s ** 2 * torch.log(1 - s)
                norm = norm + (1 - p_neg[b, a, c])
    n = max(n_obj, 1)
    return {"pos_cls": 0.25 * pos / n, "box": 1.25 * box / n, "neg_cls": neg / max(norm, 1.0)}


def _dw_inputs(seed=0, B=2, A=7, G=3):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(B, A, C, generator=g, dtype=torch.float64) * 2
    obj = torch.randn(B, A, generator=g, dtype=torch.float64)
    xy = torch.rand(B, A, 2, generator=g, dtype=torch.float64) * 40
    boxes = torch.cat([xy, xy + 5 + torch.rand(B, A, 2, generator=g, dtype=torch.float64) * 30], -1)
    gxy = torch.rand(B, G, 2, generator=g, dtype=torch.float64) * 40
    gt_boxes = torch.cat([gxy, gxy + 10 + torch.rand(B, G, 2, generator=g, dtype=torch.float64) * 30], -1)
    gt_labels = torch.randint(0, C, (B, G), generator=g)
    gt_valid = torch.tensor([[True, True, False], [True, False, False]])
    pos_w = torch.rand(B, G, A, generator=g, dtype=torch.float64) * (torch.rand(B, G, A, generator=g) > 0.4)
    p_neg = torch.where(torch.rand(B, A, C, generator=g) > 0.7,
                        torch.rand(B, A, C, generator=g, dtype=torch.float64),
                        torch.ones(B, A, C, dtype=torch.float64))
    return cls, obj, boxes, gt_boxes, gt_labels, gt_valid, pos_w, p_neg


def test_dw_loss_matches_per_prior_loop_values_and_gradients():
    inputs = _dw_inputs()
    cls, obj, boxes = (t.clone().requires_grad_() for t in inputs[:3])
    terms, n_obj = dw_loss(cls, obj, boxes, *inputs[3:])
    assert n_obj == 3
    cls2, obj2, boxes2 = (t.clone().requires_grad_() for t in inputs[:3])
    ref = _dw_loss_loop(cls2, obj2, boxes2, *inputs[3:])
    for k in ref:
        torch.testing.assert_close(terms[k].double(), ref[k].double(), rtol=1e-5, atol=1e-6)
    sum(terms.values()).backward()
    sum(ref.values()).backward()
    for mine, theirs in [(cls, cls2), (obj, obj2), (boxes, boxes2)]:
        torch.testing.assert_close(mine.grad.double(), theirs.grad.double(), rtol=1e-4, atol=1e-6)
    # the modulating s² is differentiated (official code), unlike a detached weight
    assert not torch.allclose(cls.grad, torch.zeros_like(cls.grad))


def test_dw_head_loss_recovers_p_neg_from_neg_weight():
    """The head turns the assigner's neg_weight = P·s² back into P (module docstring)."""
    cls, obj, boxes, gt_boxes, gt_labels, gt_valid, pos_w, p_neg = (
        t.float() if t.is_floating_point() else t for t in _dw_inputs(seed=1))
    head = DWHead(C, width=8, box_refine=False)
    priors = torch.cat([torch.zeros(7, 2), torch.full((7, 2), 8.0)], 1)
    raw = {"cls_logits": cls, "centerness_logits": obj, "distances": torch.cat(
        [-boxes[..., :2], boxes[..., 2:]], -1)}  # prior centre (0, 0): ltrb = (-x1, -y1, x2, y2)
    torch.testing.assert_close(head.boxes(raw, priors), boxes)
    s = cls.sigmoid() * obj.sigmoid()[..., None]
    asg = Assignment(gt_index=torch.full((2, 7), -1), labels=torch.full((2, 7), -1),
                     quality=torch.zeros(2, 7), pos_weight=pos_w, neg_weight=p_neg * s ** 2)
    targets = dict(gt_boxes=gt_boxes, gt_labels=gt_labels, gt_valid=gt_valid)
    terms, n_obj = head.loss(raw, priors, asg, targets)
    ref, _ = dw_loss(cls, obj, boxes, gt_boxes, gt_labels, gt_valid, pos_w, p_neg)
    for k in ref:
        torch.testing.assert_close(terms[k], ref[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="pos_weight"):
        head.loss(raw, priors, Assignment(asg.gt_index, asg.labels, asg.quality), targets)


def test_dw_refinement_reads_each_side_at_its_boundary_point():
    """With zero learned offsets, x1 is re-read at (row, col - l/stride), y1 at (row - t/stride, col),
    x2 at (row, col + r/stride), y2 at (row + b/stride, col), clamped into the map."""
    torch.manual_seed(0)
    head = DWHead(C, width=8, box_refine=True)
    with torch.no_grad():
        head.refine_offset.weight.zero_()
    H = W = 6
    s = 8
    cells = torch.randint(0, 4, (1, 4, H, W)).float()
    refined = head.refine(cells * s, torch.randn(1, 8, H, W), s)
    iy, ix = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    px, py = (ix + 0.5) * s, (iy + 0.5) * s
    l, t, r, b = cells[0]
    x1 = px - l * s
    y1 = py - t * s
    x2 = px + r * s
    y2 = py + b * s
    cl = lambda v, n: v.long().clamp(0, n - 1)  # noqa: E731
    exp_x1 = x1[iy, cl(ix - l, W)]
    exp_y1 = y1[cl(iy - t, H), ix]
    exp_x2 = x2[iy, cl(ix + r, W)]
    exp_y2 = y2[cl(iy + b, H), ix]
    expected = torch.stack([px - exp_x1, py - exp_y1, exp_x2 - px, exp_y2 - py]).clamp(min=0)
    torch.testing.assert_close(refined[0], expected)


def test_dw_refinement_changes_boxes_and_trains_offsets():
    torch.manual_seed(0)
    model = build_model("dw", C, build_assigner("dw", num_classes=C), width=32)
    with torch.no_grad():
        model.head.refine_offset.weight.normal_(std=0.5)
    raw = model(_images())
    assert raw["coarse_distances"].shape == raw["distances"].shape
    assert (raw["distances"] - raw["coarse_distances"]).abs().max() > 1.0
    out = model.loss(raw, _targets())
    out.total.backward()
    assert model.head.refine_offset.weight.grad.abs().sum() > 0
    # without refinement the coarse distances are the output
    plain = build_model("dw", C, None, width=32, box_refine=False)
    assert "coarse_distances" not in plain(_images())
