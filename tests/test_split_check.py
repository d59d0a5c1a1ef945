"""``densedet split`` and ``densedet check``: fractions, determinism, refusal; problem lists and
clean CLI errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densedet.cli import main
from densedet.data.check import check_dataset, size_stats
from densedet.data.readers import read_dataset
from densedet.data.split import split_stems
from densedet.errors import DensedetError


def _voc(root: Path, n: int = 3, size=(40, 30)) -> Path:
    """n images, each with one cat box, and a classes.txt."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "classes.txt").write_text("cat\ndog\n")
    for i in range(n):
        Image.new("RGB", size, (100, 50, 20)).save(root / "JPEGImages" / f"{i:03d}.jpg")
        (root / "Annotations" / f"{i:03d}.xml").write_text(
            f"<annotation><filename>{i:03d}.jpg</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height></size><object><name>cat</name><bndbox><xmin>3</xmin>"
            "<ymin>4</ymin><xmax>20</xmax><ymax>25</ymax></bndbox></object></annotation>")
    return root


def _read_lists(root: Path) -> dict[str, list[str]]:
    main_dir = root / "ImageSets" / "Main"
    return {n: (main_dir / f"{n}.txt").read_text().split() for n in ("trainval", "train", "val", "test")}


def _no_traceback(captured) -> None:
    assert "Traceback" not in captured.err and "Traceback" not in captured.out


# ----------------------------------------------------------------------------- split

def test_split_fractions_and_partition():
    stems = [f"{i:04d}" for i in range(200)]
    lists = split_stems(stems, trainval=0.9, train=0.75, seed=3)
    assert len(lists["trainval"]) == 180 and len(lists["train"]) == 135
    assert len(lists["val"]) == 45 and len(lists["test"]) == 20
    assert set(lists["train"]) | set(lists["val"]) == set(lists["trainval"])
    assert not set(lists["train"]) & set(lists["val"])
    assert set(lists["trainval"]) | set(lists["test"]) == set(stems)
    assert all(v == sorted(v) for v in lists.values())
    # 8/9 of 1800 must give 1600 (float rounding would give 1599).
    assert len(split_stems([str(i) for i in range(2000)], 0.9, 8 / 9)["train"]) == 1600


def test_split_deterministic_per_seed_and_order_independent():
    stems = [f"{i:04d}" for i in range(100)]
    a = split_stems(stems, 0.8, 0.5, seed=1)
    assert a == split_stems(list(reversed(stems)), 0.8, 0.5, seed=1)
    assert a != split_stems(stems, 0.8, 0.5, seed=2)
    with pytest.raises(DensedetError, match="--trainval must be a fraction"):
        split_stems(stems, 1.5)


def test_split_cli_writes_lists_and_refuses_overwrite(tmp_path, capsys):
    root = _voc(tmp_path / "d", n=10)
    assert main(["split", str(root), "--trainval", "0.8", "--train", "0.5", "--seed", "7"]) == 0
    lists = _read_lists(root)
    assert [len(lists[k]) for k in ("trainval", "train", "val", "test")] == [8, 4, 4, 2]
    capsys.readouterr()
    assert main(["split", str(root), "--seed", "8"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("densedet split: error: ") and "trainval.txt already exists" in captured.err
    _no_traceback(captured)
    assert _read_lists(root) == lists  # untouched
    assert main(["split", str(root), "--force"]) == 0
    assert len(_read_lists(root)["test"]) == 1
    # The lists are readable splits.
    assert len(read_dataset(root, split="test").samples) == 1


def test_split_needs_a_voc_root(tmp_path, capsys):
    assert main(["split", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "no Annotations/ directory" in captured.err
    _no_traceback(captured)


# ----------------------------------------------------------------------------- check

def test_check_clean_dataset_prints_summary(tmp_path, capsys):
    root = _voc(tmp_path / "d")
    assert main(["check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "3 images, 3 objects (0 ignored); images without objects: 0" in out and "no problems found" in out
    assert "cat" in out and "small (<32) 3" in out


def test_check_undecodable_and_wrong_size_images(tmp_path, capsys):
    root = _voc(tmp_path / "d")
    (root / "JPEGImages" / "001.jpg").write_bytes(b"\xff\xd8 this is not a jpeg at all" * 10)
    Image.new("RGB", (41, 30)).save(root / "JPEGImages" / "002.jpg")
    index = read_dataset(root)
    problems = check_dataset(index)
    assert {(Path(p.file).name, p.message.split(" (")[0]) for p in problems} == {
        ("001.jpg", "cannot decode image"), ("002.jpg", "decoded size 41x30 differs from the annotated 40x30 in "
                                            + str(root / "Annotations" / "002.xml"))}
    assert check_dataset(index, decode_images=False) == []
    assert main(["check", str(root)]) == 1
    captured = capsys.readouterr()
    _no_traceback(captured)
    assert "2 problems in 2 files" in captured.out
    assert f"{root / 'JPEGImages' / '001.jpg'}:\n  cannot decode image" in captured.out


def test_check_lists_every_annotation_problem(tmp_path, capsys):
    root = _voc(tmp_path / "d")
    (root / "Annotations" / "000.xml").write_text("<annotation><object>")  # malformed
    (root / "Annotations" / "001.xml").write_text("")                       # blank
    xml = root / "Annotations" / "002.xml"
    xml.write_text(xml.read_text().replace("<name>cat</name>", "<name>cow</name>"))
    assert main(["check", str(root)]) == 1
    captured = capsys.readouterr()
    _no_traceback(captured)
    out = captured.out
    assert "3 problems in 3 files" in out
    assert f"{root / 'Annotations' / '000.xml'}:\n  line 1: malformed XML" in out
    assert f"{root / 'Annotations' / '001.xml'}:\n  line 1: malformed XML" in out
    assert f"{xml}:\n  object 1 ('cow'): unknown class 'cow'" in out
    # --skip-unknown turns the unknown class into a reported count instead of a problem.
    (root / "Annotations" / "000.xml").unlink()
    (root / "Annotations" / "001.xml").unlink()
    assert main(["check", str(root), "--skip-unknown"]) == 0
    assert "skipped unknown-class objects: cow 1" in capsys.readouterr().out


def test_check_cli_fatal_errors_are_clean(tmp_path, capsys):
    root = _voc(tmp_path / "d")
    (root / "classes.txt").unlink()
    assert main(["check", str(root)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("densedet check: error: ") and "class list" in captured.err
    _no_traceback(captured)
    bad = tmp_path / "bad.json"
    bad.write_text("{\n\n oops")
    assert main(["check", str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"{bad}: line 3: malformed JSON" in captured.err
    _no_traceback(captured)
    assert main(["check", str(root), "--classes", "cat,dog", "--split", "nope"]) == 1
    assert "nope.txt: split list not found" in capsys.readouterr().err


def test_check_box_problems_in_samples_built_elsewhere(tmp_path):
    index = read_dataset(_voc(tmp_path / "d"))
    s = index.samples[0]
    s.boxes = np.array([[5, 5, 4, 9], [0, 0, 80, 10]], np.float32)
    s.labels = np.array([0, 5])
    s.ignore = np.zeros(2, bool)
    problems = check_dataset(index, decode_images=False)
    assert [(p.where, p.message.split(" ")[0]) for p in problems] == [
        ("object 1", "box"), ("object 2", "label"), ("object 2", "box")]
    assert all(p.file == s.source for p in problems)


def test_size_stats_buckets(tmp_path):
    index = read_dataset(_voc(tmp_path / "d", n=1))
    index.samples[0].boxes = np.array([[0, 0, 10, 10], [0, 0, 40, 40], [0, 0, 100, 100]], np.float32)
    index.samples[0].labels = np.zeros(3, np.int64)
    index.samples[0].ignore = np.array([False, False, False])
    st = size_stats(index)
    assert (st["small"], st["medium"], st["large"]) == (1, 1, 1) and st["p50"] == 40


def test_check_flags_exif_rotation(tmp_path):
    root = _voc(tmp_path / "d", n=1)
    im = Image.new("RGB", (40, 30))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90: viewers honouring EXIF show 30x40
    im.save(root / "JPEGImages" / "000.jpg", exif=exif)
    # densedet ignores EXIF orientation everywhere: annotated on the stored 40x30 grid is fine
    assert check_dataset(read_dataset(root)) == []
    # annotated with the rotated size: drawn on the rotated view, and check says so
    xml = root / "Annotations" / "000.xml"
    xml.write_text(xml.read_text().replace("<width>40</width><height>30</height>",
                                           "<width>30</width><height>40</height>"))
    (problem,) = check_dataset(read_dataset(root))
    assert problem.file.endswith("000.jpg") and "EXIF orientation 6" in problem.message
    assert problem.message.startswith("decoded size 40x30 differs from the annotated 30x40")
