"""Mixed precision: every detector's training step under autocast keeps its losses and the
assignment in float32 and finite.

CI has no GPU, so the autocast path runs on CPU with bfloat16 (the trainer enables AMP on
CUDA only, with float16 and a GradScaler; what can break there - a head or loss computing
in reduced precision, an assigner fed half-precision costs - breaks here as well).
"""
import pytest
import torch

from densedet.assign import build_assigner
from densedet.models import build_model

# 128 px, not the 64 of the model tests: at 64 px FCOS's P7 conv sees a 1x1 input, and for
# that shape torch 2.15's CPU bfloat16 conv weight-gradient returned non-finite values in a
# quarter of the trials here (a 3x3/stride-2 conv on a random [2, 128, 1, 1] input; 2x2 and
# larger inputs were always finite), a kernel fault outside densedet.
HW = 128


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def targets():
    return {"gt_boxes": torch.tensor([[[8., 12., 60., 80.], [40., 40., 120., 116.]],
                                      [[20., 24., 100., 60.], [0., 0., 0., 0.]]]),
            "gt_labels": torch.tensor([[0, 2], [1, 0]]),
            "gt_valid": torch.tensor([[True, True], [True, False]])}


@pytest.mark.parametrize("name,size,assigner", [
    ("yolox", "nano", "simota"), ("yolox", "nano", "tal"), ("fcos", "r18", "fcos"),
    ("fcos", "r18", "atss"), ("nanodet", "m", "dsl"), ("dw", "r18", "dw"), ("lla", "r18", "lla")])
def test_training_step_under_autocast(name, size, assigner):
    torch.manual_seed(0)
    model = build_model(name, 3, assigner=build_assigner(assigner, 3), size=size).train()
    images = torch.rand(2, 3, HW, HW)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = model(images)
        assert any(v.dtype == torch.bfloat16 for v in raw.values() if v.is_floating_point()), \
            "autocast did not reach the head"
        out = model.loss(raw, targets())
    a = out.assignment
    assert a.quality.dtype == torch.float32
    for field in ("pos_weight", "neg_weight", "centerness", "align_target"):
        value = getattr(a, field)
        assert value is None or value.dtype == torch.float32, field
    assert (a.gt_index >= 0).any()
    assert out.total.dtype == torch.float32
    for term, value in out.terms.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), term
    out.total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
