"""``densedet convert SRC [--from LAYOUT] [--size S] --out DST.pt``: an official model's weights
as a densedet checkpoint that computes what the official model computes.

SRC is a YOLOX ``.pth`` (current or ``--from yolox-legacy``), a NanoDet-Plus ``.ckpt``/``.pth``
(its EMA weights), a torchvision ``fcos_resnet50_fpn`` state dict or an mmdet FCOS checkpoint
(:mod:`densedet.engine.official` lists the layouts and what changes on the way). The file is
read with ``torch.load(weights_only=True)``: tensors only, never code.

DST carries, besides the weights, the config under which ``densedet predict / eval / export
--weights DST.pt`` and :func:`densedet.load` behave as the official model: its input channel
order and normalisation, prior grid, decoding, the official test size (``--size`` changes it)
and resize, and its thresholds. Class names: COCO's for the official 80 (91 torchvision slots)
class heads, ``--classes`` otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from densedet.config import config_from_dict, config_to_dict
from densedet.engine.build import build_detector
from densedet.engine.checkpoint import save_atomic
from densedet.engine.official import (LAYOUTS, Official, convert_state, extract_state,
                                      fill_missing, official_config, read_weights)
from densedet.errors import DensedetError

__all__ = ["LAYOUTS", "converted_checkpoint", "convert"]


def _input_size(size: Optional[Sequence[int] | int], off: Official):
    if size is None:
        return off.input_size
    sizes = [int(size)] if isinstance(size, int) else [int(s) for s in size]
    if len(sizes) not in (1, 2) or min(sizes) < 32:
        raise DensedetError("--size takes N or H W (each >= 32)")
    if off.preprocess.get("resize") == "shorter_side" and len(sizes) != 1:
        raise DensedetError("--size: this model resizes the shorter side: give one number")
    return sizes[0] if len(sizes) == 1 else sizes


def converted_checkpoint(src: str | Path, layout: Optional[str] = None,
                         size: Optional[Sequence[int] | int] = None,
                         classes: Optional[list[str]] = None,
                         log: Callable[[str], None] = print) -> dict:
    """Read an official weights file and return the densedet checkpoint dict (``model``,
    ``config``, ``classes``, ``converted``) without writing it."""
    if layout is not None and layout not in LAYOUTS:
        raise DensedetError(f"--from: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    state, notes = extract_state(read_weights(src))
    try:
        off = convert_state(state, layout)
    except DensedetError as e:
        raise DensedetError(f"{src}: {e}") from None
    names = classes or off.classes or [f"class_{i}" for i in range(off.num_classes)]
    if len(names) != off.num_classes:
        raise DensedetError(f"--classes: {len(names)} names for a {off.num_classes}-class head")
    raw = official_config(off)
    raw["input_size"] = _input_size(size, off)
    raw["data"] = {**raw["data"], "classes": list(names)}
    cfg = config_from_dict(raw, where=f"{src} (converted config)")
    model = build_detector(cfg, len(names), with_assigner=False)
    missing = fill_missing(model, off)
    own = model.state_dict()
    unexpected = [k for k in off.state if k not in own]
    wrong = [k for k in off.state if k in own and tuple(own[k].shape) != tuple(off.state[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("other shape", wrong)) if keys)
        raise DensedetError(f"{src}: the {off.layout} tensors do not fit densedet's "
                            f"{off.model['name']} {off.model['size']} ({detail})")
    model.load_state_dict({k: off.state[k] for k in own})
    for line in notes + off.notes:
        log(f"{src}: {line}")
    log(f"{src}: {off.layout} layout -> densedet {off.model['name']} size {off.model['size']}, "
        f"{off.num_classes} classes, {len(own)} tensors; input {raw['input_size']} "
        f"({off.preprocess.get('resize', 'letterbox')})")
    return {"model": model.state_dict(), "config": config_to_dict(cfg), "classes": list(names),
            "converted": {"source": str(src), "layout": off.layout, "notes": notes + off.notes}}


def convert(src: str | Path, out: str | Path, layout: Optional[str] = None,
            size: Optional[Sequence[int] | int] = None, classes: Optional[list[str]] = None,
            log: Callable[[str], None] = print) -> Path:
    """Convert ``src`` (see the module doc) and write the densedet checkpoint ``out``."""
    ckpt = converted_checkpoint(src, layout, size, classes, log)
    out = Path(out)
    save_atomic(ckpt, out)
    log(f"wrote {out}: densedet predict/eval/export --weights {out}, or densedet.load({str(out)!r})")
    return out
