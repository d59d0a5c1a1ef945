"""The validated experiment config: one flat YAML file a user reads top to bottom.

    from densedet.config import load_config
    cfg = load_config("configs/yolox_nano.yaml", ["train.epochs=5", "data.classes=cat,dog"])

Overrides are ``dotted.key=value``; the value is parsed as YAML (``train.amp=false``,
``input_size=[320,416]``), and ``data.classes=a,b,c`` is also read as a comma list.
Every section forbids unknown keys, so a typo fails at load time with the key named.

Keys relied on from outside (keep them): ``data.root``, ``data.format``, ``data.classes``,
``train.epochs``, ``train.batch_size``, ``input_size``, ``assigner.name``, ``output_dir``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from densedet.errors import DensedetError


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Section):
    """Which detector: ``densedet.models.build_model(name, num_classes, assigner, size, **params)``."""

    name: str = "yolox"
    size: Optional[str] = None
    params: dict[str, Any] = Field(default_factory=dict)
    # NMS-free detection: a one-to-one branch trained beside the head by dual assignment
    # (assigner.o2o, train.o2m_weight), used at inference without NMS (docs/end2end.md);
    # yolox, fcos, nanodet, lla
    end2end: bool = False
    # the one-to-one branch reads detached features (its loss then trains only its own layers)
    o2o_detach: bool = False
    # -- the input and decoding conventions of the weights (densedet's own by default; a file
    # from `densedet convert` carries the official model's, docs/pretrained.md)
    # channel order the first conv expects: rgb (densedet, torchvision, YOLOX legacy) or bgr
    # (current YOLOX weights)
    channel_order: Literal["rgb", "bgr"] = "rgb"
    # images in [0, 1] are multiplied by this before normalising: 255 for 0-255 models (YOLOX)
    input_scale: float = Field(1.0, gt=0)
    # (x * input_scale - pixel_mean) / pixel_std, in the units of input_scale and in
    # channel_order's order; YOLOX: [0, 0, 0] / [1, 1, 1]
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # prior centre (i + prior_offset) * step; null = the family's own (0.5 YOLOX/FCOS family,
    # 0 NanoDet-Plus); torchvision's FCOS uses 0
    prior_offset: Optional[float] = None
    # step between priors: stride, or input_div = input side // feature side per axis
    # (torchvision's anchor grid: differs from the stride on P6/P7 of padded inputs)
    prior_step: Literal["stride", "input_div"] = "stride"
    # FCOS/DW/LLA: a bias in every tower conv before its GroupNorm (torchvision's and mmdet's
    # FCOS layout; densedet's towers have none)
    tower_bias: bool = False
    # FCOS/DW/LLA: inference score sqrt(sigmoid(cls) * sigmoid(centerness)) (torchvision's FCOS)
    score_sqrt: bool = False
    # an ImageNet backbone file loaded before training (torchvision resnet18/resnet50 for
    # fcos/dw/lla, shufflenet_v2_x1_0 / x1_5 for nanodet); train.init_weights loads over it
    backbone_weights: Optional[str] = None


class O2OAssignerConfig(_Section):
    """The one-to-one branch's assigner of an end-to-end model (docs/end2end.md)."""

    name: str = "o2o"
    params: dict[str, Any] = Field(default_factory=dict)


class AssignerConfig(_Section):
    """Label assigner; ``name: null`` means the one the model family was published with."""

    name: Optional[str] = None
    params: dict[str, Any] = Field(default_factory=dict)
    # model.end2end: the one-to-one branch's assigner; null = o2o over this section's method
    # and params (one prior per object by the same metric), e.g. {name: tal_o2o} for YOLO26's
    o2o: Optional[O2OAssignerConfig] = None


class DataConfig(_Section):
    root: str = "data/synth"
    format: Optional[Literal["voc", "coco", "yolo"]] = "voc"
    classes: Optional[list[str]] = None
    train_split: Optional[str] = "train"
    val_split: Optional[str] = "val"  # null / none: train without validation (an explicit choice)
    skip_unknown: bool = False
    num_workers: int = Field(2, ge=0)

    @field_validator("classes", mode="before")
    @classmethod
    def _comma_list(cls, v):
        # "a,b,c" from the command line is a list too
        if isinstance(v, str):
            return [c.strip() for c in v.split(",") if c.strip()]
        return v

    @field_validator("classes")
    @classmethod
    def _not_empty(cls, v):
        # null means "the dataset's own list"; [] would mean a 0-class detector, which
        # otherwise surfaces far away as an assigner/model num_classes error
        if v is not None and not v:
            raise ValueError("empty list: give at least one class name, or omit the key to take "
                             "the classes from the dataset")
        return v

    @field_validator("val_split", mode="before")
    @classmethod
    def _no_split(cls, v):
        # data.val_split=none (or null, or empty) turns validation off; YAML only reads
        # null/~ as None, and "none" is what people type
        if isinstance(v, str) and v.strip().lower() in ("", "none", "null", "~"):
            return None
        return v


class AugmentConfig(_Section):
    """YOLOX-style augmentation (mosaic + mixup + random affine + HSV + flip)."""

    mosaic_prob: float = Field(1.0, ge=0, le=1)
    mixup_prob: float = Field(1.0, ge=0, le=1)
    hsv_prob: float = Field(1.0, ge=0, le=1)
    flip_prob: float = Field(0.5, ge=0, le=1)
    degrees: float = 10.0
    translate: float = 0.1
    mosaic_scale: tuple[float, float] = (0.1, 2.0)
    mixup_scale: tuple[float, float] = (0.5, 1.5)
    shear: float = 2.0


class TrainConfig(_Section):
    epochs: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=1)  # total over all processes
    optimizer: Literal["sgd", "adamw"] = "sgd"
    # learning rate for 64 images per step; the real one is lr * batch_size / 64 (YOLOX).
    lr: float = Field(0.01, gt=0)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = Field(5, ge=0)
    warmup_lr_ratio: float = Field(0.0, ge=0)  # warmup starts at lr * this
    no_aug_epochs: int = Field(15, ge=0)  # last epochs: no mosaic/mixup, L1 on, flat lr
    min_lr_ratio: float = Field(0.05, ge=0)
    ema: bool = True
    ema_decay: float = Field(0.9998, gt=0, lt=1)
    grad_clip: Optional[float] = None  # max gradient norm; null = off
    amp: bool = True  # mixed precision; only takes effect on CUDA
    # NHWC weights (activations follow): oneDNN's CPU convolutions and CUDA's tensor-core
    # kernels are faster in that layout (1.03-1.56x per CPU training step, docs/benchmarks.md)
    channels_last: bool = True
    multiscale: Optional[tuple[int, int]] = None  # [min, max] input side, multiples of 32
    multiscale_interval: int = Field(10, ge=1)  # iterations between size changes
    eval_interval: int = Field(10, ge=1)  # epochs; the last no_aug epochs evaluate every epoch
    checkpoint_interval: int = Field(100, ge=0)  # iterations between last.pt saves; 0 = per epoch
    seed: int = 0
    device: str = "auto"  # auto = cuda if available, else cpu
    log_interval: int = Field(10, ge=1)
    init_weights: Optional[str] = None  # start from these weights (mismatched tensors skipped)
    # init_weights (or --weights) whose backbone/neck mostly does not fit the model (fewer than
    # half of those tensors match by name and shape: another architecture or size) is an
    # error; true loads whatever fits anyway
    init_weights_partial: bool = False
    # model.end2end: one-to-many loss weight [first epoch, last epoch], linear in between; the
    # one-to-one loss weighs 1 - it (YOLO26's 0.8 -> 0.1)
    o2m_weight: tuple[float, float] = (0.8, 0.1)

    @field_validator("o2m_weight")
    @classmethod
    def _weights(cls, v):
        if not all(0.0 <= w <= 1.0 for w in v):
            raise ValueError("one-to-many loss weights lie in [0, 1]")
        return v


class EvalConfig(_Section):
    score_thresh: float = Field(0.01, ge=0, le=1)
    nms_iou: float = Field(0.65, gt=0, le=1)
    max_det: int = Field(100, ge=1)
    # null: automatic (NMS on the one-to-many head; an end-to-end model's one-to-one branch,
    # top max_det by score, no NMS); true: the one-to-many head with NMS (e.g. to compare an
    # end-to-end model's two branches); false: no NMS
    nms: Optional[bool] = None


class PreprocessConfig(_Section):
    """How evaluation, ``predict``, ``export`` users and the Python API fit an image to the
    network (training augmentation is unchanged). Defaults: densedet's centred letterbox.
    Official models converted by ``densedet convert`` carry their own (docs/pretrained.md)."""

    # letterbox: keep the aspect ratio inside input_size, pad the rest (densedet, YOLOX);
    # shorter_side: shorter side to input_size (an int), longer side at most max_size, pad to
    # a multiple of size_divisor (torchvision / mmdet FCOS; the input size varies per image);
    # warp: stretch to input_size with cv2.warpPerspective, aspect ratio not kept (NanoDet-Plus)
    resize: Literal["letterbox", "shorter_side", "warp"] = "letterbox"
    # letterbox: image centred (densedet) or at the top-left with the padding bottom-right (YOLOX)
    letterbox_position: Literal["center", "top_left"] = "center"
    # grey level 0-255 of the padding, or "mean": the normalisation mean, i.e. zero after
    # normalising (torchvision / mmdet pad the normalised tensor with zeros)
    pad_value: Union[int, Literal["mean"]] = 114
    # resized side length: round (densedet) or floor (YOLOX's int(), torchvision's)
    size_rounding: Literal["round", "floor"] = "round"
    # shorter_side: cap on the longer side (torchvision/mmdet: 1333); null = no cap
    max_size: Optional[int] = Field(None, ge=32)
    # shorter_side: the padded input is a multiple of this (32)
    size_divisor: int = Field(32, ge=1)
    # cv2: cv2.resize INTER_LINEAR on the uint8 image (densedet, YOLOX, mmdet); torch:
    # bilinear interpolation of the float image (torchvision, align_corners=False)
    interpolation: Literal["cv2", "torch"] = "cv2"

    @field_validator("pad_value")
    @classmethod
    def _grey(cls, v):
        if isinstance(v, int) and not 0 <= v <= 255:
            raise ValueError("pad_value is a grey level 0-255 or 'mean'")
        return v


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    assigner: AssignerConfig = Field(default_factory=AssignerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    input_size: Union[int, tuple[int, int]] = 640
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    output_dir: str = "runs/exp"

    @field_validator("input_size")
    @classmethod
    def _positive_size(cls, v):
        sizes = (v,) if isinstance(v, int) else v
        if any(s < 32 for s in sizes):
            raise ValueError("input_size must be at least 32")
        return v

    @property
    def input_hw(self) -> tuple[int, int]:
        """``input_size`` as ``(height, width)``."""
        s = self.input_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))


# ---------------------------------------------------------------- loading

def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=5"`` -> (["train", "epochs"], 5). The value is YAML."""
    if "=" not in text:
        raise DensedetError(f"override {text!r}: expected dotted.key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise DensedetError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise DensedetError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    if key == "data.classes" and isinstance(value, str):
        value = [c.strip() for c in value.split(",") if c.strip()]
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each ``dotted.key=value`` into the nested dict ``raw`` (in place; returned)."""
    for text in overrides or []:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise DensedetError(f"override {text!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _format_errors(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}")
        elif e["type"] == "value_error":  # our validators' messages, without pydantic's prefix
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return f"{where}: invalid config: " + "; ".join(lines)


# The presets ship inside the package (configs/ in a checkout links here), so an installed
# densedet finds them without a source tree.
PRESET_DIR = Path(__file__).resolve().parent / "configs"
PRESETS: tuple[str, ...] = tuple(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))


def preset_path(name: str) -> Path:
    """The YAML file of the preset ``name`` (e.g. ``yolox_nano``)."""
    if name not in PRESETS:
        raise DensedetError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESET_DIR / f"{name}.yaml"


def config_from_dict(raw: dict, overrides: Optional[list[str]] = None, where: str = "config") -> Config:
    """Validate a plain dict (e.g. the one stored in a checkpoint) plus overrides."""
    raw = apply_overrides(copy.deepcopy(dict(raw or {})), overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise DensedetError(_format_errors(e, where)) from None


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config, apply ``dotted.key=value`` overrides and validate.

    Raises:
        DensedetError: missing/unreadable file, bad YAML, unknown key or wrong type
            (the message names the key and the file).
    """
    path = Path(path)
    if not path.is_file() and path.name == str(path) and path.stem in PRESETS:
        path = PRESET_DIR / f"{path.stem}.yaml"  # a preset by name: `densedet train yolox_nano`
    if not path.is_file():
        raise DensedetError(f"{path}: config file not found (presets by name: {', '.join(PRESETS)})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DensedetError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise DensedetError(f"{path}: the config must be a mapping of keys, got {type(raw).__name__}")
    return config_from_dict(raw, overrides, where=str(path))


def config_to_dict(cfg: Config) -> dict:
    """Plain dict (lists, not tuples) that round-trips through YAML and checkpoints."""
    return cfg.model_dump(mode="json")
