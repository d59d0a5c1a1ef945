"""What each assigner decided, as pictures and tables: ``densedet assign-viz``.

One PNG with a panel per assigner: the (letterboxed) image, its ground-truth boxes, and every
positive prior drawn at its centre, coloured by the object it serves and sized by pyramid
level (DW: shaded by its positive weight). Beside it a Markdown table: positives per object
per level, and the objects left with none. An end-to-end model (``model.end2end``) gets one
more panel, ``one-to-one: ...``: the positives of its one-to-one assigner (stars; with
``--weights`` on the one-to-one branch's own predictions), docs/end2end.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from densedet.assign import Assignment, build_assigner, common
from densedet.boxes import box_iou, box_to_distance
from densedet.config import load_config
from densedet.data.dataset import DetectionDataset
from densedet.data.sample import Sample
from densedet.engine.build import build_detector, model_from_weights, o2o_assigner_spec, read_split
from densedet.engine.plots import save_figure
from densedet.errors import DensedetError
from densedet.priors import level_ids, priors_for_input


#: panel-name prefix of an end-to-end model's one-to-one assignment (drawn as stars)
ONE_TO_ONE = "one-to-one: "


def standin_predictions(priors: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor,
                        num_classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Predictions of an imagined half-trained model, for pictures made without ``--weights``.

    Dynamic assigners read predictions, so a picture needs some. The stand-in behaves like a
    detector part-way through training: a prior whose centre lies inside an object predicts
    that object's box with an error that grows with the prior's distance from the box centre
    (relative to the box size), and scores that object's class by the IoU of that prediction
    (plus a little noise); a prior inside several objects predicts the smallest. A prior
    outside every object predicts a 2-stride square around itself with a low score (0.02).
    Deterministic for a given ``seed``.

    Args:
        priors: ``[A, 4]`` (cx, cy, stride_w, stride_h).
        gt_boxes: ``[B, G, 4]`` xyxy; ``gt_labels`` ``[B, G]``; ``gt_valid`` ``[B, G]``.
    Returns:
        scores ``[B, A, C]`` in [0, 1], boxes ``[B, A, 4]`` xyxy.
    """
    gen = torch.Generator().manual_seed(seed)
    B, G = gt_labels.shape
    A = priors.shape[0]
    centres, strides = priors[:, :2], priors[:, 2:]
    boxes = torch.cat([centres - strides, centres + strides], dim=-1).expand(B, A, 4).clone()
    scores = torch.full((B, A, num_classes), 0.02)
    if G == 0:
        return scores, boxes
    ltrb = box_to_distance(centres[None, None], gt_boxes[:, :, None])  # [B, G, A, 4]
    inside = (ltrb.amin(-1) > 0) & gt_valid[..., None]
    wh = (gt_boxes[..., 2:] - gt_boxes[..., :2]).clamp(min=1e-3)  # [B, G, 2]
    area = (wh[..., 0] * wh[..., 1])[..., None].expand(B, G, A)
    owner = area.masked_fill(~inside, float("inf")).argmin(dim=1)  # [B, A]
    has_owner = inside.any(dim=1)
    own_box = gt_boxes.gather(1, owner[..., None].expand(B, A, 4))  # [B, A, 4]
    own_wh = (own_box[..., 2:] - own_box[..., :2]).clamp(min=1e-3)
    own_ctr = (own_box[..., :2] + own_box[..., 2:]) / 2
    # normalised offset of the prior from the centre: 0 at the centre, 1 at the border
    off = ((centres[None] - own_ctr).abs() / (own_wh / 2)).amax(dim=-1, keepdim=True).clamp(max=1)
    noise = torch.randn((B, A, 4), generator=gen)
    pred = own_box + noise * (0.05 + 0.35 * off) * own_wh.repeat(1, 1, 2)
    boxes = torch.where(has_owner[..., None], pred, boxes)
    iou = box_iou(pred, own_box, aligned=True).clamp(0, 1)
    own_label = gt_labels.gather(1, owner).clamp(0, num_classes - 1)
    cls_score = (iou + 0.05 * torch.randn((B, A), generator=gen)).clamp(0.05, 0.99)
    onehot = torch.nn.functional.one_hot(own_label, num_classes).bool() & has_owner[..., None]
    scores = torch.where(onehot, cls_score[..., None], scores)
    return scores, boxes


def run_assigners(names: Sequence[str], num_classes: int, priors: Tensor, scores: Tensor,
                  boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor,
                  params: Optional[dict[str, dict]] = None) -> dict[str, Assignment]:
    """Every named assigner on the same inputs (docs/design.md contract)."""
    params = params or {}
    return {n: build_assigner(n, num_classes, **params.get(n, {}))(
        priors, scores, boxes, gt_boxes, gt_labels, gt_valid) for n in names}


def objects_without_positive(assignment: Assignment, gt_valid: Tensor) -> int:
    """How many valid objects of the batch own no prior."""
    owned = common.owned_counts(assignment.gt_index, gt_valid.shape[1])
    return int((gt_valid & (owned == 0)).sum())


def stal_empty_table(names: Sequence[str], num_classes: int, priors: Tensor, scores: Tensor,
                     boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor) -> str:
    """Markdown: per assigner, the objects left with no positive with the small-object
    widening (``stal``, docs/design.md) off and on; ``n/a`` for methods without the option."""
    lines = ["| assigner | empty (STAL off → on) |", "|---|---|"]
    for name in names:
        off = objects_without_positive(build_assigner(name, num_classes)(
            priors, scores, boxes, gt_boxes, gt_labels, gt_valid), gt_valid)
        try:
            stal = build_assigner(name, num_classes, stal=True)
        except TypeError:
            lines.append(f"| {name} | {off} → n/a |")
            continue
        on = objects_without_positive(stal(priors, scores, boxes, gt_boxes, gt_labels, gt_valid),
                                      gt_valid)
        lines.append(f"| {name} | {off} → {on} |")
    return "\n".join(lines)


def positives_per_level(assignment: Assignment, levels: Tensor, num_objects: int,
                        num_levels: int, image: int = 0) -> np.ndarray:
    """``[G, L]`` count of positives of each object on each level (one image)."""
    gi = assignment.gt_index[image]
    pos = gi >= 0
    counts = torch.zeros((num_objects, num_levels), dtype=torch.long)
    if num_objects:
        flat = gi[pos] * num_levels + levels[pos]
        counts = torch.bincount(flat, minlength=num_objects * num_levels).view(num_objects, num_levels)
    return counts.numpy()


def assignment_table(assignments: dict[str, Assignment], levels: Tensor, strides: Sequence[int],
                     gt_labels: Tensor, class_names: Sequence[str]) -> str:
    """Markdown: per assigner, positives per object per level and the objects left with none."""
    G = gt_labels.shape[0]
    L = len(strides)
    lines = []
    header = "| object | class | " + " | ".join(f"P{s}" for s in strides) + " | total |"
    sep = "|---|---|" + "---|" * (L + 1)
    for name, a in assignments.items():
        counts = positives_per_level(a, levels, G, L)
        lines.append(f"### {name}\n")
        if G == 0:
            n_pos = int((a.gt_index[0] >= 0).sum())
            lines.append(f"no objects in this image; {n_pos} positives\n")
            continue
        lines += [header, sep]
        for g in range(G):
            cls = class_names[int(gt_labels[g])] if 0 <= int(gt_labels[g]) < len(class_names) else str(int(gt_labels[g]))
            lines.append(f"| {g} | {cls} | " + " | ".join(str(int(c)) for c in counts[g])
                         + f" | {int(counts[g].sum())} |")
        empty = [g for g in range(G) if counts[g].sum() == 0]
        lines.append("")
        lines.append(f"objects left with no positive: {', '.join(map(str, empty)) if empty else 'none'}"
                     f"; mean positives per object: {counts.sum() / G:.2f}\n")
    return "\n".join(lines)


def draw_assignments(image: np.ndarray, gt_boxes: Tensor, gt_labels: Tensor,
                     class_names: Sequence[str], priors: Tensor, levels: Tensor,
                     assignments: dict[str, Assignment], out_path: str | Path,
                     title: str = "") -> Path:
    """Write one PNG, a panel per assigner.

    Args:
        image: ``[H, W, 3]`` uint8 RGB (the network input, letterboxed).
        gt_boxes: ``[G, 4]`` xyxy in input pixels; ``gt_labels`` ``[G]``.
        priors: ``[A, 4]``; ``levels`` ``[A]`` level of each prior.
        assignments: name -> :class:`Assignment` for a batch of one image.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = max(len(assignments), 1)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    # panels large enough that every positive prior of the finest level stays visible
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 5.8 * rows), squeeze=False)
    palette = plt.get_cmap("tab10")
    G = gt_boxes.shape[0]
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, a) in zip(axes.flat, assignments.items()):
        ax.imshow(image)
        for g in range(G):
            x1, y1, x2, y2 = gt_boxes[g].tolist()
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.2,
                                   color=palette(g % 10)))
        gi = a.gt_index[0]
        pos = gi >= 0
        colours = np.array([palette(int(g) % 10) for g in gi[pos]]) if pos.any() else np.zeros((0, 4))
        if a.pos_weight is not None and pos.any():
            # DW: shade by the positive weight of the pair, normalised per object
            w = a.pos_weight[0].gather(0, gi.clamp(min=0)[None]).squeeze(0)[pos]
            wmax = torch.zeros(G).scatter_reduce(0, gi[pos], w, reduce="amax")
            alpha = (w / wmax[gi[pos]].clamp(min=1e-12)).clamp(0.03, 1).numpy()
            colours[:, 3] = alpha
        sizes = 9.0 * (2.2 ** levels[pos].float()).numpy()
        centres = priors[pos, :2].numpy()
        # DW's soft weights live in the alpha channel; an opaque edge would hide them
        edge = "none" if a.pos_weight is not None else "black"
        one_to_one = name.startswith(ONE_TO_ONE)  # an end-to-end model's one positive per object
        ax.scatter(centres[:, 0], centres[:, 1], s=sizes * (4 if one_to_one else 1), c=colours,
                   edgecolors=edge, linewidths=0.3, marker="*" if one_to_one else "o")
        counts = positives_per_level(a, levels, G, int(levels.max()) + 1 if len(levels) else 1)
        empty = int((counts.sum(axis=1) == 0).sum()) if G else 0
        ax.set_title(f"{name}: {int(pos.sum())} pos, {empty}/{G} objects empty", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    # room above the panels' titles for the figure's title (about a line of text)
    top = 1.0 - 0.3 / fig.get_figheight() if title else 1.0
    return save_figure(fig, out_path, dpi=130, rect=(0.0, 0.0, 1.0, top))


SIZE_BANDS = (32.0, 96.0)  # sqrt(area) px: COCO's small / medium / large


def teaching_image(samples: Sequence[Sample], min_objects: int = 3, max_objects: int = 8) -> Sample:
    """The image that shows an assigner's decisions best: several objects (``min_objects``
    to ``max_objects``, so each keeps room for its positives) spanning as many size bands as
    possible (a small object shows the finest level, a large one the coarse levels), then
    the widest size ratio; the first such image in ``samples`` order on ties."""
    if not samples:
        raise DensedetError("no image to draw: the split is empty")

    def merit(s: Sample) -> tuple:
        side = np.sqrt(np.clip((s.boxes[:, 2] - s.boxes[:, 0]) * (s.boxes[:, 3] - s.boxes[:, 1]), 1e-6, None))
        n = len(side)
        bands = len(set(np.searchsorted(SIZE_BANDS, side).tolist())) if n else 0
        ratio = float(side.max() / side.min()) if n else 0.0
        return (min_objects <= n <= max_objects, bands, min(ratio, 20.0), -abs(n - 5))

    return max(samples, key=merit)  # max keeps the first of equal merits


def assign_viz(config: str, overrides: Sequence[str], image_id: Optional[str], names: Sequence[str],
               weights: Optional[str] = None, out: str | Path = "assign_viz.png",
               seed: int = 0) -> tuple[Path, str]:
    """Draw what each assigner decides on one image of the configured dataset.

    With ``weights`` the dynamic assigners see that model's predictions (what its head hands
    its assigner in training); without, :func:`standin_predictions`. Assigners the model's
    head cannot train with are still drawn: assignment only needs scores and boxes.
    Returns the PNG path and the Markdown table (also written beside the PNG as ``.md``).
    """

    if weights:
        model, cfg, classes = model_from_weights(weights, config, list(overrides), log=lambda *_: None)
        index = read_split(cfg, None, classes=classes)
    else:
        cfg = load_config(config, list(overrides))
        index = read_split(cfg, None)
        classes = index.classes
        model = build_detector(cfg, len(classes), with_assigner=False).eval()
    if image_id is None:
        matches = [teaching_image(index.samples)]
        image_id = matches[0].image_id
    else:
        matches = [s for s in index.samples if str(s.image_id) == str(image_id)]
    if not matches:
        raise DensedetError(f"--image {image_id}: no such image in {cfg.data.root} "
                            f"({len(index.samples)} images; ids are file stems)")
    input_size = cfg.input_size if isinstance(cfg.input_size, int) else tuple(cfg.input_size)
    image, target, _ = DetectionDataset(matches, input_size, augment=None)[0]
    gt_boxes, gt_labels = target["boxes"][None], target["labels"][None]
    gt_valid = torch.ones(gt_labels.shape, dtype=torch.bool)
    C = len(classes)
    if weights:
        device = next(model.parameters()).device
        with torch.no_grad():
            model.head.eval_branches = "both"  # end-to-end: the one-to-one branch too
            raw = model(image[None].to(device))
            priors = raw["priors"]
            scores, boxes = model.head.assigner_inputs(raw, priors)
            if model.end2end:  # what the one-to-one branch hands its assigner
                o2o_inputs = [t.float().cpu() for t in
                              model.head.assigner_inputs(model.head.o2o_view(raw), priors)]
        priors, scores, boxes = priors.cpu(), scores.float().cpu(), boxes.float().cpu()
    else:
        priors, _ = priors_for_input(tuple(image.shape[-2:]), model.strides, model.prior_offset)
        scores, boxes = standin_predictions(priors, gt_boxes, gt_labels, gt_valid, C, seed)
        o2o_inputs = [scores, boxes]
    sizes = [(int(np.ceil(image.shape[-2] / s)), int(np.ceil(image.shape[-1] / s))) for s in model.strides]
    levels = level_ids(sizes)
    assignments = run_assigners(names, C, priors, scores, boxes, gt_boxes, gt_labels, gt_valid)
    if cfg.model.end2end:  # one more panel: the one-to-one branch's positives (docs/end2end.md)
        o2o_name, o2o_params = o2o_assigner_spec(cfg)
        label = f"{ONE_TO_ONE}{o2o_name}" + (f"({o2o_params['base']})" if "base" in o2o_params else "")
        assignments[label] = build_assigner(o2o_name, C, **o2o_params)(
            priors, *o2o_inputs, gt_boxes, gt_labels, gt_valid)
    picture = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    source = f"weights {weights}" if weights else "stand-in predictions"
    png = draw_assignments(picture, gt_boxes[0], gt_labels[0], classes, priors, levels, assignments,
                           out, title=f"image {image_id}, {cfg.model.name} priors, {source}")
    table = (f"# Assignment of image {image_id} ({source})\n\n"
             + assignment_table(assignments, levels, model.strides, gt_labels[0], classes)
             + "\n\n## Objects left with no positive, small-object widening (stal) off → on\n\n"
             + stal_empty_table(names, C, priors, scores, boxes, gt_boxes, gt_labels, gt_valid))
    png.with_suffix(".md").write_text(table + "\n")
    return png, table
