"""VOC / COCO / YOLO readers: parsing, conventions, and a precise error for every bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densedet.data.index import BOX_TOLERANCE
from densedet.data.readers import detect_format, read_dataset
from densedet.data.yolo import write_yolo
from densedet.errors import DensedetError

CLASSES = ["cat", "dog"]
# The tiny dataset written in all three formats: stem -> (width, height, [(x1, y1, x2, y2, label)]).
TINY = {
    "a": (40, 30, [(2, 3, 12, 20, 0), (10, 5, 30, 25, 1)]),
    "b": (50, 40, [(0, 0, 50, 40, 1)]),
    "c": (20, 20, []),
}


def _image(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 120, 150)).save(path)


def _voc_xml(objects: str, filename: str = "", size: str = "") -> str:
    return f"<annotation>{filename}{size}{objects}</annotation>"


def _voc_obj(name: str, xmin, ymin, xmax, ymax, extra: str = "") -> str:
    return (f"<object><name>{name}</name>{extra}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def _size(w: int, h: int) -> str:
    return f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"


def write_voc(root: Path, data=TINY, ext: str = ".jpg") -> Path:
    for stem, (w, h, objs) in data.items():
        _image(root / "JPEGImages" / f"{stem}{ext}", w, h)
        body = "".join(_voc_obj(CLASSES[l], x1 + 1, y1 + 1, x2, y2) for x1, y1, x2, y2, l in objs)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(_voc_xml(body, f"<filename>{stem}{ext}</filename>", _size(w, h)))
    return root


def write_coco(root: Path, data=TINY, crowd: set = frozenset()) -> Path:
    images, anns = [], []
    for i, (stem, (w, h, objs)) in enumerate(data.items(), start=1):
        _image(root / "imgs" / f"{stem}.jpg", w, h)
        images.append({"id": i, "file_name": f"{stem}.jpg", "width": w, "height": h})
        for x1, y1, x2, y2, l in objs:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 10 + l,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": int(len(anns) + 1 in crowd)})
    cats = [{"id": 10 + k, "name": n} for k, n in enumerate(CLASSES)]
    path = root / "imgs" / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def write_yolo_tiny(root: Path, data=TINY, names_as_dict: bool = False) -> Path:
    for stem, (w, h, objs) in data.items():
        _image(root / "images" / "train" / f"{stem}.jpg", w, h)
        lines = [f"{l} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}"
                 for x1, y1, x2, y2, l in objs]
        (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "train" / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    names = "{0: cat, 1: dog}" if names_as_dict else "[cat, dog]"
    yml = root / "data.yaml"
    yml.write_text(f"path: .\ntrain: images/train\nval: images/train\nnames: {names}\n")
    return yml


def _by_id(index):
    return {Path(s.path).stem: s for s in index.samples}


# ----------------------------------------------------------------------------- good input

def test_all_three_formats_give_the_same_samples(tmp_path):
    voc = read_dataset(write_voc(tmp_path / "voc"), classes=CLASSES)
    coco = read_dataset(write_coco(tmp_path / "coco"))
    yolo = read_dataset(write_yolo_tiny(tmp_path / "yolo"), split="train")
    assert (voc.fmt, coco.fmt, yolo.fmt) == ("voc", "coco", "yolo")
    assert voc.classes == coco.classes == yolo.classes == CLASSES
    assert coco.category_ids == [10, 11] and voc.category_ids == yolo.category_ids == [0, 1]
    for stem, (w, h, objs) in TINY.items():
        want = np.array([o[:4] for o in objs], np.float32).reshape(-1, 4)
        for index in (voc, coco, yolo):
            s = _by_id(index)[stem]
            assert (s.width, s.height) == (w, h)
            np.testing.assert_allclose(s.boxes, want, atol=1e-4)
            assert s.labels.tolist() == [o[4] for o in objs]
            assert s.boxes.dtype == np.float32 and s.labels.dtype == np.int64
    assert _by_id(voc)["a"].image_id == "a" and _by_id(coco)["a"].image_id == 1


def test_voc_float_coords_difficult_missing_tags_and_size_from_image(tmp_path):
    _image(tmp_path / "JPEGImages" / "x.png", 64, 48)
    objs = (_voc_obj("cat", 10.5, 5.5, 30.25, 40, "<difficult>1</difficult><truncated>0</truncated>")
            + _voc_obj("dog", 1, 1, 64, 48))  # no difficult/pose/truncated tags; full image
    (tmp_path / "Annotations").mkdir()
    # No <size> and no <filename>: the size comes from the image, the path from stem + extension.
    (tmp_path / "Annotations" / "x.xml").write_text(_voc_xml(objs))
    (s,) = read_dataset(tmp_path, classes=CLASSES).samples
    assert s.path.endswith("x.png") and (s.width, s.height) == (64, 48)
    np.testing.assert_allclose(s.boxes, [[9.5, 4.5, 30.25, 40], [0, 0, 64, 48]])
    assert s.ignore.tolist() == [True, False]


def test_voc_xml_without_objects_is_an_empty_image(tmp_path):
    _image(tmp_path / "JPEGImages" / "e.jpg", 10, 10)
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "e.xml").write_text(_voc_xml("", "<filename>e.jpg</filename>", _size(10, 10)))
    (s,) = read_dataset(tmp_path, classes=CLASSES).samples
    assert s.boxes.shape == (0, 4) and s.labels.shape == (0,)


def test_voc_split_list_and_classes_txt(tmp_path):
    root = write_voc(tmp_path)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "val.txt").write_text("b\nc\n")
    with pytest.raises(DensedetError, match="class list"):
        read_dataset(root)
    (root / "classes.txt").write_text("cat\ndog\n")
    index = read_dataset(root, split="val")
    assert [s.image_id for s in index.samples] == ["b", "c"]
    with pytest.raises(DensedetError, match=r"test\.txt: split list not found"):
        read_dataset(root, split="test")


def test_coco_iscrowd_is_ignore_and_class_subset(tmp_path):
    path = write_coco(tmp_path, crowd={2})
    index = read_dataset(path)
    a = _by_id(index)["a"]
    assert a.ignore.tolist() == [False, True]
    # A subset of classes maps by name; the other class is an error unless skipped and counted.
    with pytest.raises(DensedetError, match=r"instances\.json: annotation id 1: unknown class 'cat'"):
        read_dataset(path, classes=["dog"])
    sub = read_dataset(path, classes=["dog"], skip_unknown=True)
    assert sub.skipped == {"cat": 1} and sub.category_ids == [11]
    assert _by_id(sub)["a"].labels.tolist() == [0]
    with pytest.raises(DensedetError, match="'bird' are not among"):
        read_dataset(path, classes=["bird"])


@pytest.mark.parametrize("as_dict", [False, True])
def test_yolo_names_list_or_dict_and_missing_label_file(tmp_path, as_dict):
    yml = write_yolo_tiny(tmp_path, names_as_dict=as_dict)
    (tmp_path / "labels" / "train" / "c.txt").unlink()  # no label file: an image without objects
    index = read_dataset(yml)
    assert index.classes == CLASSES
    assert len(index.samples) == 3  # train and val list the same images: read once
    assert _by_id(index)["c"].boxes.shape == (0, 4)


def test_yolo_directory_without_yaml_and_polygon_line(tmp_path):
    _image(tmp_path / "images" / "p.jpg", 100, 50)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "p.txt").write_text("1 0.1 0.2 0.5 0.2 0.3 0.8\n")
    assert detect_format(tmp_path) == "yolo"
    (s,) = read_dataset(tmp_path, classes=CLASSES).samples
    np.testing.assert_allclose(s.boxes, [[10, 10, 50, 40]], atol=1e-4)


def test_detect_format(tmp_path):
    assert detect_format(write_voc(tmp_path / "v")) == "voc"
    assert detect_format(write_coco(tmp_path / "c")) == "coco"
    assert detect_format(write_yolo_tiny(tmp_path / "y")) == "yolo"
    (tmp_path / "other").mkdir()
    with pytest.raises(DensedetError, match="cannot tell the dataset format"):
        detect_format(tmp_path / "other")


def test_write_yolo_round_trip_leaves_out_ignored(tmp_path):
    voc_root = write_voc(tmp_path / "voc")
    xml = voc_root / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<name>dog</name>", "<name>dog</name><difficult>1</difficult>"))
    voc = read_dataset(voc_root, classes=CLASSES)
    yml = write_yolo(voc, tmp_path / "y", "train")
    assert "val: images/train" in yml.read_text()  # Ultralytics needs a val entry
    write_yolo(voc, tmp_path / "y", "val")
    assert "val: images/val" in yml.read_text()
    assert (tmp_path / "y" / "images" / "train" / "a.jpg").is_symlink()
    back = read_dataset(yml, split="val")
    a = _by_id(back)["a"]
    np.testing.assert_allclose(a.boxes, [[2, 3, 12, 20]], atol=1e-3)  # the difficult dog is gone
    np.testing.assert_allclose(_by_id(back)["b"].boxes, [[0, 0, 50, 40]], atol=1e-3)


# ----------------------------------------------------------------------------- bad input

def test_malformed_xml_names_file_and_line(tmp_path):
    root = write_voc(tmp_path)
    bad = root / "Annotations" / "b.xml"
    bad.write_text("<annotation>\n<object><name>cat</name>\n</annotation>")
    with pytest.raises(DensedetError, match=rf"{bad}: line 3: malformed XML"):
        read_dataset(root, classes=CLASSES)
    index = read_dataset(root, classes=CLASSES, strict=False)
    assert sorted(s.image_id for s in index.samples) == ["a", "c"]
    assert [(p.file, p.where) for p in index.problems] == [(str(bad), "line 3")]


def test_blank_xml_file_is_an_error(tmp_path):
    root = write_voc(tmp_path)
    (root / "Annotations" / "c.xml").write_text("  \n")
    with pytest.raises(DensedetError, match=r"c\.xml: line 2: malformed XML"):
        read_dataset(root, classes=CLASSES)


def test_unknown_class_is_an_error_or_counted(tmp_path):
    root = write_voc(tmp_path)
    xml = root / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<name>dog</name>", "<name>horse</name>"))
    with pytest.raises(DensedetError, match=rf"{xml}: object 2 \('horse'\): unknown class 'horse'"):
        read_dataset(root, classes=CLASSES)
    index = read_dataset(root, classes=CLASSES, skip_unknown=True)
    assert index.skipped == {"horse": 1}
    assert _by_id(index)["a"].labels.tolist() == [0]


@pytest.mark.parametrize("box, message", [
    ((1, 1, 42, 30), "lies outside the 40x30 image"),   # xmax 2 px past the right edge
    ((-3, 1, 10, 10), "lies outside the 40x30 image"),  # x1 = -4
    ((10, 5, 7, 20), "zero or negative size"),          # xmax < xmin - 1 -> negative width
    ((10, 5, 9.0, 20), "zero or negative size"),        # xmax == xmin - 1 -> x2 == x1, zero width
    ((5, 8, 20, 7), "zero or negative size"),           # y2 == y1
])
def test_bad_voc_box_names_file_and_object(tmp_path, box, message):
    root = write_voc(tmp_path)
    xml = root / "Annotations" / "a.xml"
    xml.write_text(_voc_xml(_voc_obj("cat", 2, 2, 5, 5) + _voc_obj("dog", *box), "<filename>a.jpg</filename>", _size(40, 30)))
    with pytest.raises(DensedetError, match=rf"{xml}: object 2 \('dog'\): box .* {message}"):
        read_dataset(root, classes=CLASSES)


def test_voc_object_without_coordinate(tmp_path):
    root = write_voc(tmp_path)
    xml = root / "Annotations" / "b.xml"
    xml.write_text(xml.read_text().replace("<ymax>40</ymax>", ""))
    with pytest.raises(DensedetError, match=rf"{xml}: object 1 \('dog'\): <bndbox> lacks <ymax>"):
        read_dataset(root, classes=CLASSES)


def test_box_within_tolerance_is_clipped(tmp_path):
    root = write_voc(tmp_path)
    xml = root / "Annotations" / "a.xml"
    # VOC's common xmin = 0 (one pixel left of the image in 1-based indices) and xmax = width + 1.
    xml.write_text(_voc_xml(_voc_obj("cat", 0, 1, 40 + BOX_TOLERANCE, 30), "", _size(40, 30)))
    np.testing.assert_allclose(_by_id(read_dataset(root, classes=CLASSES))["a"].boxes, [[0, 0, 40, 30]])


def test_missing_image(tmp_path):
    root = write_voc(tmp_path)
    (root / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(DensedetError, match=r"Annotations/b\.xml: image not found"):
        read_dataset(root, classes=CLASSES)
    coco = write_coco(tmp_path / "coco")
    (tmp_path / "coco" / "imgs" / "b.jpg").unlink()
    with pytest.raises(DensedetError, match=r"instances\.json: image id 2: image 'b\.jpg' not found"):
        read_dataset(coco)


def test_malformed_json_names_file_and_line(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DensedetError, match=rf"{bad}: line 2: malformed JSON"):
        read_dataset(bad)


def _coco_edit(tmp_path, edit) -> Path:
    path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["images"].append(dict(d["images"][0])), "image id 1: duplicate image id"),
    (lambda d: d["annotations"][1].update(id=1), "annotation id 1: duplicate annotation id"),
    (lambda d: d["annotations"][0].update(image_id=99), "annotation id 1: points at image id 99"),
    (lambda d: d["annotations"][2].update(category_id=7), "annotation id 3: unknown category id 7"),
    (lambda d: d["annotations"][2].update(bbox=[0, 0, 0, 5]), "annotation id 3: box .* zero or negative size"),
    (lambda d: d["annotations"][2].update(bbox=[10, 10, 45, 5]), "annotation id 3: box .* outside the 50x40"),
])
def test_bad_coco_names_file_and_id(tmp_path, edit, message):
    path = _coco_edit(tmp_path, edit)
    with pytest.raises(DensedetError, match=rf"{path}: {message}"):
        read_dataset(path)


@pytest.mark.parametrize("line, message", [
    ("2 0.5 0.5 0.2 0.2", r"class index 2 out of range 0\.\.1"),
    ("-1 0.5 0.5 0.2 0.2", r"class index -1 out of range"),
    ("nan 0.5 0.5 0.2 0.2", r"class index nan out of range"),
    ("0.5 0.5 0.5 0.2 0.2", r"class index 0\.5 out of range"),
    ("0 0.5 0.5 0.2", "expected 'class cx cy w h'"),
    ("0 0.5 x 0.2 0.2", "non-numeric value"),
    ("0 0.5 0.5 0 0.2", "box .* zero or negative size"),
    ("0 1.2 0.5 0.4 0.2", "box .* outside the 40x30 image"),
])
def test_bad_yolo_line_names_file_and_line(tmp_path, line, message):
    yml = write_yolo_tiny(tmp_path)
    labels = tmp_path / "labels" / "train" / "a.txt"
    labels.write_text(labels.read_text() + "\n" + line + "\n")  # blank line 3 is fine; line 4 is bad
    with pytest.raises(DensedetError, match=rf"{labels}: line 4: {message}"):
        read_dataset(yml)


def test_yolo_missing_image_listed_in_txt(tmp_path):
    yml = write_yolo_tiny(tmp_path)
    (tmp_path / "train.txt").write_text("images/train/a.jpg\nimages/train/zz.jpg\n")
    yml.write_text(yml.read_text().replace("train: images/train", "train: train.txt"))
    with pytest.raises(DensedetError, match=r"zz\.jpg: image not found"):
        read_dataset(yml, split="train")


def test_non_strict_collects_every_problem(tmp_path):
    root = write_voc(tmp_path)
    (root / "Annotations" / "a.xml").write_text(_voc_xml(
        _voc_obj("cat", 2, 2, 5, 5) + _voc_obj("horse", 2, 2, 5, 5) + _voc_obj("dog", 5, 5, 99, 9),
        "", _size(40, 30)))
    (root / "Annotations" / "c.xml").write_text("")
    index = read_dataset(root, classes=CLASSES, strict=False)
    assert [(Path(p.file).name, p.where) for p in index.problems] == [
        ("a.xml", "object 2 ('horse')"), ("a.xml", "object 3 ('dog')"), ("c.xml", "line 1")]
    assert _by_id(index)["a"].labels.tolist() == [0]  # the good object survives


def test_voc_cache_is_used_and_never_stale(tmp_path, monkeypatch):
    import densedet.data.voc as voc
    monkeypatch.setenv("DENSEDET_CACHE_DIR", str(tmp_path / "cache"))
    root = write_voc(tmp_path / "d")
    first = read_dataset(root, classes=CLASSES, cache=True)
    assert len(list((tmp_path / "cache").glob("voc-*.json"))) == 1  # JSON, never pickle
    parsed = []
    real = voc.load_voc_xml
    monkeypatch.setattr(voc, "load_voc_xml", lambda xml: parsed.append(xml.name) or real(xml))
    again = read_dataset(root, classes=CLASSES, cache=True)
    assert parsed == []  # every file came from the cache
    for a, b in zip(first.samples, again.samples):
        np.testing.assert_array_equal(a.boxes, b.boxes)
    # Edit one file, keeping its size: only the mtime changes, and that is enough.
    xml = root / "Annotations" / "a.xml"
    text = xml.read_text().replace("<xmax>12</xmax>", "<xmax>13</xmax>")
    st = xml.stat()
    xml.write_text(text)
    os.utime(xml, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert xml.stat().st_size == st.st_size
    edited = read_dataset(root, classes=CLASSES, cache=True)
    assert parsed == ["a.xml"]
    assert _by_id(edited)["a"].boxes[0].tolist() == [2, 3, 13, 20]
    # Validation is not cached: a deleted image is still found out.
    (root / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(DensedetError, match=r"b\.xml: image not found"):
        read_dataset(root, classes=CLASSES, cache=True)
