"""Tests for densedet.evaluate (COCO via pycocotools, hand-written VOC AP) and ``densedet eval``."""
from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from densedet.data.sample import Sample
from densedet.errors import DensedetError
from densedet.evaluate import (COCO_STAT_KEYS, evaluate, format_report, metrics_to_json,
                               voc_ap_11point, voc_ap_area, write_metrics_json)


@dataclass
class Index:
    """The DatasetIndex fields the evaluator reads (no files needed)."""

    samples: list[Sample]
    classes: list[str]
    category_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.category_ids = self.category_ids or list(range(len(self.classes)))


def sample(image_id, objects=(), width=100, height=100) -> Sample:
    """objects: (x1, y1, x2, y2, label[, ignore])."""
    boxes = [o[:4] for o in objects]
    labels = [o[4] for o in objects]
    ignore = [bool(o[5]) if len(o) > 5 else False for o in objects]
    return Sample(image_id=image_id, path=f"{image_id}.jpg", width=width, height=height,
                  boxes=np.asarray(boxes, np.float32).reshape(-1, 4), labels=labels, ignore=ignore)


def det(image_id, cat, x1, y1, x2, y2, score) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": score}


def row(metrics, name) -> dict:
    return next(r for r in metrics["per_class"] if r["name"] == name)


# --------------------------------------------------------------------------- COCO vs pycocotools


def _random_coco(rng: np.random.Generator, string_ids: bool):
    """Random ground truth (small/medium/large boxes, crowd objects, empty images) and
    detections (jittered true boxes, duplicates, random false positives)."""
    classes, cat_ids = ["cat", "dog", "bird", "fish"], [3, 7, 11, 20]
    if string_ids:
        cat_ids = list(range(len(classes)))
    samples, dets = [], []
    sides = [(8, 28), (40, 90), (110, 300)]  # small / medium / large (side ranges, px)
    for i in range(12):
        image_id = f"img_{i:03d}" if string_ids else 1000 + 7 * i
        objects = []
        for _ in range(int(rng.integers(0, 7)) if i != 3 else 0):  # image 3: no objects
            lo, hi = sides[int(rng.integers(0, 3))]
            w, h = (int(v) for v in rng.integers(lo, hi, size=2))
            x, y = int(rng.integers(0, 640 - w)), int(rng.integers(0, 480 - h))
            objects.append((x, y, x + w, y + h, int(rng.integers(0, 4)), rng.random() < 0.12))
        s = sample(image_id, objects, 640, 480)
        samples.append(s)
        for box, lab in zip(s.boxes, s.labels):
            for _ in range(int(rng.integers(0, 3))):  # 0 = miss, 2 = a duplicate
                w, h = box[2] - box[0], box[3] - box[1]
                jitter = rng.normal(0, 0.12, size=4) * np.array([w, h, w, h])
                b = box + jitter
                cat = int(lab) if rng.random() < 0.85 else int(rng.integers(0, 4))
                dets.append(det(image_id, cat_ids[cat], *map(float, b), float(rng.random())))
        for _ in range(int(rng.integers(0, 4))):  # false positives anywhere
            w, h = (float(v) for v in rng.uniform(5, 200, size=2))
            x, y = float(rng.uniform(0, 600)), float(rng.uniform(0, 440))
            dets.append(det(image_id, cat_ids[int(rng.integers(0, 4))], x, y, x + w, y + h,
                            float(rng.random())))
    return Index(samples, classes, cat_ids), dets


def _pycocotools_direct(tmp_path, index: Index, dets: list[dict], cat_id: int | None = None):
    """pycocotools the plain way: ground truth and results as json files on disk."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {s.image_id: n for n, s in enumerate(index.samples, start=1)}
    as_int = (lambda i: ids[i]) if isinstance(index.samples[0].image_id, str) else (lambda i: i)
    images = [{"id": as_int(s.image_id), "width": s.width, "height": s.height,
               "file_name": s.path} for s in index.samples]
    anns = []
    for s in index.samples:
        for b, lab, ign in zip(s.boxes.tolist(), s.labels.tolist(), s.ignore.tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": as_int(s.image_id),
                         "bbox": [b[0], b[1], w, h], "category_id": index.category_ids[lab],
                         "area": w * h,
                         "iscrowd": int(ign)})
    cats = [{"id": c, "name": n} for c, n in zip(index.category_ids, index.classes)]
    gt_file, dt_file = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    dt_file.write_text(json.dumps([{**d, "image_id": as_int(d["image_id"])} for d in dets]))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(dt_file)), "bbox")
        if cat_id is not None:
            ev.params.catIds = [cat_id]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _assert_close(ours: float, ref: float) -> None:
    if ref == -1:
        assert math.isnan(ours)
    else:
        assert ours == pytest.approx(ref, abs=1e-4)


def _backends() -> list[str]:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return ["pycocotools"]
    return ["pycocotools", "faster_coco_eval"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("seed,string_ids", [(0, False), (1, False), (2, True)])
def test_coco_metrics_equal_pycocotools(tmp_path, seed, string_ids, backend):
    index, dets = _random_coco(np.random.default_rng(seed), string_ids)
    areas = np.concatenate([(s.boxes[:, 2] - s.boxes[:, 0]) * (s.boxes[:, 3] - s.boxes[:, 1])
                            for s in index.samples])
    assert (areas < 32 ** 2).any() and ((areas > 32 ** 2) & (areas < 96 ** 2)).any()
    assert (areas > 96 ** 2).any() and any(s.ignore.any() for s in index.samples)

    metrics = evaluate(index, dets, coco_backend=backend)
    assert metrics["coco_backend"] == backend
    ref = _pycocotools_direct(tmp_path, index, dets)
    for key, value in zip(COCO_STAT_KEYS, ref):
        _assert_close(metrics[key], value)
    assert 0 < metrics["AP"] < 1
    # per-class AP and AP50 = pycocotools restricted to that one category
    for cls, cat in enumerate(index.category_ids):
        ref_cls = _pycocotools_direct(tmp_path, index, dets, cat_id=cat)
        _assert_close(metrics["per_class"][cls]["AP"], ref_cls[0])
        _assert_close(metrics["per_class"][cls]["AP50"], ref_cls[1])


# --------------------------------------------------------------------------- VOC, by hand


def test_perfect_detections_score_one():
    index = Index([sample("a", [(10, 10, 50, 50, 0), (60, 60, 90, 95, 1)]),
                   sample("b", [(0, 0, 30, 20, 1)])], ["cat", "dog"])
    dets = [det(s.image_id, int(l), *map(float, b), 0.9)
            for s in index.samples for b, l in zip(s.boxes, s.labels)]
    m = evaluate(index, dets)
    assert m["VOC_mAP50"] == pytest.approx(1.0) and m["VOC07_mAP50"] == pytest.approx(1.0)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    assert row(m, "dog")["num_gt"] == 2 and row(m, "dog")["num_det"] == 2


def test_duplicate_is_fp_and_11point_differs_from_area():
    # gts A, B. Sorted: d1 on A (TP), d2 on A again (duplicate -> FP), d3 on B (TP).
    # recall [.5, .5, 1], precision [1, .5, 2/3].
    # area: .5 * 1 + .5 * 2/3 = 0.8333; 11-point: (6 * 1 + 5 * 2/3) / 11 = 0.8485.
    index = Index([sample("a", [(0, 0, 10, 10, 0), (50, 50, 70, 70, 0)])], ["cat"])
    dets = [det("a", 0, 0, 0, 10, 10, 0.9), det("a", 0, 0, 0, 10, 10, 0.8),
            det("a", 0, 50, 50, 70, 70, 0.7)]
    m = evaluate(index, dets)
    assert m["VOC_mAP50"] == pytest.approx(5 / 6)
    assert m["VOC07_mAP50"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    curve = m["pr_curves"][0]
    np.testing.assert_allclose(curve.recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(curve.precision, [1.0, 0.5, 2 / 3])
    np.testing.assert_allclose(curve.scores, [0.9, 0.8, 0.7])


@pytest.mark.parametrize("tp_first,expected", [(True, 1.0), (False, 0.5)])
def test_score_ties_keep_input_order(tp_first, expected):
    # One gt, a TP and a FP with the same score. TP first: precision [1, .5] -> AP 1;
    # FP first: precision [0, .5] at recall [0, 1] -> AP 0.5 (area and 11-point alike).
    index = Index([sample("a", [(0, 0, 10, 10, 0)])], ["cat"])
    tp, fp = det("a", 0, 0, 0, 10, 10, 0.5), det("a", 0, 60, 60, 80, 80, 0.5)
    m = evaluate(index, [tp, fp] if tp_first else [fp, tp])
    assert m["VOC_mAP50"] == pytest.approx(expected)
    assert m["VOC07_mAP50"] == pytest.approx(expected)


def test_difficult_objects_neither_count_nor_penalise():
    # A normal, D difficult. d1 and d2 hit D (ignored, even the duplicate), d3 hits A (TP),
    # d4 is a FP. Curve without the ignored: TP, FP -> AP 1 with num_gt 1.
    # Were D counted, recall could not pass 0.5; were d1 a FP, precision would start at 0.
    index = Index([sample("a", [(0, 0, 20, 20, 0), (50, 50, 90, 90, 0, True)])], ["cat"])
    dets = [det("a", 0, 50, 50, 90, 90, 0.95), det("a", 0, 51, 50, 90, 90, 0.94),
            det("a", 0, 0, 0, 20, 20, 0.9), det("a", 0, 0, 60, 10, 70, 0.8)]
    m = evaluate(index, dets)
    r = row(m, "cat")
    assert r["num_gt"] == 1 and r["num_det"] == 4
    assert r["VOC_AP"] == pytest.approx(1.0) and r["VOC07_AP"] == pytest.approx(1.0)
    assert len(m["pr_curves"][0].recall) == 2
    # COCO side: the difficult object is a crowd region, so detections on it are ignored too.
    assert m["AP"] == pytest.approx(1.0)


def test_best_gt_is_taken_even_when_already_matched():
    # Devkit rule: a detection goes to its highest-IoU gt, matched or not. d2's best gt is
    # gt1 (IoU .818), already taken by d1, so d2 is a FP although gt2 (IoU .538) is free.
    # recall [.5, .5], precision [1, .5] -> area AP 0.5, 11-point 6/11.
    index = Index([sample("a", [(0, 0, 10, 10, 0), (4, 0, 14, 10, 0)])], ["cat"])
    m = evaluate(index, [det("a", 0, 0, 0, 10, 10, 0.9), det("a", 0, 1, 0, 11, 10, 0.8)])
    assert m["VOC_mAP50"] == pytest.approx(0.5)
    assert m["VOC07_mAP50"] == pytest.approx(6 / 11)


def test_images_without_objects():
    # A detection on an empty image is a FP: sorted FP, TP -> precision [0, .5], AP 0.5.
    # The other empty image without detections changes nothing.
    index = Index([sample("a", [(0, 0, 10, 10, 0)]), sample("b"), sample("c")], ["cat"])
    m = evaluate(index, [det("b", 0, 0, 0, 10, 10, 0.9), det("a", 0, 0, 0, 10, 10, 0.8)])
    assert m["VOC_mAP50"] == pytest.approx(0.5) and m["VOC07_mAP50"] == pytest.approx(0.5)
    assert m["num_images"] == 3 and m["num_gt"] == 1 and m["num_det"] == 2


def test_class_without_detections_and_class_without_gt():
    # cat: perfect (AP 1); dog: gt, no detection (AP 0); bird: no gt -> nan, out of the mean,
    # and its detection does not hurt the others. mAP = (1 + 0) / 2.
    index = Index([sample("a", [(0, 0, 10, 10, 0), (30, 30, 60, 60, 1)])], ["cat", "dog", "bird"])
    m = evaluate(index, [det("a", 0, 0, 0, 10, 10, 0.9), det("a", 2, 30, 30, 60, 60, 0.8)])
    assert row(m, "dog")["VOC_AP"] == 0.0 and row(m, "dog")["VOC07_AP"] == 0.0
    assert row(m, "dog")["AP"] == 0.0
    assert math.isnan(row(m, "bird")["VOC_AP"]) and math.isnan(row(m, "bird")["AP"])
    assert row(m, "bird")["num_det"] == 1 and row(m, "bird")["num_gt"] == 0
    assert m["VOC_mAP50"] == pytest.approx(0.5) and m["VOC07_mAP50"] == pytest.approx(0.5)


@pytest.mark.parametrize("backend", _backends())
def test_empty_detections(backend):
    index = Index([sample("a", [(0, 0, 10, 10, 0)]), sample("b")], ["cat", "dog"])
    m = evaluate(index, [], coco_backend=backend)
    assert m["AP"] == 0.0 and m["AR100"] == 0.0 and m["VOC_mAP50"] == 0.0
    assert math.isnan(row(m, "dog")["VOC_AP"]) and m["num_det"] == 0


def test_voc_ap_helpers_directly():
    rec, prec = np.array([0.25, 0.5, 0.5, 0.75]), np.array([1.0, 1.0, 2 / 3, 0.75])
    # envelope: 1 up to recall .5, then .75 up to .75, then 0: area = .5 + .25 * .75
    assert voc_ap_area(rec, prec) == pytest.approx(0.6875)
    # 11-point: t = 0..0.5 -> 1 (6 points), .6/.7 -> .75 (2 points), .8-1 -> 0
    assert voc_ap_11point(rec, prec) == pytest.approx((6 + 1.5) / 11)
    assert voc_ap_area(np.zeros(0), np.zeros(0)) == 0.0


def test_string_image_ids_voc_style():
    # VOC/YOLO: image ids are file stems such as "000005"; 5 must not match "000005".
    index = Index([sample("000005", [(0, 0, 10, 10, 0)]), sample("000007", [(5, 5, 50, 50, 1)])],
                  ["cat", "dog"])
    m = evaluate(index, [det("000005", 0, 0, 0, 10, 10, 0.9), det("000007", 1, 5, 5, 50, 50, 0.4)])
    assert m["VOC_mAP50"] == pytest.approx(1.0) and m["AP"] == pytest.approx(1.0)
    with pytest.raises(DensedetError, match=r"entry 0: image_id 5 is not in the ground truth"):
        evaluate(index, [det(5, 0, 0, 0, 10, 10, 0.9)])


def test_bad_detections_raise_naming_entry():
    index = Index([sample("a", [(0, 0, 10, 10, 0)])], ["cat"])
    good = det("a", 0, 0, 0, 10, 10, 0.9)
    with pytest.raises(DensedetError, match=r"dets.json: entry 1: image_id 'zzz'"):
        evaluate(index, [good, det("zzz", 0, 0, 0, 1, 1, 0.5)], source="dets.json")
    with pytest.raises(DensedetError, match=r"entry 1: category_id 4 is not one of"):
        evaluate(index, [good, det("a", 4, 0, 0, 1, 1, 0.5)])
    with pytest.raises(DensedetError, match=r"entry 0: missing key\(s\) \['score'\]"):
        evaluate(index, [{k: v for k, v in good.items() if k != "score"}])
    with pytest.raises(DensedetError, match=r"entry 0: 'bbox'"):
        evaluate(index, [{**good, "bbox": [0, 0, 1]}])
    with pytest.raises(DensedetError, match=r"entry 0: 'score'"):
        evaluate(index, [{**good, "score": float("nan")}])


def test_json_and_report(tmp_path):
    index = Index([sample("a", [(0, 0, 10, 10, 0)])], ["cat", "unseen_class"])
    m = evaluate(index, [det("a", 0, 0, 0, 10, 10, 0.9)])
    out = tmp_path / "m.json"
    write_metrics_json(m, out)
    data = json.loads(out.read_text())  # strict JSON: nan became null
    assert "pr_curves" not in data and data["per_class"][1]["VOC_AP"] is None
    assert data["APs"] == pytest.approx(1.0) and data["APm"] is None  # no medium object: undefined
    json.dumps(metrics_to_json(m, include_curves=True), allow_nan=False)
    text = format_report(m)
    assert "unseen_class" in text and "VOC07" in text and "100.0" in text


# --------------------------------------------------------------------------- CLI


def _write_voc(root, images: dict[str, list[tuple]], classes: list[str], val: list[str]):
    """A tiny VOC dataset on disk: images {stem: [(x1, y1, x2, y2, name, difficult)]}."""
    from PIL import Image

    from densedet.data.voc import write_voc_xml

    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem, objs in images.items():
        Image.new("RGB", (64, 48)).save(root / "JPEGImages" / f"{stem}.jpg")
        write_voc_xml(root / "Annotations" / f"{stem}.xml", f"{stem}.jpg", 64, 48,
                      np.array([o[:4] for o in objs], np.float32).reshape(-1, 4),
                      [o[4] for o in objs], [o[5] for o in objs])
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(val) + "\n")


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "voc"
    _write_voc(root, {"000001": [(2, 2, 30, 30, "cat", 0), (40, 10, 60, 40, "dog", 1)],
                      "000002": [(10, 5, 50, 45, "dog", 0)],
                      "000003": []}, ["cat", "dog"], val=["000002", "000003"])
    return root


def _main(argv):
    from densedet.cli import main

    return main([str(a) for a in argv])


def test_cli_writes_json(voc_root, tmp_path, capsys):
    dets = [det("000001", 0, 2, 2, 30, 30, 0.9), det("000002", 1, 10, 5, 50, 45, 0.8),
            det("000003", 1, 0, 0, 20, 20, 0.1)]
    dets_file, out = tmp_path / "dets.json", tmp_path / "out" / "metrics.json"
    dets_file.write_text(json.dumps(dets))
    assert _main(["eval", "--ann", voc_root, "--detections", dets_file, "--json", out]) == 0
    data = json.loads(out.read_text())
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "VOC07_mAP50",
                "VOC_mAP50", "per_class"):
        assert key in data
    assert data["VOC_mAP50"] == pytest.approx(1.0)  # the FP on 000003 scores below both TPs
    assert [r["name"] for r in data["per_class"]] == ["cat", "dog"]
    assert data["per_class"][1]["num_gt"] == 1  # the difficult dog does not count
    assert set(data["per_class"][0]) >= {"name", "AP", "AP50", "VOC_AP", "VOC07_AP",
                                         "num_gt", "num_det"}
    printed = capsys.readouterr().out
    assert "VOC07" in printed and "dog" in printed

    # --split val: 000001 is not in the list, so a detection on it is an unknown id
    assert _main(["eval", "--ann", voc_root, "--detections", dets_file, "--split", "val"]) == 1
    assert "image_id '000001' is not in the ground truth" in capsys.readouterr().err
    dets_file.write_text(json.dumps(dets[1:]))
    assert _main(["eval", "--ann", voc_root, "--detections", dets_file, "--split", "val",
                  "--json", out]) == 0
    assert json.loads(out.read_text())["num_images"] == 2


@pytest.mark.parametrize("content,message", [
    ("[{\"image_id\": \"000001\",", "invalid JSON at line 1"),
    ("{\"image_id\": 1}", "expected a JSON list"),
    ("[{\"image_id\": \"000001\", \"category_id\": 0, \"bbox\": [0, 0, 5, 5], \"score\": 1},"
     " {\"image_id\": \"000001\", \"bbox\": [0, 0, 5, 5], \"score\": 1}]",
     "entry 1: missing key(s) ['category_id']"),
])
def test_cli_malformed_detections(voc_root, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert _main(["eval", "--ann", voc_root, "--detections", bad]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["eval"],
    ["eval", "--ann", "x"],
    ["eval", "--ann", "x", "--detections", "y", "--weights", "w.pt"],
    ["eval", "cfg.yaml", "--ann", "x", "--detections", "y"],
    ["eval", "--ann", "x", "--detections", "y", "--save-detections", "z"],
])
def test_cli_usage_errors(argv, capsys):
    assert _main(argv) == 1
    assert "--weights" in capsys.readouterr().err


def test_cli_model_mode(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_evaluate_model(config_path, weights, split, overrides, detections_out, device="auto"):
        calls.append((config_path, weights, split, overrides, detections_out, device))
        index = Index([sample("a", [(0, 0, 10, 10, 0)])], ["cat"])
        return evaluate(index, [det("a", 0, 0, 0, 10, 10, 0.9)])

    # a stand-in for the engine: the real one (torch, models) is not what is tested here
    import densedet.cli.eval as eval_verb
    monkeypatch.setattr(eval_verb, "evaluate_model", fake_evaluate_model)
    out = tmp_path / "m.json"
    # overrides after the options too (argparse alone would reject them)
    assert _main(["eval", "cfg.yaml", "--weights", "w.pt", "a.b=1", "c=x", "--json", out,
                  "--save-detections", tmp_path / "d.json"]) == 0
    assert calls[-1] == ("cfg.yaml", "w.pt", None, ["a.b=1", "c=x"], str(tmp_path / "d.json"),
                         "auto")
    assert json.loads(out.read_text())["VOC_mAP50"] == 1.0  # --json: the metrics
    assert "cat" in capsys.readouterr().out
    assert _main(["eval", "--weights", "w.pt", "--split", "test", "lr=0.1", "--device", "cpu"]) == 0
    assert calls[-1] == (None, "w.pt", "test", ["lr=0.1"], None, "cpu")
