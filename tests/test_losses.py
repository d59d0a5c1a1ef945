"""Each loss against its formula written out element by element with Python floats."""
import math

import pytest
import torch

from densedet import losses


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(x: float, y: float) -> float:
    p = sig(x)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, generator=g) * 2


def test_bce_with_logits(logits):
    y = torch.rand(5, 3, generator=torch.Generator().manual_seed(1))
    out = losses.bce_with_logits(logits, y)
    for i in range(5):
        for c in range(3):
            assert out[i, c].item() == pytest.approx(bce(logits[i, c].item(), y[i, c].item()), rel=1e-5)
    assert losses.bce_with_logits(logits, y, reduction="sum").item() == pytest.approx(out.sum().item(), rel=1e-6)


def test_sigmoid_focal_loss(logits):
    y = (torch.rand(5, 3, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    alpha, gamma = 0.25, 2.0
    out = losses.sigmoid_focal_loss(logits, y, alpha, gamma)
    for i in range(5):
        for c in range(3):
            p, t = sig(logits[i, c].item()), y[i, c].item()
            pt = p if t == 1 else 1 - p
            at = alpha if t == 1 else 1 - alpha
            assert out[i, c].item() == pytest.approx(-at * (1 - pt) ** gamma * math.log(pt), rel=1e-4)


def test_quality_focal_loss_sparse_and_dense(logits):
    label = torch.tensor([0, -1, 2, 1, -1])
    score = torch.tensor([0.9, 0.0, 0.3, 0.6, 0.0])
    beta = 2.0
    out = losses.quality_focal_loss(logits, label, score, beta)
    assert out.shape == (5, 3)
    for i in range(5):
        for c in range(3):
            y = score[i].item() if label[i].item() == c else 0.0
            x = logits[i, c].item()
            want = bce(x, y) * abs(y - sig(x)) ** beta
            assert out[i, c].item() == pytest.approx(want, rel=1e-4, abs=1e-7)
    dense = torch.zeros(5, 3)
    for i in range(5):
        if label[i] >= 0:
            dense[i, label[i]] = score[i]
    torch.testing.assert_close(losses.quality_focal_loss(logits, None, dense, beta), out)


def test_quality_focal_loss_zero_at_perfect_prediction():
    # A logit whose sigmoid equals the target gives no loss (the modulator vanishes).
    logit = torch.logit(torch.tensor([[0.7]]))
    assert losses.quality_focal_loss(logit, torch.tensor([0]), torch.tensor([0.7])).item() == pytest.approx(0, abs=1e-6)


def test_varifocal_loss(logits):
    label = torch.tensor([0, -1, 2, 1, -1])
    score = torch.tensor([0.9, 0.0, 0.3, 0.6, 0.0])
    alpha, gamma = 0.75, 2.0
    out = losses.varifocal_loss(logits, score, label, alpha, gamma)
    for i in range(5):
        for c in range(3):
            q = score[i].item() if label[i].item() == c else 0.0
            x = logits[i, c].item()
            w = q if q > 0 else alpha * sig(x) ** gamma
            assert out[i, c].item() == pytest.approx(bce(x, q) * w, rel=1e-4, abs=1e-7)


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (hull - union) / hull


@pytest.mark.parametrize("mode", ["iou", "giou", "iou_sq", "log_iou"])
def test_iou_loss(mode):
    pred = torch.tensor([[0., 0., 10., 10.], [5., 5., 15., 25.], [0., 0., 4., 4.]])
    target = torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 10.], [2., 1., 8., 9.]])
    out = losses.iou_loss(pred, target, mode)
    for i in range(3):
        iou, giou = _iou(pred[i].tolist(), target[i].tolist())
        want = {"iou": 1 - iou, "giou": 1 - giou, "iou_sq": 1 - iou ** 2, "log_iou": -math.log(iou)}[mode]
        assert out[i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_iou_loss_disjoint_boxes_finite():
    pred = torch.tensor([[0., 0., 1., 1.]], requires_grad=True)
    target = torch.tensor([[5., 5., 6., 6.]])
    for mode in ("iou", "giou", "iou_sq", "log_iou"):
        out = losses.iou_loss(pred, target, mode)
        assert torch.isfinite(out).all()
    # GIoU still pulls disjoint boxes together: its gradient is non-zero.
    losses.iou_loss(pred, target, "giou").sum().backward()
    assert pred.grad.abs().sum() > 0


def test_l1_loss():
    a, b = torch.tensor([1.0, -2.0, 3.5]), torch.tensor([0.0, 1.0, 3.5])
    torch.testing.assert_close(losses.l1_loss(a, b), torch.tensor([1.0, 3.0, 0.0]))
    assert losses.l1_loss(a, b, reduction="mean").item() == pytest.approx(4 / 3)


def test_distribution_focal_loss():
    reg_max = 7
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, reg_max + 1, generator=g)
    target = torch.tensor([0.0, 0.5, 3.25, 6.9, 7.0, 2.0])
    out = losses.distribution_focal_loss(logits, target, reg_max)
    for i in range(6):
        row = logits[i].tolist()
        z = sum(math.exp(v) for v in row)
        logp = [v - math.log(z) for v in row]
        y = min(target[i].item(), reg_max - 1e-4)
        left = int(math.floor(y))
        want = -((left + 1 - y) * logp[left] + (y - left) * logp[left + 1])
        assert out[i].item() == pytest.approx(want, rel=1e-4)


def test_distribution_focal_loss_minimised_by_two_bin_distribution():
    # The DFL optimum puts mass (yr - y, y - yl) on the neighbouring bins.
    target = torch.tensor([2.3])
    probs = torch.full((1, 8), 1e-6)
    probs[0, 2], probs[0, 3] = 0.7, 0.3
    best = losses.distribution_focal_loss(probs.log(), target, 7)
    probs2 = torch.full((1, 8), 1e-6)
    probs2[0, 2], probs2[0, 3] = 0.5, 0.5
    assert best < losses.distribution_focal_loss(probs2.log(), target, 7)


def test_half_inputs_give_float32():
    x = torch.randn(4, 3).half()
    assert losses.bce_with_logits(x, torch.zeros(4, 3)).dtype == torch.float32
    assert losses.quality_focal_loss(x, torch.tensor([0, 1, -1, 2]), torch.rand(4)).dtype == torch.float32
