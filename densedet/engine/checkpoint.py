"""Checkpoints: atomic writes, RNG state, and loading weights across class counts.

A checkpoint is a dict:
    model, ema (optional), optimizer, scaler, epoch, iter (next iteration inside ``epoch``),
    global_iter, best_ap, rng, config (plain dict), classes (names), metrics (optional).
It carries its config and class names so ``eval``/``predict``/``export`` need only
``--weights``.

Every value is a tensor, a number, a string, None or a list/tuple/dict of those, so it
loads with ``torch.load(weights_only=True)``: a weights file from elsewhere is data, never
code (a pickle may name any callable to run on load).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from densedet.errors import DensedetError

# ``save_atomic``'s temporary names (``.last.pt.<pid>.tmp``) and the trainer's
# ``.metrics.json[.<pid>].tmp``: what a save killed mid-write leaves behind.
STALE_TMP = re.compile(r"^\.(?:last\.pt|best\.pt|metrics\.json)(?:\.(\d+))?\.tmp$")


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace``: a run killed
    while writing leaves the previous checkpoint intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 only checks; EPERM means it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # e.g. a pid beyond the platform's range: no such process
        return False
    return True


def remove_stale_tmp(folder: str | Path) -> list[Path]:
    """Delete the temporary files of saves killed mid-write in ``folder``; returns them.

    Only names matching :data:`STALE_TMP`, and only when the pid in the name is ours (a
    previous process that had our pid) or not running: a file whose writer is alive may be
    a save in progress. A name without a pid (``.metrics.json.tmp``, older runs) is stale.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        m = STALE_TMP.match(p.name)
        if m is None or not p.is_file():
            continue
        pid = int(m.group(1)) if m.group(1) else None
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            p.unlink()
        except FileNotFoundError:  # its writer finished the replace meanwhile
            continue
        removed.append(p)
    return removed


def _legacy_numpy_globals() -> list:
    """The only pickled globals densedet checkpoints ever held: numpy's MT19937 state (a
    uint32 array) in files written before RNG states were stored as tensors. Allowing exactly
    these keeps old ``last.pt`` files resumable; other dtypes (object arrays) stay refused."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    allowed: list = [_reconstruct, np.ndarray, np.dtype]
    if hasattr(np, "dtypes"):
        allowed.append(np.dtypes.UInt32DType)
    # a file pickled under numpy 1.x names the function by its old module
    allowed.append((_reconstruct, "numpy.core.multiarray._reconstruct"))
    return allowed


def safe_load(path: Path, map_location: str | torch.device = "cpu", extra_globals: Sequence = (),
              hint: str = "") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers (and numpy arrays of old
    files, and ``extra_globals``) only. A pickle that references code is refused with an error
    naming the file and what it references (``hint`` says what to do); nothing in it runs."""
    if not path.is_file():
        raise DensedetError(f"{path}: weights file not found")
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals() + list(extra_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        msg = str(e)
        if "Weights only load failed" in msg or "WeightsUnpickler" in msg:
            found = re.search(r"GLOBAL (\S+)", msg)
            what = f" (it references {found.group(1)})" if found else ""
            raise DensedetError(f"{path}: densedet refuses to unpickle code; only tensors/plain "
                                f"containers are loaded{what}. {hint}".rstrip()) from None
        raise DensedetError(f"{path}: cannot read weights: {e}") from None  # truncated/foreign


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint (or a bare state dict, returned as ``{"model": sd}``).

    Always ``weights_only=True``: tensors and plain containers only. A file whose pickle
    references a callable (``os.system``, a class to build) is refused before anything in it
    runs.
    """
    path = Path(path)
    ckpt = safe_load(path, map_location, hint="Use a densedet checkpoint or a plain state dict "
                     "(torch.save(model.state_dict(), ...)); if you trust the file, re-save its "
                     "tensors that way yourself")
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


# Backbone and neck: what pretrained weights are for. The head's prediction layers depend on
# the class count, so a fine-tune may legitimately skip them, but not these.
FEATURE_PREFIXES = ("backbone.", "neck.")


def _module_groups(keys: list[str]) -> list[str]:
    """Tensor names -> their layers, without indices and parameter names:
    ``head.cls_preds.0.weight`` -> ``head.cls_preds``."""
    groups = []
    for k in keys:
        parts = [p for p in k.split(".")[:-1] if not p.isdigit()]
        g = ".".join(parts) or k
        if g not in groups:
            groups.append(g)
    return groups


def describe_mismatch(keys: list[str]) -> str:
    """Which part of the model the shape-skipped tensors ``keys`` belong to, in words."""
    groups = _module_groups(keys)
    shown = ", ".join(groups[:6]) + (" ..." if len(groups) > 6 else "")
    if all(k.startswith("head.") for k in keys):
        if all("cls" in g.rsplit(".", 1)[-1] for g in groups):
            return f"the classifier ({shown}): the file has another class count"
        return f"the head's prediction layers ({shown}): another class count or head layout"
    return f"layers outside the head ({shown}): another architecture or model size"


def load_matching(model: nn.Module, state: dict, log: Callable[[str], None] = print,
                  source: Optional[str | Path] = None, allow_partial: bool = False,
                  by_part: bool = False) -> tuple[list[str], list[str]]:
    """Load the tensors of ``state`` whose name and shape match ``model``.

    Fine-tuning on a dataset with another class count changes the classifier's shape; a
    strict load would fail (YOLOX's loading bug with a VOC-trained head), and a silent
    partial load would hide a wrong file. So: load what fits, always print how much that
    was (``loaded N of M model tensors (K shape-skipped, L missing)``) and what did not fit.

    Args:
        model: the model to fill (M = ``len(model.state_dict())`` tensors).
        state: name -> tensor.
        log: receives the report lines.
        source: the weights file, named in the messages.
        allow_partial: load even when less than half of the backbone and neck weights (in
            numbers of values) fit, or more than a tenth have another shape in the file
            (``train.init_weights_partial``); otherwise that is an error, since such a file is
            almost surely another architecture or size and training would start from scratch
            while looking fine-tuned.
        by_part: also log the counts per part (backbone, neck, head).
    Returns:
        ``(skipped_shape_mismatch, missing_in_state)``.
    Raises:
        DensedetError: nothing matches, or too little of the backbone/neck does (see above);
            the model is left untouched then.
    """
    what = f"weights {source}" if source is not None else "weights"
    own = model.state_dict()
    keep, mismatched = {}, []
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            mismatched.append(k)
        elif k in own:
            keep[k] = v
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    log(f"{what}: loaded {len(keep)} of {len(own)} model tensors "
        f"({len(mismatched)} shape-skipped, {len(missing)} missing)")
    if by_part:
        log(f"{what}: by part: " + ", ".join(
            f"{part} {sum(k in keep for k in own if k.startswith(part + '.'))}/"
            f"{sum(k.startswith(part + '.') for k in own)}" for part in ("backbone", "neck", "head")))
    if mismatched:
        log(f"{what}: skipped {len(mismatched)} tensors with a different shape, "
            f"in {describe_mismatch(mismatched)}:")
        for k in mismatched:
            log(f"  {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
    if missing:
        log(f"{what}: {len(missing)} model tensors not in the file (kept at init): "
            + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        log(f"{what}: ignored {len(unexpected)} tensors the model does not have")
    if not keep:
        raise DensedetError(f"{what}: no tensor of the file matches the model (wrong model "
                            f"family?); pass weights of the configured model.name/model.size")
    # Measured in weights, not tensors, and shape mismatches count against: another depth of
    # the same family (ResNet-50 into ResNet-18) keeps half the names and shapes (BatchNorms,
    # the 3x3 convs) while a fine-tuning file differs in the head only, and a backbone-only
    # file (ImageNet) lacks the neck rather than mismatching it.
    features = [k for k in own if k.startswith(FEATURE_PREFIXES)]
    loaded = sum(k in keep for k in features)
    volume = max(sum(own[k].numel() for k in features), 1)
    loaded_volume = sum(own[k].numel() for k in features if k in keep)
    clashing = set(mismatched)
    clash_volume = sum(own[k].numel() for k in features if k in clashing)
    if features and (loaded_volume * 2 < volume or clash_volume * 10 > volume):
        msg = (f"only {loaded} of the model's {len(features)} backbone/neck tensors "
               f"({100 * loaded_volume / volume:.0f} % of their weights) match by name and shape, "
               f"{100 * clash_volume / volume:.0f} % have another shape in the file: it is "
               f"probably another architecture or model size")
        if not allow_partial:
            raise DensedetError(f"{what}: {msg}. Pass weights of the configured model.name/"
                                f"model.size, or set train.init_weights_partial=true to load "
                                f"what fits anyway")
        log(f"{what}: {msg}; loading anyway (train.init_weights_partial=true)")
    model.load_state_dict(keep, strict=False)
    return mismatched, missing


# ---------------------------------------------------------------- RNG state
# Stored as tensors, ints, strings and lists so checkpoints load with weights_only=True.

def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states, in weights_only-loadable types.

    ``python``: ``[version, [625 ints], gauss_next]``; ``numpy``: ``[name, int64 tensor of
    the 624 key words, pos, has_gauss, cached_gaussian]``; ``torch``/``cuda``: byte tensors.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [int(version), [int(x) for x in internal], gauss],
             # int64: torch has no general uint32 support; MT19937 words fit exactly
             "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                       int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved) -> tuple:
    """``rng_state()["numpy"]`` (or a raw ``np.random.get_state()`` tuple from an older
    checkpoint) -> what ``np.random.set_state`` takes."""
    name, keys, pos, has_gauss, cached = saved
    if isinstance(keys, torch.Tensor):
        keys = keys.cpu().numpy()
    return (str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))


def _python_state(saved) -> tuple:
    """``rng_state()["python"]`` (lists) -> the tuple ``random.setstate`` takes."""
    version, internal, gauss = saved
    return (int(version), tuple(int(x) for x in internal), gauss)


def set_rng_state(state: Optional[dict]) -> None:
    if not state:
        return
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:  # a different GPU count: not worth failing the resume for
            pass
