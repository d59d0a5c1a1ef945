"""``densedet synth``: determinism, valid boxes, class coverage, crowd overlap, speed."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from densedet.cli import main
from densedet.data.check import check_dataset
from densedet.data.readers import read_dataset
from densedet.data.synth import CROWD_CLASSES, SYNTH_CLASSES, generate_crowd, image_rng, make_synth
from densedet.errors import DensedetError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _max_iou_per_box(boxes: np.ndarray) -> np.ndarray:
    b = boxes.astype(np.float64)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(b[:, None, :2], b[None, :, :2])
    rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    iou = inter / (area[:, None] + area[None, :] - inter)
    np.fill_diagonal(iou, 0)
    return iou.max(1)


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path):
    # 32 images: the smallest run that uses the process pool.
    make_synth(tmp_path / "a", images=32, size=96, seed=5, workers=1)
    make_synth(tmp_path / "b", images=32, size=96, seed=5, workers=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 32 * 2 + 4 + 1 + 1 + 4  # jpg+xml, 4 lists, classes.txt, annotations.json, 4 per-list jsons
    # Every file, json included (its image paths are relative), matches byte for byte.
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    make_synth(tmp_path / "c", images=4, size=96, seed=6, workers=1)
    assert _files(tmp_path / "c")["JPEGImages/000001.jpg"] != a["JPEGImages/000001.jpg"]


def test_boxes_valid_classes_and_formats_agree(tmp_path):
    root = tmp_path / "s"
    index = make_synth(root, images=40, size=160, seed=0, workers=1)
    assert len(SYNTH_CLASSES) >= 8 and len(set(SYNTH_CLASSES)) == len(SYNTH_CLASSES)
    voc = read_dataset(root)  # finds classes.txt
    assert voc.classes == SYNTH_CLASSES
    assert check_dataset(voc) == []
    labels = np.concatenate([s.labels for s in voc.samples])
    assert set(labels.tolist()) == set(range(len(SYNTH_CLASSES)))  # every class shows up
    for s in voc.samples:
        b = s.boxes
        assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
        assert np.all(b[:, :2] >= 0) and np.all(b[:, 2] <= 160) and np.all(b[:, 3] <= 160)
    # Same boxes through the COCO json (category id = class index + 1, image id = int(stem)).
    coco = read_dataset(root / "annotations.json")
    assert coco.category_ids == [i + 1 for i in range(len(SYNTH_CLASSES))]
    by_id = {s.image_id: s for s in coco.samples}
    for s, made in zip(voc.samples, index.samples):
        np.testing.assert_array_equal(s.boxes, made.boxes)
        np.testing.assert_array_equal(by_id[int(s.image_id)].boxes, s.boxes)
        np.testing.assert_array_equal(by_id[int(s.image_id)].labels, s.labels)
    # fmt="coco" on the directory picks annotations_<split>.json.
    val_coco = read_dataset(root, fmt="coco", split="val")
    assert sorted(s.image_id for s in val_coco.samples) == sorted(int(s.image_id) for s in read_dataset(root, split="val").samples)
    # Lists: 80/10/10 and the per-list jsons hold the same images.
    tr = (root / "ImageSets" / "Main" / "train.txt").read_text().split()
    assert len(tr) == 32
    assert sorted(im["id"] for im in json.loads((root / "annotations_train.json").read_text())["images"]) \
        == sorted(int(x) for x in tr)


def test_size_spread_has_small_but_not_mostly_small(tmp_path):
    index = make_synth(tmp_path / "s", images=60, size=320, seed=1, workers=1)
    b = np.concatenate([s.boxes for s in index.samples])
    side = np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    small = (side <= 16).mean()
    assert 0.05 < small < 0.4
    assert side.max() > 0.4 * 320


def test_crowd_is_dense_and_heavily_overlapping():
    ious, counts = [], []
    for i in range(6):
        img, boxes, labels = generate_crowd(image_rng(0, i), 320)
        assert img.shape == (320, 320, 3) and np.all(labels == 0)
        assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] <= 320)
        counts.append(len(boxes))
        ious.append(_max_iou_per_box(boxes).mean())
    assert CROWD_CLASSES == ["person"]
    assert np.mean(counts) >= 15 and max(counts) <= 60
    # The default mode sits near 0.05; crowded full-body boxes must overlap far more.
    assert np.mean(ious) > 0.2


def test_cli_small_run_is_fast_and_refuses_non_empty_out(tmp_path, capsys):
    out = tmp_path / "s"
    t0 = time.perf_counter()
    assert main(["synth", str(out), "--images", "20", "--size", "320", "--crowd"]) == 0
    assert time.perf_counter() - t0 < 20
    printed = capsys.readouterr().out
    assert "20 images" in printed and "person" in printed
    assert read_dataset(out).classes == CROWD_CLASSES
    assert main(["synth", str(out), "--images", "2"]) == 1
    captured = capsys.readouterr()
    assert "is not empty; pass --force" in captured.err and "Traceback" not in captured.err
    assert main(["synth", str(out), "--images", "2", "--force"]) == 0
    assert len(list((out / "JPEGImages").iterdir())) == 2


def test_bad_arguments():
    with pytest.raises(DensedetError, match="--images >= 1"):
        make_synth("/nonexistent/never", images=0)
