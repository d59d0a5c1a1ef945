"""The training engine: schedule and EMA formulas, per-preset training smoke, resume after a
kill, loading across class counts, NaN stop."""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from densedet.engine.checkpoint import load_checkpoint, load_matching
from densedet.engine.ema import ModelEMA
from densedet.engine.schedule import WarmCosSchedule
from densedet.errors import DensedetError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# ----------------------------------------------------------------------------- helpers
def make_tiny_dataset(root: Path, n_train: int = 4, n_val: int = 1) -> Path:
    """A few 96 px synthetic images in VOC layout, with our own short train/val lists."""
    from densedet.data.synth import make_synth

    make_synth(root, images=n_train + n_val, size=96, seed=0, workers=1)
    stems = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    main = root / "ImageSets" / "Main"
    (main / "train.txt").write_text("".join(s + "\n" for s in stems[:n_train]))
    (main / "val.txt").write_text("".join(s + "\n" for s in stems[n_train:n_train + n_val]))
    return root


def tiny_overrides(data: Path, out: Path, **extra) -> list[str]:
    """Two iterations of batch 2 at 64 px, on the CPU, without worker processes."""
    opts = {"data.root": str(data), "output_dir": str(out), "input_size": 64,
            "train.batch_size": 2, "train.epochs": 1, "train.warmup_epochs": 0,
            "train.no_aug_epochs": 0, "train.device": "cpu", "data.num_workers": 0,
            "train.log_interval": 1, "train.eval_interval": 1}
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "synth")


# ----------------------------------------------------------------------------- schedule / EMA
def test_schedule_matches_yolox_formula():
    s = WarmCosSchedule.from_epochs(base_lr=0.02, iters_per_epoch=10, epochs=30, warmup_epochs=5,
                                    no_aug_epochs=5, warmup_lr_ratio=0.1, min_lr_ratio=0.05)
    W, T, N = 50, 300, 50
    assert s(0) == pytest.approx(0.002)  # warmup starts at lr * warmup_lr_ratio
    # quadratic warmup
    assert s(25) == pytest.approx(0.002 + (0.02 - 0.002) * (25 / 50) ** 2)
    assert s(W) == pytest.approx(0.02)  # cosine starts at the base lr
    mid = W + (T - W - N) // 2
    assert s(mid) == pytest.approx(0.001 + 0.5 * (0.02 - 0.001) * (1 + math.cos(math.pi * 0.5)))
    assert s(mid) == pytest.approx((0.02 + 0.001) / 2)
    # flat tail at min lr over the no-aug iterations
    assert [s(i) for i in (T - N, T - N + 7, T - 1)] == pytest.approx([0.001] * 3)
    # monotone decay between warmup end and the tail
    values = [s(i) for i in range(W, T - N)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_schedule_without_warmup_or_tail():
    s = WarmCosSchedule(base_lr=1.0, total_iters=10, min_lr_ratio=0.0)
    assert s(0) == pytest.approx(1.0)
    assert s(5) == pytest.approx(0.5)


def test_ema_ramp_and_average():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEMA(model, decay=0.9998, ramp=2000)
    assert ema.decay(0) == 0.0
    assert ema.decay(2000) == pytest.approx(0.9998 * (1 - math.exp(-1)))
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # first update: d = 0.9998 * (1 - e^(-1/2000)), tiny
    d1 = 0.9998 * (1 - math.exp(-1 / 2000))
    assert ema.module.weight[0, 0].item() == pytest.approx(1.0 - d1, rel=1e-6)
    ema.update(model)
    d2 = 0.9998 * (1 - math.exp(-2 / 2000))
    assert ema.module.weight[0, 0].item() == pytest.approx(d2 * (1.0 - d1) + (1 - d2), rel=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


# ----------------------------------------------------------------------------- training smoke
PRESET_EXTRA = {
    "yolox_nano": {},  # mosaic on (the nano preset's 0.5)
    "yolox_tiny": {"train.no_aug_epochs": 1},  # the no-aug tail: mosaic closed, L1 on
    "yolox_s": {"augment.mixup_prob": 1.0, "train.multiscale": "[64,96]", "train.multiscale_interval": 1},
    "fcos_r18": {},
    "nanodet_plus_m": {},
    "dw_r18": {},
    "lla_r18": {},
}


@pytest.mark.parametrize("preset", ["yolox_nano", "fcos_r18", "nanodet_plus_m", "dw_r18", "lla_r18"])
def test_channels_last_changes_layout_not_results(preset, tiny_data):
    """train.channels_last only reorders memory: raw outputs, the loss, and the gradients of
    every parameter match the default-layout model's (a `.view` on a permuted tensor would not).

    In float64: in float32 the two layouts' kernels round differently and a random-init net
    of train-mode BatchNorms over 1x1 maps amplifies that to tens of percent on some
    gradients, which would hide a real fault."""
    from densedet.config import load_config
    from densedet.data.dataset import DetectionDataset
    from densedet.data.loader import collate
    from densedet.engine.build import build_detector, read_split

    cfg = load_config(CONFIGS / f"{preset}.yaml", [f"data.root={tiny_data}", "input_size=64"])
    index = read_split(cfg, cfg.data.train_split)
    ds = DetectionDataset(index.samples, cfg.input_hw)
    images, targets, _ = collate([ds[(i, i)] for i in range(2)])
    torch.manual_seed(0)
    plain = build_detector(cfg, len(index.classes)).train().double()
    nhwc = build_detector(cfg, len(index.classes)).train().double()
    nhwc.load_state_dict(plain.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    assert any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in nhwc.parameters())
    results = []
    for model in (plain, nhwc):
        raw = model(images.double())
        loss = model.loss(raw, targets).total.detach()
        # gradients of a smooth function of every output: the loss is piecewise in the
        # scores (a dynamic assigner's top-k), so its gradients could differ legitimately
        sum(v.square().mean() for k, v in raw.items() if k != "priors").backward()
        results.append(({k: v.detach() for k, v in raw.items()}, loss,
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (raw_a, loss_a, grads_a), (raw_b, loss_b, grads_b) = results
    for k in raw_a:
        torch.testing.assert_close(raw_b[k], raw_a[k], rtol=1e-9, atol=1e-9, msg=k)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)  # assignment runs in float32
    assert grads_a.keys() == grads_b.keys() and grads_a
    # floor at a millionth of the largest gradient: some (a bias before BatchNorm) are ~0
    top = max(g.abs().max().item() for g in grads_a.values())
    for name, g in grads_a.items():
        err = (grads_b[name] - g).abs().max().item()
        assert err <= 1e-7 * max(g.abs().max().item(), 1e-6 * top), (name, err)


@pytest.mark.parametrize("preset", list(PRESET_EXTRA))
def test_two_iterations_per_preset(preset, tiny_data, tmp_path):
    from densedet.engine import train

    out = tmp_path / "run"
    lines = []
    metrics = train(CONFIGS / f"{preset}.yaml", tiny_overrides(tiny_data, out, **PRESET_EXTRA[preset]),
                    log=lines.append)
    for name in ("last.pt", "best.pt", "metrics.json", "log.csv", "config.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars
    saved = json.loads((out / "metrics.json").read_text())
    assert "AP" in saved and "VOC_mAP50" in saved and saved["train"]["iterations"] == 2
    assert saved["train"]["assigner"] == metrics["train"]["assigner"]
    rows = read_csv(out / "log.csv")
    assert [int(r["global_iter"]) for r in rows] == [1, 2]
    assert all(float(r["loss"]) > 0 and float(r["step_ms"]) > 0 for r in rows)
    assert any(re.search(r"M params, \d+\.\d+ GFLOPs at 64x64", line) for line in lines)
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["iter"], ckpt["global_iter"]) == (1, 0, 2)
    convs = [v for v in ckpt["model"].values() if v.dim() == 4 and v.shape[2] > 1]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)
    assert ckpt["classes"][0] == "circle" and ckpt["config"]["model"]["name"] in preset.replace("_plus", "")
    if preset == "yolox_tiny":
        assert "l1" in rows[0]  # the L1 term switched on in the no-aug tail
        assert any("no mosaic" in line for line in lines)
        assert ckpt["ema"]["module"]  # EMA weights saved


def test_validation_fails_fast(tiny_data, tmp_path):
    from densedet.engine import train

    # DW's loss reads the DW assigner's soft weights: any other assigner is refused
    with pytest.raises(DensedetError, match="'dw'.*'simota'"):
        train(CONFIGS / "dw_r18.yaml", tiny_overrides(tiny_data, tmp_path / "a") + ["assigner.name=simota"])
    with pytest.raises(DensedetError, match="data.root"):
        train(CONFIGS / "yolox_nano.yaml", tiny_overrides(tmp_path / "nowhere", tmp_path / "b"))
    with pytest.raises(DensedetError, match="unknown model"):
        train(CONFIGS / "yolox_nano.yaml", tiny_overrides(tiny_data, tmp_path / "c") + ["model.name=detr"])
    # a broken annotation is found before training starts
    bad = make_tiny_dataset(tmp_path / "bad", n_train=2, n_val=1)
    xml = sorted((bad / "Annotations").glob("*.xml"))[0]
    img = bad / "JPEGImages" / (xml.stem + ".jpg")
    img.write_bytes(b"not a jpeg")
    with pytest.raises(DensedetError, match=xml.stem):
        train(CONFIGS / "yolox_nano.yaml", tiny_overrides(bad, tmp_path / "d"))
    assert not (tmp_path / "d" / "last.pt").exists()


# ----------------------------------------------------------------------------- resume
def test_resume_after_kill_mid_epoch(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n_train=12, n_val=1)
    out = tmp_path / "run"
    # 6 iterations in one epoch, last.pt after every iteration
    args = [sys.executable, "-m", "densedet", "train", str(CONFIGS / "yolox_nano.yaml"),
            *tiny_overrides(data, out, **{"train.checkpoint_interval": 1})]
    env = dict(os.environ, CI="true")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "last.pt").exists():
                ckpt = load_checkpoint(out / "last.pt")
                if ckpt["epoch"] == 0 and 1 <= ckpt["iter"] < 4:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        # freeze first, so the checkpoint read below is the one the kill leaves (the run can
        # take another iteration between the poll above and the signal)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.2)  # an atomic replace in flight completes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = load_checkpoint(out / "last.pt")
    epoch, it, gi = saved["epoch"], saved["iter"], saved["global_iter"]
    assert epoch == 0 and 1 <= it < 6 and gi == it, (epoch, it, gi)
    assert not (out / "metrics.json").exists()

    res = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resumed from {out / 'last.pt'}: epoch 1, iteration {it} (global {gi})" in res.stdout
    final = load_checkpoint(out / "last.pt")
    assert (final["epoch"], final["iter"], final["global_iter"]) == (1, 0, 6)
    # every iteration logged exactly once: the resumed run continued where the kill stopped
    rows = read_csv(out / "log.csv")
    assert [int(r["global_iter"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (out / "metrics.json").is_file() and (out / "best.pt").is_file()


def test_resume_without_checkpoint_is_an_error(tiny_data, tmp_path):
    from densedet.engine import train

    with pytest.raises(DensedetError, match="last.pt"):
        train(CONFIGS / "yolox_nano.yaml", tiny_overrides(tiny_data, tmp_path / "none"), resume=True)


# ----------------------------------------------------------------------------- weights across class counts
def test_load_with_other_class_count_skips_and_reports(tiny_data, tmp_path):
    from densedet.models import build_model

    src = build_model("yolox", num_classes=10, size="nano")
    dst = build_model("yolox", num_classes=3, size="nano")
    lines = []
    mismatched, missing = load_matching(dst, src.state_dict(), log=lines.append)
    assert mismatched and all("cls" in k for k in mismatched)
    assert not missing
    assert any("skipped" in line for line in lines)
    assert sum(k in line for k in mismatched for line in lines) >= len(mismatched)
    # everything else was loaded
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    for k, v in dst_sd.items():
        if k not in mismatched:
            assert torch.equal(v, src_sd[k]), k

    # and through training: --weights from a 10-class checkpoint into a 2-class run
    ckpt = tmp_path / "ten.pt"
    torch.save({"model": src.state_dict()}, ckpt)
    from densedet.engine import train

    lines = []
    train(CONFIGS / "yolox_nano.yaml",
          tiny_overrides(tiny_data, tmp_path / "ft", **{"data.classes": "circle,square",
                                                         "data.skip_unknown": "true",
                                                         "data.val_split": "null"}),
          weights=str(ckpt), log=lines.append)
    text = "\n".join(lines)
    assert "skipped" in text and all(k in text for k in mismatched)
    assert load_checkpoint(tmp_path / "ft" / "best.pt")["classes"] == ["circle", "square"]


# ----------------------------------------------------------------------------- NaN stop
def test_nan_loss_stops_naming_term_and_iteration(tiny_data, tmp_path, monkeypatch):
    from densedet.engine import NonFiniteLossError, train
    from densedet.models.yolox import YOLOXHead

    original = YOLOXHead.loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        terms, num_pos = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            terms = dict(terms)
            terms["cls"] = terms["cls"] * float("nan")
        return terms, num_pos

    monkeypatch.setattr(YOLOXHead, "loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError) as e:
        train(CONFIGS / "yolox_nano.yaml",
              tiny_overrides(tiny_data, out, **{"train.checkpoint_interval": 1}))
    msg = str(e.value)
    assert "'cls'" in msg and "nan" in msg
    assert "epoch 1, iteration 2/2" in msg and "global iteration 2" in msg
    assert isinstance(e.value, DensedetError)
    # the last good checkpoint (after iteration 1) is kept
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["iter"]) == (0, 1)
    assert str(out / "last.pt") in msg


# ----------------------------------------------------------------------------- multi-scale
def test_multiscale_resizes_whole_batches_and_boxes():
    from densedet.config import Config
    from densedet.engine.trainer import Trainer

    tr = Trainer.__new__(Trainer)  # only the pieces _multiscale reads
    tr.cfg = Config.model_validate({"input_size": 64, "train": {"multiscale": [64, 160],
                                                                  "multiscale_interval": 2}})
    tr.device = torch.device("cpu")
    images = torch.rand(2, 3, 64, 64)
    boxes = torch.tensor([[[8.0, 8.0, 32.0, 40.0]], [[0.0, 0.0, 64.0, 64.0]]])
    targets = {"gt_boxes": boxes, "gt_labels": torch.zeros(2, 1, dtype=torch.long),
               "gt_valid": torch.ones(2, 1, dtype=torch.bool)}
    seen = set()
    for it in range(40):
        tr.global_iter = it
        out_images, out_targets = tr._multiscale(images, targets)
        h, w = out_images.shape[-2:]
        assert h == w and h % 32 == 0 and 64 <= h <= 160
        torch.testing.assert_close(out_targets["gt_boxes"], boxes * (h / 64))
        if it % 2 == 1:  # the size changes only every multiscale_interval iterations
            assert h == prev
        prev = h
        seen.add(h)
    assert seen == {64, 96, 128, 160}


def test_budget_epochs_fit_the_wall_clock():
    from densedet.bench.train_speed import _budget_epochs

    # 17 epochs of 50 s + 3 evaluations of 10 s (the last, and 2 in the no-aug tail) = 880 s;
    # 18 would take 940 s: 40 s over beats 20 s under, so 17
    assert _budget_epochs(900, 50, 10) == 17
    assert _budget_epochs(950, 50, 10) == 18  # 940 s: the nearest
    assert _budget_epochs(100, 200, 10) == 1  # never zero
