"""Training curves from ``OUTPUT_DIR/log.csv`` (matplotlib, no display needed).

    plot_losses("runs/demo/log.csv", "runs/demo/loss.png", "runs/demo/metrics.json")

(``densedet train`` writes ``OUTPUT_DIR/loss.png`` with it at the end of every run.)
"""
from __future__ import annotations

import csv
from pathlib import Path

from densedet.errors import DensedetError

NOT_LOSSES = {"epoch", "iter", "global_iter", "lr", "num_pos", "assign_ms", "data_ms", "step_ms"}


def read_log(path: str | Path) -> dict[str, list[float]]:
    """Columns of ``log.csv`` as float lists (missing cells -> nan)."""
    path = Path(path)
    if not path.is_file():
        raise DensedetError(f"{path}: no training log")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DensedetError(f"{path}: the log has no rows yet")
    cols: dict[str, list[float]] = {k: [] for k in rows[0]}
    for r in rows:
        for k in cols:
            v = r.get(k, "")
            cols[k].append(float(v) if v not in ("", None) else float("nan"))
    return cols


def save_figure(fig, out: str | Path, dpi: int = 110,
                rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure. ``rect``: the part
    of the figure the panels may fill (``tight_layout`` leaves a ``suptitle`` out and would
    put the top row's titles under it)."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def plot_losses(log_csv: str | Path, out_png: str | Path, metrics_json: str | Path | None = None) -> Path:
    """Loss terms and total against the global iteration, the learning rate on a second
    panel, and the validation AP per epoch when ``metrics_json`` has a history."""
    import matplotlib
    matplotlib.use("Agg")  # headless: the demo runs on machines without a display
    import matplotlib.pyplot as plt

    cols = read_log(log_csv)
    x = cols["global_iter"]
    history = []
    if metrics_json and Path(metrics_json).is_file():
        import json
        history = json.loads(Path(metrics_json).read_text()).get("train", {}).get("history", [])
    panels = 3 if history else 2
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3 * panels), sharex=False)
    ax = axes[0]
    for k, v in cols.items():
        if k in NOT_LOSSES:
            continue
        ax.plot(x, v, label=k, linewidth=2.0 if k == "loss" else 1.0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss ({Path(log_csv).parent.name})")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(alpha=0.3)
    axes[1].plot(x, cols["lr"], color="tab:gray")
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("learning rate")
    axes[1].grid(alpha=0.3)
    if history:
        ep = [h["epoch"] for h in history]
        for key in ("AP", "AP50"):
            axes[2].plot(ep, [h.get(key) if h.get(key) is not None else float("nan") for h in history],
                         marker="o", label=f"val {key}")
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel("AP (EMA model)")
        axes[2].legend(fontsize=8)
        axes[2].grid(alpha=0.3)
    return save_figure(fig, out_png, dpi=100)


def plot_pr_curves(metrics: dict, out_png: str | Path, iou: float = 0.5) -> Path:
    """Per-class precision-recall curves (VOC, IoU ``iou``) from :func:`densedet.evaluate.evaluate`'s
    ``pr_curves``: one line per class, its area-AP in the legend."""
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = metrics.get("pr_curves") or []
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for c in curves:
        if c.num_gt == 0 or len(c.recall) == 0:
            continue
        ap = "–" if math.isnan(c.ap) else f"{100 * c.ap:.1f}"
        ax.plot(c.recall, c.precision, lw=1.3, label=f"{c.name} ({ap})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"precision-recall per class, IoU {iou:g} (VOC AP in legend)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    return save_figure(fig, out_png)
