"""Detector families. ``build_model(name, num_classes, assigner, size=..., **params)``.

Each family module provides ``build(num_classes, assigner, size, **params) -> Detector``.
"""
from __future__ import annotations

import importlib
from typing import Optional

from densedet.assign import Assigner
from densedet.models.detector import Detections, Detector, Head, LossOutput

# name -> module providing build(); imported on first use.
MODELS: dict[str, str] = {
    "yolox": "densedet.models.yolox",
    "fcos": "densedet.models.fcos",
    "nanodet": "densedet.models.nanodet",
    "dw": "densedet.models.dw",
    "lla": "densedet.models.lla",
}

# the assigner each family was published with
DEFAULT_ASSIGNER: dict[str, str] = {
    "yolox": "simota", "fcos": "fcos", "nanodet": "dsl", "dw": "dw", "lla": "lla",
}


def model_module(name: str):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return importlib.import_module(MODELS[name])


def build_model(name: str, num_classes: int, assigner: Optional[Assigner] = None,
                size: Optional[str] = None, end2end: bool = False,
                o2o_assigner: Optional[Assigner] = None,
                o2m_weight: tuple[float, float] = (0.8, 0.1), o2o_detach: bool = False,
                **params) -> Detector:
    """Build detector family ``name``. Refuses an assigner its head cannot train with.

    ``end2end``: add the one-to-one branch (docs/end2end.md), trained by ``o2o_assigner``
    with loss weights ``o2m_weight`` (one-to-many start, end; the one-to-one weight is one
    minus it), reading detached features when ``o2o_detach``; a family without a one-to-one
    form (dw) is refused."""
    module = model_module(name)
    kwargs = dict(params)
    if size is not None:
        kwargs["size"] = size
    model = module.build(num_classes=num_classes, assigner=assigner, **kwargs)
    if assigner is not None and assigner.name not in model.head.compatible_assigners:
        raise ValueError(
            f"model {name!r} cannot train with assigner {assigner.name!r}: its loss needs one of "
            f"{', '.join(model.head.compatible_assigners)}")
    if end2end:
        try:
            model.enable_end2end(o2o_assigner, o2m_weight, o2o_detach)
        except ValueError as e:
            raise ValueError(f"model {name!r}: {e}; model.end2end supports "
                             f"{', '.join(END2END_MODELS)}") from None
    return model


#: the families with a one-to-one branch (``model.end2end``)
END2END_MODELS = ("yolox", "fcos", "nanodet", "lla")


__all__ = ["DEFAULT_ASSIGNER", "END2END_MODELS", "MODELS", "Detections", "Detector", "Head", "LossOutput",
           "build_model", "model_module"]
