"""``densedet shootout``: the same model, data, seed and budget, trained once per assigner.

Each run goes to ``OUT/<assigner>_seed<k>/`` (a normal training run: ``best.pt``,
``metrics.json``, ``log.csv``). Afterwards every run's best model is scored with the one
evaluator, and its assigner is run once more over the validation images with that model's
own predictions to count positives per object and objects left without any. The table goes
to ``OUT/shootout.md`` (with the command), the numbers to ``OUT/shootout.json``, the bar plot
to ``OUT/shootout.png``.
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Optional, Sequence

import torch

from densedet.assign import build_assigner, common
from densedet.config import load_config
from densedet.data.dataset import DetectionDataset
from densedet.data.loader import collate
from densedet.engine import evaluate_model, train
from densedet.engine.build import model_from_weights, o2o_assigner_spec, read_split
from densedet.models import build_model

COLUMNS = ("assigner", "seed", "AP", "AP50", "pos_per_object", "objects_without_pos",
           "objects_without_pos_stal", "assign_ms_per_iter", "wall_s")
#: end-to-end runs (model.end2end, docs/end2end.md) add: the one-to-many head scored with NMS
#: (AP, AP50 are the one-to-one branch's, without NMS) and the one-to-one assigner's counts
E2E_COLUMNS = ("AP_o2m_nms", "AP50_o2m_nms", "o2o_pos_per_object", "o2o_objects_without_pos")


def mean_csv_column(path: Path, column: str) -> Optional[float]:
    """Mean of a numeric column of a training ``log.csv`` (blank cells skipped)."""
    if not path.exists():
        return None
    with open(path, newline="") as f:
        values = [float(r[column]) for r in csv.DictReader(f) if r.get(column) not in (None, "")]
    return statistics.fmean(values) if values else None


@torch.no_grad()
def assignment_stats(weights: Path, assigner_name: str, assigner_params: dict,
                     split: Optional[str] = None, batch_size: int = 8,
                     max_images: int = 200, o2o: bool = False) -> dict:
    """Run a trained model's assigner over validation images with the model's own predictions.

    Returns ``pos_per_object`` (mean positives per valid object), ``objects_without_pos``
    (fraction of valid objects with no positive prior) and ``objects_without_pos_stal``: the
    same fraction with the small-object widening on (``stal``, docs/design.md; None for an
    assigner without the option). ``o2o``: the end-to-end model's one-to-one assigner on its
    one-to-one branch's predictions instead.
    """

    model, cfg, classes = model_from_weights(weights, log=lambda *_: None)
    if o2o:
        assigner_name, assigner_params = o2o_assigner_spec(cfg)
    index = read_split(cfg, split if split is not None else cfg.data.val_split, classes=classes)
    samples = index.samples[:max_images]
    input_size = cfg.input_size if isinstance(cfg.input_size, int) else tuple(cfg.input_size)
    dataset = DetectionDataset(samples, input_size, augment=None)
    assigner = build_assigner(assigner_name, len(classes), **assigner_params)
    try:
        widened = build_assigner(assigner_name, len(classes), **{**assigner_params, "stal": True})
    except TypeError:  # a method whose candidates are not "centre inside the box"
        widened = None
    device = next(model.parameters()).device
    total_pos, total_obj, total_empty, total_empty_stal = 0, 0, 0, 0
    for start in range(0, len(dataset), batch_size):
        images, targets, _ = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        targets = {k: v.to(device) for k, v in targets.items()}
        raw = model(images.to(device))
        view = model.head.o2o_view(raw) if o2o else raw
        scores, boxes = model.head.assigner_inputs(view, raw["priors"])
        inputs = (raw["priors"], scores, boxes, targets["gt_boxes"], targets["gt_labels"], targets["gt_valid"])
        valid = targets["gt_valid"]
        counts = common.owned_counts(assigner(*inputs).gt_index, valid.shape[1])
        total_pos += int(counts[valid].sum())
        total_obj += int(valid.sum())
        total_empty += int(((counts == 0) & valid).sum())
        if widened is not None:
            owned = common.owned_counts(widened(*inputs).gt_index, valid.shape[1])
            total_empty_stal += int(((owned == 0) & valid).sum())
    return {"pos_per_object": total_pos / max(total_obj, 1),
            "objects_without_pos": total_empty / max(total_obj, 1),
            "objects_without_pos_stal": total_empty_stal / max(total_obj, 1) if widened is not None else None}


def run_one(config: str, overrides: Sequence[str], assigner: str, seed: int, epochs: Optional[int],
            out_dir: Path, log=print) -> dict:
    """Train and score one assigner; returns one table row.

    Unattended and resumable: a run whose ``metrics.json`` exists finished earlier and is
    reused; one with a ``last.pt`` but no ``metrics.json`` was interrupted and resumes; any
    other leftover of an interrupted start is started afresh."""
    run_dir = out_dir / f"{assigner}_seed{seed}"
    extra = [f"assigner.name={assigner}", f"train.seed={seed}", f"output_dir={run_dir}"]
    if epochs is not None:
        extra.append(f"train.epochs={epochs}")
    cfg = load_config(config, list(overrides) + extra)
    finished = run_dir / "metrics.json"
    if finished.is_file():
        log(f"{run_dir}: finished earlier, reusing {finished}")
        metrics = json.loads(finished.read_text())
    else:
        resume = (run_dir / "last.pt").is_file()
        metrics = train(cfg, log=log, resume=resume, force=not resume)
    wall = metrics.get("train", {}).get("train_seconds")
    stats = assignment_stats(run_dir / "best.pt", assigner, cfg.assigner.params)
    row = {"assigner": assigner, "seed": seed, "AP": metrics.get("AP"), "AP50": metrics.get("AP50"),
           "pos_per_object": stats["pos_per_object"],
           "objects_without_pos": stats["objects_without_pos"],
           "objects_without_pos_stal": stats["objects_without_pos_stal"],
           "assign_ms_per_iter": mean_csv_column(run_dir / "log.csv", "assign_ms"),
           "wall_s": wall}
    if cfg.model.end2end:  # both branches: the one-to-many head with NMS for comparison
        nms = evaluate_model(None, run_dir / "best.pt", overrides=["eval.nms=true"])
        o2o = assignment_stats(run_dir / "best.pt", assigner, cfg.assigner.params, o2o=True)
        row.update(AP_o2m_nms=nms.get("AP"), AP50_o2m_nms=nms.get("AP50"),
                   o2o_pos_per_object=o2o["pos_per_object"],
                   o2o_objects_without_pos=o2o["objects_without_pos"])
    return row


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def summarise(rows: list[dict]) -> list[dict]:
    """One row per assigner: means over seeds; for mAP50-95 also the standard deviation over
    seeds (``AP_std``, sample std, None for one seed) and the range (``AP_spread``)."""
    out = []
    for name in dict.fromkeys(r["assigner"] for r in rows):
        rs = [r for r in rows if r["assigner"] == name]
        if any("skipped" in r for r in rs):
            out.append(rs[0])
            continue
        s = {"assigner": name, "seeds": [r["seed"] for r in rs]}
        for k in COLUMNS[2:] + tuple(k for k in E2E_COLUMNS if k in rs[0]):
            vals = [r[k] for r in rs if r.get(k) is not None]
            s[k] = statistics.fmean(vals) if vals else None
        aps = [r["AP"] for r in rs if r.get("AP") is not None]
        s["AP_std"] = statistics.stdev(aps) if len(aps) > 1 else None
        s["AP_spread"] = (max(aps) - min(aps)) if len(aps) > 1 else None
        out.append(s)
    return out


def separated_pairs(summary: list[dict], factor: float = 2.0) -> list[tuple[str, str, float, float]]:
    """Pairs of assigners whose mean mAP50-95 differ by more than ``factor`` times the larger
    of their two seed standard deviations: ``(better, worse, difference, that std)``, largest
    difference first. Assigners run with one seed have no spread and are never paired."""
    rows = [s for s in summary if "skipped" not in s and s.get("AP_std") is not None]
    pairs = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            hi, lo = (a, b) if a["AP"] >= b["AP"] else (b, a)
            spread = max(a["AP_std"], b["AP_std"])
            if hi["AP"] - lo["AP"] > factor * spread:
                pairs.append((hi["assigner"], lo["assigner"], hi["AP"] - lo["AP"], spread))
    return sorted(pairs, key=lambda p: -p[2])


def markdown_table(summary: list[dict]) -> str:
    lines = ["| assigner | seeds | mAP50-95 (mean ± std) | mAP50 | pos / object | objects w/o pos "
             "(STAL off → on) | assign ms / iter | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        if "skipped" in s:
            lines.append(f"| {s['assigner']} | – | {s['skipped']} | | | | | |")
            continue
        ap = _fmt(s["AP"], pct=True)
        if s.get("AP_std") is not None:
            ap += f" ± {100 * s['AP_std']:.1f}"
        empty = f"{_fmt(s['objects_without_pos'], True)}%"
        if s.get("objects_without_pos_stal") is not None:
            empty += f" → {_fmt(s['objects_without_pos_stal'], True)}%"
        lines.append(f"| {s['assigner']} | {','.join(map(str, s['seeds']))} | {ap} | {_fmt(s['AP50'], True)} | "
                     f"{_fmt(s['pos_per_object'])} | {empty} | "
                     f"{_fmt(s['assign_ms_per_iter'])} | {_fmt(s['wall_s'])} |")
    if any(s.get("AP_std") is not None for s in summary):
        pairs = separated_pairs(summary)
        lines += ["", "Pairs whose mean mAP50-95 differ by more than twice the larger seed std "
                  "of the two:", ""]
        lines += [f"- {a} > {b}: +{100 * d:.1f} (std {100 * sd:.1f})" for a, b, d, sd in pairs] or [
            "- none: at this budget no assigner is separated from another by the seeds' spread"]
    e2e = [s for s in summary if "AP_o2m_nms" in s]
    if e2e:  # end-to-end runs: the other branch (docs/end2end.md)
        lines += ["", "End-to-end models: mAP above is the one-to-one branch without NMS; the "
                  "one-to-many head of the same checkpoints with NMS, and the one-to-one assigner:",
                  "", "| assigner | mAP50-95 o2m+NMS | mAP50 o2m+NMS | o2o pos / object | "
                  "objects w/o o2o pos |", "|---|---|---|---|---|"]
        lines += [f"| {s['assigner']} | {_fmt(s['AP_o2m_nms'], True)} | {_fmt(s['AP50_o2m_nms'], True)} | "
                  f"{_fmt(s['o2o_pos_per_object'])} | {_fmt(s['o2o_objects_without_pos'], True)}% |"
                  for s in e2e]
    return "\n".join(lines)


def bar_plot(summary: list[dict], path: Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summary if "skipped" not in s]
    names = [s["assigner"] for s in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.2 * max(len(rows), 3) + 2, 3.6))
    ap = [100 * (s["AP"] or 0) for s in rows]
    ap50 = [100 * (s["AP50"] or 0) for s in rows]
    err = [100 * (s.get("AP_std") or 0) for s in rows]
    ax.bar([i - 0.2 for i in x], ap, 0.4, yerr=err, label="mAP50-95", capsize=3)
    ax.bar([i + 0.2 for i in x], ap50, 0.4, label="mAP50")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("%")
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compatible_assigners(cfg) -> tuple[str, ...]:
    """The assigners the configured model's head can train with (built on the meta device:
    nothing is allocated)."""

    with torch.device("meta"):
        model = build_model(cfg.model.name, num_classes=1, size=cfg.model.size, **cfg.model.params)
    return tuple(model.head.compatible_assigners)


def shootout(config: str, assigners: Sequence[str], overrides: Sequence[str] = (),
             epochs: Optional[int] = None, seeds: Sequence[int] = (0,), out: str | Path = "runs/shootout",
             command: str = "", log=print) -> list[dict]:
    """Train once per (assigner, seed); write ``shootout.md``, ``.json`` and ``.png`` in ``out``."""

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = load_config(config, list(overrides))
    compatible = compatible_assigners(base)
    rows = [{"assigner": name, "skipped": f"incompatible with {base.model.name}"}
            for name in assigners if name not in compatible]  # refused before any training starts
    # seeds outer: an interrupted shoot-out has every assigner at the same number of seeds
    for seed in seeds:
        for name in assigners:
            if name in compatible:
                log(f"== shootout: {name}, seed {seed} ==")
                rows.append(run_one(config, overrides, name, seed, epochs, out_dir, log=log))
    order = {name: i for i, name in enumerate(assigners)}
    summary = sorted(summarise(rows), key=lambda s: order[s["assigner"]])
    title = f"{base.model.name} ({base.model.size or 'default'}) on {base.data.root}"
    (out_dir / "shootout.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=2) + "\n")
    bar_plot(summary, out_dir / "shootout.png", title)
    md = [f"# Assigner shoot-out: {title}", "", f"Command: `{command}`" if command else "", "",
          markdown_table(summary), "",
          "mAP on the validation split from each run's best checkpoint (EMA); positives per object "
          "and objects without a positive from that run's assigner over the validation images "
          "with the trained model's predictions (STAL off → on: the same with the small-object "
          "widening); assign ms is the mean assigner time per training iteration; wall s is "
          "the whole training run.", ""]
    (out_dir / "shootout.md").write_text("\n".join(md))
    return summary
