"""Huge scenes are assigned a chunk of objects at a time (``common.object_chunks``, bounded by
``common.MAX_CHUNK_PAIRS``): the chunking is an implementation detail, so any budget must give
the same assignment as the default single chunk, and both must still equal the per-image
reference on scenes with hundreds of objects."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from densedet.assign import build_assigner, common, dw
from densedet.assign.reference import run_per_image
from densedet.priors import feature_sizes, make_priors

#: every assigner that walks objects in chunks, with parameter variants that change its path
CASES = [
    ("fcos", {}), ("fcos", {"center_sampling": False}),
    ("atss", {}), ("atss", {"topk": 3}),
    ("simota", {}), ("simota", {"center_only": True, "center_radius": 1.5}),
    ("dsl", {}), ("dsl", {"soft_center_prior": True}),
    ("lla", {}),
    ("dw", {}),
    ("tal", {}), ("tal", {"topk": 3, "beta": 2.5}),
]
FIELDS = ("quality", "pos_weight", "neg_weight", "centerness", "align_target")


@pytest.fixture(autouse=True)
def dense_dw(monkeypatch):
    """The chunks are the dense path's: DW's list of candidate pairs (CPU) has none; it is
    checked against the dense path and the reference at the end of this file."""
    monkeypatch.setattr(dw, "use_packed_pairs", lambda device: False)


def make_scene(seed: int, B: int = 3, G: int = 40, C: int = 4, hw=(64, 96), lo: float = 6.0,
               hi: float = 40.0):
    """A padded batch with conflicts: many overlapping objects of similar size (log-uniform
    sides in [lo, hi]), some partly outside the image, a zero-area box, padding rows with
    garbage boxes and labels, and (B > 1) one image without objects."""
    gen = torch.Generator().manual_seed(seed)
    strides = (8, 16, 32)
    priors = make_priors(feature_sizes(hw, strides), strides)
    A = priors.shape[0]
    H, W = hw
    wh = torch.exp(torch.empty(B, G, 2).uniform_(math.log(lo), math.log(hi), generator=gen))
    centre = torch.rand(B, G, 2, generator=gen) * torch.tensor([W + 10.0, H + 10.0]) - 5
    gt = torch.cat([centre - wh / 2, centre + wh / 2], dim=-1)
    gt[:, 0, 2] = gt[:, 0, 0]  # zero width
    labels = torch.randint(0, C, (B, G), generator=gen)
    n_valid = torch.randint(G // 2, G + 1, (B,), generator=gen)
    if B > 1:
        n_valid[-1] = 0
    valid = torch.arange(G)[None] < n_valid[:, None]
    labels = torch.where(valid, labels, -1)
    ltrb = torch.exp(torch.randn(B, A, 4, generator=gen) * 0.8) * priors[:, 2, None] * 1.5
    boxes = priors[:, :2].repeat(1, 2) + ltrb * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    scores = torch.rand(B, A, C, generator=gen) * 0.98 + 0.01
    return (priors, scores, boxes, gt, labels, valid), C


def assert_same(a, b):
    assert torch.equal(a.gt_index, b.gt_index)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.candidate_mask, b.candidate_mask)
    for field in FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=field)


# ---------------------------------------------------------------------------- object_chunks
def test_object_chunks_cover_the_objects_within_the_budget():
    for B, G, A, budget in [(1, 5000, 8400, 1 << 24), (1, 5000, 33600, 1 << 24), (2, 7, 10, 25),
                            (3, 10, 1, 4), (1, 3, 5, 1), (4, 1, 100, 1)]:
        chunks = common.object_chunks(B, G, A, budget)
        assert chunks[0].start == 0 and chunks[-1].stop == G
        assert all(a.stop == b.start for a, b in itertools.pairwise(chunks))
        sizes = [c.stop - c.start for c in chunks]
        assert min(sizes) >= 1
        assert max(sizes) == sizes[0] and len(set(sizes[:-1])) <= 1  # equal but the last
        # within the budget unless one object alone is over it
        assert all(B * s * A <= budget for s in sizes) or sizes == [1] * G
    assert len(common.object_chunks(1, 5000, 8400)) == 5  # the default budget
    assert len(common.object_chunks(1, 5000, 33600)) == 17
    assert common.object_chunks(2, 0, 8400) == []


def test_everyday_batches_are_one_chunk():
    assert common.object_chunks(16, 20, 8400) == [slice(0, 20)]
    assert common.object_chunks(2, 500, 8400) == [slice(0, 500)]


# ------------------------------------------------------------------ chunked == single chunk
@pytest.mark.parametrize("budget_objects", [1, 3, 7])
@pytest.mark.parametrize("ensure", [False, True])
@pytest.mark.parametrize("name,params", CASES)
def test_tiny_chunk_budget_gives_the_same_assignment(name, params, ensure, budget_objects,
                                                     monkeypatch):
    for seed in (0, 1):
        args, C = make_scene(seed)
        B, G, A = args[3].shape[0], args[3].shape[1], args[0].shape[0]
        whole = build_assigner(name, C, ensure_each_gt=ensure, **params)(*args)
        assert len(common.object_chunks(B, G, A)) == 1
        # budget_objects objects per chunk (the last chunk shorter when it does not divide G)
        monkeypatch.setattr(common, "MAX_CHUNK_PAIRS", budget_objects * B * A)
        assert len(common.object_chunks(B, G, A)) == math.ceil(G / budget_objects)
        chunked = build_assigner(name, C, ensure_each_gt=ensure, **params)(*args)
        monkeypatch.undo()
        assert whole.pos_mask.any()
        assert_same(whole, chunked)


@pytest.mark.parametrize("name,params", CASES)
def test_chunks_and_prior_blocks_together(name, params, monkeypatch):
    """Chunks of objects with tiny blocks of priors inside them (both loops at once)."""
    args, C = make_scene(5, B=2, G=25)
    whole = build_assigner(name, C, **params)(*args)
    A = args[0].shape[0]
    monkeypatch.setattr(common, "MAX_CHUNK_PAIRS", 4 * 2 * A)
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(common, "MIN_BLOCK_PRIORS", 1)
    assert_same(whole, build_assigner(name, C, **params)(*args))


@pytest.mark.parametrize("name", ["simota", "dsl", "lla", "dw", "tal"])
def test_scratch_buffers_are_one_chunk(name, monkeypatch):
    """With a budget, the scratch an assigner keeps between calls is one chunk's size, not
    ``[B, G, A]`` (what bounds the memory of huge scenes)."""
    args, C = make_scene(2, B=2, G=30)
    B, A = 2, args[0].shape[0]
    monkeypatch.setattr(common, "MAX_CHUNK_PAIRS", 8 * B * A)  # 8 objects per chunk
    assigner = build_assigner(name, C)
    assigner(*args)
    sizes = [buf.numel() for buf in assigner._workspace._buffers.values()]
    assert sizes and max(sizes) == 8 * B * A


# ------------------------------------------------------------- hundreds of objects: reference
@pytest.mark.parametrize("budget", [None, 16])
@pytest.mark.parametrize("name,params", CASES)
def test_batched_equals_reference_with_hundreds_of_objects(name, params, budget, monkeypatch):
    """G = 300 objects on a small grid (A = 84): crowded, many conflicts; batched (one chunk,
    or chunks of 16 objects) against the per-image reference."""
    args, C = make_scene(11, B=2, G=300, C=3, hw=(64, 64), lo=4.0, hi=24.0)
    if budget is not None:
        monkeypatch.setattr(common, "MAX_CHUNK_PAIRS", budget * 2 * args[0].shape[0])
    out = build_assigner(name, C, **params)(*args)
    ref = run_per_image(name, *args, num_classes=C, **params)
    assert torch.equal(out.gt_index, ref["gt_index"])
    assert torch.equal(out.labels, ref["labels"])
    torch.testing.assert_close(out.quality, ref["quality"], rtol=0, atol=1e-5)
    assert torch.equal(out.candidate_mask, ref["candidate_mask"].bool())
    if name == "fcos":
        torch.testing.assert_close(out.centerness, ref["centerness"], rtol=0, atol=1e-6)
    if name == "tal":
        torch.testing.assert_close(out.align_target, ref["align_target"], rtol=1e-4, atol=1e-6)
    if name == "dw":
        torch.testing.assert_close(out.pos_weight, ref["pos_weight"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out.neg_weight, ref["neg_weight"], rtol=1e-5, atol=1e-6)
    assert out.gt_index[0][out.gt_index[0] >= 0].unique().numel() > 30  # conflicts happened


@pytest.mark.parametrize("ensure", [False, True])
def test_dw_candidate_pairs_equal_the_dense_path(ensure, monkeypatch):
    """DW on its list of candidate pairs (CPU) against the dense, chunked path and the
    reference, with hundreds of crowded objects."""
    args, C = make_scene(11, B=2, G=300, C=3, hw=(64, 64), lo=4.0, hi=24.0)
    dense = build_assigner("dw", C, ensure_each_gt=ensure)(*args)
    monkeypatch.setattr(dw, "use_packed_pairs", lambda device: True)
    packed = build_assigner("dw", C, ensure_each_gt=ensure)(*args)
    ref = run_per_image("dw", *args, num_classes=C, ensure_each_gt=ensure)
    # (with 300 objects on 84 priors the rescue of ensure_each_gt is compared between the
    # two paths only: the batched rescue and the reference's differ in such an overload)
    if not ensure:
        assert torch.equal(packed.gt_index, ref["gt_index"])
    assert torch.equal(packed.gt_index, dense.gt_index)
    assert torch.equal(packed.candidate_mask, ref["candidate_mask"].bool())
    assert torch.equal(packed.labels, dense.labels)
    torch.testing.assert_close(packed.quality, dense.quality, rtol=0, atol=1e-6)
    torch.testing.assert_close(packed.pos_weight, dense.pos_weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(packed.neg_weight, dense.neg_weight, rtol=1e-5, atol=1e-7)
