"""Training refuses bad inputs up front, with a message naming the file or key and the fix:
a broken or empty val split, weights of another architecture, an output_dir holding a run,
an empty class list, and weights files carrying pickled code. Also: leftovers of killed
saves are cleaned, and densedet's own checkpoints load with ``weights_only=True``."""
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from densedet.config import load_config
from densedet.engine import train
from densedet.engine.checkpoint import (load_checkpoint, load_matching, remove_stale_tmp, rng_state,
                                        set_rng_state)
from densedet.errors import DensedetError
from test_engine import CONFIGS, make_tiny_dataset, tiny_overrides

NANO = CONFIGS / "yolox_nano.yaml"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "synth")


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory) -> Path:
    """One complete two-iteration run (with validation); tests only read it."""
    out = tmp_path_factory.mktemp("runs") / "done"
    train(NANO, tiny_overrides(tiny_data, out), log=lambda s: None)
    return out


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- 1. val split
def test_missing_val_image_is_refused_before_training(tiny_data, tmp_path):
    data = copy_dataset(tiny_data, tmp_path / "data")
    stem = (data / "ImageSets" / "Main" / "val.txt").read_text().split()[0]
    (data / "JPEGImages" / f"{stem}.jpg").unlink()
    out = tmp_path / "run"
    with pytest.raises(DensedetError) as e:
        train(NANO, tiny_overrides(data, out), log=lambda s: None)
    msg = str(e.value)
    # names the annotation whose image is gone, the key, and both ways out
    assert stem in msg and "data.val_split" in msg and "data.val_split=null" in msg
    assert not (out / "log.csv").exists() and not (out / "last.pt").exists()


def test_missing_val_list_is_refused(tiny_data, tmp_path):
    data = copy_dataset(tiny_data, tmp_path / "data")
    (data / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(DensedetError, match=r"val\.txt.*data\.val_split=null"):
        train(NANO, tiny_overrides(data, tmp_path / "run"), log=lambda s: None)


def test_empty_val_list_is_refused_naming_the_list(tiny_data, tmp_path):
    data = copy_dataset(tiny_data, tmp_path / "data")
    val_list = data / "ImageSets" / "Main" / "val.txt"
    val_list.write_text("\n")
    with pytest.raises(DensedetError) as e:
        train(NANO, tiny_overrides(data, tmp_path / "run"), log=lambda s: None)
    msg = str(e.value)
    assert str(val_list) in msg and "no images" in msg
    assert "fill it" in msg and "data.val_split=null" in msg


@pytest.mark.parametrize("value", ["null", "none", "None", "~", ""])
def test_val_split_off_spellings(value, tmp_path):
    cfg = load_config(NANO, [f"data.val_split={value}"])
    assert cfg.data.val_split is None
    p = tmp_path / "exp.yaml"
    p.write_text("data:\n  val_split: null\n")
    assert load_config(p).data.val_split is None
    assert load_config(NANO, ["data.val_split=val"]).data.val_split == "val"


def test_val_split_none_trains_without_validation_and_says_so(tiny_data, tmp_path):
    data = copy_dataset(tiny_data, tmp_path / "data")
    (data / "ImageSets" / "Main" / "val.txt").unlink()  # not even read
    lines = []
    out = tmp_path / "run"
    metrics = train(NANO, tiny_overrides(data, out, **{"data.val_split": "none"}), log=lines.append)
    assert any(line.startswith("validation off (data.val_split=null)") for line in lines)
    assert (out / "best.pt").is_file() and "AP" not in metrics


# ----------------------------------------------------------------------------- 2. weights that barely fit
def _yolox(size: str, num_classes: int = 3):
    from densedet.models import build_model

    torch.manual_seed(0)
    return build_model("yolox", num_classes=num_classes, size=size)


def test_weights_of_another_size_are_refused(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(_yolox("tiny").state_dict(), path)
    nano = _yolox("nano")
    before = {k: v.clone() for k, v in nano.state_dict().items()}
    lines = []
    with pytest.raises(DensedetError) as e:
        load_matching(nano, load_checkpoint(path)["model"], log=lines.append, source=path)
    msg = str(e.value)
    assert str(path) in msg and "backbone/neck" in msg and "train.init_weights_partial=true" in msg
    # the count is printed even when refusing, and the model is untouched
    m = re.search(r"loaded (\d+) of (\d+) model tensors \((\d+) shape-skipped, (\d+) missing\)", "\n".join(lines))
    assert m and int(m.group(2)) == len(nano.state_dict()) and int(m.group(1)) < int(m.group(2)) // 2
    assert all(torch.equal(v, before[k]) for k, v in nano.state_dict().items())

    # explicitly allowed: loads what fits and says so
    lines = []
    load_matching(nano, load_checkpoint(path)["model"], log=lines.append, source=path, allow_partial=True)
    assert any("loading anyway (train.init_weights_partial=true)" in line for line in lines)


def test_another_depth_of_the_same_backbone_is_refused():
    # ResNet-50 FCOS into ResNet-18 FCOS: the convs differ, but many BatchNorm tensors keep
    # their names and shapes, so a count of tensors would let it through
    from densedet.models import build_model

    r18 = build_model("fcos", num_classes=3, size="r18")
    r50 = build_model("fcos", num_classes=3, size="r50")
    own, other = r18.state_dict(), r50.state_dict()
    feats = [k for k in own if k.startswith(("backbone.", "neck."))]
    fits = [k for k in feats if k in other and other[k].shape == own[k].shape]
    assert len(fits) * 2 >= len(feats)  # what the tensor count saw
    with pytest.raises(DensedetError, match=r"% of their weights"):
        load_matching(r18, other, log=lambda s: None, source="fcos_r50.pt")


def test_init_weights_of_another_size_refused_by_train(tiny_data, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save({"model": _yolox("tiny", 10).state_dict()}, path)
    with pytest.raises(DensedetError, match=re.escape(str(path)) + ".*init_weights_partial"):
        train(NANO, tiny_overrides(tiny_data, tmp_path / "a", **{"train.init_weights": str(path)}),
              log=lambda s: None)
    assert not (tmp_path / "a" / "log.csv").exists()
    # the config key lets it through (documented next to init_weights)
    lines = []
    train(NANO, tiny_overrides(tiny_data, tmp_path / "b", **{"train.init_weights": str(path),
                                                             "train.init_weights_partial": "true"}),
          log=lines.append)
    assert any("loading anyway" in line for line in lines)


def test_other_class_count_loads_with_the_count_printed(tmp_path):
    path = tmp_path / "ten.pt"
    torch.save(_yolox("nano", 10).state_dict(), path)
    dst = _yolox("nano", 3)
    n_model = len(dst.state_dict())
    lines = []
    mismatched, missing = load_matching(dst, load_checkpoint(path)["model"], log=lines.append, source=path)
    text = "\n".join(lines)
    assert len(mismatched) == 6 and not missing  # the three levels' cls_preds weight + bias
    assert f"loaded {n_model - 6} of {n_model} model tensors (6 shape-skipped, 0 missing)" in text
    assert "the classifier (head.cls_preds)" in text and "class count?" not in text


def test_count_line_printed_on_a_full_match():
    src, dst = _yolox("nano"), _yolox("nano")
    lines = []
    load_matching(dst, src.state_dict(), log=lines.append)
    n = len(dst.state_dict())
    assert lines == [f"weights: loaded {n} of {n} model tensors (0 shape-skipped, 0 missing)"]


# ----------------------------------------------------------------------------- 3. output_dir with a run
@pytest.mark.parametrize("name", ["best.pt", "last.pt", "metrics.json", "log.csv"])
def test_output_dir_with_a_run_is_refused_first(name, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("previous run\n")
    # a data root that does not exist: the output_dir check must come before any data read
    with pytest.raises(DensedetError) as e:
        train(NANO, tiny_overrides(tmp_path / "nowhere", out), log=lambda s: None)
    msg = str(e.value)
    assert str(out) in msg and name in msg and "--resume" in msg and "--force" in msg
    assert (out / name).read_text() == "previous run\n"


def test_force_replaces_the_previous_run(finished_run, tiny_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "metrics.json").write_text('{"AP": 0.99}\n')  # marks the old run's file
    old_events = sorted((out / "tb").glob("events.out.tfevents.*"))
    assert old_events
    with pytest.raises(DensedetError, match="--force"):
        train(NANO, tiny_overrides(tiny_data, out), log=lambda s: None)
    lines = []
    train(NANO, tiny_overrides(tiny_data, out), log=lines.append, force=True)
    assert '"AP": 0.99' not in (out / "metrics.json").read_text()
    assert not any(p.exists() for p in old_events)
    assert any(line.startswith("--force: removed the previous run's") for line in lines)


def test_resume_and_force_together_are_refused(tiny_data, tmp_path):
    with pytest.raises(DensedetError, match="--resume.*--force"):
        train(NANO, tiny_overrides(tiny_data, tmp_path / "x"), resume=True, force=True)


def test_cli_force_flag_reaches_train(monkeypatch, tmp_path):
    import argparse

    from densedet.cli import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    seen = {}
    monkeypatch.setattr(train_cli, "train", lambda cfg, **kw: seen.update(kw))
    assert train_cli.run(parser.parse_args([str(NANO), f"output_dir={tmp_path}", "--force"])) == 0
    assert seen["force"] is True and seen["resume"] is False
    assert train_cli.run(parser.parse_args([str(NANO)])) == 0
    assert seen["force"] is False


# ----------------------------------------------------------------------------- 4. stale temporary files
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_tmp_files_removed_at_start(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead, ours, alive = _dead_pid(), os.getpid(), os.getppid()
    stale = [f".last.pt.{dead}.tmp", f".best.pt.{ours}.tmp", ".metrics.json.tmp", f".metrics.json.{dead}.tmp"]
    kept = [f".last.pt.{alive}.tmp",  # its writer may be mid-save
            ".other.pt.123.tmp", "last.pt.1.tmp", "notes.txt"]  # not save_atomic's names
    for name in stale + kept:
        (out / name).write_bytes(b"partial")
    lines = []
    train(NANO, tiny_overrides(tiny_data, out), log=lines.append)
    assert not any((out / n).exists() for n in stale)
    assert all((out / n).exists() for n in kept)
    line = next(line for line in lines if line.startswith("removed 4 temporary file(s)"))
    assert all(n in line for n in stale)
    assert remove_stale_tmp(tmp_path / "absent") == []


# ----------------------------------------------------------------------------- 5. empty class list
@pytest.mark.parametrize("where", ["override", "yaml list", "yaml comma string"])
def test_empty_class_list_names_the_key(where, tiny_data, tmp_path):
    path, overrides = NANO, ["data.classes=[]"]
    if where != "override":
        path, overrides = tmp_path / "exp.yaml", []
        path.write_text("data:\n  classes: " + ("[]" if where == "yaml list" else "' , '") + "\n")
    with pytest.raises(DensedetError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert ("data.classes: empty list: give at least one class name, or omit the key to take the "
            "classes from the dataset") in msg
    assert str(path) in msg and "assigner" not in msg
    # what omitting means: null takes the dataset's own list (synth writes classes.txt)
    assert load_config(NANO, ["data.classes=null"]).data.classes is None
    with pytest.raises(DensedetError, match="data.classes"):  # and the trainer says the same
        train(NANO, tiny_overrides(tiny_data, tmp_path / "run") + ["data.classes=[]"])


# ----------------------------------------------------------------------------- 6. untrusted files
class _Payload:
    """Unpickling runs ``os.system(cmd)``."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_torch_load_is_weights_only_everywhere():
    calls = []
    for path in (REPO / "densedet").rglob("*.py"):
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", path.read_text()):
            calls.append((path.name, m.group(0)))
    assert calls
    assert all("weights_only=True" in call for _, call in calls), calls


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pickled_code_is_refused_not_run(how, tiny_data, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    obj = {"model": {"w": torch.zeros(1)}, "extra": _Payload(f"touch {marker}")}
    if how == "torch.save":
        torch.save(obj, evil)
    else:
        evil.write_bytes(pickle.dumps(obj, protocol=2))
    # the payload is live: an unrestricted load would run it
    live = tmp_path / "live.pt"
    torch.save({"x": _Payload(f"touch {tmp_path / 'live'}")}, live)
    torch.load(live, weights_only=False)
    assert (tmp_path / "live").exists()

    with pytest.raises(DensedetError) as e:
        load_checkpoint(evil)
    msg = str(e.value)
    assert str(evil) in msg and "refuses to unpickle code; only tensors/plain containers are loaded" in msg
    with pytest.raises(DensedetError, match="refuses to unpickle code"):
        train(NANO, tiny_overrides(tiny_data, tmp_path / "run"), weights=str(evil), log=lambda s: None)
    from densedet.engine.build import model_from_weights
    with pytest.raises(DensedetError, match="refuses to unpickle code"):
        model_from_weights(evil)
    assert not marker.exists()


def test_own_checkpoints_load_weights_only(finished_run):
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(finished_run / name, weights_only=True)  # no densedet allow-list
        assert ckpt["classes"][0] == "circle" and ckpt["rng"]["torch"].dtype == torch.uint8


def test_rng_state_roundtrip_through_weights_only_file(tmp_path):
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1)), np.random.normal()

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # numpy caches a second gaussian: part of the state
    path = tmp_path / "rng.pt"
    torch.save({"rng": rng_state()}, path)
    expected = draw()
    draw()
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert draw() == expected


def test_checkpoint_with_numpy_rng_of_older_versions_still_loads(tmp_path):
    """Checkpoints written before RNG states were tensors hold numpy's uint32 array."""
    np.random.seed(5)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    path = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "rng": old}, path)
    expected = np.random.rand()
    set_rng_state(load_checkpoint(path)["rng"])
    assert np.random.rand() == expected
    # but no other numpy array (object arrays can carry anything)
    torch.save({"model": {"w": torch.zeros(1)}, "x": np.array([1, "a"], dtype=object)}, path)
    with pytest.raises(DensedetError, match="refuses to unpickle code"):
        load_checkpoint(path)
