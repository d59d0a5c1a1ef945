"""Assignment pictures (assign-viz) and the assigner shoot-out, end to end on tiny data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from densedet.assign import ASSIGNERS, build_assigner
from densedet.cli import main
from densedet.priors import level_ids, priors_for_input
from densedet.viz import (assignment_table, positives_per_level, run_assigners,
                          standin_predictions)

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "yolox_nano.yaml")
TINY = ["input_size=64", "data.num_workers=0", "train.batch_size=2", "train.warmup_epochs=0",
        "train.no_aug_epochs=0", "train.eval_interval=1", "train.log_interval=1",
        "augment.mosaic_prob=0.0", "train.checkpoint_interval=0"]


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory) -> Path:
    """8 synthetic images at 64 px, plus one image whose annotation has no objects."""
    from densedet.data.synth import make_synth

    root = tmp_path_factory.mktemp("synth")
    make_synth(root, images=8, size=64, seed=3, workers=1)
    # an image with no objects: copy one picture, annotate it empty
    src = root / "JPEGImages" / "000001.jpg"
    (root / "JPEGImages" / "empty01.jpg").write_bytes(src.read_bytes())
    (root / "Annotations" / "empty01.xml").write_text(
        "<annotation><filename>empty01.jpg</filename>"
        "<size><width>64</width><height>64</height><depth>3</depth></size></annotation>")
    return root


def test_standin_predictions_follow_the_objects():
    priors, sizes = priors_for_input((64, 64), [8, 16, 32])
    gt = torch.tensor([[[8.0, 8.0, 40.0, 40.0]]])
    scores, boxes = standin_predictions(priors, gt, torch.tensor([[2]]), torch.tensor([[True]]), 3)
    inside = ((priors[:, 0] > 8) & (priors[:, 0] < 40) & (priors[:, 1] > 8) & (priors[:, 1] < 40))
    # priors inside the object score its class above the background score and predict
    # boxes near it; priors outside keep the 0.02 floor everywhere
    assert (scores[0, inside, 2] > 0.02).all()
    assert torch.allclose(scores[0, ~inside], torch.full_like(scores[0, ~inside], 0.02))
    centre_prior = torch.argmin((priors[:, :2] - 24).abs().sum(-1))
    assert (boxes[0, centre_prior] - gt[0, 0]).abs().max() < 8


def test_positives_per_level_counts_by_object_and_level():
    priors, sizes = priors_for_input((64, 64), [8, 16, 32])
    levels = level_ids(sizes)
    a = build_assigner("fcos", 3)
    gt = torch.tensor([[[0.0, 0.0, 30.0, 30.0], [0.0, 0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, False]])
    out = a(priors, torch.rand(1, priors.shape[0], 3), torch.zeros(1, priors.shape[0], 4), gt,
            torch.tensor([[1, 0]]), valid)
    counts = positives_per_level(out, levels, num_objects=2, num_levels=3)
    expected = [[int(((out.gt_index[0] == g) & (levels == l)).sum()) for l in range(3)] for g in range(2)]
    assert counts.tolist() == expected
    assert counts[0].sum() > 0 and counts[1].sum() == 0
    table = assignment_table({"fcos": out}, levels, [8, 16, 32], torch.tensor([1, 0]), ["a", "b", "c"])
    assert "objects left with no positive: 1" in table


def test_every_assigner_runs_on_the_standin():
    priors, _ = priors_for_input((96, 96), [8, 16, 32])
    gt = torch.tensor([[[10.0, 10.0, 50.0, 60.0], [40.0, 30.0, 90.0, 70.0]]])
    labels, valid = torch.tensor([[0, 1]]), torch.tensor([[True, True]])
    scores, boxes = standin_predictions(priors, gt, labels, valid, 2)
    outs = run_assigners(list(ASSIGNERS), 2, priors, scores, boxes, gt, labels, valid)
    assert set(outs) == set(ASSIGNERS)
    for name, out in outs.items():
        assert (out.gt_index >= 0).any(), name


@pytest.mark.parametrize("image", ["000002", "empty01"])
def test_assign_viz_cli_draws_every_assigner(tiny_voc, tmp_path, image, capsys):
    out = tmp_path / f"{image}.png"
    rc = main(["assign-viz", CONFIG, f"data.root={tiny_voc}", "input_size=64", "--image", image,
               "--out", str(out)])
    assert rc == 0
    assert out.stat().st_size > 5000
    table = out.with_suffix(".md").read_text()
    for name in ASSIGNERS:
        assert f"### {name}" in table
    if image == "empty01":
        assert "no objects in this image" in table


def test_assign_viz_unknown_image_is_a_clean_error(tiny_voc, tmp_path, capsys):
    rc = main(["assign-viz", CONFIG, f"data.root={tiny_voc}", "--image", "nope", "--out",
               str(tmp_path / "x.png")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--image nope" in err and "Traceback" not in err


@pytest.mark.slow
def test_shootout_end_to_end_on_a_tiny_budget(tiny_voc, tmp_path):
    out = tmp_path / "shootout"
    rc = main(["shootout", CONFIG, f"data.root={tiny_voc}", *TINY, "--assigners", "simota,tal,dw",
               "--epochs", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "shootout.json").read_text())
    by_name = {s["assigner"]: s for s in data["summary"]}
    assert set(by_name) == {"simota", "tal", "dw"}
    assert "incompatible" in by_name["dw"]["skipped"]  # YOLOX's head has no DW loss
    for name in ("simota", "tal"):
        s = by_name[name]
        assert 0.0 <= s["AP"] <= 1.0 and s["wall_s"] > 0 and s["assign_ms_per_iter"] > 0
        assert s["pos_per_object"] >= 0 and 0.0 <= s["objects_without_pos"] <= 1.0
        assert 0.0 <= s["objects_without_pos_stal"] <= 1.0  # both methods take the stal option
        assert (out / f"{name}_seed0" / "best.pt").exists()
    assert (out / "shootout.png").stat().st_size > 2000
    md = (out / "shootout.md").read_text()
    assert "| simota |" in md and "| tal |" in md


def test_pr_curves_plot_from_evaluation(tmp_path):
    from types import SimpleNamespace

    from densedet.data.sample import Sample
    from densedet.engine.plots import plot_pr_curves
    from densedet.evaluate import evaluate

    samples = [Sample(image_id=f"im{i}", path="", width=100, height=100,
                      boxes=[[10, 10, 50, 50], [60, 60, 90, 95]], labels=[0, 1], ignore=[False, False])
               for i in range(3)]
    gt = SimpleNamespace(samples=samples, classes=["a", "b"], category_ids=[0, 1])
    dets = [{"image_id": f"im{i}", "category_id": 0, "bbox": [10, 10, 40, 40], "score": 0.9}
            for i in range(2)]
    dets.append({"image_id": "im2", "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.5})
    metrics = evaluate(gt, dets)
    curves = {c.name: c for c in metrics["pr_curves"]}
    # class a: 2 of 3 objects found with no false positive; class b: one false positive
    assert curves["a"].recall.max() == pytest.approx(2 / 3)
    assert curves["b"].ap == 0.0
    out = plot_pr_curves(metrics, tmp_path / "pr.png")
    assert out.stat().st_size > 5000


def test_teaching_image_prefers_several_objects_of_different_sizes():
    from densedet.data.sample import Sample
    from densedet.viz import teaching_image

    def sample(name, sides):
        boxes = np.array([[0, 0, s, s] for s in sides], dtype=np.float32).reshape(-1, 4)
        return Sample(image_id=name, path=Path(f"{name}.jpg"), width=320, height=320, boxes=boxes,
                      labels=np.zeros(len(sides), dtype=np.int64))

    one_big = sample("one", [200])
    same_size = sample("same", [40, 41, 42, 43])
    crowd = sample("crowd", [10] * 30)
    mixed = sample("mixed", [12, 60, 150, 20])
    assert teaching_image([one_big, same_size, crowd, mixed]).image_id == "mixed"
    assert teaching_image([one_big, same_size]).image_id == "same"  # several objects first


def test_shootout_summary_reports_mean_std_and_separated_pairs():
    from densedet.shootout import markdown_table, separated_pairs, summarise

    def row(name, seed, ap):
        return {"assigner": name, "seed": seed, "AP": ap, "AP50": 2 * ap, "pos_per_object": 3.0,
                "objects_without_pos": 0.1, "objects_without_pos_stal": 0.05,
                "assign_ms_per_iter": 1.0, "wall_s": 9.0}

    aps = {"a": [0.30, 0.31, 0.32], "b": [0.20, 0.21, 0.22], "c": [0.295, 0.305, 0.285]}
    rows = [row(n, s, ap) for n, v in aps.items() for s, ap in enumerate(v)]
    summary = {s["assigner"]: s for s in summarise(rows)}
    for name, v in aps.items():  # sample std, written out from its definition
        m = sum(v) / 3
        assert summary[name]["AP"] == pytest.approx(m)
        assert summary[name]["AP_std"] == pytest.approx((sum((x - m) ** 2 for x in v) / 2) ** 0.5)
    pairs = separated_pairs(list(summary.values()))
    # a and c differ by 0.01 with stds of 0.01: not separated; b trails both by ~0.1
    assert [(p[0], p[1]) for p in pairs] == [("a", "b"), ("c", "b")]
    table = markdown_table(list(summary.values()))
    assert "| a | 0,1,2 | 31.0 ± 1.0 |" in table and "10.0% → 5.0%" in table
    assert "- a > b: +10.0 (std 1.0)" in table and "a > c" not in table and "c > a" not in table
    one_seed = summarise([row("a", 0, 0.3), row("b", 0, 0.1)])
    assert separated_pairs(one_seed) == []  # no spread, no claim
