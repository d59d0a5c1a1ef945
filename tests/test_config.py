"""Config loading: schema, overrides, errors naming the key and the file, presets."""
from pathlib import Path

import pytest
import yaml

from densedet.config import Config, apply_overrides, config_from_dict, config_to_dict, load_config
from densedet.engine.build import assigner_name
from densedet.errors import DensedetError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ["yolox_nano", "yolox_tiny", "yolox_s", "fcos_r18", "nanodet_plus_m", "dw_r18", "lla_r18"]


def write(tmp_path, data) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_fixed_keys_exist_with_their_names(tmp_path):
    cfg = load_config(write(tmp_path, {}), [
        "data.root=/some/where", "data.format=coco", "data.classes=[a, b]", "train.epochs=7",
        "train.batch_size=3", "input_size=320", "assigner.name=atss", "output_dir=out/x"])
    assert cfg.data.root == "/some/where" and cfg.data.format == "coco"
    assert cfg.data.classes == ["a", "b"]
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.input_size) == (7, 3, 320)
    assert cfg.assigner.name == "atss" and cfg.output_dir == "out/x"


def test_override_values_are_yaml(tmp_path):
    cfg = load_config(write(tmp_path, {"train": {"amp": True}}), [
        "train.amp=false", "input_size=[320, 416]", "train.lr=2e-3", "train.grad_clip=null",
        "model.params.width=0.5", "train.multiscale=[320,480]"])
    assert cfg.train.amp is False
    assert cfg.input_hw == (320, 416)
    assert cfg.train.lr == pytest.approx(2e-3)
    assert cfg.train.grad_clip is None
    assert cfg.model.params == {"width": 0.5}
    assert cfg.train.multiscale == (320, 480)


def test_classes_comma_list(tmp_path):
    cfg = load_config(write(tmp_path, {}), ["data.classes=cat, dog,bird"])
    assert cfg.data.classes == ["cat", "dog", "bird"]
    # also in the YAML file itself
    cfg = load_config(write(tmp_path, {"data": {"classes": "a,b"}}))
    assert cfg.data.classes == ["a", "b"]


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, {"train": {"epochs": 3, "epoch": 4}})
    with pytest.raises(DensedetError) as e:
        load_config(path)
    assert "train.epoch" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(DensedetError, match=r"train\.learning_rate"):
        load_config(write(tmp_path, {}), ["train.learning_rate=0.1"])
    with pytest.raises(DensedetError, match="'bogus'"):
        load_config(write(tmp_path, {"bogus": 1}))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(DensedetError, match=r"train\.epochs") as e:
        load_config(write(tmp_path, {}), ["train.epochs=many"])
    assert "many" in str(e.value)
    with pytest.raises(DensedetError, match=r"train\.optimizer"):
        load_config(write(tmp_path, {}), ["train.optimizer=rmsprop"])
    with pytest.raises(DensedetError, match=r"data\.format"):
        load_config(write(tmp_path, {"data": {"format": "pascal"}}))
    with pytest.raises(DensedetError, match="input_size"):
        load_config(write(tmp_path, {}), ["input_size=8"])


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(DensedetError, match="key=value"):
        load_config(write(tmp_path, {}), ["train.epochs"])
    with pytest.raises(DensedetError, match="not a section"):
        load_config(write(tmp_path, {"output_dir": "runs/a"}), ["output_dir.x=1"])
    with pytest.raises(DensedetError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(DensedetError, match="YAML"):
        load_config(bad)


def test_roundtrip_through_dict_does_not_mutate():
    raw = {"train": {"epochs": 5}}
    cfg = config_from_dict(raw, ["train.epochs=6"])
    assert raw == {"train": {"epochs": 5}}  # checkpoints' stored configs stay intact
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_defaults_follow_yolox():
    cfg = Config()
    assert cfg.train.lr == 0.01 and cfg.train.batch_size == 64
    assert cfg.train.no_aug_epochs == 15 and cfg.train.min_lr_ratio == 0.05
    assert assigner_name(cfg) == "simota"  # yolox's own when assigner.name is null


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_point_at_synth(name):
    from densedet.data.synth import SYNTH_CLASSES
    from densedet.models import DEFAULT_ASSIGNER

    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.data.root == "data/synth" and cfg.data.format == "voc"
    assert cfg.data.classes == list(SYNTH_CLASSES)
    assert assigner_name(cfg) == DEFAULT_ASSIGNER[cfg.model.name]
    assert load_config(name) == cfg  # a preset by name: the file shipped in the package
    # written out in full: every section present in the file itself
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert set(raw) == set(Config.model_fields)
