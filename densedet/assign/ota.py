"""OTA, Optimal Transport Assignment (Ge, Liu, Li, Yoshie, Sun, CVPR 2021).

Label assignment as an optimal transport problem between *suppliers* (every object, plus one
background supplier) and *demanders* (every prior, wanting one unit of label), solved
approximately with a fixed number of Sinkhorn-Knopp iterations.

Definition (per image, the form of the official release, Megvii-BaseDetection/OTA on cvpods,
``playground/detection/coco/ota.*/fcos.py``; defaults from its ``config.py``):

- *centre prior*: a pair (object, prior) is penalty-free when the prior centre lies inside the
  box by more than 0.01 on all four sides AND strictly inside the square of half-size
  ``center_radius * stride`` around the box centre (the official code clips that square to
  the box; the paper's "r^2 closest anchors per level" with r = 5 is the same 5x5 square);
- pair cost over ALL priors:
  ``sum_c focal(score_c, onehot_c; focal_alpha, focal_gamma)
  + reg_weight * -log(max(IoU, float32 eps)) + P * [not penalty-free]``, IoU of the object
  with the prior's predicted box (the official cost uses the ``"iou"`` loss, i.e. -log IoU,
  although the detector trains with GIoU); the background supplier's cost at a prior is
  ``sum_c focal(score_c, 0)``;
- supplies: object i gives ``s_i = max(1, floor(sum of its candidate_topk largest IoUs over its
  penalty-free priors))`` units (dynamic k), the background ``max(0, A - sum_i s_i)`` (the
  clamp is ours: the official code has no guard when the objects ask for more than A units);
  every prior demands 1 unit;
- plan: entropic OT with regularisation ``sinkhorn_eps``, ``sinkhorn_iters`` Sinkhorn
  iterations in the log domain (potentials start at a constant; each iteration updates the
  prior potentials, then the supplier potentials; ``log(marginal + 1e-8)`` as the official
  code); no convergence test;
- decision: every supplier's row of the plan is divided by its largest entry, then each prior
  goes to the supplier with the largest rescaled entry (first one on ties: objects in index
  order, background last); the prior is background when the background supplier wins.

``P`` is "large" (1e6 in the official code): ``exp(-P / eps)`` underflows to exactly 0 in the
official float32 computation, so a penalised pair of an object that has penalty-free priors
receives nothing. Here such pairs are ``-inf`` in the log kernel (the same numbers without
forming ``1e6 + cost`` in float32, which rounds costs to 1/16). An object with NO penalty-free
prior (a zero-area box, a box between prior centres or outside the image) is penalised at
every prior; a constant added to a whole row does not change the plan, so its row is the
unpenalised cost, and it starts the first iteration excluded (its penalised entries underflow
in the official code too). Such an object therefore still takes the priors it sends most of
its one unit to, as in the official code. The decision only needs the prior potentials after
the last iteration (the rescale cancels the supplier potentials), so the last supplier update
is skipped; the rescale is done in the log domain (the official ``pi / pi.max()`` is 0/0 when
a row underflows).

Padding rows never supply and never win anything (``-inf`` rows, potentials held at ``-inf``).

Computation: every prior takes part (as in the official code; no candidate restriction), with
a fixed number of iterations, in base 2 (``exp2`` is 5-10x faster than ``exp`` on CPU; the
plan is the same in any base). The background cost ``sum_c focal(p_c, 0)`` is a term of every
supplier's cost at a prior, so the prior's potential absorbs it and it is never computed.
Two layouts of the same computation (:func:`use_packed_rows` picks one from the shapes and
the device):

- dense: the whole ``[B, G + 1, A]`` kernel, pair costs built a block of priors at a time
  like the other assigners, no host sync (everyday GPU batches);
- packed: each object's row holds its penalty-free entries only (everything else in it is
  ``-inf``), and the Sinkhorn runs over the priors some object reaches; one ``nonzero`` (a
  host sync) sizes it (CPU, and huge scenes on any device).

On one CPU thread (docs/benchmarks.md) the packed layout takes 32 ms at B=16, G=20, A=8400,
C=80 (SimOTA 39 ms; the dense layout 243 ms) and 66 ms for B=2, G=500.

Parameters (defaults; source):
    candidate_topk: 20 (official ``OTA.TOP_CANDIDATES``; the paper's q = 20).
    reg_weight: 1.5 (official ``OTA.REG_WEIGHT``; the paper's alpha = 1.5).
    center_radius: 2.5 strides (official ``center_sampling_radius = 2.5`` in
        ``get_ground_truth``, the paper's centre prior r = 5; the config's
        ``FCOS.CENTER_SAMPLING_RADIUS = 1.5`` is not read by OTA's matching).
    sinkhorn_eps: 0.1 (official ``OTA.SINKHORN_EPS``, the paper's epsilon).
    sinkhorn_iters: 50 (official ``OTA.SINKHORN_ITER``, the paper's T = 50).
    focal_alpha, focal_gamma: 0.25, 2.0 (official ``FCOS.FOCAL_LOSS_ALPHA/GAMMA``).
    ensure_each_gt: False. With the per-row rescale every object has a rescaled entry 1 at its
        favourite prior, so an object only loses everything when a lower-indexed object has
        the same favourite; with the option it then gets that prior back (rescued objects
        wanting the same prior: lower classification + regression cost wins, then the lower
        index; see ``common._rescue``).

Outputs: ``quality`` is the IoU of the assigned prior's predicted box with its object;
``candidate_mask [B, G, A]`` is the penalty-free region.

Memory: everyday batches (``B * (G + 1) * A`` up to ``common.MAX_CHUNK_PAIRS``) keep the
``[B, G + 1, A]`` log kernel, one scratch of that size and the IoUs ``[B, G, A]`` (never
``[..., C]``). Huge scenes pack each object's row to its penalty-free entries (at most
``ceil(2 * center_radius)**2`` per level), since everything else in it is ``-inf``; the
Sinkhorn then runs over those entries, the background row and the rare rows of objects
without a penalty-free prior (:meth:`OTAAssigner._assign_packed`). One image with 5,000
objects (docs/benchmarks.md, one thread): 0.42 s and 53 MB at 640 px, 0.96 s and 194 MB at
1280 px, of which the bool ``candidate_mask`` is 42 and 168 MB.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from densedet.assign import common
from densedet.assign.base import Assigner, Assignment

IN_BOX_MARGIN = 0.01
#: clamp of the IoU inside the log (the official ``torch.finfo(torch.float32).eps``)
IOU_EPS = float(torch.finfo(torch.float32).eps)
#: added to the marginals inside the logs (as the official ``SinkhornDistance``)
MARGINAL_EPS = 1e-8
NEG_INF = float("-inf")


#: exponents (base 2) are clamped here: ``2**-126`` is the smallest normal float32, and on
#: CPU ``exp2`` is several times slower when its results are subnormal. Every slice summed
#: holds a term ``2**0 = 1``, so the clamped terms (at most ``A * 1.2e-38``) are far below its
#: rounding.
EXP2_FLOOR = -126.0
LOG2_E = 1.0 / math.log(2.0)


def _logsumexp2_(x: Tensor, dim: int) -> Tensor:
    """``log2(sum(2**x))`` along ``dim``, computed in place in ``x`` (which is destroyed).

    Base 2 because ``torch.exp2`` is about 5-10x faster than ``torch.exp`` on CPU here (the
    plan is the same in any base: the potentials just scale by ``log2(e)``). Terms more than
    126 below the slice maximum count as ``2**-126`` (see :data:`EXP2_FLOOR`); a slice that is
    all ``-inf`` gives a finite value near ``-126 + log2(n)`` (never NaN; the caller masks
    those rows). Six passes over ``x`` and no temporary of its size.
    """
    m = x.amax(dim=dim, keepdim=True)
    m.masked_fill_(m == NEG_INF, 0.0)  # small tensor
    x.sub_(m).clamp_(min=EXP2_FLOOR).exp2_()
    return x.sum(dim=dim).log2_().add_(m.squeeze(dim))


def sinkhorn_prior_potentials(log_kernel: Tensor, log_mu: Tensor, row_valid: Tensor,
                              row_start: Tensor, iters: int, scratch: Tensor) -> Tensor:
    """Sinkhorn-Knopp in the log domain (base 2), batched over images; returns the prior
    (column) potentials ``g`` after the last iteration: the plan is ``2**(log_kernel + f + g)``.

    Args:
        log_kernel: ``[B, R, A]`` ``-cost / (eps ln 2)``, ``-inf`` where nothing may flow.
        log_mu: ``[B, R]`` ``log2(supply + 1e-8)``.
        row_valid: ``[B, R]`` bool; other rows keep ``f = -inf`` (they do not exist).
        row_start: ``[B, R]`` bool, rows taking part in the first column update.
        iters: number of iterations (each: column update, then row update; the row update of
            the last one is skipped, it does not change ``g``).
        scratch: ``[B, R, A]`` buffer.
    """
    log_nu = math.log2(1.0 + MARGINAL_EPS)
    f = torch.zeros_like(log_mu).masked_fill_(~row_start, NEG_INF)
    g = None
    for it in range(iters):
        torch.add(log_kernel, f[..., None], out=scratch)
        g = _logsumexp2_(scratch, 1).neg_().add_(log_nu)  # [B, A]
        if it == iters - 1:
            break
        torch.add(log_kernel, g[:, None, :], out=scratch)
        f = torch.sub(log_mu, _logsumexp2_(scratch, 2)).masked_fill_(~row_valid, NEG_INF)
    return g


def use_packed_rows(device: torch.device, B: int, G: int, A: int) -> bool:
    """Whether :class:`OTAAssigner` packs its object rows (:meth:`OTAAssigner._assign_packed`):
    always on CPU, where the Sinkhorn over a few thousand packed entries is 3-10x faster than
    over the dense kernel and a host sync costs nothing; elsewhere only in huge scenes (more
    than ``common.MAX_CHUNK_PAIRS`` kernel entries), so that everyday batches on a GPU run
    without a host sync. Shapes and device decide, never data."""
    return device.type == "cpu" or B * (G + 1) * A > common.MAX_CHUNK_PAIRS


class OTAAssigner(Assigner):
    name = "ota"

    def __init__(self, num_classes: int, candidate_topk: int = 20, reg_weight: float = 1.5,
                 center_radius: float = 2.5, sinkhorn_eps: float = 0.1, sinkhorn_iters: int = 50,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 ensure_each_gt: bool = False,
                 **small_objects):
        super().__init__(num_classes, **small_objects)  # stal options (Assigner)
        self.candidate_topk = int(candidate_topk)
        self.reg_weight = float(reg_weight)
        self.center_radius = float(center_radius)
        self.sinkhorn_eps = float(sinkhorn_eps)
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.ensure_each_gt = bool(ensure_each_gt)
        if self.candidate_topk < 1:
            raise ValueError(f"candidate_topk must be >= 1, got {candidate_topk!r}")
        if not self.sinkhorn_eps > 0:
            raise ValueError(f"sinkhorn_eps must be > 0, got {sinkhorn_eps!r}")
        if self.sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters!r}")
        self._workspace = common.Workspace()

    def assign(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        B, A, _ = pred_scores.shape
        if gt_boxes.shape[1] == 0:
            return common.empty_assignment(B, A, pred_scores.device)
        G = gt_boxes.shape[1]
        device, dtype = pred_scores.device, pred_scores.dtype
        eps = self.sinkhorn_eps
        alpha, gamma = self.focal_alpha, self.focal_gamma
        focal = functools.partial(common.focal_cost, alpha=alpha, gamma=gamma)
        correction = functools.partial(common.focal_onehot_correction, alpha=alpha, gamma=gamma)
        # padding rows contain nothing; with stal small boxes are widened (inside tests only)
        boxes = common.mask_padding_boxes(self.candidate_boxes(gt_boxes, gt_valid), gt_valid)
        radii = self.center_radius * priors[:, 2]
        # The background's cost at a prior, sum_c focal(p_c, 0), is also a term of every
        # object's cost there (the one-hot cost is it plus the correction at the object's
        # class). A constant added to a whole column of the kernel is absorbed by that prior's
        # potential: the iterates K + f + g, hence the plan and the decision, are the same
        # without it. So it is left out (the focal sum over [B, A, C] was a third of the time).
        bg = pred_scores.new_zeros((B, A))

        if use_packed_rows(device, B, G, A):
            return self._assign_packed(priors, pred_scores, pred_boxes, gt_boxes, gt_labels, gt_valid,
                                       boxes, radii)

        # rows 0..G-1: objects, row G: background; filled with the cost first
        kernel = self._workspace.get("kernel", (B, G + 1, A), dtype, device)

        def pairs(blk: slice) -> tuple[Tensor, Tensor, Tensor]:
            """Penalty-free mask, cost and IoU of the priors ``blk`` with every object."""
            pts = priors[blk, :2]
            region = common.box_margin(pts, boxes) > IN_BOX_MARGIN
            region &= common.points_in_centre_region(pts, radii[blk], gt_boxes)
            ious = common.pairwise_iou(pred_boxes[:, blk], gt_boxes)  # [B, G, a]
            cost = common.split_class_cost(pred_scores[:, blk], gt_labels, 1.0, focal,
                                           correction, bg=bg[:, blk])
            cost.sub_(ious.clamp(min=IOU_EPS).log_(), alpha=self.reg_weight)
            return region, cost, ious

        region, _, ious = common.fill_by_prior_blocks(pairs, (
            torch.empty((B, G, A), dtype=torch.bool, device=device), kernel[:, :G],
            self._workspace.get("ious", (B, G, A), dtype, device)), rows=B * G)
        kernel[:, G] = bg

        # supplies: dynamic k from the IoUs over the penalty-free priors, background the rest
        n = min(self.candidate_topk, A)
        k = common.row_topk(torch.where(region, ious, 0.0), n)[0].sum(dim=-1).floor_().clamp_(min=1)
        k = torch.where(gt_valid, k, 0.0)  # [B, G]
        supply = torch.cat([k, (A - k.sum(dim=1, keepdim=True)).clamp_(min=0)], dim=1)
        log_mu = supply.add_(MARGINAL_EPS).log2_()  # [B, G + 1]

        # log kernel -cost/(eps ln 2): -inf at penalised pairs of objects that have penalty-free
        # priors and on padding rows; unpenalised rows for objects without any (see module doc)
        has_region = region.any(dim=-1)  # [B, G]
        keep = region | ~has_region[..., None]
        keep &= gt_valid[..., None]
        kernel.mul_(-LOG2_E / eps)
        kernel[:, :G].masked_fill_(~keep, NEG_INF)
        del keep
        true_col = torch.ones((B, 1), dtype=torch.bool, device=device)
        row_valid = torch.cat([gt_valid, true_col], dim=1)
        row_start = torch.cat([gt_valid & has_region, true_col], dim=1)

        scratch = self._workspace.get("scratch", (B, G + 1, A), dtype, device)
        g = sinkhorn_prior_potentials(kernel, log_mu, row_valid, row_start, self.sinkhorn_iters,
                                      scratch)

        # rescale each row to its largest entry (f cancels), then the best row per prior
        x = torch.add(kernel, g[:, None, :], out=scratch)
        row_max, best_prior = x.max(dim=2)  # [B, G + 1]
        x.sub_(row_max.masked_fill(row_max == NEG_INF, 0.0)[..., None])
        winner = x.max(dim=1).indices  # [B, A], first maximum: objects before background
        gt_index = torch.where(winner == G, -1, winner)
        if self.ensure_each_gt:
            lost = gt_valid & (common.owned_counts(gt_index, G) == 0)
            best_prior = best_prior[:, :G]
            # unpenalised cost at the favourite prior (finite for every valid object)
            best_cost = kernel[:, :G].gather(2, best_prior[..., None]).squeeze(2)
            best_cost.mul_(-eps / LOG2_E)
            gt_index = common._rescue(gt_index, lost, best_prior, best_cost)
        return common.build_assignment(gt_index, gt_labels, ious, candidate_mask=region)

    def _assign_packed(self, priors: Tensor, pred_scores: Tensor, pred_boxes: Tensor,
                       gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, boxes: Tensor,
                       radii: Tensor) -> Assignment:
        """The same assignment with the object rows of the kernel kept sparse (huge scenes).

        An object that has penalty-free priors has ``-inf`` everywhere else in its row, and
        its region is the centre square (at most ``ceil(2 * center_radius)**2`` priors per
        level); so each such row is stored as its region's entries only, packed into
        ``[B * G, W]`` (``W`` the largest region, ``-inf`` padding), with each entry's prior.
        The rows of objects without any (dense by definition, see the module doc) stay
        ``[Nd, A]``, and the background row ``[B, A]``. The Sinkhorn's column update is then
        a scatter (running maximum, then sum of ``2**(x - max)``) over those entries, its row
        update a reduction along each packed row: the same plan without the ``[B, G + 1, A]``
        kernel (5 GB at G=5,000 and 1280 px). Packing reads the pairs, the widest row and the
        touched priors (``nonzero``, ``max``): a few host syncs per call, on CPU (where they
        are free) and in huge scenes only. The float sums run in another order than the dense
        path's, so potentials agree to rounding; both paths are checked against the float64
        reference.
        """
        B, A, _ = pred_scores.shape
        G = gt_boxes.shape[1]
        device, dtype = pred_scores.device, pred_scores.dtype
        scale = -LOG2_E / self.sinkhorn_eps
        correction = functools.partial(common.focal_onehot_correction, alpha=self.focal_alpha,
                                       gamma=self.focal_gamma)

        def geometry(blk: slice) -> tuple[Tensor]:
            pts = priors[blk, :2]
            region = common.box_margin(pts, boxes) > IN_BOX_MARGIN
            return (region.logical_and_(common.points_in_centre_region(pts, radii[blk], gt_boxes)),)

        region, = common.fill_by_prior_blocks(
            geometry, (torch.empty((B, G, A), dtype=torch.bool, device=device),), rows=B * G)
        rows, pa = common.mask_pairs(region)  # every penalty-free pair; the host sync
        pb, pi = rows.div(G, rounding_mode="floor"), rows.remainder(G)
        counts = torch.bincount(rows, minlength=B * G)  # [B * G]
        has_region = (counts > 0).view(B, G)
        width = max(int(counts.max()), 1) if counts.numel() else 1
        slot = torch.arange(rows.numel(), device=device) - (counts.cumsum(0) - counts)[rows]

        def pair_log_kernel(p: Tensor, iou: Tensor) -> Tensor:
            """``-cost / (eps ln 2)`` from the class score and IoU of pairs (the dense path's
            operations, element by element; no background term, see :meth:`assign`)."""
            cost = correction(p, 1.0)
            cost.sub_(iou.clamp(min=IOU_EPS).log_(), alpha=self.reg_weight)
            return cost.mul_(scale)

        # packed object rows: log kernel (-inf padding), flat prior column (padding -> B * A,
        # a dummy column), IoU (0 padding)
        R = B * G
        dummy = B * A
        iou = common.aligned_box_iou(pred_boxes[pb, pa].t().contiguous(), gt_boxes[pb, pi].t().contiguous())
        k_obj = torch.full((R, width), NEG_INF, dtype=dtype, device=device)
        k_obj[rows, slot] = pair_log_kernel(pred_scores[pb, pa, gt_labels[pb, pi]], iou)
        col = torch.full((R, width), dummy, dtype=torch.long, device=device)
        col[rows, slot] = pb * A + pa
        n = min(self.candidate_topk, A)
        iou_rows = torch.zeros((R, max(width, n)), dtype=dtype, device=device)
        iou_rows[rows, slot] = iou
        del pb, pi, pa, rows, slot, iou

        # supplies as the dense path (the same sorted top-n values, summed in the same order)
        k = iou_rows.topk(n, dim=1).values.sum(dim=1).floor_().clamp_(min=1).view(B, G)
        del iou_rows
        k = torch.where(gt_valid, k, 0.0)
        log_mu = k.add(MARGINAL_EPS).log2_().flatten()  # [R]
        log_mu_bg = (A - k.sum(dim=1)).clamp_(min=0).add_(MARGINAL_EPS).log2_()  # [B]

        # objects without a penalty-free prior: whole rows of unpenalised cost
        db, di = (gt_valid & ~has_region).nonzero(as_tuple=True)
        drow = db * G + di
        d_iou = common.aligned_box_iou(pred_boxes[db].permute(2, 0, 1).contiguous(),
                                       [c[:, None] for c in gt_boxes[db, di].unbind(1)])
        lab = gt_labels[db, di]
        d_scores = pred_scores[db[:, None], torch.arange(A, device=device), lab[:, None]]  # [Nd, A]
        k_dense = pair_log_kernel(d_scores, d_iou)  # [Nd, A]
        del d_iou, d_scores
        k_bg = pred_scores.new_zeros((B, A))  # the background row (see assign)

        log_nu = math.log2(1.0 + MARGINAL_EPS)
        row_valid = gt_valid.flatten()
        f = torch.zeros(R, dtype=dtype, device=device)
        f.masked_fill_(~(gt_valid & has_region).flatten(), NEG_INF)
        f_bg = torch.zeros(B, dtype=dtype, device=device)
        flat_col = col.flatten()
        # Only the priors some object reaches ("touched": its penalty-free ones, and every
        # prior of an image with a dense row) need a column sum; at every other prior the
        # background alone is there (log kernel 0), so its potential is log_nu - f_bg of its
        # image. The Sinkhorn runs over the touched priors only (a fifth of them in everyday
        # batches), in positions 0..nT-1 of a compact axis (nT: the dummy).
        touched = torch.zeros(dummy + 1, dtype=torch.bool, device=device)
        touched[flat_col] = True
        touched[dummy] = False
        if drow.numel():
            touched[:dummy].view(B, A)[db] = True
        t_idx = touched.nonzero().squeeze(1)  # [nT] flat prior index, ascending
        nT = t_idx.numel()
        t_img = t_idx.div(A, rounding_mode="floor")
        position = torch.full((dummy + 1,), nT, dtype=torch.long, device=device)
        position[t_idx] = torch.arange(nT, device=device)
        ccol = position.take(col)  # [R, W] compact column of each packed entry
        flat_ccol = ccol.flatten()
        per_image = torch.bincount(t_img, minlength=B)  # [B] touched priors
        untouched = A - per_image
        # a dense row's image is wholly touched: its priors are one run of the compact axis
        first = torch.cumsum(per_image, 0) - per_image
        dpos = first[db][:, None] + torch.arange(A, device=device)  # [Nd, A]
        g_t = None
        for it in range(self.sinkhorn_iters):
            # column update: every touched prior's sum over the suppliers that reach it
            g_t = _column_logsumexp2(f_bg[t_img], (k_obj + f[:, None]).flatten(), flat_ccol,
                                     k_dense + f[drow][:, None], dpos).neg_().add_(log_nu)
            if it == self.sinkhorn_iters - 1:
                break
            g_ext = torch.cat([g_t, g_t.new_zeros(1)])  # the dummy
            f = torch.sub(log_mu, _logsumexp2_(g_ext.take(ccol).add_(k_obj), 1))
            if drow.numel():
                f[drow] = log_mu[drow] - _logsumexp2_(k_dense + g_t[dpos], 1)
            f.masked_fill_(~row_valid, NEG_INF)
            f_bg = log_mu_bg - _image_logsumexp2(g_t, t_img, (-f_bg).add_(log_nu), untouched)
        g = (-f_bg).add_(log_nu)[:, None].repeat(1, A)  # [B, A]: untouched priors
        g.view(-1)[t_idx] = g_t

        # decision: each supplier's row rescaled to its largest entry, then the best per prior
        g_flat = torch.cat([g.flatten(), g.new_zeros(1)])
        x_obj = g_flat.take(col).add_(k_obj)
        obj_max, obj_arg = x_obj.max(dim=1)  # [R]
        x_obj.sub_(obj_max.masked_fill(obj_max == NEG_INF, 0.0)[:, None])
        x_bg = k_bg + g
        x_bg.sub_(x_bg.amax(dim=1, keepdim=True))
        x_dense = k_dense + g[db]
        dense_max, dense_arg = x_dense.max(dim=1)
        x_dense.sub_(dense_max[:, None])
        best = torch.cat([x_bg.flatten(), x_bg.new_full((1,), NEG_INF)])
        best.scatter_reduce_(0, flat_col, x_obj.flatten(), "amax")
        best_2d = best[:dummy].view(B, A)
        if drow.numel():
            best_2d.scatter_reduce_(0, db[:, None].expand_as(x_dense), x_dense, "amax")
        # first maximum: the lowest object index, background (index G) last
        winner = torch.full((dummy + 1,), G, dtype=torch.long, device=device)
        obj_of_row = torch.arange(R, device=device).remainder_(G)
        ties = (x_obj == best.take(col)) & (col != dummy)
        winner.scatter_reduce_(0, flat_col[ties.flatten()],
                               obj_of_row[:, None].expand(R, width)[ties], "amin")
        winner_2d = winner[:dummy].view(B, A)
        if drow.numel():
            d_ties = x_dense == best_2d[db]
            d_obj = torch.where(d_ties, di[:, None], G)
            winner_2d.scatter_reduce_(0, db[:, None].expand_as(d_obj), d_obj, "amin")
        gt_index = torch.where(winner_2d == G, -1, winner_2d)
        if self.ensure_each_gt:
            lost = gt_valid & (common.owned_counts(gt_index, G) == 0)
            best_prior = (col.gather(1, obj_arg[:, None]).squeeze(1) % A)
            best_log_k = k_obj.gather(1, obj_arg[:, None]).squeeze(1)
            if drow.numel():
                best_prior[drow] = dense_arg
                best_log_k[drow] = k_dense.gather(1, dense_arg[:, None]).squeeze(1)
            best_cost = best_log_k.mul_(-self.sinkhorn_eps / LOG2_E).view(B, G)
            gt_index = common._rescue(gt_index, lost, best_prior.view(B, G), best_cost)
        quality = common.assigned_box_iou(pred_boxes, gt_boxes, gt_index)
        return common.build_assignment(gt_index, gt_labels, quality=quality, candidate_mask=region)


def _column_logsumexp2(t_bg: Tensor, t_obj: Tensor, col: Tensor, t_dense: Tensor,
                       dense_col: Tensor) -> Tensor:
    """``log2`` of the sum of ``2**t`` over every supplier at each of ``n`` columns: the
    background entries ``t_bg [n]``, the packed object entries ``t_obj`` at columns ``col``
    (``n`` is a dummy column for padding) and dense rows ``t_dense [Nd, A]`` at columns
    ``dense_col [Nd, A]``. A scatter version of :func:`_logsumexp2_` (same clamp)."""
    n = t_bg.numel()
    m = torch.cat([t_bg, t_bg.new_full((1,), NEG_INF)])
    m.scatter_reduce_(0, col, t_obj, "amax")
    if t_dense.numel():
        m.scatter_reduce_(0, dense_col.flatten(), t_dense.flatten(), "amax")
    m[-1] = 0.0  # the dummy column: every other one holds a finite background entry
    total = torch.sub(t_bg, m[:n]).clamp_(min=EXP2_FLOOR).exp2_()
    total = torch.cat([total, total.new_zeros(1)])
    total.index_add_(0, col, t_obj.sub(m.take(col)).clamp_(min=EXP2_FLOOR).exp2_())
    if t_dense.numel():
        flat = dense_col.flatten()
        total.index_add_(0, flat, t_dense.flatten().sub(m.take(flat)).clamp_(min=EXP2_FLOOR).exp2_())
    return total[:n].log2_().add_(m[:n])


def _image_logsumexp2(values: Tensor, image: Tensor, rest: Tensor, rest_count: Tensor) -> Tensor:
    """Per image, ``log2`` of ``sum 2**values`` over the entries of that image plus
    ``rest_count * 2**rest``: ``values [n]`` of images ``image [n]``; ``rest, rest_count [B]``
    (the background row over its untouched priors, all with the same potential)."""
    m = torch.where(rest_count > 0, rest, NEG_INF)
    m = m.scatter_reduce(0, image, values, "amax")
    m.masked_fill_(m == NEG_INF, 0.0)
    total = torch.sub(rest, m).clamp_(min=EXP2_FLOOR).exp2_().mul_(rest_count)
    total.index_add_(0, image, values.sub(m.take(image)).clamp_(min=EXP2_FLOOR).exp2_())
    return total.log2_().add_(m)
