"""Weights from the field (`densedet convert`, `densedet.load`, `train.init_weights`,
`model.backbone_weights`).

Parity: the official model, built from its own code with random weights (BatchNorm
statistics, biases and prediction biases randomised too, so that every renamed tensor and
every convention matters) and saved in its own file layout, against
``densedet.load(convert(file)).predict_raw`` on a 480x640 image: scores within 1e-4, boxes
within 1e-2 px, for every prior.

* torchvision ``fcos_resnet50_fpn``: torchvision is a dependency, so this always runs.
* YOLOX nano/tiny/s, current and legacy: ``pytest.importorskip("yolox")`` (``pip install
  --no-build-isolation --no-deps yolox loguru thop tabulate``; docs/pretrained.md).
* mmdet FCOS R-18 / R-50 (the pytorch-style ``*-centeronreg-giou`` configs):
  ``pytest.importorskip("mmdet")`` (mmdet with mmcv and mmengine).
* NanoDet-Plus-m: ``pytest.importorskip("nanodet")`` (not on PyPI: a checkout of
  RangiLyu/nanodet on ``PYTHONPATH``). Its file layout (Lightning checkpoint with EMA and
  class-keyed callback states, guidance head, fused prediction conv) is also checked without
  the package, from densedet's own model written in the official names.
"""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import densedet
from densedet.cli import main as cli_main
from densedet.convert import convert
from densedet.engine.official import detect_layout, read_weights
from densedet.errors import DensedetError
from densedet.models import build_model
from densedet.models.common import ConvNormAct, DepthwiseSeparableConv

SCORE_TOL, BOX_TOL = 1e-4, 1e-2


# ----------------------------------------------------------------------------- helpers

def real_sized_image(path: Path, h: int = 480, w: int = 640, seed: int = 0) -> Path:
    """A 480x640 picture with shapes and texture (lossless PNG: both sides decode it alike)."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 60 + 90).astype(np.uint8)
    for _ in range(12):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        cv2.circle(img, (x, y), int(rng.integers(10, 120)), c, -1)
        cv2.rectangle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), (x, y), c[::-1], 3)
    cv2.imwrite(str(path), img)
    return path


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics, perturbed norm/bias parameters and N(0, 1) prediction
    biases (official inits put those at 0 or at a 0.01 prior, which would hide a missed
    tower bias, box shift or scale)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    preds = ("preds", "cls_logits", "ctrness", "gfl_cls", "bbox_reg", "conv_cls", "conv_centerness", "conv_reg")
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name not in params:
                continue  # constant buffers (NanoDet's bin vector)
            elif t.dim() == 1 and name.endswith("bias") and any(p in name for p in preds):
                t.copy_(torch.randn(t.shape, generator=g))
            elif t.dim() == 1:
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def assert_parity(raw: dict, scores: torch.Tensor, boxes: torch.Tensor) -> tuple[float, float]:
    assert raw["scores"].shape == scores.shape and raw["boxes"].shape == boxes.shape
    ds = float((raw["scores"] - scores).abs().max())
    db = float((raw["boxes"] - boxes).abs().max())
    assert scores.max() > 0.05, "degenerate test: every score near 0"
    print(f"parity: max |d| scores {ds:.2e}, boxes {db:.2e} px over {tuple(scores.shape)}")  # -s shows it
    assert ds <= SCORE_TOL and db <= BOX_TOL, f"max |d| scores {ds:.2e}, boxes {db:.2e} px"
    return ds, db


# ----------------------------------------------------------------------------- torchvision FCOS

@pytest.fixture(scope="module")
def torchvision_fcos(tmp_path_factory):
    """``fcos_resnet50_fpn`` with random weights, its state dict saved as torchvision does."""
    from torchvision.models.detection import fcos_resnet50_fpn

    torch.manual_seed(0)
    model = randomise(fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)).eval()
    path = tmp_path_factory.mktemp("tv") / "fcos_resnet50_fpn.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_torchvision_fcos_parity(torchvision_fcos, tmp_path):
    from torchvision.models.detection.transform import resize_boxes

    model, path = torchvision_fcos
    image = real_sized_image(tmp_path / "img.png")
    bgr = cv2.imread(str(image))
    x = torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1).float() / 255
    with torch.no_grad():  # torchvision's own pipeline, stopped before its score filter
        images, _ = model.transform([x])
        feats = list(model.backbone(images.tensors).values())
        out = model.head(feats)
        anchors = model.anchor_generator(images, feats)[0]
        boxes = model.box_coder.decode(out["bbox_regression"][0], anchors)
        scores = torch.sqrt(torch.sigmoid(out["cls_logits"][0]) * torch.sigmoid(out["bbox_ctrness"][0]))
        boxes = resize_boxes(boxes, images.image_sizes[0], list(x.shape[-2:]))
    assert tuple(images.tensors.shape[-2:]) == (800, 1088)  # P6/P7 grid steps 61/64 and 114/120

    dst = convert(path, tmp_path / "fcos.pt", log=lambda s: None)
    net = densedet.load(dst)
    raw = net.predict_raw(image)
    assert raw["input_hw"] == (800, 1088)
    assert_parity(raw, scores, boxes)
    assert net.classes[1] == "person" and len(net.classes) == 91
    cfg = net.cfg
    assert (cfg.input_size, cfg.preprocess.resize, cfg.preprocess.max_size) == (800, "shorter_side", 1333)
    assert cfg.model.tower_bias and cfg.model.score_sqrt and cfg.model.prior_step == "input_div"


# ----------------------------------------------------------------------------- YOLOX

YOLOX_CASES = [(size, legacy) for size in ("nano", "tiny", "s") for legacy in (False, True)]


@pytest.mark.parametrize("size,legacy", YOLOX_CASES, ids=[f"{s}{'-legacy' if lg else ''}" for s, lg in YOLOX_CASES])
def test_yolox_parity(size, legacy, tmp_path):
    pytest.importorskip("yolox")
    from yolox.data.data_augment import ValTransform
    from yolox.exp import get_exp

    exp = get_exp(None, f"yolox-{size}")
    model = randomise(exp.get_model(), seed=1).eval()
    path = tmp_path / f"yolox_{size}.pth"
    torch.save({"model": model.state_dict(), "start_epoch": 300}, path)  # YOLOX's layout
    image = real_sized_image(tmp_path / "img.png")
    bgr = cv2.imread(str(image))
    test_size = exp.test_size
    x, _ = ValTransform(legacy=legacy)(bgr, None, test_size)
    r = min(test_size[0] / bgr.shape[0], test_size[1] / bgr.shape[1])
    with torch.no_grad():
        out = model(torch.from_numpy(x)[None])[0]  # decoded: cx, cy, w, h, obj, classes
    cx, cy, w, h = out[:, :4].unbind(1)
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1) / r
    scores = out[:, 4:5] * out[:, 5:]

    dst = convert(path, tmp_path / "yolox.pt", layout="yolox-legacy" if legacy else None, log=lambda s: None)
    net = densedet.load(dst)
    assert_parity(net.predict_raw(image), scores, boxes)
    assert net.cfg.model.size == size and net.cfg.input_size == (416 if size != "s" else 640)
    assert net.cfg.model.channel_order == ("rgb" if legacy else "bgr")
    assert net.cfg.preprocess.letterbox_position == "top_left"


# ----------------------------------------------------------------------------- NanoDet-Plus

def _nanodet_official_names(model: nn.Module) -> dict[str, torch.Tensor]:
    """densedet NanoDet-Plus tensors in NanoDet-Plus's names (conv1 reading BGR), the inverse
    of densedet.engine.official's renames, found from the module types."""
    names: dict[str, str] = {}
    for path, m in model.named_modules():
        if isinstance(m, DepthwiseSeparableConv):
            for sub, (conv, norm) in (("0", ("depthwise", "dwnorm")), ("1", ("pointwise", "pwnorm"))):
                names[f"{path}.{sub}.0"] = f"{path}.{conv}"
                names[f"{path}.{sub}.1"] = f"{path}.{norm}"
        elif isinstance(m, ConvNormAct) and f"{path}" not in names and path.startswith("neck.reduce."):
            names[f"{path}.0"], names[f"{path}.1"] = f"{path}.conv", f"{path}.bn"
    out = {}
    for k, v in model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        base = names.get(owner, owner)
        k2 = f"{base}.{leaf}"
        for a, b in [(r"\.primary\.", ".primary_conv."), (r"\.cheap\.", ".cheap_operation."),
                     (r"\.shortcut\.0\.0\.", ".shortcut.0."), (r"\.shortcut\.0\.1\.", ".shortcut.1."),
                     (r"\.shortcut\.1\.0\.", ".shortcut.2."), (r"\.shortcut\.1\.1\.", ".shortcut.3."),
                     (r"^neck\.reduce\.", "fpn.reduce_layers."), (r"^neck\.top_down\.", "fpn.top_down_blocks."),
                     (r"^neck\.bottom_up\.", "fpn.bottom_up_blocks."), (r"^neck\.downsamples\.", "fpn.downsamples."),
                     (r"^neck\.extra_in\.", "fpn.extra_lvl_in_conv."), (r"^neck\.extra_out\.", "fpn.extra_lvl_out_conv."),
                     (r"^head\.towers\.", "head.cls_convs."), (r"^head\.preds\.", "head.gfl_cls.")]:
            k2 = re.sub(a, b, k2)
        if k.startswith("head.aux."):
            continue
        out[k2] = v.clone()
    out["backbone.conv1.0.weight"] = out["backbone.conv1.0.weight"][:, [2, 1, 0]].contiguous()
    out["head.distribution_project.project"] = torch.linspace(0, 7, 8)
    out["aux_head.cls_convs.0.conv.weight"] = torch.zeros(192, 192, 3, 3)  # dropped on conversion
    return out


def _lightning_ckpt(path: Path, ema: dict, plain: dict) -> Path:
    """A Lightning checkpoint as NanoDet-Plus saves it: ``model.*`` and EMA ``avg_model.*``,
    a callback state keyed by its class (older Lightning), optimizer states."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    module = types.ModuleType(name)

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = name
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    parents = ["pytorch_lightning", "pytorch_lightning.callbacks"]
    previous = {n: sys.modules.get(n) for n in [*parents, name]}
    for n in parents:
        sys.modules.setdefault(n, types.ModuleType(n))
    sys.modules[name] = module
    try:
        sd = {**{f"model.{k}": v for k, v in plain.items()}, **{f"avg_model.{k}": v for k, v in ema.items()}}
        torch.save({"epoch": 299, "global_step": 100, "pytorch-lightning_version": "1.9.5", "state_dict": sd,
                    "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.27)}},
                    "optimizer_states": [{"state": {}, "param_groups": []}], "lr_schedulers": []}, path)
    finally:
        for n, m in previous.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return path


def test_nanodet_layout_lightning_ema_roundtrip(tmp_path):
    """Without the nanodet package: densedet's NanoDet-Plus written in the official names,
    in a Lightning checkpoint; conversion takes the EMA weights and computes the same."""
    torch.manual_seed(0)
    ema = randomise(build_model("nanodet", num_classes=80, size="m", use_aux=False), seed=3).eval()
    other = randomise(build_model("nanodet", num_classes=80, size="m", use_aux=False), seed=4)
    path = _lightning_ckpt(tmp_path / "nanodet-plus-m_320.ckpt", _nanodet_official_names(ema),
                           _nanodet_official_names(other))
    with pytest.raises(Exception):  # an unrestricted-by-name load refuses the class key
        torch.load(path, weights_only=True)
    assert detect_layout({k[len("model."):]: v for k, v in read_weights(path)["state_dict"].items()
                          if k.startswith("model.")}) == "nanodet"
    lines = []
    dst = convert(path, tmp_path / "nd.pt", log=lines.append)
    assert any("EMA weights (avg_model.*" in s for s in lines)
    assert any("dropped the training-only guidance head" in s for s in lines)
    net = densedet.load(dst)
    image = real_sized_image(tmp_path / "img.png")
    raw = net.predict_raw(image)
    # densedet's own model on the same warp (its conv1 reads RGB, the official file's BGR)
    bgr = cv2.imread(str(image))
    warped = cv2.warpPerspective(bgr, np.diag([320 / 640, 320 / 480, 1.0]), (320, 320))
    x = torch.from_numpy(warped[..., ::-1].copy()).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        out = ema(x)
        scores, boxes = ema.head.decode(out, out["priors"])
    boxes = boxes[0] / torch.tensor([0.5, 320 / 480, 0.5, 320 / 480])
    assert_parity(raw, scores[0], boxes)
    assert net.cfg.input_size == 320 and net.cfg.preprocess.resize == "warp"


def test_nanodet_parity(tmp_path):
    pytest.importorskip("nanodet")
    from nanodet.data.transform import Pipeline
    from nanodet.model.arch import build_model as nanodet_model
    from nanodet.util import cfg, distance2bbox, load_config

    config = Path(sys.modules["nanodet"].__file__).parents[1] / "config" / "nanodet-plus-m_320.yml"
    if not config.is_file():
        pytest.skip("nanodet's config/ folder is not next to the package")
    load_config(cfg, str(config))
    cfg.defrost()
    cfg.model.arch.backbone.pretrain = False  # no download
    torch.manual_seed(0)
    model = randomise(nanodet_model(cfg.model), seed=1).eval()
    other = randomise(nanodet_model(cfg.model), seed=2)
    path = _lightning_ckpt(tmp_path / "nanodet.ckpt", model.state_dict(), other.state_dict())
    image = real_sized_image(tmp_path / "img.png")
    bgr = cv2.imread(str(image))
    meta = Pipeline(cfg.data.val.pipeline, cfg.data.val.keep_ratio)(
        None, dict(img=bgr.copy(), img_info={"height": 480, "width": 640, "id": 0}), (320, 320))
    x = torch.from_numpy(meta["img"].transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        out = model(x)[0]
        head = model.head
        cls, reg = out[:, :head.num_classes], out[:, head.num_classes:]
        priors = torch.cat([head.get_single_level_center_priors(1, (320 // s, 320 // s), s, torch.float32, "cpu")[0]
                            for s in head.strides])
        boxes = distance2bbox(priors[:, :2], head.distribution_project(reg) * priors[:, 2:3])
        inv = torch.from_numpy(np.linalg.inv(meta["warp_matrix"])).float()
        pts = torch.cat([boxes.view(-1, 2, 2), torch.ones(len(boxes), 2, 1)], -1) @ inv.T
        boxes = (pts[..., :2] / pts[..., 2:]).reshape(-1, 4)
    dst = convert(path, tmp_path / "nd.pt", log=lambda s: None)
    assert_parity(densedet.load(dst).predict_raw(image), cls.sigmoid(), boxes)


# ----------------------------------------------------------------------------- mmdet FCOS

@pytest.mark.parametrize("depth", [18, 50])
def test_mmdet_fcos_parity(depth, tmp_path):
    pytest.importorskip("mmdet")
    mmcv = pytest.importorskip("mmcv")
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    name = f"fcos_r{depth}_fpn_gn-head-center-normbbox-centeronreg-giou_8xb8-amp-lsj-200e_coco.py"
    config = Path(sys.modules["mmdet"].__file__).parent / ".mim" / "configs" / "fcos" / name
    if not config.is_file():
        pytest.skip("mmdet's configs are not installed with the package")
    cfg = Config.fromfile(str(config))
    cfg.model.backbone.init_cfg = None  # no download
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model = randomise(model, seed=1).eval()
    path = tmp_path / "fcos_mmdet.pth"
    torch.save({"meta": {"epoch": 200, "mmdet_version": "3.3.0"}, "state_dict": model.state_dict()}, path)
    image = real_sized_image(tmp_path / "img.png")
    bgr = cv2.imread(str(image))
    resized = mmcv.imrescale(bgr, (1333, 800))  # the test pipeline's Resize(keep_ratio=True)
    h, w = resized.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    with torch.no_grad():
        inputs = model.data_preprocessor({"inputs": [x], "data_samples": [DetDataSample()]}, False)["inputs"]
        cls, reg, ctr = model.bbox_head(model.extract_feat(inputs))
        priors = torch.cat(model.bbox_head.prior_generator.grid_priors([c.shape[-2:] for c in cls],
                                                                       dtype=torch.float32, device="cpu"))

        def flat(ts, k):
            return torch.cat([t[0].permute(1, 2, 0).reshape(-1, k) for t in ts])

        scores = flat(cls, cls[0].shape[1]).sigmoid() * flat(ctr, 1).sigmoid()
        boxes = model.bbox_head.bbox_coder.decode(priors, flat(reg, 4))
        boxes = boxes / torch.tensor([w / 640, h / 480, w / 640, h / 480])
    dst = convert(path, tmp_path / "fcos.pt", log=lambda s: None)
    assert_parity(densedet.load(dst).predict_raw(image), scores, boxes)


# ----------------------------------------------------------------------------- YOLOX layout without the package

def _yolox_official_names(model: nn.Module) -> dict[str, torch.Tensor]:
    """densedet YOLOX tensors in YOLOX's names (reg bias back at the official grid)."""
    names: dict[str, str] = {}
    for path, m in model.named_modules():
        if isinstance(m, DepthwiseSeparableConv):
            names[f"{path}.0.0"], names[f"{path}.0.1"] = f"{path}.dconv.conv", f"{path}.dconv.bn"
            names[f"{path}.1.0"], names[f"{path}.1.1"] = f"{path}.pconv.conv", f"{path}.pconv.bn"
        elif isinstance(m, ConvNormAct):
            names.setdefault(f"{path}.0", f"{path}.conv")
            names.setdefault(f"{path}.1", f"{path}.bn")
    neck = {"lateral5": "lateral_conv0", "td4": "C3_p4", "lateral4": "reduce_conv1", "td3": "C3_p3",
            "down3": "bu_conv2", "bu4": "C3_n3", "down4": "bu_conv1", "bu5": "C3_n4"}
    out = {}
    for k, v in model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        k2 = f"{names.get(owner, owner)}.{leaf}"
        if k2.startswith("backbone."):
            k2 = "backbone." + k2
        elif k2.startswith("neck."):
            first, _, rest = k2[len("neck."):].partition(".")
            k2 = f"backbone.{neck[first]}.{rest}"
        out[k2] = v.clone()
        if re.fullmatch(r"head\.reg_preds\.\d+\.bias", k):
            out[k2][:2] += 0.5
    return out


@pytest.fixture(scope="module")
def yolox_nano_file(tmp_path_factory):
    """A YOLOX-nano file in the official layout (80 classes), and the densedet model it came from."""
    torch.manual_seed(0)
    model = randomise(build_model("yolox", num_classes=80, size="nano"), seed=5).eval()
    path = tmp_path_factory.mktemp("yx") / "yolox_nano.pth"
    torch.save({"model": _yolox_official_names(model), "start_epoch": 300}, path)
    return model, path


def test_yolox_layout_recognised_and_renamed_exactly(yolox_nano_file, tmp_path):
    model, path = yolox_nano_file
    assert detect_layout(read_weights(path)["model"]) == "yolox"
    dst = convert(path, tmp_path / "nano.pt", layout="yolox-legacy", log=lambda s: None)
    got = torch.load(dst, weights_only=True)["model"]
    own = model.state_dict()
    assert set(got) == set(own) and all(torch.allclose(got[k].float(), own[k].float(), atol=1e-6) for k in own)


# ----------------------------------------------------------------------------- CLI, predict, export

def test_cli_convert_then_predict_and_export(yolox_nano_file, tmp_path, capsys):
    _, path = yolox_nano_file
    out = tmp_path / "nano.pt"
    assert cli_main(["convert", str(path), "--size", "320", "--out", str(out)]) == 0
    assert "yolox layout -> densedet yolox size nano, 80 classes" in capsys.readouterr().out
    ckpt = torch.load(out, weights_only=True)  # a plain densedet checkpoint
    assert ckpt["config"]["input_size"] == 320 and ckpt["config"]["model"]["channel_order"] == "bgr"
    image = real_sized_image(tmp_path / "img.png")
    assert cli_main(["predict", "--weights", str(out), str(image), "--out", str(tmp_path / "p"),
                     "--score-thresh", "0.2", "--no-draw"]) == 0
    import json
    written = json.loads((tmp_path / "p" / "detections.json").read_text())
    net = densedet.load(out)
    assert net.predict(image, score_thresh=0.2) == written["images"][0]["detections"]
    assert net.predict(cv2.imread(str(image)), score_thresh=0.2) == written["images"][0]["detections"]
    pytest.importorskip("onnxruntime")
    assert cli_main(["export", "--weights", str(out), "--out", str(tmp_path / "m.onnx")]) == 0


def test_convert_refusals(tmp_path, yolox_nano_file):
    _, path = yolox_nano_file
    with pytest.raises(DensedetError, match="not in the nanodet layout"):
        convert(path, tmp_path / "x.pt", layout="nanodet", log=lambda s: None)
    junk = tmp_path / "junk.pth"
    torch.save({"w": torch.zeros(3)}, junk)
    with pytest.raises(DensedetError, match="unrecognised weights layout"):
        convert(junk, tmp_path / "y.pt", log=lambda s: None)
    with pytest.raises(DensedetError, match="--classes: 2 names for a 80-class head"):
        convert(path, tmp_path / "z.pt", classes=["a", "b"], log=lambda s: None)


def test_load_takes_an_official_file_directly(yolox_nano_file, tmp_path):
    _, path = yolox_nano_file
    image = real_sized_image(tmp_path / "img.png")
    a = densedet.load(path).predict_raw(image)
    b = densedet.load(convert(path, tmp_path / "n.pt", log=lambda s: None)).predict_raw(image)
    assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["boxes"], b["boxes"])


# ----------------------------------------------------------------------------- train.init_weights, backbone_weights

@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    from densedet.data.synth import make_synth

    root = tmp_path_factory.mktemp("synth") / "data"
    make_synth(root, images=4, size=96, seed=0, workers=1)
    stems = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(s + "\n" for s in stems))
    return root


def _tiny(root: Path, out: Path, **extra) -> list[str]:
    o = {"data.root": str(root), "data.num_workers": 0, "train.epochs": 1, "train.batch_size": 2,
         "train.warmup_epochs": 0, "train.no_aug_epochs": 0, "input_size": 64, "train.device": "cpu",
         "data.val_split": "null", "train.checkpoint_interval": 0, "output_dir": str(out), **extra}
    return [f"{k}={v}" for k, v in o.items()]


def test_init_weights_official_yolox_other_classes(yolox_nano_file, tiny_voc, tmp_path):
    from densedet.engine import train

    _, path = yolox_nano_file
    lines: list[str] = []
    train("yolox_nano", _tiny(tiny_voc, tmp_path / "run", **{"train.init_weights": str(path)}), log=lines.append)
    text = "\n".join(lines)
    assert "(yolox layout;" in text
    assert "taking their conventions: model.channel_order='bgr', model.input_scale=255.0" in text
    m = re.search(r"by part: backbone (\d+)/(\d+), neck (\d+)/(\d+), head (\d+)/(\d+)", text)
    assert m and m.group(1) == m.group(2) and m.group(3) == m.group(4)
    assert int(m.group(6)) - int(m.group(5)) == 6  # the 3 levels' classifier (weight, bias): 80 -> 10 classes
    stored = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["config"]["model"]
    assert stored["channel_order"] == "bgr" and stored["input_scale"] == 255.0


def test_init_weights_nanodet_keeps_box_rows(tmp_path):
    from densedet.config import load_config
    from densedet.engine.official import load_init, prepare_init

    torch.manual_seed(0)
    src = randomise(build_model("nanodet", num_classes=80, size="m", use_aux=False), seed=3)
    path = _lightning_ckpt(tmp_path / "n.ckpt", _nanodet_official_names(src), _nanodet_official_names(src))
    cfg = load_config("nanodet_plus_m", ["data.classes=a,b,c"])
    init = prepare_init(cfg, path, log=lambda s: None)
    dst = build_model("nanodet", num_classes=3, size="m")
    lines: list[str] = []
    load_init(dst, init, cfg, log=lines.append)
    w_src, w_dst = src.head.preds[0].weight, dst.head.preds[0].weight
    assert torch.equal(w_dst[3:], w_src[80:])  # 32 box rows carried
    assert "by part: backbone" in "\n".join(lines)


def test_init_weights_torchvision_fcos_takes_its_layout(torchvision_fcos, tiny_voc, tmp_path):
    from densedet.config import load_config
    from densedet.engine.build import build_detector
    from densedet.engine.official import load_init, prepare_init

    _, path = torchvision_fcos
    cfg = load_config("fcos_r18", ["model.size=r50", "data.classes=circle,square,triangle"])
    lines: list[str] = []
    init = prepare_init(cfg, path, log=lines.append)
    assert cfg.model.tower_bias and cfg.model.score_sqrt and cfg.model.prior_offset == 0.0
    model = build_detector(cfg, 3)
    load_init(model, init, cfg, log=lines.append)
    m = re.search(r"by part: backbone (\d+)/(\d+), neck (\d+)/(\d+), head (\d+)/(\d+)", "\n".join(lines))
    assert m and m.group(1) == m.group(2) and m.group(3) == m.group(4)
    assert int(m.group(6)) - int(m.group(5)) == 7  # cls_logits weight+bias (91 -> 3), 5 scales


def test_init_weights_another_size_still_refused(yolox_nano_file):
    from densedet.config import load_config
    from densedet.engine.build import build_detector
    from densedet.engine.official import load_init, prepare_init

    _, path = yolox_nano_file  # official YOLOX-nano into the tiny preset: refused
    cfg = load_config("yolox_tiny")
    init = prepare_init(cfg, path, log=lambda s: None)
    with pytest.raises(DensedetError, match="init_weights_partial"):
        load_init(build_detector(cfg, 10), init, cfg, log=lambda s: None)


@pytest.mark.parametrize("family,arch", [("fcos", "resnet18"), ("nanodet", "shufflenet_v2_x1_0")])
def test_backbone_weights_imagenet(family, arch, tmp_path):
    import torchvision

    from densedet.config import load_config
    from densedet.engine.build import build_detector
    from densedet.engine.official import load_backbone_weights

    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None)
    path = tmp_path / f"{arch}.pth"
    torch.save(net.state_dict(), path)  # torchvision's ImageNet file layout
    cfg = load_config("fcos_r18" if family == "fcos" else "nanodet_plus_m", [f"model.backbone_weights={path}"])
    model = build_detector(cfg, 10)
    lines: list[str] = []
    load_backbone_weights(model, cfg, path, log=lines.append)
    n = sum(k.startswith("backbone.") for k in model.state_dict())
    assert f"loaded {n} of {n} backbone tensors" in lines[0]
    ours, theirs = ("backbone.body.conv1.weight", "conv1.weight") if family == "fcos" else \
        ("backbone.conv1.0.weight", "conv1.0.weight")
    assert torch.equal(model.state_dict()[ours], net.state_dict()[theirs])
    yolox = load_config("yolox_nano", [f"model.backbone_weights={path}"])
    with pytest.raises(DensedetError, match="no ImageNet backbone"):
        load_backbone_weights(build_detector(yolox, 10), yolox, path, log=lambda s: None)
