"""Run logs: ``log.csv`` (one row per logged step) and TensorBoard, rank 0 only.

The CSV columns are the union of everything logged so far: a loss term that appears late
(YOLOX's L1 term in the no-augmentation epochs) extends the header and the file is
rewritten once, so every row stays readable by ``csv.DictReader`` and pandas.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Optional

FIXED_COLUMNS = ["epoch", "iter", "global_iter", "lr", "loss"]
TAIL_COLUMNS = ["num_pos", "assign_ms", "data_ms", "step_ms"]


class CsvLog:
    """Append rows of floats to a CSV file whose header grows with new keys."""

    def __init__(self, path: str | Path, resume: bool = False, keep_until: Optional[int] = None):
        self.path = Path(path)
        self.columns: list[str] = list(FIXED_COLUMNS) + list(TAIL_COLUMNS)
        if resume and self.path.is_file():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                self.columns = list(reader.fieldnames or self.columns)
            if keep_until is not None:
                # rows logged after the checkpoint we resume from would be logged twice
                # (a row's global_iter counts the iterations done, as the checkpoint's does)
                rows = [r for r in rows if int(float(r["global_iter"])) <= keep_until]
            self._rewrite(rows)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite([])

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, restval="")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        new = [k for k in row if k not in self.columns]
        if new:
            with self.path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            # loss terms go before the tail columns, in the order they first appear
            self.columns = self.columns[:-len(TAIL_COLUMNS)] + new + self.columns[-len(TAIL_COLUMNS):]
            self._rewrite(rows)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(
                {k: _fmt(v) for k, v in row.items()})


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return v


def tensorboard_writer(log_dir: str | Path):
    """A SummaryWriter, or None when tensorboard is not importable (logs are optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard missing or broken: training must not depend on it
        return None
    return SummaryWriter(str(log_dir))
