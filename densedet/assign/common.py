"""Pieces shared by the assigners: candidate masks, class-cost split, dynamic-k selection,
conflict resolution. All batched over images and objects, free of host syncs.

Shapes: B images, G (padded) objects, A priors, C classes.

Memory: the crowd case (B=2, G=500, A=8400) makes one ``[B, G, A]`` float32 tensor 34 MB, so
these helpers never build ``[B, G, A, 4]`` (or ``[B, G, A, C]``), work axis by axis, reuse
buffers in place where that is safe, and chunk the pairwise IoU over objects. Huge scenes
(aerial or retail images: B=1, G=5,000, A=33,600 makes one ``[B, G, A]`` float32 tensor
672 MB) are walked a chunk of objects at a time (:func:`object_chunks`, at most
:data:`MAX_CHUNK_PAIRS` pairs each): a selection or a rescue is per object, so a chunk's
objects are decided from the chunk's pairs alone, and what is decided across objects (the
cheapest or best object of a prior) is a running minimum / maximum over the chunks, exact
to the bit. The only ``[B, G, A]`` tensors left are outputs of the contract (the bool
``candidate_mask``; DW's ``pos_weight``). Everyday batches are one chunk.

Speed on CPU (what the batched assigners are built around, measured with one thread):

- the pair terms are computed a block of priors at a time (:func:`fill_by_prior_blocks`):
  every pair depends on its own prior only, and ~1 MB blocks keep a method's dozens of
  temporaries in cache instead of streaming ``[B, G, A]`` tensors through memory;
- ``[B, G, A]`` scratch tensors that never leave an assigner live in a per-assigner
  :class:`Workspace`, because a fresh big tensor is zero-filled by the OS on first touch;
- masks are built as floats (gaps, 0/1 factors, ``+inf`` addends) where that is exact: a
  comparison or ``masked_fill`` with a bool tensor is several times slower than a float add;
- a broadcast operand must be contiguous (``contiguous_columns``), or the kernel runs scalar.
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from densedet.assign.base import Assignment, widen_small_boxes  # noqa: F401 (re-exported)
from densedet.boxes import EPS as BOX_EPS
from densedet.boxes import box_iou

INF = float("inf")

#: elements of one ``[B, g, A]`` slice in :func:`pairwise_iou`; ``box_iou`` keeps a few
#: ``[B, g, A]`` (older versions ``[B, g, A, 2]``) temporaries alive; this bounds them.
IOU_CHUNK_ELEMENTS = 1 << 22


#: elements of one ``[B, G, a]`` block of pairs in :func:`fill_by_prior_blocks` (1 MB of
#: float32). On CPU each elementwise op is one pass over its tensors; over whole ``[B, G, A]``
#: tensors (11 MB at B=16, G=20, A=8400) every pass streams through memory and every fresh
#: temporary is zero-filled by the OS, which together made up most of the assigners' time.
#: On blocks of about this size a dozen temporaries stay in the core's cache and the
#: allocator reuses the same few blocks (2-2.5x faster for the IoU and the cost).
BLOCK_ELEMENTS = 1 << 18
#: never split the priors finer than this (rows shorter than this vectorise poorly).
MIN_BLOCK_PRIORS = 64

#: pairs (``B * g * A``) of one chunk of objects (:func:`object_chunks`): an assigner keeps
#: two ``[B, g, A]`` float32 scratch tensors of a chunk (40 MB each at this size), so this
#: bounds its memory in huge scenes. Everyday batches (B=16, G=20 or B=2, G=500 at 640 px:
#: 2.7M and 8.4M pairs) are one chunk; B=1, G=5,000 is 5 chunks at 640 px and 17 at 1280 px.
#: More chunks cost next to nothing (the prior blocks inside keep their size); once there is
#: more than one, simota and dsl pay one more geometry pass for the image's candidate union
#: (:func:`prior_any`). Shapes decide the chunks, never data (no host sync).
MAX_CHUNK_PAIRS = 10 << 20


# ---------------------------------------------------------------------- object chunks
def object_chunks(B: int, G: int, A: int, max_pairs: int | None = None) -> list[slice]:
    """Slices of the object axis, as few as keep ``B * g * A <= max_pairs`` (default
    :data:`MAX_CHUNK_PAIRS`, read at call time), of equal size but the last; one slice
    ``0:G`` when everything fits; none when ``G == 0``. Depends on shapes only."""
    if G == 0:
        return []
    budget = MAX_CHUNK_PAIRS if max_pairs is None else max_pairs
    per_object = max(1, B * A)
    if G == 1 or G * per_object <= budget:
        return [slice(0, G)]
    n = -(-G // max(1, budget // per_object))  # as few chunks as the budget allows (ceil)
    step = -(-G // n)  # then equal sizes: never above budget // per_object
    return [slice(s, min(s + step, G)) for s in range(0, G, step)]


# ----------------------------------------------------------------------- prior blocks
def prior_blocks(rows: int, A: int, device: torch.device) -> list[slice]:
    """Slices of the prior axis such that ``rows`` x slice has about :data:`BLOCK_ELEMENTS`
    elements; one slice (the whole axis) off CPU, where big kernels are what is fast.
    The slices depend on shapes only (no host sync)."""
    if device.type != "cpu":
        return [slice(0, A)]
    step = max(MIN_BLOCK_PRIORS, BLOCK_ELEMENTS // max(1, rows))
    return [slice(s, min(s + step, A)) for s in range(0, A, step)]


def fill_by_prior_blocks(block_fn: Callable[[slice], tuple[Tensor, ...]],
                         outs: tuple[Tensor, ...], rows: int) -> tuple[Tensor, ...]:
    """Fill tensors whose last axis is the priors a block of priors at a time.

    ``block_fn(blk)`` computes the entries of the priors ``blk`` (``[..., a]``, one per
    output); every entry depends on its own prior only, so the result equals the same
    computation on whole tensors, while the temporaries stay small (see
    :data:`BLOCK_ELEMENTS`). ``rows`` is the number of entries per prior of the biggest
    temporaries (``B * G`` for ``[B, G, A]`` pairs).
    """
    A = outs[0].shape[-1]
    for blk in prior_blocks(rows, A, outs[0].device):
        for out, part in zip(outs, block_fn(blk)):
            out[..., blk] = part
    return outs


class Workspace:
    """Scratch tensors an assigner reuses from call to call (CPU only).

    A fresh multi-MB CPU tensor is zero-filled page by page by the OS on first touch, which
    cost as much as computing the pair costs into it; internal ``[B, G, A]`` tensors that
    never leave the assigner (costs, masked IoUs) are therefore kept for the next call of the
    same shape. Keyed by thread, so concurrent calls from several threads do not share a
    buffer; off CPU (where the caching allocator already reuses memory) it hands out fresh
    tensors. Nothing handed out by :meth:`get` may be returned to the caller.
    """

    def __init__(self):
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device, capacity: int | None = None) -> Tensor:
        """A contiguous ``shape`` tensor (uninitialised). ``capacity``: the buffer's size in
        elements (at least ``prod(shape)``), so that the chunks of one call, the last one
        smaller, share one buffer (views of its first elements)."""
        numel = math.prod(shape)
        capacity = numel if capacity is None else max(capacity, numel)
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        slot = (name, threading.get_ident())
        buf = self._buffers.get(slot)
        if buf is None or (buf.numel(), buf.dtype) != (capacity, dtype):
            self._buffers[slot] = buf = None  # drop the old size before allocating
            self._buffers[slot] = buf = torch.empty(capacity, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def __repr__(self) -> str:
        return "Workspace()"

    def __deepcopy__(self, memo) -> "Workspace":
        return Workspace()

    def __getstate__(self) -> dict:
        return {"_buffers": {}}


def per_prior_class_sum(pred_scores: Tensor, background: Callable[[Tensor], Tensor],
                        where: Tensor | None = None) -> Tensor:
    """``background(pred_scores)`` (a sum over classes, ``[B, A, C]`` -> ``[B, A]``) a block
    of priors at a time: the ``[B, A, C]`` scores are the biggest input, and a whole-tensor
    temporary of their size (43 MB at B=16) costs more to allocate than to compute.

    ``where`` (``[B, A]`` bool): the priors whose sum the caller reads. On CPU, where a host
    sync costs nothing, only those are computed when they are under half of all (the others
    are 0): the class sum is a log per (prior, class), the largest single cost of a
    cost-based assigner, and in everyday batches an image's candidates are a fifth of its
    priors. Each computed entry is the same float as in the full computation (the same
    operations on the same row of classes). Elsewhere every prior is computed (no sync).
    """
    B, A, C = pred_scores.shape
    if where is not None and pred_scores.device.type == "cpu":
        idx = where.flatten().nonzero().squeeze(1)
        if 2 * idx.numel() < B * A:
            out = pred_scores.new_zeros(B * A)
            rows = pred_scores.reshape(B * A, C)
            step = max(1, BLOCK_ELEMENTS // max(C, 1))
            for start in range(0, idx.numel(), step):
                part = idx[start:start + step]
                out[part] = background(rows[part])
            return out.view(B, A)
    out = pred_scores.new_empty((B, A))
    for blk in prior_blocks(B * C, A, pred_scores.device):
        out[:, blk] = background(pred_scores[:, blk])
    return out


# --------------------------------------------------------------------------- geometry
def _strictly_between(v: Tensor, lo: Tensor, hi: Tensor, eps: float) -> Tensor:
    """``(v - lo > eps) & (hi - v > eps)`` by broadcasting; one axis of an inside test."""
    if eps == 0.0:
        # v - lo > 0 <=> v > lo exactly in IEEE arithmetic (gradual underflow), and the
        # comparison skips a float temporary.
        return (v > lo) & (hi > v)
    return ((v - lo) > eps) & ((hi - v) > eps)


def points_in_boxes(points: Tensor, gt_boxes: Tensor, eps: float = 0.0) -> Tensor:
    """Whether each point lies strictly inside each box by more than ``eps``.

    Equal to ``box_to_distance(points, boxes).amin(-1) > eps`` without the ``[B, G, A, 4]``
    distances: the minimum over l, t, r, b exceeds ``eps`` iff each of them does.

    Args:
        points: ``[A, 2]`` (x, y).
        gt_boxes: ``[B, G, 4]`` xyxy.
    Returns:
        ``[B, G, A]`` bool.
    """
    return box_margin(points, gt_boxes) > eps


def contiguous_columns(points: Tensor) -> Tensor:
    """``[A, k]`` -> ``[k, A]`` contiguous: ``points[:, 0]`` is a strided view, and a strided
    operand broadcast over ``[B, G, A]`` makes an elementwise kernel fall back from vector to
    scalar code on CPU (5-8x slower); rows of the transposed copy are contiguous."""
    return points.t().contiguous()


def mask_padding_boxes(gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
    """``gt_boxes`` with padding rows turned into (inf, inf, -inf, -inf): an empty box whose
    :func:`box_margin` is ``-inf`` everywhere, so masks built from it need no ``& gt_valid``
    pass over ``[B, G, A]``."""
    empty = gt_boxes.new_tensor([INF, INF, -INF, -INF])
    return torch.where(gt_valid[..., None], gt_boxes, empty)


def row_inf(gt_valid: Tensor, value: float = 0.0) -> Tensor:
    """``[B, G, 1]``: ``value`` on real objects, ``inf`` on padding rows; added to a cost it
    keeps padding rows from choosing or winning anything (a float add is several times
    faster than ``masked_fill`` on CPU)."""
    return torch.where(gt_valid, value, INF)[..., None]


def box_margin(points: Tensor, gt_boxes: Tensor) -> Tensor:
    """``min(l, t, r, b)``, the distance from each point to the nearest side of each box
    (negative outside), ``[B, G, A]`` float.

    ``margin > eps`` is exactly ``l > eps and t > eps and r > eps and b > eps`` (each
    distance is the same float either way), but costs four float passes and ONE comparison
    instead of four comparisons and three logical ands: on CPU a comparison writing a bool
    tensor is about four times slower than a float subtraction or minimum.
    """
    x, y = contiguous_columns(points)  # [A] each
    x1, y1, x2, y2 = (gt_boxes[..., i, None] for i in range(4))  # [B, G, 1] each
    margin = torch.sub(x, x1)
    margin = torch.minimum(margin, torch.sub(x2, x), out=margin)
    margin = torch.minimum(margin, torch.sub(y, y1), out=margin)
    return torch.minimum(margin, torch.sub(y2, y), out=margin)


def points_in_centre_region(points: Tensor, radii: Tensor, gt_boxes: Tensor,
                            clip_to_box: bool = False, clip_boxes: Tensor | None = None) -> Tensor:
    """Whether each point lies inside a square of half-size ``radii`` around each box centre.

    The square's sides are computed as ``centre -/+ radius`` (YOLOX's form) so borders fall
    exactly where the reference implementations put them.

    Args:
        points: ``[A, 2]`` (x, y).
        radii: ``[A]`` half-size of the square for each point (``radius * stride``).
        gt_boxes: ``[B, G, 4]`` xyxy.
        clip_to_box: intersect the square with the box (FCOS centre sampling).
        clip_boxes: ``[B, G, 4]`` the boxes to clip to when they differ from ``gt_boxes``
            (the small-object widened candidate boxes, ``Assigner.candidate_boxes``).
    Returns:
        ``[B, G, A]`` bool.
    """
    centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, G, 2]
    inside = None
    coords = contiguous_columns(points)
    for axis in range(2):
        c = centre[..., axis, None]  # [B, G, 1]
        axis_in = _strictly_between(coords[axis], c - radii, c + radii, 0.0)  # [B, G, A]
        inside = axis_in if inside is None else inside.logical_and_(axis_in)
    if clip_to_box:
        # max(lo, x1) < x < min(hi, x2)  <=>  lo < x < hi and x1 < x < x2
        inside &= points_in_boxes(points, gt_boxes if clip_boxes is None else clip_boxes)
    return inside


def box_and_centre_gaps(points: Tensor, radii: Tensor, gt_boxes: Tensor,
                        gt_valid: Tensor, box_boxes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """SimOTA's geometry as float "gaps": ``box_gap < 0`` iff the point is inside the box and
    ``centre_gap < 0`` iff it is inside the centre square; ``+inf`` on padding rows.

    Inside the box is ``|d| < half-size`` and inside the square ``|d| < radius``, with
    ``d = point - centre`` per axis (12 passes over ``[B, G, A]`` instead of about 22 for
    :func:`points_in_boxes` and :func:`points_in_centre_region`), exactly: ``d - half < 0``
    iff ``d < half`` in IEEE arithmetic, and a maximum (minimum) of gaps is negative iff all
    (any) of them are. So "box OR square" is
    ``minimum(box_gap, centre_gap) < 0`` and "box AND square" the ``maximum``: float passes
    instead of comparisons and logical ops on bool tensors, which are several times slower
    on CPU (see :func:`box_margin`).

    Args:
        points: ``[A, 2]``; radii: ``[A]``; gt_boxes: ``[B, G, 4]`` xyxy; gt_valid: ``[B, G]``.
        box_boxes: ``[B, G, 4]`` the boxes of the inside-box test when they differ from
            ``gt_boxes`` (the small-object widened ``Assigner.candidate_boxes``); the square
            stays around the centre of ``gt_boxes``.
    Returns:
        ``(box_gap, centre_gap)``, each ``[B, G, A]`` float.
    """
    invalid = ~gt_valid[..., None]
    # padding rows: centre at +inf and size 0, so every gap is +inf (never NaN)
    centre = ((gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2).masked_fill(invalid, INF)
    half = ((gt_boxes[..., 2:] - gt_boxes[..., :2]) / 2).masked_fill(invalid, 0.0)
    x, y = contiguous_columns(points)
    dx = torch.sub(x, centre[..., 0, None]).abs_()  # [B, G, A]
    dy = torch.sub(y, centre[..., 1, None]).abs_()
    centre_gap = torch.maximum(dx, dy).sub_(radii)
    if box_boxes is not None and box_boxes is not gt_boxes:
        box_gap, _ = box_and_centre_gaps(points, radii, box_boxes, gt_valid)
        return box_gap, centre_gap
    box_gap = torch.maximum(dx.sub_(half[..., 0, None]), dy.sub_(half[..., 1, None]), out=dx)
    return box_gap, centre_gap


def pairwise_iou(pred_boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """IoU of every object with every prior's predicted box.

    ``densedet.boxes.box_iou`` on slices of objects, so that its ``[B, g, A, 2]``
    intermediates stay bounded (see :data:`IOU_CHUNK_ELEMENTS`); the number of slices
    depends on shapes only.

    Args:
        pred_boxes: ``[B, A, 4]`` xyxy.
        gt_boxes: ``[B, G, 4]`` xyxy.
    Returns:
        ``[B, G, A]`` IoU in [0, 1].
    """
    B, A, _ = pred_boxes.shape
    G = gt_boxes.shape[1]
    step = max(1, IOU_CHUNK_ELEMENTS // max(1, B * A))
    if G <= step:
        return box_iou(gt_boxes, pred_boxes)
    out = pred_boxes.new_empty((B, G, A))
    for start in range(0, G, step):
        out[:, start:start + step] = box_iou(gt_boxes[:, start:start + step], pred_boxes)
    return out


def prior_levels(priors: Tensor) -> Tensor:
    """Pyramid level of each prior: the rank of its stride among the distinct strides present.

    Computed with a sort and a cumulative count of "stride changed" marks, so it needs no
    ``unique`` (data-dependent shape) and no host sync.

    Args:
        priors: ``[A, 4]`` (cx, cy, stride_w, stride_h); the level key is ``stride_w``.
    Returns:
        ``[A]`` int64, 0 = smallest stride.
    """
    stride = priors[:, 2]
    if stride.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=priors.device)
    sorted_s, order = stride.sort(stable=True)
    new_level = torch.ones_like(sorted_s, dtype=torch.long)
    new_level[0] = 0
    new_level[1:] = (sorted_s[1:] != sorted_s[:-1]).long()
    rank_sorted = new_level.cumsum(0)
    return torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)


class LevelLayout:
    """Host-side ``(start, size)`` of each level, cached per priors tensor.

    A method that takes a fixed number of candidates *per level* (ATSS) needs the level
    boundaries as Python ints. Reading them costs one host sync; the result is cached on the
    identity of the priors tensor (and its in-place version counter), so a model that reuses
    its priors tensor pays that sync once, not every step.
    """

    def __init__(self):
        self._key = None
        self._segments: list[tuple[int, int]] = []

    def segments(self, priors: Tensor) -> list[tuple[int, int]]:
        """``[(start, size), ...]`` per level; levels must be contiguous (docs/design.md order)."""
        key = self._key
        if key is not None and key[0]() is priors and key[1] == priors._version \
                and key[2] == tuple(priors.shape):
            return self._segments
        levels = prior_levels(priors).cpu()  # the one host sync, cached below
        segments = []
        if levels.numel():
            counts = torch.bincount(levels).tolist()
            start = 0
            for n in counts:
                segments.append((start, n))
                start += n
            expected = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
            if not torch.equal(expected, levels):
                raise ValueError("priors must be ordered by ascending stride, one contiguous "
                                 "block per level (see docs/design.md)")
        self._segments = segments
        self._key = (weakref.ref(priors), priors._version, tuple(priors.shape))
        return segments

    def __repr__(self) -> str:
        return "LevelLayout()"

    def __deepcopy__(self, memo) -> "LevelLayout":
        return LevelLayout()

    def __getstate__(self) -> dict:
        return {"_key": None, "_segments": []}


def assigned_box_iou(pred_boxes: Tensor, gt_boxes: Tensor, gt_index: Tensor) -> Tensor:
    """IoU of each prior's predicted box with the box of its assigned object, ``[B, A]``
    (0 for background): gather the assigned box, then one aligned IoU.

    The same float, bit for bit, as the entry of the pairwise ``box_iou(gt_boxes,
    pred_boxes)`` (the same operations on the same numbers), so a method never needs to keep
    its ``[B, G, A]`` IoU just to read the quality of its positives.
    """
    B, A = gt_index.shape
    if gt_boxes.shape[1] == 0:
        return pred_boxes.new_zeros((B, A))
    # box_iou(pred_boxes, assigned boxes, aligned=True), one coordinate at a time on
    # contiguous [B, A] rows (the [..., :2] slices of [B, A, 4] make every kernel scalar)
    idx = gt_index.clamp(min=0)
    gt = [gt_boxes[..., i].gather(1, idx) for i in range(4)]
    return aligned_box_iou(pred_boxes.permute(2, 0, 1).contiguous(), gt).masked_fill_(gt_index < 0, 0.0)


def mask_pairs(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(row, prior)`` of every true entry of ``mask [B, G, A]``, rows ``b * G + g`` in order
    and priors ascending within a row: ``nonzero`` (a host sync) a slice of rows at a time,
    since it keeps an int64 per element of its input (5 GB for one ``[1, 5000, 33600]``)."""
    B, G, A = mask.shape
    flat = mask.reshape(B * G, A)
    step = max(1, IOU_CHUNK_ELEMENTS // max(A, 1))
    row_parts, prior_parts = [], []
    for start in range(0, B * G, step):
        r, a = flat[start:start + step].nonzero(as_tuple=True)
        row_parts.append(r + start)
        prior_parts.append(a)
    if not row_parts:
        empty = torch.zeros(0, dtype=torch.long, device=mask.device)
        return empty, empty.clone()
    return torch.cat(row_parts), torch.cat(prior_parts)


def aligned_box_iou(pred: Sequence[Tensor], gt: Sequence[Tensor]) -> Tensor:
    """IoU of box ``pred`` with box ``gt``, element by element, from their coordinates
    ``(x1, y1, x2, y2)`` given as four broadcastable tensors each (contiguous rows: the
    ``[..., :2]`` slices of ``[..., 4]`` make every kernel scalar). The same operations as
    the pairwise ``box_iou(gt_boxes, pred_boxes)``, so the same float bit for bit."""
    px1, py1, px2, py2 = pred
    gx1, gy1, gx2, gy2 = gt
    area = torch.sub(px2, px1).clamp_(min=0).mul_(torch.sub(py2, py1).clamp_(min=0))
    area += torch.sub(gx2, gx1).clamp_(min=0).mul_(torch.sub(gy2, gy1).clamp_(min=0))
    w = torch.minimum(px2, gx2).sub_(torch.maximum(px1, gx1)).clamp_(min=0)
    inter = w.mul_(torch.minimum(py2, gy2).sub_(torch.maximum(py1, gy1)).clamp_(min=0))
    return inter.div_(area.sub_(inter).clamp_(min=BOX_EPS))


# ------------------------------------------------------------------------ class cost
def gather_gt_class_scores(pred_scores: Tensor, gt_labels: Tensor) -> Tensor:
    """Each prior's score on each object's class.

    Args:
        pred_scores: ``[B, A, C]``.
        gt_labels: ``[B, G]`` int64 (padding rows may hold any value; they are clamped).
    Returns:
        ``[B, G, A]`` (contiguous).
    """
    B, A, C = pred_scores.shape
    # along the class axis each prior's row of C scores is read once for all objects, then
    # one transposed copy; gathering along A reads one cache line per element (2-3x slower)
    idx = gt_labels.clamp(0, C - 1)[:, None, :].expand(B, A, gt_labels.shape[1])
    return pred_scores.gather(2, idx).transpose(1, 2).contiguous()


def class_table(num_classes: int, G: int) -> bool:
    """Whether a one-hot class cost is cheaper as a per-(prior, class) table gathered per pair
    (fewer classes than object slots: crowds) than computed pair by pair. The same switch
    decides the CPU shortcuts that only pay when the class cost is per pair
    (:func:`union_first`, :func:`use_near_pairs`)."""
    return num_classes < G


def split_class_cost(pred_scores: Tensor, gt_labels: Tensor, target: Tensor | float,
                     pair_cost: Callable[[Tensor, Tensor | float], Tensor],
                     correction: Callable[[Tensor, Tensor | float], Tensor] | None = None,
                     background: Callable[[Tensor], Tensor] | None = None,
                     bg: Tensor | None = None) -> Tensor:
    """``sum_c pair_cost(p_c, y_c)`` for a target ``y`` that is ``target`` at the object's class
    and 0 elsewhere, without materialising ``[B, G, A, C]``.

    The sum over classes splits into the all-zero-target sum per prior plus a correction at
    the object's class: ``sum_c f(p_c, 0) + f(p_g, t) - f(p_g, 0)``.

    Args:
        pred_scores: ``[B, A, C]`` probabilities.
        gt_labels: ``[B, G]``.
        target: ``[B, G, A]`` target at the object's class (or a scalar, e.g. 1 for one-hot).
        pair_cost: element-wise ``f(p, y)``, broadcasting.
        correction: optional closed form of ``f(p, t) - f(p, 0)`` (fewer passes over
            ``[B, G, A]``, e.g. :func:`bce_onehot_correction`).
        background: optional closed form of ``sum_c f(p_c, 0)`` -> ``[B, A]`` (e.g.
            :func:`bce_background`); it runs over ``[B, A, C]``, the biggest tensor here.
        bg: that per-prior sum already computed, ``[B, A]`` (e.g. by
            :func:`per_prior_class_sum` once for all blocks of priors); overrides
            ``background``.
    Returns:
        ``[B, G, A]`` (a new tensor the caller may modify in place).
    """
    if bg is None and background is None:
        bg = pair_cost(pred_scores, 0.0).sum(dim=-1)  # [B, A]
    elif bg is None:
        bg = background(pred_scores)
    if isinstance(target, (int, float)) and class_table(pred_scores.shape[-1], gt_labels.shape[1]):
        # fewer classes than objects (crowds): the cost of every (prior, class) pair, then
        # one gather, is fewer logs than the cost of every (prior, object) pair
        table = _class_correction(pred_scores, target, pair_cost, correction)
        table += bg[..., None]
        return gather_gt_class_scores(table, gt_labels)
    p_gt = gather_gt_class_scores(pred_scores, gt_labels)  # [B, G, A]
    cost = _class_correction(p_gt, target, pair_cost, correction)
    del p_gt
    cost += bg[:, None, :]
    return cost


def _class_correction(p: Tensor, target: Tensor | float,
                      pair_cost: Callable[[Tensor, Tensor | float], Tensor],
                      correction: Callable[[Tensor, Tensor | float], Tensor] | None) -> Tensor:
    """``pair_cost(p, target) - pair_cost(p, 0)`` (a new tensor)."""
    if correction is not None:
        return correction(p, target)
    cost = pair_cost(p, target)
    cost -= pair_cost(p, 0.0)  # in place: at most three [B, G, A] alive here
    return cost


def log1m(p: Tensor) -> Tensor:
    """``log(1 - p)`` (a new tensor), as ``binary_cross_entropy`` writes its target-0 term.

    Not ``log1p(-p)``: torch's CPU ``log1p`` is not vectorised on some machines (the
    development VM's AVX-512 build: ~11 ns an element against ~1 ns for ``log``, which made
    it the largest single cost of the class terms); against ``log1p(-p)`` it differs by the
    rounding of ``1 - p`` (at most 6e-8 / (1 - p)) and an ulp, far under anything a cost
    comparison sees.
    """
    return torch.rsub(p, 1.0).log_()


def bce_background(p: Tensor) -> Tensor:
    """``sum_c BCE(p_c, 0)`` over the last axis: the sign flip happens after the sum."""
    return log1m(p).clamp_(min=-100.0).sum(dim=-1).neg_()


def bce_onehot_correction(p: Tensor, y: Tensor | float = 1.0) -> Tensor:
    """``BCE(p, 1) - BCE(p, 0) = log((1 - p) / p)``, clamped to [-100, 100] as the two clamped
    logs are (p = 0 gives 100, p = 1 gives -100). Only for the one-hot target ``y = 1``."""
    if not _is_scalar(y, 1.0):
        raise ValueError("bce_onehot_correction is the one-hot (target 1) case only")
    return torch.rsub(p, 1.0).div_(p).log_().clamp_(min=-100.0, max=100.0)


def _is_scalar(y: Tensor | float, value: float) -> bool:
    return isinstance(y, (int, float)) and float(y) == value


def bce_cost(p: Tensor, y: Tensor | float) -> Tensor:
    """Element-wise binary cross-entropy of probabilities (logs clamped at -100 like torch).

    A scalar target of 0 or 1 needs one log instead of two (the background term over
    ``[B, A, C]`` is the largest piece of work in the class cost).
    """
    if _is_scalar(y, 0.0):
        return log1m(p).clamp_(min=-100.0).neg_()  # one temporary, not two
    if _is_scalar(y, 1.0):
        return p.log().clamp_(min=-100.0).neg_()
    y = torch.as_tensor(y, dtype=p.dtype, device=p.device).expand_as(p)
    return F.binary_cross_entropy(p, y, reduction="none")


def focal_cost(p: Tensor, y: Tensor | float, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss written on probabilities.

    ``-alpha * y * (1-p)^gamma * log(p) - (1-alpha) * (1-y) * p^gamma * log(1-p)``, logs
    clamped at -100 (as ``binary_cross_entropy``) so that p = 0 or 1 gives a finite value
    instead of ``0 * inf = NaN``. A scalar target of 0 or 1 skips the vanishing half; at
    most two temporaries of ``p``'s size are alive at once.
    """
    out = None
    if not _is_scalar(y, 0.0):
        out = p.log().clamp_(min=-100.0).mul_((1 - p).pow_(gamma)).mul_(-alpha)
        if not isinstance(y, (int, float)) or y != 1:
            out.mul_(y)
    if not _is_scalar(y, 1.0):
        neg = log1m(p).clamp_(min=-100.0).mul_(p.pow(gamma)).mul_(-(1 - alpha))
        if not isinstance(y, (int, float)) or y != 0:
            neg.mul_(1 - y)
        out = neg if out is None else out.add_(neg)
    return out


# Sigmoid focal loss on probabilities, logs clamped at -100 like :func:`focal_cost`, in the
# two closed forms the one-hot class cost needs. ``log(1 - p)`` rather than ``log1p(-p)``:
# ``log1p`` is not vectorised on CPU here (about 15x slower than ``log``, the largest cost
# of the whole assigner over ``[B, A, C]``); the absolute error of ``log(1 - p)`` is below
# 6e-8, and every use multiplies it by ``p**gamma``.
def focal_background(p: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """``sum_c focal(p_c, 0) = sum_c -(1 - alpha) p_c^gamma log(1 - p_c)``, last axis."""
    t = torch.rsub(p, 1.0).log_().clamp_(min=-100.0).mul_(p.pow(gamma))
    return t.sum(dim=-1).mul_(-(1.0 - alpha))


def focal_onehot_correction(p: Tensor, y: Tensor | float, alpha: float = 0.25,
                            gamma: float = 2.0) -> Tensor:
    """``focal(p, 1) - focal(p, 0) = -alpha (1-p)^gamma log p + (1-alpha) p^gamma log(1-p)``."""
    if not (isinstance(y, (int, float)) and float(y) == 1.0):
        raise ValueError("focal_onehot_correction is the one-hot (target 1) case only")
    q = torch.rsub(p, 1.0)
    out = p.log().clamp_(min=-100.0).mul_(q.pow(gamma)).mul_(-alpha)
    neg = q.log_().clamp_(min=-100.0).mul_(p.pow(gamma))
    return out.add_(neg, alpha=1.0 - alpha)



# ----------------------------------------------------------------------- selection
# The methods here pick at most n (a static bound: candidate_topk or topk) priors per object,
# so the choice is kept sparse: ``Selection.index [B, G, n]`` are each object's n cheapest
# priors in ascending cost and ``taken [B, G, n]`` says which of them it takes (a prefix).
# Counting matches per prior and resolving conflicts then costs O(B*G*n), not O(B*G*A).
#: entries per segment in :func:`row_topk` (CPU): short enough that the segment extremes
#: leave little to gather, long enough that the extremes are one cheap reduction.
TOPK_SEGMENT = 80


def row_topk(x: Tensor, n: int, largest: bool = True) -> tuple[Tensor, Tensor]:
    """``x.topk(n, dim=-1, largest=largest)`` (sorted) over long rows, about 2x faster on CPU.

    ``torch.topk`` on CPU copies every entry of a row into a (value, index) queue; here the
    row is cut into segments of :data:`TOPK_SEGMENT` entries, the ``n`` segments with the best
    extremes are gathered and ``topk`` runs on those ``n * TOPK_SEGMENT`` entries only. Exact:
    an entry among the row's ``n`` best lies in a segment whose extreme is at least as good,
    so it can only be missed when it ties with the ``n``-th best extreme, i.e. with the
    ``n``-th best value. The values equal ``topk``'s; the indices differ at most in which of
    several entries equal to the ``n``-th value are chosen (``topk`` leaves that unspecified
    too); and where a row has fewer than ``n`` entries better than ``±inf`` (``worst``), the
    places holding ``worst`` may repeat the last prior's index (they pad the short last
    segment). Short rows and non-CPU devices use ``torch.topk`` directly.

    Args:
        x: ``[..., A]``.
    Returns:
        ``(values, indices)``, ``[..., n]`` each, best first.
    """
    A = x.shape[-1]
    s = TOPK_SEGMENT
    full = A // s
    if x.device.type != "cpu" or full < 4 * n or x.numel() == 0:
        return x.topk(n, dim=-1, largest=largest)
    worst = -INF if largest else INF
    extreme = torch.amax if largest else torch.amin
    main = x[..., :full * s].unflatten(-1, (full, s))  # a view: rows keep stride 1
    ext = extreme(main, dim=-1)  # [..., full]
    if A > full * s:  # the short last segment
        ext = torch.cat([ext, extreme(x[..., full * s:], dim=-1, keepdim=True)], dim=-1)
    seg = ext.topk(n, dim=-1, largest=largest, sorted=False).indices  # [..., n]
    idx = (seg[..., None] * s + torch.arange(s, device=x.device)).flatten(-2)  # [..., n*s]
    past_end = idx >= A
    idx.clamp_(max=A - 1)
    vals = x.gather(-1, idx).masked_fill_(past_end, worst)
    values, j = vals.topk(n, dim=-1, largest=largest)
    return values, idx.gather(-1, j)


class Selection(NamedTuple):
    index: Tensor  # [B, G, n] int64 prior indices, ascending cost
    cost: Tensor  # [B, G, n] their costs
    taken: Tensor  # [B, G, n] bool, a prefix of each row


def select_cheapest(cost: Tensor, n: int, k: Tensor | None = None) -> Selection:
    """Each object's ``k`` cheapest priors (``k <= n``), never one of infinite cost.

    Args:
        cost: ``[B, G, A]``, ``inf`` at pairs that must not be chosen (non-candidates,
            padding rows).
        n: static upper bound of ``k`` (the ``topk`` size).
        k: ``[B, G]`` per-object count, or None for ``n`` everywhere.
    """
    n = min(n, cost.shape[-1])
    top_cost, index = row_topk(cost, n, largest=False)  # [B, G, n] ascending
    taken = torch.isfinite(top_cost)
    if k is not None:
        taken &= torch.arange(n, device=cost.device) < k[..., None]
    return Selection(index, top_cost, taken)


def select_dynamic_k(cost: Tensor, ious: Tensor, candidate_topk: int) -> Selection:
    """SimOTA's dynamic-k selection on pre-masked inputs (no ``[B, G, A]`` copies).

    ``k = max(1, floor(sum of the object's candidate_topk largest IoUs over candidates))``;
    since IoU <= 1, ``k <= candidate_topk``, so one fixed-size ``topk`` and a rank comparison
    replace the per-object ``topk(k)``.

    Args:
        cost: ``[B, G, A]``, ``inf`` at non-candidate pairs and padding rows.
        ious: ``[B, G, A]``, 0 at non-candidate pairs.
    """
    n = min(candidate_topk, cost.shape[-1])
    return select_cheapest(cost, n, dynamic_k(ious, n))


def dynamic_k(ious: Tensor, n: int) -> Tensor:
    """``[B, G]`` ``max(1, floor(sum of the n largest IoUs of each row))`` (float)."""
    return row_topk(ious, n)[0].sum(dim=-1).floor_().clamp_(min=1)


def _take_counts(sel: Selection, A: int) -> tuple[Tensor, Tensor]:
    """How many objects took each prior and the (highest-index) one that did, ``[B, A]``
    each (-1 where none did)."""
    B, G, n = sel.index.shape
    index = sel.index.reshape(B, G * n)
    taken = sel.taken.reshape(B, G * n)
    gids = torch.arange(G, device=index.device).repeat_interleave(n).expand(B, G * n)
    count = torch.zeros((B, A), dtype=torch.long, device=index.device)
    count.scatter_add_(1, index, taken.long())
    owner = torch.full((B, A), -1, dtype=torch.long, device=index.device)
    owner.scatter_reduce_(1, index, torch.where(taken, gids, -1), reduce="amax")
    return count, owner


def resolve_selection(sel: Selection, cost: Tensor | None, gt_valid: Tensor,
                      cheapest: Tensor | None = None) -> Tensor:
    """Conflict resolution the way YOLOX, NanoDet and LLA do it: a prior taken once keeps its
    object; taken several times it goes to the object of lowest cost among ALL valid objects
    (the reference code takes ``min`` over the whole cost column, not only over the objects
    that chose it).

    Args:
        sel: the selection.
        cost: ``[B, G, A]`` (read at the selected priors only, when that is cheaper); may be
            None when ``cheapest`` is given.
        gt_valid: ``[B, G]`` bool.
        cheapest: ``[B, A]`` each prior's cheapest valid object (first on ties), already
            known (e.g. a running minimum over chunks of objects, :class:`RunningArgBest`).
    Returns:
        ``[B, A]`` int64 object index, -1 for background.
    """
    B, G, n = sel.index.shape
    A = cost.shape[-1] if cheapest is None else cheapest.shape[-1]
    count, owner = _take_counts(sel, A)
    if cheapest is not None:
        pass
    elif 8 * G * n <= A:
        # few selected priors: the cost columns of those only, [B, G, G*n] (a random gather
        # costs several times a streamed read, hence the factor 8)
        index = sel.index.reshape(B, G * n)
        columns = cost.gather(2, index[:, None, :].expand(B, G, G * n))
        # min(dim).indices: the same first minimum as argmin, which is ~2x slower on CPU
        # along a non-innermost axis
        cheapest = columns.masked_fill_(~gt_valid[..., None], INF).min(dim=1).indices  # [B, G*n]
        # duplicates of a prior carry the same value, so the scatter is deterministic
        cheapest = torch.full_like(owner, -1).scatter_(1, index, cheapest)
    else:
        # every prior's cheapest valid object, a block of priors at a time (no [B, G, A] copy)
        padding_inf = row_inf(gt_valid)  # + 0 leaves a cost unchanged
        cheapest, = fill_by_prior_blocks(
            lambda blk: (cost[..., blk].add(padding_inf).min(dim=1).indices,),
            (torch.empty((B, A), dtype=torch.long, device=cost.device),), rows=B * G)
    return torch.where(count > 1, cheapest, owner)


class RunningArgBest:
    """Each prior's best object over chunks of objects: ``update(value, index, start)`` with a
    chunk's per-prior best ``value`` and its ``index`` inside the chunk (first best on ties);
    a later chunk replaces the running best only when strictly better, so ties keep the
    lowest object index, as one ``min``/``max`` over all objects does.

    Args:
        shape: ``[B, A]``; largest: maximum (else minimum); init: the starting value (an
            update must beat it; the index starts at -1).
    """

    def __init__(self, shape: tuple[int, int], largest: bool, init: float,
                 dtype: torch.dtype, device: torch.device):
        self.largest = largest
        self.value = torch.full(shape, init, dtype=dtype, device=device)
        self.index = torch.full(shape, -1, dtype=torch.long, device=device)

    def update(self, value: Tensor, index: Tensor, start: int) -> Tensor:
        """Merge a chunk; returns the ``[B, A]`` bool mask of priors whose best changed."""
        better = value > self.value if self.largest else value < self.value
        self.value = torch.where(better, value, self.value)
        self.index = torch.where(better, index + start, self.index)
        return better


def rescue_lost(gt_index: Tensor, sel: Selection) -> Tensor:
    """:func:`ensure_each_gt` on a sparse selection: an object that took priors but kept none
    gets its cheapest taken prior (``sel.index[..., 0]``) back; rescued objects wanting the
    same prior: the cheaper wins, equal cost the lower index.

    Args:
        gt_index: ``[B, A]`` after conflict resolution.
        sel: the selection before conflict resolution.
    Returns:
        ``[B, A]`` int64.
    """
    return rescue_matched(gt_index, sel.taken[..., 0], sel.index[..., 0], sel.cost[..., 0])


def owned_counts(gt_index: Tensor, G: int) -> Tensor:
    """``[B, G]`` how many priors each object owns: one scatter over ``[B, A]``, not a
    ``[B, A, G]`` one-hot (slot 0 collects background)."""
    owned = torch.zeros((gt_index.shape[0], G + 1), dtype=torch.long, device=gt_index.device)
    owned.scatter_add_(1, gt_index + 1, torch.ones_like(gt_index))
    return owned[:, 1:]


def _rescue(gt_index: Tensor, lost: Tensor, best_prior: Tensor, best_cost: Tensor) -> Tensor:
    """Give each ``lost`` object its ``best_prior``; the cheaper (then lower index) wins ties."""
    B, G = lost.shape
    A = gt_index.shape[1]
    best_cost = best_cost.masked_fill(~lost, INF)
    want = torch.full((B, A), INF, device=best_cost.device, dtype=best_cost.dtype)
    want.scatter_reduce_(1, best_prior, best_cost, reduce="amin")  # order-independent
    winner = lost & (best_cost <= want.gather(1, best_prior))
    gids = torch.arange(G, device=gt_index.device).expand(B, G)
    pick = torch.full((B, A), G, device=gt_index.device, dtype=torch.long)
    pick.scatter_reduce_(1, best_prior, torch.where(winner, gids, G), reduce="amin")
    return torch.where(pick < G, pick, gt_index)


def matched_summary(matched: Tensor, cost: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What the rescue of :func:`ensure_each_gt` needs to know of each object, per object
    (so a chunk of objects at a time gives the same answer):

    Args:
        matched: ``[B, g, A]`` bool matching before conflict resolution.
        cost: ``[B, g, A]`` (broadcastable).
    Returns:
        ``(any_matched, best_prior, best_cost)``, ``[B, g]`` each: whether the object matched
        some prior, its cheapest matched prior (first on ties) and that cost.
    """
    best_cost, best_prior = torch.where(matched, cost, INF).min(dim=-1)
    return matched.any(dim=-1), best_prior, best_cost


def rescue_matched(gt_index: Tensor, any_matched: Tensor, best_prior: Tensor,
                   best_cost: Tensor) -> Tensor:
    """The rescue of :func:`ensure_each_gt` from the per-object :func:`matched_summary`
    (``[B, G]`` each): an object that matched some prior but owns none after conflict
    resolution gets its ``best_prior``."""
    G = any_matched.shape[1]
    if G == 0:
        return gt_index
    lost = any_matched & (owned_counts(gt_index, G) == 0)  # [B, G]
    return _rescue(gt_index, lost, best_prior, best_cost)


def ensure_each_gt(gt_index: Tensor, matched: Tensor, cost: Tensor) -> Tensor:
    """Give every object that was matched to some prior but lost all of them in conflict
    resolution its cheapest matched prior back.

    If two rescued objects want the same prior, the cheaper keeps it (equal cost: the lower
    index); the other stays without a prior. A rescue may take the only positive of another
    object; this is rare and accepted (the option is off by default).

    Args:
        gt_index: ``[B, A]`` after conflict resolution.
        matched: ``[B, G, A]`` bool matching before conflict resolution.
        cost: ``[B, G, A]``.
    Returns:
        ``[B, A]`` int64.
    """
    if matched.shape[1] == 0:
        return gt_index
    return rescue_matched(gt_index, *matched_summary(matched, cost))


#: the former name in ``densedet.assign.fcos`` (the same function).
apply_ensure_each_gt = ensure_each_gt


def build_assignment(gt_index: Tensor, gt_labels: Tensor, ious: Tensor | None = None,
                     quality: Tensor | None = None, **extra) -> Assignment:
    """Fill labels and quality from the chosen object indices.

    Args:
        gt_index: ``[B, A]`` int64, -1 for background.
        gt_labels: ``[B, G]`` int64.
        ious: ``[B, G, A]`` IoU of each object with each prior's prediction, read at the
            assigned pairs; or
        quality: ``[B, A]`` that IoU of each prior with its assigned object (e.g.
            :func:`assigned_box_iou`), zeroed on background here.
        extra: further :class:`Assignment` fields.
    """
    pos = gt_index >= 0
    idx = gt_index.clamp(min=0)
    if gt_labels.shape[1] == 0:
        labels = torch.full_like(gt_index, -1)
        dtype = quality.dtype if quality is not None else ious.dtype
        quality = torch.zeros(gt_index.shape, device=gt_index.device, dtype=dtype)
    else:
        labels = torch.where(pos, gt_labels.gather(1, idx), -1)
        if quality is None:
            quality = ious.gather(1, idx[:, None]).squeeze(1)
        quality = torch.where(pos, quality, 0.0)
    return Assignment(gt_index=gt_index, labels=labels, quality=quality, **extra)


def empty_assignment(B: int, A: int, device: torch.device, **extra) -> Assignment:
    """Everything background (no objects in the batch)."""
    gt_index = torch.full((B, A), -1, dtype=torch.long, device=device)
    return Assignment(gt_index=gt_index, labels=gt_index.clone(),
                      quality=torch.zeros((B, A), device=device), **extra)


def fill_pairs(block_fn: Callable[[slice], tuple[Tensor, Tensor, Tensor]], workspace: "Workspace",
               shape: tuple[int, int, int], dtype: torch.dtype,
               device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The cost-based assigners' pair tensors, a block of priors at a time (one chunk of
    objects; :func:`cost_chunks` walks the chunks).

    ``block_fn(blk)`` returns ``(mask, cost, ious)`` of the priors ``blk`` with every object.
    The mask is returned to the caller (a fresh ``[B, G, A]`` bool tensor); cost and IoU live in
    ``workspace`` buffers reused across calls.
    """
    B, G, _ = shape
    return fill_by_prior_blocks(block_fn, (
        torch.empty(shape, dtype=torch.bool, device=device),
        workspace.get("cost", shape, dtype, device),
        workspace.get("ious", shape, dtype, device)), rows=B * G)


def prior_any(block_fn: Callable[[slice, slice], Tensor], chunks: list[slice], B: int, A: int,
              device: torch.device) -> Tensor:
    """``[B, A]`` bool: whether ``block_fn(part, blk)`` (``[B, a]`` bool, "some object of the
    chunk ``part`` holds the prior") holds for some chunk; e.g. an image's candidate priors
    (the union of its objects' regions) before the chunks' costs are built."""
    out = torch.zeros((B, A), dtype=torch.bool, device=device)
    for part in chunks:
        g = part.stop - part.start
        for blk in prior_blocks(B * g, A, device):
            out[:, blk] |= block_fn(part, blk)
    return out


def union_first(chunks: list[slice], device: torch.device, num_classes: int, G: int) -> bool:
    """Whether a candidate-union method (SimOTA, DSL) computes each image's candidate union
    (:func:`prior_any`) before its pairs: always with several chunks of objects (every chunk
    needs it); on CPU when ``num_classes >= G``, where restricting the ``[B, A, C]`` class sum
    to the union saves more than the extra geometry pass over ``[B, G, A]`` costs (B=16,
    G=20, C=80); in crowds (G=500) that pass costs more than the whole class sum."""
    return len(chunks) > 1 or (device.type == "cpu" and not class_table(num_classes, G))


# ------------------------------------------------------------------ near pairs (CPU)
# A cost-based method takes each object's k cheapest pairs. Where the pairs it can take are a
# few percent of all, the CPU path (lla, simota, dsl: ``use_packed_pairs``) lists the
# object's *near* pairs (its own region, or a predicted box that overlaps it), computes the
# cost there only, and leaves every other pair at ``inf``. That is exact whenever every pair
# left out provably costs at least a method's ``bound`` (a penalty and an IoU of 0) and each
# object's k-th cheapest near pair is under it (:func:`vouched`); otherwise the method runs
# its dense path. The conflict rule then reads only exact costs: a prior taken twice is near
# to its takers, whose costs beat every pair that is not near.
#: room for float rounding below a method's bound on the pairs left out (the bounds' terms are
#: ~1e3 or more; the rounding of a class sum of up to C * 100 is far below this)
BOUND_SLACK = 1.0


class PairList(NamedTuple):
    """The true entries of a ``[B, G, A]`` mask as flat ids, ``[P]`` int64 each."""

    b: Tensor  # image
    a: Tensor  # prior within the image
    obj: Tensor  # b * G + g, a row of ``[B * G, A]`` (ascending)
    prior: Tensor  # b * A + a, an entry of ``[B, A]``
    pair: Tensor  # obj * A + a, an entry of ``[B, G, A]``


def use_near_pairs(device: torch.device, num_classes: int, G: int,
                   per_pair_class_cost: bool = False) -> bool:
    """Whether lla, simota and dsl first try their near pairs: on CPU, where listing them (a
    host sync) costs nothing, and where the dense path computes the class cost pair by pair
    (logs), which is most of its work. For the one-hot costs (lla, simota) that is when there
    are at least as many classes as object slots: with more objects than classes the dense
    class cost is a per-class table, its pairs are cheap, and the near pairs grow with the
    crowd (lla at B=2, G=500, C=80: 63 against 120 ms). A soft target (dsl,
    ``per_pair_class_cost``) has no table, so there the near pairs pay at any C (B=16, G=20,
    C=10: 1.45-1.6x faster; the crowd within noise). Elsewhere the dense path, without a
    host sync."""
    return device.type == "cpu" and (per_pair_class_cost or not class_table(num_classes, G))


def list_pairs(mask: Tensor) -> PairList:
    """:func:`mask_pairs` with the flat ids the packed computations index by
    (``index_select`` on flat tensors is several times faster on CPU than 2-D indexing)."""
    B, G, A = mask.shape
    obj, a = mask_pairs(mask)
    b = obj.div(G, rounding_mode="floor")
    return PairList(b, a, obj, b * A + a, obj * A + a)


def overlap_side(pred_xyxy: Tensor, gt_xyxy: Tensor, blk: slice) -> Tensor:
    """``min(w, h)`` of the intersection of each object's box with the predicted box of each
    prior of ``blk``, ``[B, G, a]``: ``> 0`` exactly where they overlap, which an IoU > 0
    needs (``-inf`` on rows masked by :func:`mask_padding_boxes`).

    Args:
        pred_xyxy: ``[4, B, A]`` contiguous coordinates of the predicted boxes.
        gt_xyxy: ``[4, B, G]`` of the objects.
    """
    px1, py1, px2, py2 = pred_xyxy[:, :, None, blk]  # [B, 1, a] each
    gx1, gy1, gx2, gy2 = gt_xyxy[..., None]  # [B, G, 1] each
    w = torch.minimum(px2, gx2).sub_(torch.maximum(px1, gx1))
    h = torch.minimum(py2, gy2).sub_(torch.maximum(py1, gy1))
    return torch.minimum(w, h, out=w)


def pair_iou(pred_xyxy: Tensor, gt_xyxy: Tensor, pairs: PairList) -> Tensor:
    """``[P]`` IoU of the listed pairs, the same float as the pairwise ``box_iou`` entry."""
    B, A = pred_xyxy.shape[1:]
    G = gt_xyxy.shape[2]
    return aligned_box_iou(pred_xyxy.view(4, B * A).index_select(1, pairs.prior),
                           gt_xyxy.view(4, B * G).index_select(1, pairs.obj))


def pairs_to_dense(values: Tensor, pairs: PairList, out: Tensor, fill: float) -> Tensor:
    """``out [B, G, A]`` filled with ``fill`` but at the listed pairs (``values [P]``)."""
    out.fill_(fill).view(-1).index_copy_(0, pairs.pair, values)
    return out


def near_pair_coordinates(pred_boxes: Tensor, gt_boxes: Tensor,
                          gt_valid: Tensor) -> tuple[Tensor, Tensor] | None:
    """``([4, B, A], [4, B, G])`` contiguous coordinates of the predicted boxes and of the
    objects (padding rows masked by :func:`mask_padding_boxes`) for :func:`overlap_side` and
    :func:`pair_iou`, or None when a predicted box is not finite (NaN has no overlap test;
    the dense path defines the result then)."""
    if not bool(torch.isfinite(pred_boxes).all()):
        return None
    return (pred_boxes.permute(2, 0, 1).contiguous(),
            mask_padding_boxes(gt_boxes, gt_valid).permute(2, 0, 1).contiguous())


def pair_scores(pred_scores: Tensor, gt_labels: Tensor, pairs: PairList) -> Tensor:
    """``[P]`` each listed pair's score on its object's class (``pred_scores`` may be a head's
    non-contiguous view)."""
    C = pred_scores.shape[-1]
    label = gt_labels.reshape(-1).clamp(0, C - 1).index_select(0, pairs.obj)
    return pred_scores[pairs.b, pairs.a, label]


def vouched(sel: Selection, k: Tensor | None, bound: float, gt_valid: Tensor) -> bool:
    """Whether every valid object's ``k``-th cheapest pair (the last it takes; ``k`` None: the
    selection's size) costs less than ``bound`` (a host sync). NaN is never under it."""
    last = sel.cost[..., -1] if k is None else sel.cost.gather(-1, k.long()[..., None] - 1)[..., 0]
    return bool(((last < bound) | ~gt_valid).all())


class NearCosts(NamedTuple):
    """A method's costs on its near pairs (``near_costs`` of :func:`assign_near_pairs`)."""

    candidate_mask: Tensor  # [B, G, A] bool, the Assignment field
    pairs: PairList
    cost: Tensor  # [P]
    ious: Tensor | None  # [P] for SimOTA's dynamic k, None for a fixed n


def assign_near_pairs(near_costs: Callable[[Tensor, Tensor], NearCosts], pred_boxes: Tensor,
                      gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, bound: float,
                      n: int, workspace: Workspace,
                      rescue_lost_objects: bool) -> Assignment | None:
    """A cost-based method's assignment from its near pairs, or None when a predicted box is
    not finite or the near pairs do not :func:`vouched` for every object (the method then
    runs its dense path).

    ``near_costs(pred_xyxy, gt_xyxy)`` (the :func:`near_pair_coordinates`) lists the method's
    near pairs and their costs. Each object takes its ``n`` cheapest pairs, or with ``ious``
    SimOTA's dynamic ``k <= n`` of them (:func:`dynamic_k`; IoU 0 elsewhere); conflicts and
    the optional rescue as :func:`resolve`; ``quality`` is the assigned pair's IoU.
    """
    coordinates = near_pair_coordinates(pred_boxes, gt_boxes, gt_valid)
    if coordinates is None:
        return None
    candidate_mask, pairs, cost, ious = near_costs(*coordinates)
    shape = tuple(candidate_mask.shape)
    dense = pairs_to_dense(cost, pairs, workspace.get("cost", shape, cost.dtype, cost.device), INF)
    n = min(n, shape[-1])
    k = None
    if ious is not None:
        ious = pairs_to_dense(ious, pairs, workspace.get("ious", shape, cost.dtype, cost.device),
                              0.0)
        k = dynamic_k(ious, n)
    sel = select_cheapest(dense, n, k)
    if not vouched(sel, k, bound, gt_valid):
        return None
    gt_index = resolve(sel, dense, gt_valid, rescue_lost_objects)
    quality = assigned_box_iou(pred_boxes, gt_boxes, gt_index)
    return build_assignment(gt_index, gt_labels, quality=quality, candidate_mask=candidate_mask)


def cost_chunks(pairs: Callable[[slice, slice], tuple[Tensor, ...]],
                select: Callable[..., Selection], chunks: list[slice], workspace: Workspace,
                shape: tuple[int, int, int], gt_valid: Tensor, rescue_lost_objects: bool,
                dtype: torch.dtype, device: torch.device,
                extras: tuple[str, ...] = ("ious",)) -> tuple[Tensor, Tensor]:
    """The cost-based assigners (select per object, the cheapest object wins a conflict), a
    chunk of objects at a time.

    For every chunk ``part`` of :func:`object_chunks`, ``pairs(part, blk)`` returns ``(mask,
    cost, *extras)`` of the chunk's objects with the priors ``blk`` (``[B, g, a]`` each; the
    cost ``inf`` where a pair must not be chosen); they are filled a block of priors at a time
    (:func:`fill_by_prior_blocks`), the mask into the returned ``[B, G, A]`` bool tensor, the
    rest into ``workspace`` buffers of one chunk's size. ``select(cost, *extras)`` picks each
    object's priors (per object, so per chunk); conflicts go to the cheapest valid object over
    all chunks (a running minimum, first object on ties, exactly one ``min`` over all
    objects); then the optional rescue (:func:`rescue_lost`).

    Returns:
        ``(gt_index [B, A], mask [B, G, A])``.
    """
    B, G, A = shape
    mask = torch.empty(shape, dtype=torch.bool, device=device)
    step = chunks[0].stop - chunks[0].start
    capacity = B * step * A
    names = ("cost",) + tuple(extras)
    if len(chunks) == 1:  # everyday batches: today's single pass
        bufs = tuple(workspace.get(n, shape, dtype, device) for n in names)
        fill_by_prior_blocks(lambda blk: pairs(chunks[0], blk), (mask,) + bufs, rows=B * G)
        sel = select(*bufs)
        gt_index = resolve_selection(sel, bufs[0], gt_valid)
    else:
        padding_inf = row_inf(gt_valid)
        best = RunningArgBest((B, A), largest=False, init=INF, dtype=dtype, device=device)
        sels = []
        for part in chunks:
            g = part.stop - part.start
            bufs = tuple(workspace.get(n, (B, g, A), dtype, device, capacity) for n in names)
            pad = padding_inf[:, part]

            def block(blk: slice, part=part, pad=pad) -> tuple[Tensor, ...]:
                out = pairs(part, blk)
                low, low_idx = out[1].add(pad).min(dim=1)  # the chunk's cheapest valid object
                return out + (low, low_idx)

            *_, low, low_idx = fill_by_prior_blocks(block, (mask[:, part],) + bufs + (
                torch.empty((B, A), dtype=dtype, device=device),
                torch.empty((B, A), dtype=torch.long, device=device)), rows=B * g)
            best.update(low, low_idx, part.start)
            sels.append(select(*bufs))
        sel = Selection(*(torch.cat(t, dim=1) for t in zip(*sels)))
        gt_index = resolve_selection(sel, None, gt_valid, cheapest=best.index)
    if rescue_lost_objects:
        gt_index = rescue_lost(gt_index, sel)
    return gt_index, mask


def resolve(sel: "Selection", cost: Tensor, gt_valid: Tensor, rescue_lost_objects: bool) -> Tensor:
    """Conflict resolution (cheapest object wins), then the optional :func:`rescue_lost`
    (an assigner's ``ensure_each_gt`` option)."""
    gt_index = resolve_selection(sel, cost, gt_valid)
    return rescue_lost(gt_index, sel) if rescue_lost_objects else gt_index
