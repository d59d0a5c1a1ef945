"""Which assigner a head trains with follows from what its loss needs (no hand-kept lists)."""
from __future__ import annotations

import pytest

from densedet.assign import ASSIGNERS, Assigner, assigner_class, assigners_for, trains_with
from densedet.models import build_model

HARD_LABEL = {"fcos", "atss", "simota", "dsl", "lla", "tal", "ota", "o2o", "tal_o2o"}


@pytest.mark.parametrize("family", ["yolox", "fcos", "nanodet", "lla"])
def test_hard_label_heads_train_with_every_method_without_soft_weights(family):
    head = build_model(family, num_classes=3).head
    assert set(head.compatible_assigners) == HARD_LABEL
    assert "dw" not in head.compatible_assigners


def test_dw_head_trains_only_with_pair_weights():
    assert build_model("dw", num_classes=3).head.compatible_assigners == ("dw",)


def test_rule_on_fields():
    assert trains_with(frozenset(), frozenset({"centerness"}))           # extra fields are fine
    assert not trains_with(frozenset(), frozenset({"pos_weight"}))       # ignored soft weights
    assert not trains_with(frozenset({"pos_weight"}), frozenset())       # missing a needed field
    assert trains_with(frozenset({"pos_weight", "neg_weight"}), frozenset({"pos_weight", "neg_weight"}))


def test_a_new_method_is_picked_up_from_the_registry(monkeypatch):
    """Registering a method is the only step: every head's list derives from it."""
    class Soft(Assigner):
        name = "soft"
        provides = frozenset({"pos_weight", "neg_weight"})

    import densedet.assign as assign

    monkeypatch.setitem(ASSIGNERS, "soft", "x:Soft")
    monkeypatch.setattr(assign, "assigner_class",
                        lambda n: Soft if n == "soft" else assigner_class(n))
    assert "soft" in assigners_for(frozenset({"pos_weight", "neg_weight"}))
    assert "soft" not in assigners_for(frozenset())


def test_refused_pairing_names_the_choices():
    from densedet.assign import build_assigner

    with pytest.raises(ValueError, match="cannot train with assigner 'dw'"):
        build_model("yolox", num_classes=3, assigner=build_assigner("dw", num_classes=3))
