"""Input files as users have them: ids with spaces and non-ASCII in split lists, one image
decoder for training / check / predict (EXIF orientation ignored, truncated JPEGs refused,
named), predict carrying on past a broken image, and a VOC cache that is never unpickled."""
from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from densedet.data.check import check_dataset
from densedet.data.dataset import DetectionDataset
from densedet.data.image import ImageError, jpeg_truncated, read_image
from densedet.data.index import DatasetIndex
from densedet.data.readers import read_dataset
from densedet.data.sample import Sample
from densedet.data.split import split_dataset
from densedet.data.voc import parse_split_line, read_split_list
from densedet.errors import DensedetError
from densedet.predict import predict, print_summary
from test_export_predict import CLASSES as PREDICT_CLASSES  # noqa: F401
from test_export_predict import weights  # noqa: F401  (the checkpoint fixture)

ODD = "im 0002 é"  # spaces and non-ASCII: a stem densedet split writes as it is


def _voc(root: Path, stems: list[str], size=(40, 30)) -> Path:
    """One cat box per image, and a classes.txt (like test_split_check's helper, any stems)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "classes.txt").write_text("cat\ndog\n")
    for stem in stems:
        Image.new("RGB", size, (100, 50, 20)).save(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height></size><object><name>cat</name><bndbox><xmin>3</xmin>"
            "<ymin>4</ymin><xmax>20</xmax><ymax>25</ymax></bndbox></object></annotation>",
            encoding="utf-8")
    return root


def _noise_jpeg(h: int = 120, w: int = 160, seed: int = 0) -> bytes:
    """A smooth random JPEG (compresses to a few kB, so a cut lands in the scan data)."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    return buf.tobytes()


def _truncated_jpeg(path: Path) -> Path:
    data = _noise_jpeg()
    path.write_bytes(data[: len(data) // 2])
    return path


def _exif_rotated_jpeg(path: Path, w: int, h: int, orientation: int = 6) -> np.ndarray:
    """A JPEG stored ``w x h`` with an EXIF orientation tag; returns its stored pixels (BGR)."""
    rng = np.random.default_rng(3)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, quality=95)
    return read_image(path)


def _check_image(path: Path, width: int, height: int):
    """check_dataset's problems for one image annotated ``width x height``."""
    index = DatasetIndex([Sample("x", str(path), width, height, source="x.xml")], ["cat"], [0])
    return check_dataset(index)


# ----------------------------------------------------------------------------- split lists

def test_split_then_read_and_check_ids_with_spaces_and_non_ascii(tmp_path):
    # "im 1" ends in a word that looks like VOC's per-class flag: it must still read whole
    root = _voc(tmp_path / "d", ["000", ODD, "im 1"])
    split_dataset(root, trainval=1.0)
    lines = (root / "ImageSets" / "Main" / "trainval.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(lines) == sorted(["000", ODD, "im 1"])  # written as is
    for cache in (False, True):
        index = read_dataset(root, split="trainval", cache=cache)
        assert sorted(s.image_id for s in index.samples) == sorted(["000", ODD, "im 1"])
    odd = next(s for s in index.samples if s.image_id == ODD)
    assert Path(odd.path).name == f"{ODD}.jpg" and odd.boxes.tolist() == [[2, 3, 20, 25]]
    assert check_dataset(index) == []


def test_split_list_lines_flags_bom_and_bad_utf8(tmp_path):
    assert parse_split_line("000005 -1") == "000005"          # VOC per-class list
    assert parse_split_line("000005  1\r") == "000005"
    assert parse_split_line(f"{ODD} 0") == ODD
    assert parse_split_line(f"  {ODD}\t") == ODD               # a whole line is an id
    assert parse_split_line("a b c") == "a b c"
    assert parse_split_line("   ") is None
    assert parse_split_line("im 1") == "im"                     # unknown: the 1 is a flag ...
    assert parse_split_line("im 1", {"im 1"}.__contains__) == "im 1"  # ... unless "im 1" exists
    lst = tmp_path / "val.txt"
    lst.write_bytes(b"\xef\xbb\xbf" + f"{ODD}\n\nb -1\n".encode())  # BOM, as Notepad writes
    assert read_split_list(lst) == [(ODD, 1), ("b", 3)]
    lst.write_bytes(b"a\nb\xe9\n")  # latin-1, not UTF-8
    with pytest.raises(DensedetError, match=rf"{lst}: line 2: not valid UTF-8"):
        read_split_list(lst)


def test_split_refuses_a_stem_a_list_line_cannot_carry(tmp_path):
    root = _voc(tmp_path / "d", ["000", "trailing "])
    with pytest.raises(DensedetError, match="trailing .xml': .*rename the annotation and its image"):
        split_dataset(root)
    assert not (root / "ImageSets").exists()  # nothing half-written


# ----------------------------------------------------------------------------- one decoder

def test_read_image_uses_the_stored_grid_and_reduces(tmp_path):
    path = tmp_path / "rot.jpg"
    _exif_rotated_jpeg(path, 40, 30, orientation=6)
    assert read_image(path).shape == (30, 40, 3)     # stored 40x30, not the rotated 30x40
    assert read_image(path, 2).shape == (15, 20, 3)  # the loader's reduced JPEG decode
    sample = Sample("rot", str(path), 40, 30)
    ds = DetectionDataset([sample], 32)
    assert ds.load(0)[3] == (30, 40)
    assert _check_image(path, 40, 30) == []  # annotated on the stored grid: fine
    # annotated with the rotated size: labelled on the rotated view, and check says so
    (problem,) = _check_image(path, 30, 40)
    assert "EXIF orientation 6" in problem.message and "stored pixels" in problem.message


def test_jpeg_truncation_detection():
    data = _noise_jpeg()
    assert not jpeg_truncated(data)
    assert not jpeg_truncated(data + b"\x00" * 7 + b"appended video")  # motion-photo trailer
    assert jpeg_truncated(data[: len(data) // 2])  # cut in the scan data
    assert jpeg_truncated(data[:-1])
    assert jpeg_truncated(data[:40])               # cut in the header segments
    assert not jpeg_truncated(b"\x89PNG\r\n\x1a\n")  # not a JPEG: the decoder judges it
    # progressive JPEG: several scans, tables between them
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", progressive=True, quality=90)
    prog = buf.getvalue()
    assert not jpeg_truncated(prog) and jpeg_truncated(prog[: len(prog) * 2 // 3])


def test_truncated_jpeg_is_named_by_loader_and_check(tmp_path):
    bad = _truncated_jpeg(tmp_path / "half.jpg")
    with pytest.raises(ImageError, match=r"half\.jpg: truncated JPEG") as err:
        read_image(bad)
    assert isinstance(err.value, DensedetError)
    ds = DetectionDataset([Sample(0, str(bad), 160, 120)], 64)
    with pytest.raises(DensedetError, match=r"half\.jpg: truncated JPEG"):
        ds[0]
    (problem,) = _check_image(bad, 160, 120)
    assert problem.file == str(bad) and problem.message.startswith("truncated JPEG")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: empty image file"):
        read_image(empty)


# ----------------------------------------------------------------------------- predict

def test_predict_names_broken_images_and_keeps_one_grid(weights, tmp_path, capsys):  # noqa: F811
    src = tmp_path / "imgs"
    src.mkdir()
    bad = _truncated_jpeg(src / "broken.jpg")
    stored = _exif_rotated_jpeg(src / "rotated.jpg", 80, 48, orientation=6)
    # the same pixels without the EXIF tag must give the same detections
    cv2.imwrite(str(src / "plain.png"), stored)
    out = tmp_path / "pred"
    written = predict(str(weights), [str(src)], out, score_thresh=0.05, device="cpu")
    capsys.readouterr()
    assert print_summary(written, out) == 1  # what `densedet predict` prints and exits with
    captured = capsys.readouterr()
    assert f"{bad}: truncated JPEG" in captured.err
    assert "FAILED: 1 image(s) could not be read" in captured.out
    data = json.loads((out / "detections.json").read_text())
    assert data == written
    assert set(data) == {"weights", "classes", "score_thresh", "branch", "images", "errors"}
    assert [e["file"] for e in data["errors"]] == [str(bad)]
    assert data["errors"][0]["error"].startswith("truncated JPEG")
    by_name = {Path(r["image"]).name: r for r in data["images"]}
    assert set(by_name) == {"rotated.jpg", "plain.png"}  # the others went on
    rot = by_name["rotated.jpg"]
    assert (rot["width"], rot["height"]) == (80, 48)
    drawn = read_image(rot["drawn"])
    assert drawn.shape[:2] == (48, 80)  # drawn on the stored grid, like the boxes
    boxes = np.array([d["box"] for d in rot["detections"]]).reshape(-1, 4)
    assert len(boxes) and (boxes[:, [0, 2]] <= 80).all() and (boxes[:, [1, 3]] <= 48).all()
    # the PNG holds the JPEG's stored pixels: EXIF did not rotate what the model saw either
    assert by_name["plain.png"]["detections"] == rot["detections"]


# ----------------------------------------------------------------------------- VOC cache

def _cached_voc(tmp_path, monkeypatch) -> tuple[Path, Path]:
    monkeypatch.setenv("DENSEDET_CACHE_DIR", str(tmp_path / "cache"))
    root = _voc(tmp_path / "d", ["a", "b"])
    read_dataset(root, cache=True)
    (cache_file,) = (tmp_path / "cache").glob("voc-*.json")
    return root, cache_file


class _Planted:
    """Unpickling this runs ``os.mkdir(marker)``: what a planted cache file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_voc_cache_never_unpickles_a_planted_file(tmp_path, monkeypatch):
    root, cache_file = _cached_voc(tmp_path, monkeypatch)
    marker = tmp_path / "pwned"
    payload = pickle.dumps((1, _Planted(marker)))
    cache_file.write_bytes(payload)                         # in the cache file itself ...
    cache_file.with_suffix(".pkl").write_bytes(payload)     # ... and where the pickle cache was
    index = read_dataset(root, cache=True)
    assert not marker.exists()
    assert sorted(s.image_id for s in index.samples) == ["a", "b"]
    assert json.loads(cache_file.read_text())["version"] == 2  # rebuilt as JSON


def test_voc_cache_survives_corrupt_and_malformed_entries(tmp_path, monkeypatch):
    import densedet.data.voc as voc
    root, cache_file = _cached_voc(tmp_path, monkeypatch)
    stored = json.loads(cache_file.read_text())
    stored["entries"]["a.xml"]["raw"]["objects"] = [{"name": 7}]  # wrong shape: re-parse a.xml
    cache_file.write_text(json.dumps(stored))
    parsed = []
    real = voc.load_voc_xml
    monkeypatch.setattr(voc, "load_voc_xml", lambda xml: parsed.append(xml.name) or real(xml))
    assert len(read_dataset(root, cache=True).samples) == 2
    assert parsed == ["a.xml"]  # b.xml still came from the cache
    cache_file.write_text('{"version": 2, "entries": {"a.xml": ')  # cut off mid-write
    assert len(read_dataset(root, cache=True).samples) == 2
    assert set(json.loads(cache_file.read_text())["entries"]) == {"a.xml", "b.xml"}
    assert not list(cache_file.parent.glob("*.tmp"))  # the atomic write left nothing behind
