"""From a validated :class:`~densedet.config.Config` to the objects a run needs.

Shared by ``train``, ``eval``, ``predict`` and ``export`` so they agree on how a config
becomes a model, a device and a dataset, and on the error messages when it cannot.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode
from torch import nn

from densedet.assign import ASSIGNERS, build_assigner
from densedet.config import Config, config_from_dict, load_config
from densedet.data.check import check_dataset
from densedet.data.readers import read_dataset
from densedet.engine.checkpoint import inference_state_dict, load_checkpoint, load_matching
from densedet.errors import DensedetError
from densedet.models import DEFAULT_ASSIGNER, MODELS, build_model


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DensedetError(f"train.device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DensedetError(f"train.device={name!r} but CUDA is not available (use auto or cpu)")
    return device


def assigner_name(cfg: Config) -> str:
    """The assigner a config trains with: ``assigner.name``, or the model family's own when
    that is null."""
    return cfg.assigner.name or DEFAULT_ASSIGNER.get(cfg.model.name, "")


def o2o_assigner_spec(cfg: Config) -> tuple[str, dict]:
    """``(name, params)`` of an end-to-end model's one-to-one assigner: ``assigner.o2o``, or
    by default ``o2o`` over the one-to-many method and its params (docs/end2end.md)."""
    if cfg.assigner.o2o is not None:
        return cfg.assigner.o2o.name, dict(cfg.assigner.o2o.params)
    return "o2o", {"base": assigner_name(cfg), "base_params": dict(cfg.assigner.params)}


def build_o2o_assigner(cfg: Config, num_classes: int):
    """The one-to-one assigner of :func:`o2o_assigner_spec`; refusals as DensedetError."""
    name, params = o2o_assigner_spec(cfg)
    if name not in ASSIGNERS:
        raise DensedetError(f"assigner.o2o.name: unknown assigner {name!r}; choose one of "
                            f"{', '.join(ASSIGNERS)}")
    try:
        return build_assigner(name, num_classes=num_classes, **params)
    except (TypeError, ValueError) as e:
        raise DensedetError(f"assigner.o2o: {e}") from None


def build_detector(cfg: Config, num_classes: int, with_assigner: bool = True) -> nn.Module:
    """``build_model`` + ``build_assigner`` from the config; every refusal becomes a
    :class:`DensedetError` naming the model and the assigner."""

    name = cfg.model.name
    if name not in MODELS:
        raise DensedetError(f"model.name: unknown model {name!r}; choose one of {', '.join(MODELS)}")
    assigner = None
    aname = assigner_name(cfg)
    if with_assigner:
        if aname not in ASSIGNERS:
            raise DensedetError(f"assigner.name: unknown assigner {aname!r}; choose one of "
                                f"{', '.join(ASSIGNERS)}")
        try:
            assigner = build_assigner(aname, num_classes=num_classes, **cfg.assigner.params)
        except (TypeError, ValueError) as e:
            raise DensedetError(f"assigner.params: {e}") from None
    o2o_assigner = None
    if with_assigner and cfg.model.end2end:
        o2o_assigner = build_o2o_assigner(cfg, num_classes)
    e2e = dict(end2end=True, o2o_assigner=o2o_assigner, o2m_weight=cfg.train.o2m_weight,
               o2o_detach=cfg.model.o2o_detach) if cfg.model.end2end else {}
    params = dict(cfg.model.params)
    for key in ("tower_bias", "score_sqrt"):  # FCOS-family head options (config keys)
        if getattr(cfg.model, key):
            if name not in FCOS_FAMILY:
                raise DensedetError(f"model.{key} applies to the FCOS family ({', '.join(FCOS_FAMILY)}), "
                                    f"not {name!r}")
            params[key] = True
    try:
        model = build_model(name, num_classes=num_classes, assigner=assigner, size=cfg.model.size,
                            **e2e, **params)
    except (TypeError, ValueError, KeyError) as e:
        raise DensedetError(f"model {name!r} (size {cfg.model.size!r}) with assigner {aname!r}: {e}") from None
    apply_input_keys(model, cfg)
    return model


#: families whose head is densedet.models.fcos.FCOSHead or a subclass (ResNet-FPN backbone)
FCOS_FAMILY = ("fcos", "dw", "lla")


def apply_input_keys(model: nn.Module, cfg: Config) -> None:
    """The config's input convention and prior grid (``model.channel_order``, ``input_scale``,
    ``pixel_mean``, ``pixel_std``, ``prior_offset``, ``prior_step``) set on a built detector."""
    m = cfg.model
    model.set_input(m.channel_order, m.input_scale, m.pixel_mean, m.pixel_std)
    model.set_priors(offset=m.prior_offset, step=m.prior_step)


def read_split(cfg: Config, split: Optional[str], classes: Optional[list[str]] = None):
    """``read_dataset`` for one split of the configured dataset."""

    root = Path(cfg.data.root)
    if not root.exists():
        raise DensedetError(f"data.root: {root} does not exist (create it, e.g. `densedet synth "
                            f"{root}`, or set data.root=PATH)")
    return read_dataset(root, fmt=cfg.data.format, classes=classes or cfg.data.classes, split=split,
                        skip_unknown=cfg.data.skip_unknown)


def check_index(index, what: str, decode_images: bool = True, limit: int = 10) -> None:
    """Run ``check_dataset`` and fail with the first problems listed (seconds, not hours
    into a training run)."""
    problems = check_dataset(index, decode_images=decode_images)
    if problems:
        shown = "\n  ".join(str(p) for p in problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        raise DensedetError(f"{what}: {len(problems)} problem(s) in the dataset "
                            f"(run `densedet check`):\n  {shown}{more}")


def model_from_weights(weights: str | Path, config_path: Optional[str | Path] = None,
                       overrides: Optional[list[str]] = None, device: str | torch.device = "cpu",
                       log=print):
    """Load a trained model from a checkpoint alone (its config and class names travel with it).

    Returns ``(model in eval mode, cfg, classes)``. ``config_path`` replaces the stored config
    (overrides apply on top of whichever is used). Loads the EMA weights when present.
    """

    ckpt = load_checkpoint(weights)
    if config_path is not None:
        cfg = load_config(config_path, overrides)
    elif isinstance(ckpt.get("config"), dict):
        cfg = config_from_dict(ckpt["config"], overrides, where=f"{weights} (stored config)")
    else:
        raise DensedetError(f"{weights}: the checkpoint carries no config; pass the config file (an "
                            f"official YOLOX / NanoDet-Plus / FCOS file: `densedet convert` it first)")
    classes = ckpt.get("classes") or cfg.data.classes
    if not classes:
        raise DensedetError(f"{weights}: no class names in the checkpoint or config (data.classes)")
    model = build_detector(cfg, len(classes), with_assigner=False)
    state = inference_state_dict(ckpt)
    if ckpt.get("classes") is not None and len(ckpt["classes"]) == len(classes):
        try:
            model.load_state_dict(state)  # a checkpoint of this very model: all or nothing
        except RuntimeError as e:
            raise DensedetError(f"{weights}: the weights do not fit model {cfg.model.name!r} "
                                f"size {cfg.model.size!r}: {str(e).splitlines()[0]}") from None
    else:
        load_matching(model, state, log=log, source=weights,
                      allow_partial=cfg.train.init_weights_partial)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    return model.to(device).eval(), cfg, list(classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: nn.Module, input_hw: tuple[int, int]) -> Optional[float]:
    """Forward GFLOPs of one image at ``input_hw`` (FlopCounterMode counts a multiply-add as
    2 FLOPs, like YOLOX's reported GFLOPs). None when counting fails.

    The count runs on a copy of the model on the ``meta`` device: shapes only, no
    arithmetic, so it costs well under a second even for ResNet-50 on a busy CPU.
    """
    import copy

    try:
        meta = copy.deepcopy(model).to("meta").eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            meta(torch.zeros(1, 3, *input_hw, device="meta"))
        return counter.get_total_flops() / 1e9
    except Exception:  # counting is informative only; never fail a run for it
        return None
