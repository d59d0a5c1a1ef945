"""NMS-free end-to-end detection (docs/end2end.md): the one-to-one assignment, the one-to-one
branch trained beside the head, the loss-weight schedule, NMS-free inference and its ONNX
export. Compared with straightforward implementations written here from the definitions."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from densedet.assign import ASSIGNERS, build_assigner, common
from densedet.assign.o2o import O2OAssigner
from densedet.assign.reference import run_per_image
from densedet.boxes import box_iou
from densedet.config import config_to_dict, load_config
from densedet.engine.build import build_detector, model_from_weights
from densedet.errors import DensedetError
from densedet.models import build_model
from densedet.models.detector import o2m_weight_at, topk_detections
from densedet.priors import feature_sizes, make_priors

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "yolox_nano.yaml"
C = 3
#: every one-to-many method with the parameter variants that change its metric
BASES = [("tal", {}), ("tal", {"topk": 3, "beta": 2.5}), ("simota", {}),
         ("simota", {"center_only": True, "center_radius": 1.5}), ("dsl", {}),
         ("dsl", {"soft_center_prior": True}), ("lla", {}), ("ota", {}), ("fcos", {}),
         ("atss", {}), ("dw", {}),
         # small-object widening (stal): the penalties' inside tests use the widened boxes
         ("simota", {"stal": True, "stal_small_side": 12.0, "stal_widen_to": 20.0}),
         ("lla", {"stal": True, "stal_small_side": 12.0, "stal_widen_to": 20.0}),
         ("ota", {"stal": True, "stal_small_side": 12.0, "stal_widen_to": 20.0})]


def scene(seed: int, B: int = 3, G: int = 14, classes: int = 4, hw=(64, 96)):
    """A padded batch with overlapping objects, a zero-width box, padding rows with garbage and
    (last image) no objects at all."""
    gen = torch.Generator().manual_seed(seed)
    strides = (8, 16, 32)
    priors = make_priors(feature_sizes(hw, strides), strides)
    A = priors.shape[0]
    H, W = hw
    wh = torch.exp(torch.empty(B, G, 2).uniform_(math.log(6.0), math.log(40.0), generator=gen))
    centre = torch.rand(B, G, 2, generator=gen) * torch.tensor([W + 10.0, H + 10.0]) - 5
    gt = torch.cat([centre - wh / 2, centre + wh / 2], dim=-1)
    gt[:, 0, 2] = gt[:, 0, 0]
    n_valid = torch.randint(G // 2, G + 1, (B,), generator=gen)
    n_valid[-1] = 0
    valid = torch.arange(G)[None] < n_valid[:, None]
    labels = torch.where(valid, torch.randint(0, classes, (B, G), generator=gen), -1)
    ltrb = torch.exp(torch.randn(B, A, 4, generator=gen) * 0.8) * priors[:, 2, None] * 1.5
    boxes = priors[:, :2].repeat(1, 2) + ltrb * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    scores = torch.rand(B, A, classes, generator=gen) * 0.98 + 0.01
    return (priors, scores, boxes, gt, labels, valid), classes


# ------------------------------------------------------------------ one-to-one assignment
def test_registered_and_picked_up_by_every_head():
    assert {"o2o", "tal_o2o"} <= set(ASSIGNERS)
    assert "o2o" in build_model("yolox", num_classes=3).head.compatible_assigners
    with pytest.raises(ValueError, match="already one-to-one"):
        build_assigner("o2o", 3, base="tal_o2o")


@pytest.mark.parametrize("base,params", BASES)
def test_one_prior_per_object_one_object_per_prior(base, params):
    for seed in range(3):
        args, K = scene(seed)
        o2m = build_assigner(base, K, **params)(*args)
        out = build_assigner("o2o", K, base=base, base_params=params)(*args)
        B, G = args[4].shape
        gi = out.gt_index
        for b in range(B):
            for g in range(G):
                mine = (gi[b] == g).nonzero().flatten()
                base_pos = (o2m.gt_index[b] == g).nonzero().flatten()
                if not args[5][b, g]:
                    assert len(mine) == 0  # padding never assigned
                    continue
                # exactly one prior when the base method gave the object any, else none,
                # and it is one of the base method's own positives of that object
                assert len(mine) == (1 if len(base_pos) else 0)
                assert set(mine.tolist()) <= set(base_pos.tolist())
        # a prior serves at most one object: gt_index holds one object per prior, and the
        # positives are a subset of the base method's (disjoint across objects)
        assert ((gi >= 0) <= (o2m.gt_index == gi)).all()
        assert torch.equal(out.labels[gi >= 0], o2m.labels[gi >= 0])
        assert (out.labels[gi < 0] == -1).all() and (out.quality[gi < 0] == 0).all()


@pytest.mark.parametrize("base,params", BASES)
def test_batched_equals_per_image_reference(base, params):
    """Batched (closed-form class sums, float64 at the [B, A] pairs) against the plain per-image
    reference (full class sums, object by object, on the base method's own reference)."""
    chosen_not_first = 0
    for seed in range(3):
        args, K = scene(seed)
        out = build_assigner("o2o", K, base=base, base_params=params)(*args)
        ref = run_per_image("o2o", *args, num_classes=K, base=base, base_params=params)
        assert torch.equal(out.gt_index, ref["gt_index"])
        assert torch.equal(out.labels, ref["labels"])
        torch.testing.assert_close(out.quality, ref["quality"], rtol=0, atol=1e-5)
        assert torch.equal(out.candidate_mask, ref["candidate_mask"].bool())
        if base == "fcos":
            torch.testing.assert_close(out.centerness, ref["centerness"], rtol=0, atol=1e-6)
        if base == "tal":
            torch.testing.assert_close(out.align_target, ref["align_target"], rtol=1e-4, atol=1e-6)
        # the metric decides: not merely each object's first (lowest-index) base positive
        o2m = build_assigner(base, K, **params)(*args)
        for b in range(out.gt_index.shape[0]):
            for g in out.gt_index[b][out.gt_index[b] >= 0].tolist():
                first = int((o2m.gt_index[b] == g).nonzero()[0])
                chosen_not_first += int(out.gt_index[b, first] != g)
    if base not in ("fcos",):  # fcos: its most central positive may be the first
        assert chosen_not_first > 0


def test_tal_o2o_is_yolo26_topk7_then_top1():
    """Against a dense [G, A] version of YOLO26's rule written here: TAL's top 7 by
    s * IoU**6 among in-box priors, a prior chosen twice goes to the higher IoU, then each
    object keeps its best metric among what it kept."""
    args, K = scene(4)
    priors, scores, boxes, gt, labels, valid = args
    out = build_assigner("tal_o2o", K)(*args)
    ref = run_per_image("tal_o2o", *args, num_classes=K)
    assert torch.equal(out.gt_index, ref["gt_index"])
    for b in range(gt.shape[0]):
        g_idx = valid[b].nonzero().flatten()
        if not len(g_idx):
            assert (out.gt_index[b] < 0).all()
            continue
        box = gt[b, g_idx]
        iou = box_iou(box, boxes[b])  # [g, A]
        x, y = priors[:, 0], priors[:, 1]
        inside = ((x[None] - box[:, :1] > 1e-9) & (y[None] - box[:, 1:2] > 1e-9)
                  & (box[:, 2:3] - x[None] > 1e-9) & (box[:, 3:4] - y[None] > 1e-9))
        metric = scores[b][:, labels[b, g_idx]].t() * iou ** 6 * inside
        kth = metric.topk(7, dim=1).values[:, -1:]
        chosen = (metric >= kth) & (metric > 0)
        owner_iou = torch.where(chosen, iou, -1.0)
        winner = owner_iou.argmax(0)  # first of the highest IoU
        kept = chosen & (torch.arange(len(g_idx))[:, None] == winner[None])
        expected = torch.full_like(out.gt_index[b], -1)
        for j in range(len(g_idx)):
            if kept[j].any():
                a = int(torch.where(kept[j], metric[j], -1.0).argmax())
                expected[a] = g_idx[j]
        assert torch.equal(out.gt_index[b], expected)


@pytest.mark.parametrize("name,params", [("o2o", {"base": "simota"}), ("tal_o2o", {})])
def test_chunks_and_blocks_do_not_change_it(name, params, monkeypatch):
    args, K = scene(7, B=2, G=25)
    whole = build_assigner(name, K, **params)(*args)
    A = args[0].shape[0]
    monkeypatch.setattr(common, "MAX_CHUNK_PAIRS", 4 * 2 * A)
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(common, "MIN_BLOCK_PRIORS", 1)
    assert torch.equal(whole.gt_index, build_assigner(name, K, **params)(*args).gt_index)


def test_no_objects_and_no_host_sync_shapes():
    args, K = scene(0)
    priors, scores, boxes, gt, labels, valid = args
    out = O2OAssigner(K, base="simota")(priors, scores, boxes, gt[:, :0], labels[:, :0], valid[:, :0])
    assert (out.gt_index == -1).all() and out.gt_index.shape == scores.shape[:2]


# ------------------------------------------------------------------ the one-to-one branch
TARGETS = {"gt_boxes": torch.tensor([[[4., 6., 30., 40.], [20., 20., 60., 58.]],
                                     [[10., 12., 50., 30.], [0., 0., 0., 0.]]]),
           "gt_labels": torch.tensor([[0, 2], [1, 0]]),
           "gt_valid": torch.tensor([[True, True], [True, False]])}
FAMILIES = [("yolox", {"size": "nano"}, "simota"), ("fcos", {"width": 32}, "fcos"),
            ("nanodet", {"feat_channels": 32, "aux_channels": 32}, "dsl"),
            ("lla", {"width": 32}, "lla")]


def e2e_model(family, kw, aname, detach=False, o2m_weight=(0.8, 0.1)):
    torch.manual_seed(0)
    return build_model(family, C, build_assigner(aname, C), end2end=True,
                       o2o_assigner=build_assigner("o2o", C, base=aname), o2m_weight=o2m_weight,
                       o2o_detach=detach, **kw)


@pytest.mark.parametrize("family,kw,aname", FAMILIES)
def test_training_step_reaches_both_branches(family, kw, aname):
    model = e2e_model(family, kw, aname)
    model.train()
    model.set_epoch(0, 10, False)
    raw = model(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    assert any(k.startswith("o2o_") for k in raw)
    out = model.loss(raw, TARGETS)
    assert torch.isfinite(out.total)
    assert any(k.startswith("o2o_") for k in out.terms) and sum(out.terms.values()) is not None
    # the one-to-one assignment: one prior per valid object (3 here)
    assert int(out.o2o_assignment.pos_mask.sum()) == 3
    assert int(out.assignment.pos_mask.sum()) >= 3
    out.total.backward()
    o2o = [p for n, p in model.named_parameters() if n.startswith("head.o2o.")]
    o2m = [p for n, p in model.named_parameters()
           if n.startswith("head.") and not n.startswith("head.o2o.") and not n.startswith("head.aux")]
    assert o2o and all(p.grad is not None and torch.isfinite(p.grad).all() for p in o2o)
    assert sum(float(p.grad.abs().sum()) for p in o2o) > 0
    assert sum(float(p.grad.abs().sum()) for p in o2m if p.grad is not None) > 0
    assert next(model.backbone.parameters()).grad.abs().sum() > 0


def test_loss_is_the_weighted_sum_of_the_two_branches():
    model = e2e_model("yolox", {"size": "nano"}, "simota")
    model.train()
    model.set_epoch(3, 7, False)
    w = 0.8 + (0.1 - 0.8) * 3 / 6
    assert model.head.o2m_weight == pytest.approx(w)
    raw = model(torch.rand(2, 3, 64, 64))
    out = model.loss(raw, TARGETS)
    # independently: each branch's own loss with its own assignment
    o2m_terms, _ = model.head.loss(raw, raw["priors"], out.assignment, TARGETS)
    view = {k[4:]: v for k, v in raw.items() if k.startswith("o2o_")}
    o2o_terms, _ = model.head.loss(view, raw["priors"], out.o2o_assignment, TARGETS)
    expected = w * sum(o2m_terms.values()) + (1 - w) * sum(o2o_terms.values())
    torch.testing.assert_close(out.total, expected)


def test_detached_branch_leaves_the_shared_layers_to_the_one_to_many_loss():
    model = e2e_model("yolox", {"size": "nano"}, "simota", detach=True)
    model.train()
    model.set_epoch(0, 10, False)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out = model.loss(model(x), TARGETS)
    out.total.backward()
    full = [p.grad.clone() for p in model.backbone.parameters()]
    o2o_grad = sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()
                   if n.startswith("head.o2o."))
    model.zero_grad()
    out = model.loss(model(x), TARGETS)
    sum(v for k, v in out.terms.items() if not k.startswith("o2o_")).backward()
    for a, p in zip(full, model.backbone.parameters()):
        torch.testing.assert_close(a, p.grad)
    assert o2o_grad > 0


@pytest.mark.parametrize("start,end,epochs", [(0.8, 0.1, 10), (0.5, 0.5, 3), (1.0, 0.0, 1)])
def test_o2m_weight_schedule(start, end, epochs):
    model = e2e_model("yolox", {"size": "nano"}, "simota", o2m_weight=(start, end))
    seen = []
    for e in range(epochs):
        note = model.set_epoch(e, epochs, no_aug=False)
        assert "o2m" in note
        seen.append(model.head.o2m_weight)
    expected = [start + (end - start) * e / max(epochs - 1, 1) for e in range(epochs)]
    assert seen == pytest.approx(expected)
    assert seen[0] == pytest.approx(start)
    if epochs > 1:
        assert seen[-1] == pytest.approx(end)
    assert o2m_weight_at(0.8, 0.1, 5, 11) == pytest.approx(0.45)
    assert o2m_weight_at(0.8, 0.1, 20, 11) == pytest.approx(0.1)  # past the end: held


def test_yolox_l1_switch_and_schedule_both_happen():
    model = e2e_model("yolox", {"size": "nano"}, "simota")
    note = model.set_epoch(9, 10, no_aug=True)
    assert "L1 loss on" in note and "o2m 0.100" in note and model.head.use_l1


def test_dw_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="soft pair weights.*yolox, fcos, nanodet, lla"):
        build_model("dw", C, end2end=True)
    cfg = load_config("dw_r18", ["model.end2end=true"])
    with pytest.raises(DensedetError, match="end2end"):
        build_detector(cfg, 3)


def test_config_builds_the_default_one_to_one_assigner():
    cfg = load_config(CONFIG, ["model.end2end=true", "assigner.params={center_radius: 1.5}",
                               "train.o2m_weight=[0.6,0.2]"])
    model = build_detector(cfg, 3)
    assert model.end2end and model.o2o_assigner.name == "o2o"
    assert model.o2o_assigner.base.name == "simota"
    assert model.o2o_assigner.base.center_radius == 1.5
    assert model.head.o2m_schedule == (0.6, 0.2)
    cfg = load_config(CONFIG, ["model.end2end=true", "assigner.o2o={name: tal_o2o, params: {topk: 5}}"])
    model = build_detector(cfg, 3)
    assert model.o2o_assigner.name == "tal_o2o" and model.o2o_assigner.base.topk == 5
    with pytest.raises(DensedetError, match="o2m_weight"):
        load_config(CONFIG, ["train.o2m_weight=[1.5,0.1]"])
    assert not build_detector(load_config(CONFIG), 3).end2end  # off by default


# ------------------------------------------------------------------------- inference
def naive_topk(scores, boxes, k, thresh):
    """Every (prior, class) pair sorted by score, the first k above the threshold."""
    out = []
    for s, b in zip(scores, boxes):
        pairs = [(float(s[a, c]), a, c) for a in range(s.shape[0]) for c in range(s.shape[1])]
        pairs.sort(key=lambda t: -t[0])
        out.append([(b[a].tolist(), sc, c) for sc, a, c in pairs[:k] if sc > thresh])
    return out


def test_postprocess_without_nms_is_topk_by_score():
    model = e2e_model("yolox", {"size": "nano"}, "simota").eval()
    raw = model(torch.rand(2, 3, 64, 64))
    A = raw["priors"].shape[0]
    # duplicates that NMS would merge: two priors with the same box and high scores
    gen = torch.Generator().manual_seed(0)
    raw["o2o_cls"] = torch.randn(2, A, C, generator=gen) * 3
    raw["o2o_reg"][:, 1] = raw["o2o_reg"][:, 0]
    raw["o2o_reg"][:, 1, :2] += torch.tensor([-0.5, 0.0])  # prior 1 points at prior 0's box
    raw["o2o_cls"][:, :2] = 8.0
    raw["o2o_obj"][:, :2] = 8.0
    dets = model.postprocess(raw, score_thresh=0.05, max_det=20)  # automatic: no NMS
    with torch.no_grad():
        scores, boxes = model.decode_branch(raw, "o2o")
    expected = naive_topk(scores, boxes, 20, 0.05)
    for d, e in zip(dets, expected):
        assert len(d.scores) == len(e)
        assert (d.scores[:-1] >= d.scores[1:]).all()  # sorted by score
        torch.testing.assert_close(d.scores, torch.tensor([t[1] for t in e]))
        # the duplicates both survive (NMS would keep one)
        assert int((box_iou(d.boxes[:1], d.boxes).squeeze(0) > 0.9).sum()) >= 2
        assert {tuple(map(round, t[0])) for t in e} == {tuple(map(round, b.tolist())) for b in d.boxes}
    # eval.nms=true: the one-to-many head with NMS
    nms = model.postprocess(raw, score_thresh=0.0, nms=True)
    o2m_scores, _ = model.decode_branch(raw, "o2m")
    assert all(float(d.scores.max()) <= float(o2m_scores.max()) + 1e-6 for d in nms if len(d.scores))
    assert model.inference_branch(None) == "o2o" and model.inference_branch(True) == "o2m"
    plain = build_model("yolox", C, size="nano")
    assert plain.inference_branch(None) == "o2m" and plain.inference_branch(False) == "o2m"


def test_topk_detections_pads_tiny_inputs():
    scores = torch.rand(1, 2, 3)
    out = topk_detections(scores, torch.rand(1, 2, 4), 10)
    assert out.shape == (1, 10, 6) and (out[0, 6:] == 0).all()
    assert torch.equal(out[0, :6, 4], scores.flatten().sort(descending=True).values)


def test_set_branch_computes_only_what_inference_reads():
    model = e2e_model("fcos", {"width": 32}, "fcos").eval()
    x = torch.rand(2, 3, 64, 64)
    assert model.set_branch(None) == "o2o"
    raw = model(x)
    assert all(k.startswith("o2o_") or k == "priors" for k in raw)
    assert model.set_branch(True) == "o2m"
    assert not any(k.startswith("o2o_") for k in model(x))
    model.head.eval_branches = "both"
    both = model(x)
    # the branches see the same features: at initialisation (copies) their outputs agree
    torch.testing.assert_close(both["o2o_cls_logits"], both["cls_logits"])


# ----------------------------------------------------------------------- checkpoints, CLI
@pytest.fixture(scope="module")
def e2e_weights(tmp_path_factory) -> Path:
    """An untrained end-to-end YOLOX-Nano checkpoint at 64 px (with a positive class bias)."""
    cfg = load_config(CONFIG, ["input_size=64", "model.end2end=true", "eval.max_det=30"])
    torch.manual_seed(0)
    model = build_detector(cfg, len(cfg.data.classes), with_assigner=False)
    for name, p in model.named_parameters():
        if name.endswith("bias") and ("cls" in name or "obj" in name):
            torch.nn.init.constant_(p, 2.0)
    # make the two branches differ, so that the branch choice is visible
    for p in model.head.o2o.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("e2e") / "best.pt"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg),
                "classes": cfg.data.classes}, path)
    return path


def test_weights_round_trip_with_the_branch(e2e_weights):
    model, cfg, _ = model_from_weights(e2e_weights)
    assert model.end2end and cfg.model.end2end
    stored = torch.load(e2e_weights, weights_only=False)["model"]
    assert any(k.startswith("head.o2o.") for k in stored)
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())


def test_export_has_no_nms_and_matches_pytorch(e2e_weights, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from densedet.cli import main

    out = tmp_path / "e2e.onnx"
    assert main(["export", "--weights", str(e2e_weights), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "detections [B, 30, 6]" in printed and "max abs difference" in printed
    graph = onnx.load(str(out)).graph
    ops = {n.op_type for n in graph.node}
    assert "NonMaxSuppression" not in ops and "TopK" in ops
    assert [o.name for o in graph.output] == ["detections"]
    dims = [d.dim_value or d.dim_param for d in graph.output[0].type.tensor_type.shape.dim]
    assert dims[1:] == [30, 6]
    # independently: a batch of 3 through onnxruntime against the PyTorch postprocess
    model, _, _ = model_from_weights(e2e_weights)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (dets,) = sess.run(["detections"], {"images": x.numpy()})
    assert dets.shape == (3, 30, 6)
    with torch.no_grad():
        ref = model.postprocess(model(x), score_thresh=0.0, max_det=30)
    for d, r in zip(torch.from_numpy(dets), ref):
        assert (d[:-1, 4] >= d[1:, 4]).all()
        torch.testing.assert_close(d[:, 4], r.scores, rtol=0, atol=1e-5)
        # rows are matched by (class, box) so that near-equal scores may swap places
        for row in d[d[:, 4] > d[-1, 4] + 1e-5]:
            same = (r.labels == int(row[5])) & ((r.boxes - row[:4]).abs().amax(-1) < 1e-3)
            assert same.any()


def test_export_of_the_one_to_many_head_with_eval_nms(e2e_weights, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from densedet.cli import main

    out = tmp_path / "o2m.onnx"
    assert main(["export", "--weights", str(e2e_weights), "--out", str(out), "eval.nms=true"]) == 0
    assert "outputs scores [B, A, 10]" in capsys.readouterr().out


def test_predict_and_eval_know_both_branches(e2e_weights, tmp_path):
    from densedet.data.synth import make_synth
    from densedet.engine import evaluate_model
    from densedet.predict import predict

    root = tmp_path / "synth"
    make_synth(root, images=4, size=64, seed=1, workers=1)
    images = sorted((root / "JPEGImages").glob("*.jpg"))[:2]
    auto = predict(str(e2e_weights), [str(p) for p in images], tmp_path / "p1", score_thresh=0.0,
                   draw=False)
    assert auto["branch"] == "o2o"
    assert all(len(r["detections"]) == 30 for r in auto["images"])  # top max_det, no NMS
    json.loads((tmp_path / "p1" / "detections.json").read_text())
    nms = predict(str(e2e_weights), [str(p) for p in images], tmp_path / "p2", score_thresh=0.0,
                  overrides=["eval.nms=true"], draw=False)
    assert nms["branch"] == "o2m"
    assert auto["images"][0]["detections"] != nms["images"][0]["detections"]
    # evaluation scores the branch eval.nms selects: the detections differ, so do the files
    dets = {}
    for nms in ("null", "true"):
        out = tmp_path / f"dets_{nms}.json"
        metrics = evaluate_model(None, e2e_weights, split="train", device="cpu",
                                 overrides=[f"data.root={root}", f"eval.nms={nms}"],
                                 detections_out=out)
        assert "AP" in metrics
        dets[nms] = json.loads(out.read_text())
    per_image = [sum(d["image_id"] == i for d in dets["null"]) for i in {d["image_id"] for d in dets["null"]}]
    assert max(per_image) == 30  # top max_det, no NMS
    assert dets["null"] != dets["true"]


def test_assign_viz_draws_the_one_to_one_panel(tmp_path):
    from densedet.data.synth import make_synth
    from densedet.viz import assign_viz

    root = tmp_path / "synth"
    make_synth(root, images=3, size=64, seed=2, workers=1)
    png, table = assign_viz(str(CONFIG), [f"data.root={root}", "input_size=64", "model.end2end=true"],
                            None, ["simota"], out=tmp_path / "v.png")
    assert "### simota" in table and "### one-to-one: o2o(simota)" in table
    assert png.stat().st_size > 5000
    # each object gets at most one one-to-one positive
    section = table.split("### one-to-one: o2o(simota)")[1]
    totals = [int(line.rsplit("|", 2)[1]) for line in section.splitlines()
              if line.startswith("| ") and line[2].isdigit()]
    assert totals and max(totals) <= 1


def test_shootout_reports_both_branches(e2e_weights, tmp_path):
    from densedet.data.synth import make_synth
    from densedet.shootout import assignment_stats, markdown_table, summarise

    root = tmp_path / "synth"
    make_synth(root, images=6, size=64, seed=4, workers=1)
    # the checkpoint's config points at data/synth: repoint it (a copy with the new root)
    ckpt = torch.load(e2e_weights, weights_only=False)
    ckpt["config"]["data"]["root"] = str(root)
    ckpt["config"]["data"]["val_split"] = "train"
    weights = tmp_path / "best.pt"
    torch.save(ckpt, weights)
    o2m = assignment_stats(weights, "simota", {})
    o2o = assignment_stats(weights, "simota", {}, o2o=True)
    # at most one positive per object (an untrained model's SimOTA gives k = 1 too)
    assert 0 < o2o["pos_per_object"] <= min(1.0, o2m["pos_per_object"])
    rows = [{"assigner": "simota", "seed": s, "AP": 0.2, "AP50": 0.5, "pos_per_object": 3.0,
             "objects_without_pos": 0.0, "assign_ms_per_iter": 1.0, "wall_s": 9.0,
             "AP_o2m_nms": 0.1, "AP50_o2m_nms": 0.4, "o2o_pos_per_object": o2o["pos_per_object"],
             "o2o_objects_without_pos": o2o["objects_without_pos"]} for s in (0, 1)]
    table = markdown_table(summarise(rows))
    assert "mAP50-95 o2m+NMS" in table and "| simota | 10.0 | 40.0 |" in table
