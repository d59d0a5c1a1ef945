"""Weights from the field: the official YOLOX, NanoDet-Plus, torchvision and mmdet files, read
as densedet state dicts with the conventions that make them compute what they computed there.

A layout (``--from`` of ``densedet convert``) is recognised from the tensor names:

| layout             | file                                             | densedet model |
|--------------------|--------------------------------------------------|----------------|
| `yolox`            | YOLOX ``{"model": sd}`` (``yolox_s.pth``): BGR 0-255 input | yolox nano/tiny/s/m/l/x |
| `yolox-legacy`     | the same layout, older weights: RGB + ImageNet mean/std | (told apart only by ``--from``) |
| `nanodet`          | NanoDet-Plus ``{"state_dict": model.* / avg_model.*}`` (.ckpt, .pth) | nanodet m / m-1.5x |
| `torchvision-fcos` | ``fcos_resnet50_fpn`` state dict                 | fcos r50       |
| `mmdet-fcos`       | mmdet FCOS ``{"meta", "state_dict"}`` (pytorch-style ResNet, centerness on the regression tower) | fcos r18 / r50 |
| `torchvision-resnet`, `torchvision-shufflenet` | ImageNet classifiers (``model.backbone_weights``) | backbones only |

:func:`convert_state` renames the tensors and returns, with them, the config keys under which
densedet reproduces the official outputs (:class:`Official`): input channel order and
normalisation, prior offset and grid, tower conv biases, score, resize, official test size
and thresholds. What is changed on the way:

* YOLOX: its box centre is ``(i + tx) * s``; densedet's priors sit at ``(i + 0.5) * s`` and
  decode ``prior + tx * s``, so ``reg_preds`` bias ``[0:2]`` is shifted by -0.5 (exact).
* NanoDet-Plus: the EMA weights (``avg_model.*``) when the file has them; ``conv1`` takes its
  input channels reversed (the official model reads BGR, densedet feeds RGB: exact); the
  training-only guidance head (``aux_fpn``, ``aux_head``) is dropped (the converted model has
  ``use_aux: false``).
* torchvision: frozen BatchNorm has no ``num_batches_tracked`` (filled with 0) and FCOS no
  per-level scale (1.0).

:func:`prepare_init` / :func:`load_init` are ``train.init_weights`` for any of these files
(and densedet checkpoints): the conventions the weights need are taken into the run's config
unless the config sets them, the class count may differ (NanoDet-Plus's fused class + box
conv keeps its box rows), and counts are reported per part.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from torch import Tensor, nn

from densedet.config import Config
from densedet.engine.checkpoint import inference_state_dict, load_matching, safe_load
from densedet.errors import DensedetError

LAYOUTS = ("yolox", "yolox-legacy", "nanodet", "torchvision-fcos", "mmdet-fcos")
BACKBONE_LAYOUTS = ("torchvision-resnet", "torchvision-shufflenet")

#: model keys that describe what the weights expect (taken from an init file into the run)
CONVENTION_KEYS = ("channel_order", "input_scale", "pixel_mean", "pixel_std", "prior_offset",
                   "prior_step", "tower_bias", "score_sqrt")


def coco_names(with_background: bool = False) -> list[str]:
    """COCO's class names: the 80 contiguous ones (YOLOX, NanoDet, mmdet), or torchvision's
    91 category-id slots (``__background__`` and ``N/A`` gaps, made unique as ``N/A_<id>``)."""
    from torchvision.models.detection import FCOS_ResNet50_FPN_Weights

    cats = list(FCOS_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    if with_background:
        return [f"N/A_{i}" if c == "N/A" else c for i, c in enumerate(cats)]
    return [c for c in cats if c not in ("__background__", "N/A")]


# ----------------------------------------------------------------------------- reading

class _PickledClassKey:
    """Stand-in for a class a pickle only names (Lightning keyed callback states by their
    class in older releases). It is never given behaviour: creating one does nothing."""

    def __init__(self, *args, **kwargs):
        pass


#: classes named in Lightning checkpoints as dictionary keys (``callbacks``), resolved to
#: :class:`_PickledClassKey`: a name, not code
_LIGHTNING_CLASS_KEYS = tuple(
    f"{pkg}.callbacks.{mod}.{cls}"
    for pkg in ("pytorch_lightning", "lightning.pytorch")
    for mod, cls in (("model_checkpoint", "ModelCheckpoint"), ("early_stopping", "EarlyStopping"),
                     ("lr_monitor", "LearningRateMonitor"), ("progress.tqdm_progress", "TQDMProgressBar"),
                     ("progress", "ProgressBar"), ("model_summary", "ModelSummary"))
)


def read_weights(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` of a weights file from anywhere: tensors and plain
    containers only, plus the class *names* Lightning checkpoints use as dictionary keys
    (mapped to an inert stand-in). Code in a pickle is refused, never run."""
    return safe_load(Path(path), extra_globals=[(_PickledClassKey, name) for name in _LIGHTNING_CLASS_KEYS],
                     hint="If you trust the file, re-save its state dict with "
                          "torch.save(ckpt['state_dict'], ...) yourself")


def _tensors(d: Any) -> dict[str, Tensor]:
    return {k: v for k, v in d.items() if isinstance(v, Tensor)} if isinstance(d, dict) else {}


def extract_state(obj: Any) -> tuple[dict[str, Tensor], list[str]]:
    """The model's tensors in a loaded file, and notes on the choice: Lightning / NanoDet
    ``state_dict`` (EMA ``avg_model.*`` preferred, ``model.*`` otherwise), mmdet
    ``state_dict``, YOLOX / densedet ``model`` (a densedet EMA when present), or a bare dict."""
    notes: list[str] = []
    if not isinstance(obj, dict):
        raise DensedetError("not a weights file: expected a dict of tensors")
    if isinstance(obj.get("state_dict"), dict):
        sd = _tensors(obj["state_dict"])
        ema = {k[len("avg_model."):]: v for k, v in sd.items() if k.startswith("avg_model.")}
        if ema:
            notes.append(f"EMA weights (avg_model.*, {len(ema)} tensors)")
            return ema, notes
        plain = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        if plain:
            return plain, notes
        return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}, notes
    if isinstance(obj.get("model"), dict):
        if isinstance(obj.get("ema"), dict) and "module" in obj["ema"]:
            notes.append("EMA weights")
        return _tensors(inference_state_dict(obj)), notes
    return _tensors(obj), notes


def detect_layout(state: dict[str, Tensor]) -> Optional[str]:
    """The layout of a state dict (``None``: densedet's own or unknown)."""
    keys = set(state)
    if "backbone.backbone.stem.conv.conv.weight" in keys and "head.cls_preds.0.weight" in keys:
        return "yolox"
    if "head.gfl_cls.0.weight" in keys and "fpn.reduce_layers.0.conv.weight" in keys:
        return "nanodet"
    if "head.classification_head.cls_logits.weight" in keys and "backbone.body.conv1.weight" in keys:
        return "torchvision-fcos"
    if "bbox_head.conv_cls.weight" in keys and "neck.lateral_convs.0.conv.weight" in keys:
        return "mmdet-fcos"
    if "layer1.0.conv1.weight" in keys and "conv1.weight" in keys:
        return "torchvision-resnet"
    if "stage2.0.branch1.0.weight" in keys and "conv1.0.weight" in keys:
        return "torchvision-shufflenet"
    return None


# ----------------------------------------------------------------------------- conversion

@dataclass
class Official:
    """A converted official model: densedet tensors and the config that runs them.

    ``model``/``preprocess``/``eval`` are config sections (plain dicts, merged over a
    default :class:`~densedet.config.Config`), ``input_size`` the official test size.
    ``fill``: densedet tensor names the file does not have and that take the model's own
    values (``num_batches_tracked``, FCOS scales at 1.0)."""

    layout: str
    state: dict[str, Tensor]
    num_classes: int
    model: dict
    input_size: Any
    preprocess: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    classes: Optional[list[str]] = None
    notes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    fill: list[str] = field(default_factory=list)

    def conventions(self) -> dict:
        """The ``model`` keys the weights need (:data:`CONVENTION_KEYS` that are set)."""
        return {k: v for k, v in self.model.items() if k in CONVENTION_KEYS}


def _rename(state: dict[str, Tensor], rules: list[tuple[str, str]]) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


#: YOLOX's BaseConv (``conv``, ``bn``) and DWConv (``dconv``, ``pconv``) -> ConvNormAct
#: (Sequential: 0 conv, 1 norm) and DepthwiseSeparableConv (0 depthwise, 1 pointwise)
_YOLOX_BLOCKS = [(r"\.dconv\.", ".0."), (r"\.pconv\.", ".1."), (r"\.conv\.weight$", ".0.weight"),
                 (r"\.bn\.(\w+)$", r".1.\1")]
_YOLOX_NECK = {"lateral_conv0": "lateral5", "C3_p4": "td4", "reduce_conv1": "lateral4", "C3_p3": "td3",
               "bu_conv2": "down3", "C3_n3": "bu4", "bu_conv1": "down4", "C3_n4": "bu5"}
#: (width, depth multiplier, depthwise) -> densedet size
_YOLOX_SIZES = {(16, 1, True): "nano", (24, 1, False): "tiny", (32, 1, False): "s",
                (48, 2, False): "m", (64, 3, False): "l", (80, 4, False): "x"}


def _yolox(state: dict[str, Tensor], legacy: bool) -> Official:
    out = {}
    for k, v in state.items():
        if k.startswith("backbone.backbone."):
            k = "backbone." + k[len("backbone.backbone."):]
        elif k.startswith("backbone."):
            name, _, rest = k[len("backbone."):].partition(".")
            if name not in _YOLOX_NECK:
                raise DensedetError(f"unexpected YOLOX tensor {k}")
            k = f"neck.{_YOLOX_NECK[name]}.{rest}"
        elif not k.startswith("head."):
            continue
        out[k] = v
    out = _rename(out, _YOLOX_BLOCKS)
    for name in [k for k in out if re.fullmatch(r"head\.reg_preds\.\d+\.bias", k)]:
        bias = out[name].clone()
        bias[:2] -= 0.5  # official centre (i + tx) * s; densedet's prior (i + 0.5) * s + tx * s
        out[name] = bias
    width = int(state["backbone.backbone.stem.conv.conv.weight"].shape[0])
    depthwise = "backbone.backbone.dark2.0.dconv.conv.weight" in state
    depth = len({k.split(".")[5] for k in state if k.startswith("backbone.backbone.dark2.1.m.")})
    num_classes = int(state["head.cls_preds.0.weight"].shape[0])
    size = _YOLOX_SIZES.get((width, depth, depthwise))
    model: dict = {"name": "yolox", "size": size or "s", "params": {}}
    if size is None:  # a custom depth/width: say it in params
        model["params"] = {"width": width / 64, "depth": {1: 0.33, 2: 0.67, 3: 1.0, 4: 1.33}.get(depth, depth / 3),
                           "depthwise": depthwise}
    if legacy:  # RGB in [0, 1], ImageNet mean/std: densedet's own convention
        model.update(channel_order="rgb", input_scale=1.0, pixel_mean=[0.485, 0.456, 0.406],
                     pixel_std=[0.229, 0.224, 0.225])
    else:  # BGR 0-255, no normalisation
        model.update(channel_order="bgr", input_scale=255.0, pixel_mean=[0.0, 0.0, 0.0],
                     pixel_std=[1.0, 1.0, 1.0])
    small = size in ("nano", "tiny")
    return Official(
        layout="yolox-legacy" if legacy else "yolox", state=out, num_classes=num_classes, model=model,
        input_size=416 if small else 640,
        preprocess=dict(resize="letterbox", letterbox_position="top_left", pad_value=114,
                        size_rounding="floor", interpolation="cv2"),
        eval=dict(score_thresh=0.01, nms_iou=0.65, max_det=100),
        classes=coco_names() if num_classes == 80 else None,
        notes=[f"YOLOX-{size or 'custom'} ({'legacy: RGB + ImageNet mean/std' if legacy else 'BGR 0-255'}); "
               f"box-centre bias shifted by -0.5 (densedet priors at cell centres)"])


_NANODET_RULES = [
    (r"^fpn\.", "neck."),
    (r"^neck\.reduce_layers\.", "neck.reduce."),
    (r"^neck\.top_down_blocks\.", "neck.top_down."),
    (r"^neck\.bottom_up_blocks\.", "neck.bottom_up."),
    (r"^neck\.extra_lvl_in_conv\.", "neck.extra_in."),
    (r"^neck\.extra_lvl_out_conv\.", "neck.extra_out."),
    (r"\.primary_conv\.", ".primary."),
    (r"\.cheap_operation\.", ".cheap."),
    (r"\.shortcut\.0\.", ".shortcut.0.0."), (r"\.shortcut\.1\.", ".shortcut.0.1."),
    (r"\.shortcut\.2\.", ".shortcut.1.0."), (r"\.shortcut\.3\.", ".shortcut.1.1."),
    (r"^head\.cls_convs\.", "head.towers."),
    (r"^head\.gfl_cls\.", "head.preds."),
    # DepthwiseConvModule -> DepthwiseSeparableConv; ConvModule -> ConvNormAct
    (r"\.depthwise\.weight$", ".0.0.weight"), (r"\.dwnorm\.(\w+)$", r".0.1.\1"),
    (r"\.pointwise\.weight$", ".1.0.weight"), (r"\.pwnorm\.(\w+)$", r".1.1.\1"),
    (r"\.conv\.weight$", ".0.weight"), (r"\.bn\.(\w+)$", r".1.\1"),
]
#: ShuffleNetV2 width (stage2 output channels) -> densedet nanodet size
_NANODET_SIZES = {116: "m", 176: "m-1.5x"}


def _nanodet(state: dict[str, Tensor]) -> Official:
    dropped = [k for k in state if k.startswith(("aux_fpn.", "aux_head."))]
    # head.distribution_project.project is the constant bin vector 0..reg_max (densedet's
    # non-persistent head.bins)
    kept = {k: v for k, v in state.items() if k.startswith(("backbone.", "fpn.", "head."))
            and not k.startswith("head.distribution_project.")}
    out = _rename(kept, _NANODET_RULES)
    conv1 = out["backbone.conv1.0.weight"]
    out["backbone.conv1.0.weight"] = conv1[:, [2, 1, 0]].contiguous()  # BGR input -> RGB input
    stage2 = int(state["backbone.stage2.0.branch2.0.weight"].shape[0]) * 2
    size = _NANODET_SIZES.get(stage2)
    if size is None:
        raise DensedetError(f"NanoDet-Plus backbone width {stage2} is not one densedet builds (m, m-1.5x)")
    reg = 4 * 8  # reg_max 7
    num_classes = int(state["head.gfl_cls.0.weight"].shape[0]) - reg
    # the official normalisation, BGR (103.53, 116.28, 123.675) / (57.375, 57.12, 58.395) on
    # 0-255, is ImageNet's in RGB order once conv1 reads RGB
    model = {"name": "nanodet", "size": size, "params": {"use_aux": False},
             "channel_order": "rgb", "input_scale": 1.0,
             "pixel_mean": [123.675 / 255, 116.28 / 255, 103.53 / 255],
             "pixel_std": [58.395 / 255, 57.12 / 255, 57.375 / 255], "prior_offset": 0.0}
    return Official(
        layout="nanodet", state=out, num_classes=num_classes, model=model, input_size=320,
        preprocess=dict(resize="warp", interpolation="cv2"),
        eval=dict(score_thresh=0.05, nms_iou=0.6, max_det=100),
        classes=coco_names() if num_classes == 80 else None, dropped=dropped,
        notes=[f"NanoDet-Plus-{size}; conv1 input channels reversed (the official model reads BGR)"]
        + ([f"dropped the training-only guidance head ({len(dropped)} tensors of aux_fpn/aux_head)"]
           if dropped else []))


def _torchvision_fcos(state: dict[str, Tensor]) -> Official:
    out = {}
    for k, v in state.items():
        if k.startswith("backbone.fpn."):
            k = "neck.fpn." + k[len("backbone.fpn."):]
        elif k.startswith("head."):
            m = re.fullmatch(r"head\.(classification|regression)_head\.conv\.(\d+)\.(weight|bias)", k)
            if m:
                tower = "cls_tower" if m.group(1) == "classification" else "reg_tower"
                i = int(m.group(2))  # Sequential of [conv, GroupNorm, ReLU] x 4
                k = f"head.{tower}.{i // 3}.{i % 3}.{m.group(3)}"
            else:
                k = (k.replace("head.classification_head.cls_logits", "head.cls_logits")
                      .replace("head.regression_head.bbox_reg", "head.bbox_reg")
                      .replace("head.regression_head.bbox_ctrness", "head.quality"))
        elif not k.startswith("backbone.body."):
            continue
        out[k] = v
    width = int(state["head.classification_head.cls_logits.weight"].shape[1])
    c5 = int(state["backbone.body.layer4.0.conv1.weight"].shape[1])
    size = "r50" if c5 == 1024 else "r18" if c5 == 256 else None
    if size is None:
        raise DensedetError("torchvision FCOS: only ResNet-18/50 bodies map onto densedet's fcos sizes")
    num_classes = int(state["head.classification_head.cls_logits.weight"].shape[0])
    model = {"name": "fcos", "size": size, "params": {"width": width}, "channel_order": "rgb",
             "input_scale": 1.0, "pixel_mean": [0.485, 0.456, 0.406], "pixel_std": [0.229, 0.224, 0.225],
             "prior_offset": 0.0, "prior_step": "input_div", "tower_bias": True, "score_sqrt": True}
    return Official(
        layout="torchvision-fcos", state=out, num_classes=num_classes, model=model, input_size=800,
        preprocess=dict(resize="shorter_side", max_size=1333, size_divisor=32, pad_value="mean",
                        size_rounding="floor", interpolation="torch"),
        eval=dict(score_thresh=0.2, nms_iou=0.6, max_det=100),
        classes=coco_names(with_background=True) if num_classes == 91 else None,
        fill=["num_batches_tracked", "head.scales."],
        notes=["torchvision FCOS: priors at i * (input // feature size), offset 0; score "
               "sqrt(cls * centerness); tower convs with biases"])


def _mmdet_fcos(state: dict[str, Tensor]) -> Official:
    out = {}
    for k, v in state.items():
        if k.startswith("backbone."):
            if k.startswith("backbone.fc."):
                continue
            k = "backbone.body." + k[len("backbone."):]
        elif k.startswith("neck."):
            m = re.fullmatch(r"neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)", k)
            if not m:
                continue
            i = int(m.group(2))
            if m.group(1) == "lateral_convs":
                k = f"neck.fpn.inner_blocks.{i}.0.{m.group(3)}"
            elif i < 3:
                k = f"neck.fpn.layer_blocks.{i}.0.{m.group(3)}"
            else:
                k = f"neck.fpn.extra_blocks.{'p6' if i == 3 else 'p7'}.{m.group(3)}"
        elif k.startswith("bbox_head."):
            m = re.fullmatch(r"bbox_head\.(cls|reg)_convs\.(\d+)\.(conv|gn)\.(weight|bias)", k)
            if m:
                tower = "cls_tower" if m.group(1) == "cls" else "reg_tower"
                k = f"head.{tower}.{m.group(2)}.{0 if m.group(3) == 'conv' else 1}.{m.group(4)}"
            else:
                k = (k.replace("bbox_head.conv_cls", "head.cls_logits")
                      .replace("bbox_head.conv_reg", "head.bbox_reg")
                      .replace("bbox_head.conv_centerness", "head.quality")
                      .replace("bbox_head.scales", "head.scales"))
        else:
            continue
        out[k] = v
    width = int(state["bbox_head.conv_cls.weight"].shape[1])
    c5 = int(state["backbone.layer4.0.conv1.weight"].shape[1])
    size = "r50" if c5 == 1024 else "r18" if c5 == 256 else None
    if size is None:
        raise DensedetError("mmdet FCOS: only ResNet-18/50 bodies map onto densedet's fcos sizes")
    num_classes = int(state["bbox_head.conv_cls.weight"].shape[0])
    tower_bias = "bbox_head.cls_convs.0.conv.bias" in state
    model = {"name": "fcos", "size": size, "params": {"width": width}, "channel_order": "rgb",
             "input_scale": 255.0, "pixel_mean": [123.675, 116.28, 103.53],
             "pixel_std": [58.395, 57.12, 57.375], "prior_offset": 0.5, "tower_bias": tower_bias}
    return Official(
        layout="mmdet-fcos", state=out, num_classes=num_classes, model=model, input_size=800,
        preprocess=dict(resize="shorter_side", max_size=1333, size_divisor=32, pad_value="mean",
                        size_rounding="round", interpolation="cv2"),
        eval=dict(score_thresh=0.05, nms_iou=0.6, max_det=100),
        classes=coco_names() if num_classes == 80 else None, fill=["num_batches_tracked"],
        notes=["mmdet FCOS (pytorch-style ResNet, centerness on the regression tower, "
               "norm_on_bbox): the layout densedet's fcos builds; caffe-style backbones and "
               "centerness on the class tower cannot be told from the tensors and do not map"])


def convert_state(state: dict[str, Tensor], layout: Optional[str] = None) -> Official:
    """An official state dict (its layout recognised when ``layout`` is None) -> :class:`Official`."""
    found = detect_layout(state)
    layout = layout or found
    if layout is None:
        raise DensedetError("unrecognised weights layout; pass --from " + "|".join(LAYOUTS))
    base = "yolox" if layout == "yolox-legacy" else layout
    if found != base:
        looks = found or "none of " + ", ".join(LAYOUTS)
        raise DensedetError(f"the file is not in the {layout} layout (it looks like {looks})")
    if layout in ("yolox", "yolox-legacy"):
        return _yolox(state, legacy=layout == "yolox-legacy")
    if layout == "nanodet":
        return _nanodet(state)
    if layout == "torchvision-fcos":
        return _torchvision_fcos(state)
    if layout == "mmdet-fcos":
        return _mmdet_fcos(state)
    raise DensedetError(f"{layout}: an ImageNet backbone, not a detector; use it as "
                        f"model.backbone_weights")


def official_config(off: Official, base: Optional[dict] = None) -> dict:
    """A plain config dict running ``off``: ``base`` (default: densedet's defaults) with the
    official model, test size, resize and thresholds."""
    from densedet.config import config_to_dict

    cfg = config_to_dict(Config()) if base is None else dict(base)
    cfg["model"] = {**cfg.get("model", {}), **off.model}
    cfg["preprocess"] = {**cfg.get("preprocess", {}), **off.preprocess}
    cfg["eval"] = {**cfg.get("eval", {}), **off.eval}
    cfg["input_size"] = off.input_size
    cfg["assigner"] = {"name": None, "params": {}}
    return cfg


def fill_missing(model: nn.Module, off: Official) -> list[str]:
    """Put the model's own value for tensors the file cannot have (``off.fill``); returns
    the names that are still missing after that."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in off.state and any(f in k for f in off.fill):
            off.state[k] = v.clone()
    return [k for k in own if k not in off.state]


# ----------------------------------------------------------------------------- ImageNet backbones

def backbone_state(state: dict[str, Tensor], family: str) -> tuple[dict[str, Tensor], str]:
    """A torchvision ImageNet classifier's tensors as densedet backbone tensors for ``family``."""
    layout = detect_layout(state)
    if family in ("fcos", "dw", "lla"):
        if layout == "torchvision-resnet":
            return {f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}, layout
        if layout == "torchvision-fcos":  # a detector's backbone also serves
            return {k: v for k, v in state.items() if k.startswith("backbone.body.")}, layout
        want = "a torchvision ResNet (resnet18 / resnet50 ImageNet weights)"
    elif family == "nanodet":
        if layout == "torchvision-shufflenet":
            return {f"backbone.{k}": v for k, v in state.items()
                    if not k.startswith(("fc.", "conv5."))}, layout
        want = "a torchvision ShuffleNetV2 (shufflenet_v2_x1_0 / x1_5 ImageNet weights)"
    else:
        raise DensedetError(f"model.backbone_weights: {family!r} has no ImageNet backbone (CSPDarknet "
                            f"is trained with the detector); start from a detector's weights with "
                            f"train.init_weights instead (e.g. yolox_s.pth)")
    raise DensedetError(f"model.backbone_weights: expected {want}, got a {layout or 'unrecognised'} layout")


def load_backbone_weights(model: nn.Module, cfg: Config, path: str | Path,
                          log: Callable[[str], None] = print) -> None:
    """``model.backbone_weights``: ImageNet weights into the backbone (a count per part)."""
    state, notes = extract_state(read_weights(path))
    mapped, layout = backbone_state(state, cfg.model.name)
    own = model.state_dict()
    backbone = [k for k in own if k.startswith("backbone.")]
    keep = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
    n = sum(k in keep for k in backbone)
    log(f"backbone weights {path} ({layout}): loaded {n} of {len(backbone)} backbone tensors")
    if n * 2 < len(backbone):
        raise DensedetError(f"model.backbone_weights {path}: only {n} of the backbone's {len(backbone)} "
                            f"tensors fit (model.size {cfg.model.size!r}: another width or depth?)")
    model.load_state_dict(keep, strict=False)


# ----------------------------------------------------------------------------- train.init_weights

@dataclass
class InitWeights:
    """``train.init_weights`` read and converted: the densedet-named tensors, what the
    weights expect of the model (config keys), where they came from."""

    path: str
    state: dict[str, Tensor]
    layout: Optional[str]
    conventions: dict
    notes: list[str]


def _stored_conventions(ckpt: dict) -> dict:
    cfg = ckpt.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        return {}
    return {k: v for k, v in cfg["model"].items() if k in CONVENTION_KEYS}


def prepare_init(cfg: Config, path: Optional[str | Path], log: Callable[[str], None] = print,
                 layout: Optional[str] = None) -> Optional[InitWeights]:
    """Read ``train.init_weights`` before the model is built, and take into ``cfg.model`` the
    conventions the weights need (input channel order / scale / mean / std, prior grid, tower
    biases, score) unless the config sets them itself (then a differing value is reported).
    Returns None without a path."""
    if not path:
        return None
    obj = read_weights(path)
    state, notes = extract_state(obj)
    found = detect_layout(state)
    if layout is not None or found in LAYOUTS:
        off = convert_state(state, layout)
        state, conventions, notes = off.state, off.conventions(), notes + off.notes
        layout = off.layout
        if off.model["name"] != cfg.model.name:
            log(f"initial weights {path}: an official {off.model['name']} ({layout}) file, but "
                f"model.name is {cfg.model.name!r}")
    elif found in BACKBONE_LAYOUTS:
        raise DensedetError(f"train.init_weights {path}: an ImageNet classifier ({found}); pass it as "
                            f"model.backbone_weights")
    else:
        conventions = _stored_conventions(obj) if isinstance(obj, dict) else {}
    adopt_conventions(cfg, conventions, str(path), log)
    return InitWeights(str(path), state, layout, conventions, notes)


def adopt_conventions(cfg: Config, conventions: dict, source: str, log: Callable[[str], None]) -> None:
    """Set ``cfg.model``'s convention keys to the weights' (keys the config sets explicitly
    win, with a note when they differ)."""
    explicit = cfg.model.model_fields_set
    taken = []
    for key, value in conventions.items():
        current = getattr(cfg.model, key)
        same = list(current) == list(value) if isinstance(current, (tuple, list)) else current == value
        if same:
            continue
        if key in explicit:
            log(f"initial weights {source}: they expect model.{key}={value!r}; keeping the "
                f"config's {current!r}")
            continue
        setattr(cfg.model, key, tuple(value) if isinstance(value, list) else value)
        taken.append(f"model.{key}={value!r}")
    if taken:
        log(f"initial weights {source}: taking their conventions: {', '.join(taken)}")


def _fused_rows(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """NanoDet-Plus's prediction conv fuses C class rows and 4 (reg_max + 1) box rows: with
    another class count, keep the file's box rows on the model's freshly initialised class
    rows (the class rows alone are the classifier)."""
    head = getattr(model, "head", None)
    if head is None or not hasattr(head, "preds") or not hasattr(head, "reg_max"):
        return state
    own = model.state_dict()
    box = 4 * (head.reg_max + 1)
    state = dict(state)
    for k in [k for k in state if re.fullmatch(r"head\.preds\.\d+\.(weight|bias)", k)]:
        if k in own and state[k].shape[1:] == own[k].shape[1:] and state[k].shape[0] != own[k].shape[0]:
            merged = own[k].clone()
            merged[-box:] = state[k][-box:]
            state[k] = merged
    return state


def load_init(model: nn.Module, init: InitWeights, cfg: Config,
              log: Callable[[str], None] = print) -> None:
    """Load :func:`prepare_init`'s tensors into ``model`` (the class count may differ;
    refusal rule of :func:`~densedet.engine.checkpoint.load_matching`), counts per part."""
    what = f"{init.layout} layout" if init.layout else "densedet"
    log(f"initial weights: {init.path} ({what}" + (f"; {'; '.join(init.notes)}" if init.notes else "") + ")")
    load_matching(model, _fused_rows(model, init.state), log=log, source=init.path,
                  allow_partial=cfg.train.init_weights_partial, by_part=True)
