"""Label assignment: every method behind one batched contract (docs/design.md).

    from densedet.assign import build_assigner
    assigner = build_assigner("simota", num_classes=80)
    out = assigner(priors, pred_scores, pred_boxes, gt_boxes, gt_labels, gt_valid)
"""
from __future__ import annotations

import importlib

from densedet.assign.base import Assigner, Assignment, trains_with

# name -> "module:Class"; imported on first use so that building one method does not
# import the others.
ASSIGNERS: dict[str, str] = {
    "fcos": "densedet.assign.fcos:FCOSAssigner",
    "atss": "densedet.assign.atss:ATSSAssigner",
    "simota": "densedet.assign.simota:SimOTAAssigner",
    "dsl": "densedet.assign.dsl:DSLAssigner",
    "lla": "densedet.assign.lla:LLAAssigner",
    "dw": "densedet.assign.dw:DWAssigner",
    "tal": "densedet.assign.tal:TALAssigner",
    "ota": "densedet.assign.ota:OTAAssigner",
    # one-to-one (end-to-end) forms, docs/end2end.md: any method's, and YOLO26's TAL
    "o2o": "densedet.assign.o2o:O2OAssigner",
    "tal_o2o": "densedet.assign.o2o:TALO2OAssigner",
}


def assigner_class(name: str) -> type[Assigner]:
    """The class registered under ``name``."""
    if name not in ASSIGNERS:
        raise ValueError(f"unknown assigner {name!r}; choose one of {', '.join(ASSIGNERS)}")
    module, cls = ASSIGNERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def assigners_for(head_needs: frozenset[str]) -> tuple[str, ...]:
    """Registered methods a head needing the Assignment fields ``head_needs`` trains with."""
    return tuple(n for n in ASSIGNERS if trains_with(head_needs, assigner_class(n).provides))


def build_assigner(name: str, num_classes: int, **params) -> Assigner:
    """Build the assigner ``name`` for ``num_classes`` classes with its parameters (docs/design.md)."""
    cls = assigner_class(name)
    try:
        return cls(num_classes=num_classes, **params)
    except TypeError as e:
        raise TypeError(f"assigner {name!r}: {e}") from None


__all__ = ["ASSIGNERS", "Assigner", "Assignment", "assigner_class", "assigners_for", "build_assigner",
           "trains_with"]
