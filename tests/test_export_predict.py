"""Export (ONNX parity with PyTorch) and predict (drawn images + JSON in original pixels),
both from ``--weights`` alone: the checkpoint carries config and class names."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from densedet.cli import main
from densedet.config import config_to_dict, load_config
from densedet.engine.build import build_detector, model_from_weights
from densedet.errors import DensedetError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A checkpoint of an untrained YOLOX-Nano at 64 px (EMA entry included, as training writes)."""
    cfg = load_config(REPO / "configs" / "yolox_nano.yaml", ["input_size=64", f"data.classes={','.join(CLASSES)}"])
    torch.manual_seed(0)
    model = build_detector(cfg, len(CLASSES), with_assigner=False)
    # give the classifier a positive bias so an untrained model still produces detections
    for name, p in model.named_parameters():
        if name.endswith("bias") and ("cls" in name or "obj" in name):
            torch.nn.init.constant_(p, 2.0)
    path = tmp_path_factory.mktemp("w") / "best.pt"
    torch.save({"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
                "ema": {"module": model.state_dict(), "updates": 1},
                "config": config_to_dict(cfg), "classes": CLASSES}, path)
    return path


def test_model_from_weights_uses_ema_and_stored_config(weights):
    model, cfg, classes = model_from_weights(weights)
    assert classes == CLASSES and cfg.input_hw == (64, 64)
    stored = torch.load(weights, weights_only=False)["ema"]["module"]
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    _, cfg2, _ = model_from_weights(weights, overrides=["input_size=96"])
    assert cfg2.input_hw == (96, 96)


def test_export_onnx_matches_pytorch(weights, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    assert main(["export", "--weights", str(weights), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max abs difference" in printed
    diff = float(printed.split("max abs difference ")[1].split()[0])
    assert diff < 1e-3
    # independently: a batch of 3 (dynamic batch axis) against the PyTorch model
    model, _, _ = model_from_weights(weights)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = model(x)
        ref_scores, ref_boxes = model.head.decode(raw, raw["priors"])
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    scores, boxes = sess.run(["scores", "boxes"], {"images": x.numpy()})
    assert scores.shape == tuple(ref_scores.shape) and scores.shape[-1] == len(CLASSES)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-4)
    np.testing.assert_allclose(boxes, ref_boxes.numpy(), atol=1e-2)


def test_export_fails_when_parity_is_off(weights, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from densedet import export

    model, cfg, _ = model_from_weights(weights)
    path = export.export_onnx(model, tmp_path / "m.onnx", cfg.input_hw)
    with torch.no_grad():  # the PyTorch side changes after export: parity must fail
        for q in model.parameters():
            q.mul_(1.5)
    with pytest.raises(DensedetError, match="differs from PyTorch"):
        export.check_onnx(model, path, cfg.input_hw, atol=1e-3)


def test_predict_writes_images_and_json_in_original_pixels(weights, tmp_path):
    import cv2

    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    # a wide image (letterboxed with padding top/bottom) and a small square one in a subfolder
    cv2.imwrite(str(src / "wide.jpg"), rng.integers(0, 255, (100, 200, 3), dtype=np.uint8))
    cv2.imwrite(str(src / "sub" / "small.png"), rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    out = tmp_path / "pred"
    code = main(["predict", "--weights", str(weights), str(src), "--out", str(out),
                 "--score-thresh", "0.05", "eval.max_det=20"])
    assert code == 0
    data = json.loads((out / "detections.json").read_text())
    assert data["classes"] == CLASSES
    by_name = {Path(r["image"]).name: r for r in data["images"]}
    assert set(by_name) == {"wide.jpg", "small.png"}
    wide = by_name["wide.jpg"]
    assert (wide["width"], wide["height"]) == (200, 100)
    dets = wide["detections"]
    assert 0 < len(dets) <= 20  # eval.max_det=20 given after the options was applied
    boxes = np.array([d["box"] for d in dets])
    assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= 200).all()
    assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= 100).all()
    assert boxes[:, 2].max() > 64  # mapped back from the 64 px input to the 200 px image
    assert all(d["score"] >= 0.05 and d["class"] == CLASSES[d["label"]] for d in dets)
    for r in data["images"]:
        drawn = cv2.imread(r["drawn"])
        assert drawn is not None and drawn.shape[:2] == (r["height"], r["width"])


def test_predict_errors(weights, tmp_path):
    assert main(["predict", "--weights", str(weights), str(tmp_path / "missing.jpg")]) == 1
    assert main(["predict", "--weights", str(tmp_path / "nope.pt"), str(tmp_path)]) == 1
