"""``densedet eval`` against the metrics' own definitions, computed independently here.

* COCO: a COCO json plus a results json, with no image file anywhere, scored by the CLI and
  by pycocotools' ``COCOeval`` run directly on the same two files.
* VOC: the PASCAL VOC devkit's ``VOCevaldet`` (and py-faster-rcnn's ``voc_eval``), written
  below from its definition, on boxes as written in the XML (1-based inclusive pixels) and a
  detections file in the same frame, small boxes of 3-10 px included (where the devkit's
  ``+1`` widths matter); VOC07 11-point and VOC2010+ area AP.
* The box-frame convention itself (``det_frame``), and the model mode's
  ``--save-detections`` file re-scoring to the model mode's numbers.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densedet.data.sample import Sample
from densedet.errors import DensedetError
from densedet.evaluate import (COCO_STAT_KEYS, continuous_to_voc_results, evaluate,
                               voc_to_continuous_xywh)


def _main(argv) -> int:
    from densedet.cli import main

    return main([str(a) for a in argv])


# --------------------------------------------------------------------------- COCO, no images


def _coco_files(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    """A COCO ground-truth json and a results json (no image files): small/medium/large
    boxes, crowd objects, an image without objects; detections are jittered true boxes,
    duplicates, wrong classes and random false positives."""
    cats = [{"id": 4, "name": "cat"}, {"id": 9, "name": "dog"}, {"id": 17, "name": "bird"}]
    sides = [(6, 30), (35, 90), (100, 250)]
    images, anns, dets = [], [], []
    for i in range(10):
        img_id, (w_img, h_img) = 300 + 11 * i, (640, 480)
        images.append({"id": img_id, "file_name": f"img_{i}.jpg", "width": w_img,
                       "height": h_img})
        for _ in range(int(rng.integers(1, 7)) if i != 4 else 0):  # image 4: no objects
            lo, hi = sides[int(rng.integers(0, 3))]
            w, h = (float(v) for v in rng.uniform(lo, hi, size=2))
            x, y = float(rng.uniform(0, w_img - w)), float(rng.uniform(0, h_img - h))
            cat = cats[int(rng.integers(0, 3))]["id"]
            # area = box area: densedet's ground truth keeps no segmentation area
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat,
                         "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": int(rng.random() < 0.1)})
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0, 0.1, size=4) * np.array([w, h, w, h])
                bx, by, bw, bh = np.array([x, y, w, h]) + jitter
                c = cat if rng.random() < 0.85 else cats[int(rng.integers(0, 3))]["id"]
                dets.append({"image_id": img_id, "category_id": c,
                             "bbox": [float(bx), float(by), abs(float(bw)), abs(float(bh))],
                             "score": float(rng.random())})
        for _ in range(int(rng.integers(0, 3))):
            w, h = (float(v) for v in rng.uniform(5, 150, size=2))
            dets.append({"image_id": img_id, "category_id": cats[int(rng.integers(0, 3))]["id"],
                         "bbox": [float(rng.uniform(0, 480)), float(rng.uniform(0, 320)), w, h],
                         "score": float(rng.random())})
    gt_file, dt_file = tmp_path / "instances_val.json", tmp_path / "dets.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    dt_file.write_text(json.dumps(dets))
    return gt_file, dt_file


def _pycocotools_stats(gt_file: Path, dt_file: Path) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(dt_file)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_json_scored_without_images_equals_pycocotools(tmp_path, seed):
    gt_file, dt_file = _coco_files(tmp_path, np.random.default_rng(seed))
    assert not list(tmp_path.rglob("*.jpg"))  # really no image anywhere
    out = tmp_path / "metrics.json"
    assert _main(["eval", "--ann", gt_file, "--detections", dt_file, "--json", out]) == 0
    ours = json.loads(out.read_text())
    ref = _pycocotools_stats(gt_file, dt_file)
    assert 0 < ref[0] < 1
    for key, value in zip(COCO_STAT_KEYS, ref):
        if value == -1:  # pycocotools' "undefined"
            assert ours[key] is None, key
        else:
            assert ours[key] == pytest.approx(value, abs=1e-4), key
    assert ours["num_images"] == 10 and ours["det_frame"] == "continuous"


def test_training_reader_still_requires_images(tmp_path):
    from densedet.data.readers import read_dataset

    gt_file, _ = _coco_files(tmp_path, np.random.default_rng(0))
    with pytest.raises(DensedetError, match=r"image 'img_0.jpg' not found"):
        read_dataset(gt_file)


def test_coco_without_images_needs_width_and_height(tmp_path):
    gt_file, dt_file = _coco_files(tmp_path, np.random.default_rng(0))
    data = json.loads(gt_file.read_text())
    del data["images"][2]["width"]
    gt_file.write_text(json.dumps(data))
    from densedet.data.coco import read_coco_ground_truth

    with pytest.raises(DensedetError, match=r"image id 322: image 'img_2.jpg' not found .*"
                                            r"no width/height"):
        read_coco_ground_truth(gt_file)


# --------------------------------------------------------------------------- VOC devkit


def devkit_voc_ap(gt: dict, dets: list[dict], cls: int, use_07: bool,
                  min_overlap: float = 0.5) -> float:
    """One class's AP as the PASCAL VOC devkit (``VOCevaldet.m``) defines it.

    ``gt``: image id -> list of ``(xmin, ymin, xmax, ymax, class, difficult)`` exactly as in
    the XML; ``dets``: COCO-results entries whose corners ``(x, y, x + w, y + h)`` are in the
    same 1-based inclusive pixel frame. A straight transcription: inclusive-pixel widths
    ``x2 - x1 + 1`` for detections and ground truth, a detection takes the ground truth of
    highest overlap (matched or not), difficult ones are neither TP nor FP.
    """
    objs = {img: [o for o in objects if o[4] == cls] for img, objects in gt.items()}
    taken = {img: [False] * len(o) for img, o in objs.items()}
    npos = sum(not o[5] for objects in objs.values() for o in objects)
    mine = [d for d in dets if d["category_id"] == cls]
    order = sorted(range(len(mine)), key=lambda k: -mine[k]["score"])  # stable, like MATLAB
    tp, fp = np.zeros(len(mine)), np.zeros(len(mine))
    for rank, k in enumerate(order):
        d = mine[k]
        x, y, w, h = d["bbox"]
        bb = (x, y, x + w, y + h)
        ovmax, jmax = -math.inf, -1
        for j, g in enumerate(objs[d["image_id"]]):
            iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
            ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
            if iw > 0 and ih > 0:
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                      + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - iw * ih)
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= min_overlap:
            if not objs[d["image_id"]][jmax][5]:
                if not taken[d["image_id"]][jmax]:
                    tp[rank] = 1
                    taken[d["image_id"]][jmax] = True
                else:
                    fp[rank] = 1
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07:  # VOC2007: 11-point interpolated
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = prec[rec >= t].max() if (rec >= t).any() else 0.0
            ap += p / 11.0
        return float(ap)
    # VOC2010+: area under the monotone envelope (VOCap.m)
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


CLASSES = ["car", "person", "dog"]
SIZE = (96, 72)  # image width, height


def _random_voc(rng: np.random.Generator, n_images: int = 14):
    """Ground truth in XML coordinates and detections in the same frame (COCO results).

    Half the objects are 3-10 px (where ``+1`` moves IoU most), the rest 15-60 px; ~15%
    difficult. Detections: true boxes moved by a pixel or two (integer) or jittered (float),
    duplicates, wrong classes and false positives.
    """
    gt, dets = {}, []
    w_img, h_img = SIZE
    for i in range(n_images):
        stem = f"{i:06d}"
        objects = []
        for _ in range(int(rng.integers(0, 6)) if i != 5 else 0):  # 000005: no objects
            lo, hi = (3, 10) if rng.random() < 0.5 else (15, 60)
            bw, bh = (int(v) for v in rng.integers(lo, hi + 1, size=2))  # inclusive widths
            x1, y1 = int(rng.integers(1, w_img - bw + 2)), int(rng.integers(1, h_img - bh + 2))
            objects.append((x1, y1, x1 + bw - 1, y1 + bh - 1, int(rng.integers(0, 3)),
                            bool(rng.random() < 0.15)))
        gt[stem] = objects
        for x1, y1, x2, y2, cls, _ in objects:
            for _ in range(int(rng.integers(0, 3))):  # 0: a miss, 2: a duplicate
                if rng.random() < 0.5:
                    b = np.array([x1, y1, x2, y2]) + rng.integers(-2, 3, size=4)
                else:
                    s = max(x2 - x1 + 1, y2 - y1 + 1)
                    b = np.array([x1, y1, x2, y2]) + rng.normal(0, 0.12 * s + 0.4, size=4)
                b[2], b[3] = max(b[2], b[0] - 1), max(b[3], b[1] - 1)  # >= zero pixels wide
                c = cls if rng.random() < 0.85 else int(rng.integers(0, 3))
                dets.append({"image_id": stem, "category_id": c,
                             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]),
                                      float(b[3] - b[1])], "score": float(rng.random())})
        for _ in range(int(rng.integers(0, 3))):
            bw, bh = (int(v) for v in rng.integers(3, 40, size=2))
            x, y = int(rng.integers(1, w_img - bw)), int(rng.integers(1, h_img - bh))
            dets.append({"image_id": stem, "category_id": int(rng.integers(0, 3)),
                         "bbox": [float(x), float(y), float(bw - 1), float(bh - 1)],
                         "score": float(rng.random())})
    return gt, dets


def _write_voc_root(root: Path, gt: dict) -> None:
    """A VOC root written by hand (the devkit's XML, not densedet's writer)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for stem, objects in gt.items():
        Image.new("RGB", SIZE).save(root / "JPEGImages" / f"{stem}.png")
        body = "".join(
            f"<object><name>{CLASSES[c]}</name><difficult>{int(d)}</difficult><bndbox>"
            f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
            f"</bndbox></object>" for x1, y1, x2, y2, c, d in objects)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.png</filename><size><width>{SIZE[0]}</width>"
            f"<height>{SIZE[1]}</height><depth>3</depth></size>{body}</annotation>")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc_ap_equals_devkit_definition(tmp_path, seed):
    gt, dets = _random_voc(np.random.default_rng(seed))
    small = [o for objects in gt.values() for o in objects if o[2] - o[0] + 1 <= 10]
    assert len(small) >= 5 and any(o[5] for objects in gt.values() for o in objects)
    root, dt_file, out = tmp_path / "voc", tmp_path / "dets.json", tmp_path / "m.json"
    _write_voc_root(root, gt)
    dt_file.write_text(json.dumps(dets))
    assert _main(["eval", "--ann", root, "--classes", ",".join(CLASSES),
                  "--detections", dt_file, "--json", out]) == 0
    ours = json.loads(out.read_text())
    assert ours["det_frame"] == "voc"
    ref_area = [devkit_voc_ap(gt, dets, c, use_07=False) for c in range(len(CLASSES))]
    ref_07 = [devkit_voc_ap(gt, dets, c, use_07=True) for c in range(len(CLASSES))]
    for c, row in enumerate(ours["per_class"]):
        assert row["VOC_AP"] == pytest.approx(ref_area[c], abs=1e-4), CLASSES[c]
        assert row["VOC07_AP"] == pytest.approx(ref_07[c], abs=1e-4), CLASSES[c]
    assert ours["VOC_mAP50"] == pytest.approx(np.mean(ref_area), abs=1e-4)
    assert ours["VOC07_mAP50"] == pytest.approx(np.mean(ref_07), abs=1e-4)


def test_voc_data_is_sensitive_to_the_plus_one():
    """The devkit test above would catch the old geometry: scoring the same file without the
    frame shift (plain widths on the raw detections) moves the AP by far more than 1e-4."""
    from densedet.data.index import ClassMapper, Reporter, make_sample
    from densedet.data.voc import _parse_object

    gap = 0.0
    for seed in range(3):
        gt, dets = _random_voc(np.random.default_rng(seed))
        mapper, report, samples = ClassMapper(CLASSES, False), Reporter(), []
        for stem, objects in gt.items():
            parsed = [_parse_object({"name": CLASSES[c], "difficult": str(int(d)),
                                     "bndbox": {"xmin": str(x1), "ymin": str(y1),
                                                "xmax": str(x2), "ymax": str(y2)}},
                                    k, Path(f"{stem}.xml"), *SIZE, mapper, report)
                      for k, (x1, y1, x2, y2, c, d) in enumerate(objects, start=1)]
            samples.append(make_sample(stem, Path(f"{stem}.png"), *SIZE, parsed, f"{stem}.xml"))
        index = types.SimpleNamespace(samples=samples, classes=CLASSES, category_ids=[0, 1, 2],
                                      fmt="voc")
        ref = np.mean([devkit_voc_ap(gt, dets, c, use_07=False) for c in range(3)])
        assert evaluate(index, dets, det_frame="voc")["VOC_mAP50"] == pytest.approx(ref, abs=1e-4)
        # the old reading; zero-pixel boxes (w = -1 .. 0 here) have no continuous equivalent
        plain = [{**d, "bbox": [*d["bbox"][:2], max(d["bbox"][2], 0.0), max(d["bbox"][3], 0.0)]}
                 for d in dets]
        gap = max(gap, abs(evaluate(index, plain)["VOC_mAP50"] - ref))
    assert gap > 0.01


# --------------------------------------------------------------------------- the convention


def _index(objects, image_id="a", fmt=None):
    boxes = np.asarray([o[:4] for o in objects], np.float32).reshape(-1, 4)
    s = Sample(image_id=image_id, path=f"{image_id}.jpg", width=100, height=100, boxes=boxes,
               labels=[o[4] for o in objects], ignore=[False] * len(objects))
    return types.SimpleNamespace(samples=[s], classes=["cat"], category_ids=[0], fmt=fmt)


def test_voc_frame_by_hand():
    # XML box (1, 1, 3, 3): 3x3 pixels; the reader's ground truth is (0, 0, 3, 3).
    # Detection (2, 1, 4, 3) in the XML frame: devkit IoU = 2*3 / (9 + 9 - 6) = 0.5 -> TP.
    # Read as continuous (plain widths), the same numbers overlap 1*3 / (4 + 9 - 3) = 0.3 -> FP.
    index = _index([(0, 0, 3, 3, 0)], fmt="voc")
    dets = [{"image_id": "a", "category_id": 0, "bbox": [2, 1, 2, 2], "score": 0.9}]
    assert evaluate(index, dets, det_frame="voc")["VOC_mAP50"] == pytest.approx(1.0)
    assert evaluate(index, dets)["VOC_mAP50"] == pytest.approx(0.0)


def test_frame_conversions_are_inverse_and_validated():
    xywh = np.array([[2.0, 1.0, 2.0, 2.0], [10.5, 3.25, -1.0, 0.0]])
    np.testing.assert_allclose(voc_to_continuous_xywh(xywh),
                               [[1.0, 0.0, 3.0, 3.0], [9.5, 2.25, 0.0, 1.0]])
    dets = [{"image_id": "a", "category_id": 0, "bbox": list(b), "score": 0.5, "extra": 1}
            for b in voc_to_continuous_xywh(xywh).tolist()]
    back = continuous_to_voc_results(dets)
    np.testing.assert_allclose([d["bbox"] for d in back], xywh)
    assert back[0]["extra"] == 1 and dets[0]["bbox"] == [1.0, 0.0, 3.0, 3.0]  # input untouched

    index = _index([(0, 0, 3, 3, 0)])
    zero_wide = {"image_id": "a", "category_id": 0, "bbox": [2, 1, -1, 2], "score": 0.9}
    evaluate(index, [zero_wide], det_frame="voc")  # xmax = xmin - 1: zero pixels, legal
    with pytest.raises(DensedetError, match="negative width"):
        evaluate(index, [zero_wide])
    with pytest.raises(DensedetError, match="below -1"):
        evaluate(index, [{**zero_wide, "bbox": [2, 1, -1.5, 2]}], det_frame="voc")
    with pytest.raises(DensedetError, match="unknown detection box frame"):
        evaluate(index, [], det_frame="devkit")


def test_saved_model_detections_rescore_to_model_metrics(tmp_path, monkeypatch, capsys):
    """Model mode scores predictions in the continuous frame; its --save-detections file
    (VOC ground truth) is written in the VOC frame, which the files mode reads."""
    from densedet.data.readers import read_dataset
    from densedet.engine import write_detections

    gt, _ = _random_voc(np.random.default_rng(3))
    root = tmp_path / "voc"
    _write_voc_root(root, gt)
    rng = np.random.default_rng(4)

    def fake_evaluate_model(config_path, weights, split, overrides, detections_out, device="auto"):
        index = read_dataset(root, classes=CLASSES)
        results = []  # "predictions": the reader's (continuous) boxes, jittered
        for s in index.samples:
            for box, lab in zip(s.boxes.tolist(), s.labels.tolist()):
                b = np.array(box) + rng.normal(0, 0.8, size=4)
                results.append({"image_id": s.image_id, "category_id": int(lab),
                                "bbox": [b[0], b[1], max(b[2] - b[0], 0.1),
                                         max(b[3] - b[1], 0.1)], "score": float(rng.random())})
        write_detections(results, index.fmt, detections_out)  # the engine's own writer
        return evaluate(index, results)

    import densedet.cli.eval as eval_verb
    monkeypatch.setattr(eval_verb, "evaluate_model", fake_evaluate_model)
    saved, m_model, m_files = tmp_path / "d.json", tmp_path / "a.json", tmp_path / "b.json"
    assert _main(["eval", "--weights", "w.pt", "--save-detections", saved, "--json", m_model]) == 0
    assert _main(["eval", "--ann", root, "--classes", ",".join(CLASSES), "--detections", saved,
                  "--json", m_files]) == 0
    a, b = json.loads(m_model.read_text()), json.loads(m_files.read_text())
    assert (a["det_frame"], b["det_frame"], a["gt_format"]) == ("continuous", "voc", "voc")
    assert 0 < a["VOC_mAP50"] < 1
    for key in ("VOC_mAP50", "VOC07_mAP50", "AP", "AP50", "AP75", "AR100"):
        assert b[key] == pytest.approx(a[key], abs=1e-9), key
