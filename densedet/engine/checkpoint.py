"""Checkpoints: atomic writes, RNG state, and loading weights across class counts.

A checkpoint is a dict:
    model, ema (optional), optimizer, scaler, epoch, iter (next iteration inside ``epoch``),
    global_iter, best_ap, rng, config (plain dict), classes (names), metrics (optional).
It carries its config and class names so ``eval``/``predict``/``export`` need only
``--weights``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from densedet.errors import DensedetError


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace``: a run killed
    while writing leaves the previous checkpoint intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint (or a bare state dict, returned as ``{"model": sd}``)."""
    path = Path(path)
    if not path.is_file():
        raise DensedetError(f"{path}: weights file not found")
    try:
        # weights_only=False: our checkpoints hold plain dicts and numpy RNG states.
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which
        raise DensedetError(f"{path}: cannot read checkpoint: {e}") from None
    if isinstance(ckpt, dict) and "model" not in ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"model": ckpt}
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise DensedetError(f"{path}: not a densedet checkpoint (no 'model' entry)")
    return ckpt


def inference_state_dict(ckpt: dict) -> dict:
    """The weights to run: the EMA average when the checkpoint has one."""
    ema = ckpt.get("ema")
    if isinstance(ema, dict) and "module" in ema:
        return ema["module"]
    return ckpt["model"]


def load_matching(model: nn.Module, state: dict, log=print) -> tuple[list[str], list[str]]:
    """Load the tensors of ``state`` whose name and shape match ``model``.

    Fine-tuning on a dataset with another class count changes the classifier's shape; a
    strict load would fail (YOLOX's loading bug with a VOC-trained head), and a silent
    partial load would hide a wrong file. So: load what fits, print what does not.
    Returns ``(skipped_shape_mismatch, missing_in_state)``.
    """
    own = model.state_dict()
    keep, mismatched = {}, []
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            mismatched.append(k)
        elif k in own:
            keep[k] = v
    missing = [k for k in own if k not in state]
    model.load_state_dict(keep, strict=False)
    if mismatched:
        log(f"weights: skipped {len(mismatched)} tensors with a different shape (class count?):")
        for k in mismatched:
            log(f"  {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
    if missing:
        log(f"weights: {len(missing)} model tensors not in the file (kept at init): "
            + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    unexpected = [k for k in state if k not in own]
    if unexpected:
        log(f"weights: ignored {len(unexpected)} tensors the model does not have")
    if not keep:
        raise DensedetError("weights: no tensor of the file matches the model (wrong model family?)")
    return mismatched, missing


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[dict]) -> None:
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:  # a different GPU count: not worth failing the resume for
            pass
