"""COCO json reader.

``bbox [x, y, w, h]`` becomes xyxy, ``iscrowd`` becomes the ignore flag, ``image_id`` is the
json's own id. Duplicate image or annotation ids, annotations pointing at missing images and
unknown category ids are problems naming the file and the id.

Images are looked up relative to ``image_root`` when given, else (first match wins) the json's
directory, its parent, and ``<parent>/<split>`` / ``<parent>/images/<split>`` where ``split``
is the json stem after its last ``_`` (``instances_val2017.json`` -> ``val2017``).

Scoring detections needs no image (:func:`read_coco_ground_truth`, used by ``densedet eval
--ann JSON --detections D.json``): a COCO json carries each image's ``width``/``height``, which
is all the box checks use, so image files are then neither required nor opened, as with
pycocotools. Training reads through :func:`densedet.data.readers.read_dataset`, which keeps
requiring every image.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from densedet.data.index import (ClassMapper, DatasetIndex, Reporter, image_size, make_sample,
                                 validate_box)
from densedet.errors import DensedetError


def coco_json_in_dir(root: Path, split: str | None) -> Path:
    """The json of a ``synth``-style directory: ``annotations_<split>.json`` or ``annotations.json``."""
    jpath = root / (f"annotations_{split}.json" if split else "annotations.json")
    if not jpath.is_file():
        raise DensedetError(f"{jpath}: not found (pass the COCO .json file itself)")
    return jpath


def read_coco(path: str | os.PathLike, classes: Sequence[str] | None, skip_unknown: bool,
              report: Reporter, image_root: str | os.PathLike | None = None,
              need_images: bool = True) -> DatasetIndex:
    """Read a COCO json into a DatasetIndex (see :func:`densedet.data.readers.read_dataset`).

    ``need_images=False`` (scoring only) takes each image's size from the json and neither
    looks for nor opens the image, unless the json lacks the size; ``Sample.path`` is then
    the image's would-be path under the first candidate root.
    """
    jpath = Path(path)
    data = _load_json(jpath)
    cat_names = _categories(data, jpath, report)
    if classes is None:
        classes = [cat_names[cid] for cid in sorted(cat_names)]
    mapper = ClassMapper(classes, skip_unknown)
    by_name = {name: cid for cid, name in cat_names.items()}
    missing = [c for c in mapper.classes if c not in by_name]
    if missing:
        raise DensedetError(f"{jpath}: classes {', '.join(map(repr, missing))} are not among the "
                            f"json categories ({', '.join(sorted(by_name))})")
    category_ids = [by_name[c] for c in mapper.classes]

    images = _images(data, jpath, report)
    roots = _image_roots(jpath, images, image_root)
    per_image: dict[int, list[tuple[np.ndarray, int, bool]]] = {i: [] for i in images}
    sizes = {}
    for img_id, img in images.items():
        sizes[img_id] = _image_path_and_size(img, img_id, roots, jpath, report, need_images)
    seen_ann: set[Any] = set()
    for k, ann in enumerate(data.get("annotations", [])):
        obj = _annotation(ann, k, jpath, images, sizes, cat_names, mapper, seen_ann, report)
        if obj is not None:
            per_image[ann["image_id"]].append(obj)
    samples = []
    for img_id in images:
        if sizes[img_id] is None:
            continue
        image, w, h = sizes[img_id]
        samples.append(make_sample(img_id, image, w, h, per_image[img_id], jpath))
    return DatasetIndex(samples=samples, classes=mapper.classes, category_ids=category_ids,
                        skipped=mapper.skipped, root=str(jpath), fmt="coco")


def _load_json(jpath: Path) -> dict:
    try:
        with open(jpath, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DensedetError(f"{jpath}: line {e.lineno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DensedetError(f"{jpath}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DensedetError(f"{jpath}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DensedetError(f"{jpath}: not a COCO annotation file (no 'images' list)")
    return data


def _categories(data: dict, jpath: Path, report: Reporter) -> dict[int, str]:
    """category id -> name; duplicate ids/names are problems."""
    cats: dict[int, str] = {}
    for k, c in enumerate(data.get("categories", [])):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            report(jpath, f"categories[{k}]", "needs 'id' and 'name'")
            continue
        if c["id"] in cats:
            report(jpath, f"category id {c['id']}", "duplicate category id")
            continue
        if c["name"] in cats.values():
            report(jpath, f"category id {c['id']}", f"duplicate category name {c['name']!r}")
            continue
        cats[c["id"]] = str(c["name"])
    if not cats:
        raise DensedetError(f"{jpath}: no categories")
    return cats


def _images(data: dict, jpath: Path, report: Reporter) -> dict[int, dict]:
    images: dict[int, dict] = {}
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            report(jpath, f"images[{k}]", "needs 'id' and 'file_name'")
            continue
        if img["id"] in images:
            report(jpath, f"image id {img['id']}", "duplicate image id")
            continue
        images[img["id"]] = img
    return images


def _image_roots(jpath: Path, images: dict[int, dict], image_root: str | os.PathLike | None) -> list[Path]:
    """Candidate image directories, the one holding the first image first."""
    if image_root is not None:
        return [Path(image_root)]
    d = jpath.parent
    split = jpath.stem.rsplit("_", 1)[-1]
    candidates = [d, d.parent, d.parent / split, d.parent / "images" / split, d / "images"]
    if images:
        first = next(iter(images.values()))["file_name"]
        for c in candidates:
            if (c / first).is_file():
                return [c] + [x for x in candidates if x != c]
    return candidates


def _find_image(img: dict, roots: list[Path]) -> Path | None:
    return next((r / img["file_name"] for r in roots if (r / img["file_name"]).is_file()), None)


def _image_path_and_size(img: dict, img_id: Any, roots: list[Path], jpath: Path,
                         report: Reporter, need_images: bool = True
                         ) -> tuple[Path, int, int] | None:
    """``(image path, width, height)`` or None (reported). The size comes from the json, else
    from the image header; ``need_images=False`` skips the file lookup when the json has it."""
    w, h = img.get("width"), img.get("height")
    has_size = bool(w) and bool(h)
    # one stat per image and root adds up on large sets (and network disks): skip it when
    # nothing needs the file
    path = _find_image(img, roots) if need_images or not has_size else None
    if path is None and (need_images or not has_size):
        why = "" if need_images else " (and the json gives no width/height)"
        report(jpath, f"image id {img_id}",
               f"image {img['file_name']!r} not found in {roots[0]}{why}")
        return None
    if path is None:
        path = roots[0] / img["file_name"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (w or 0, h or 0)):
        report(jpath, f"image id {img_id}", f"width/height {w!r}/{h!r} are not numbers")
        return None
    if not has_size:
        try:
            w, h = image_size(path)
        except OSError as e:
            report(path, "", f"cannot read image header ({e})")
            return None
    return path, int(w), int(h)


def _annotation(ann: Any, k: int, jpath: Path, images: dict, sizes: dict, cat_names: dict[int, str],
                mapper: ClassMapper, seen: set, report: Reporter) -> tuple[np.ndarray, int, bool] | None:
    """One annotation -> (box, label, ignore) or None."""
    if not isinstance(ann, dict) or "image_id" not in ann or "bbox" not in ann:
        report(jpath, f"annotations[{k}]", "needs 'image_id' and 'bbox'")
        return None
    where = f"annotation id {ann['id']}" if "id" in ann else f"annotations[{k}]"
    if "id" in ann:
        if ann["id"] in seen:
            report(jpath, where, "duplicate annotation id")
            return None
        seen.add(ann["id"])
    if ann["image_id"] not in images:
        report(jpath, where, f"points at image id {ann['image_id']}, which is not in 'images'")
        return None
    if ann.get("category_id") not in cat_names:
        report(jpath, where, f"unknown category id {ann.get('category_id')}")
        return None
    if sizes[ann["image_id"]] is None:  # image problem already reported
        return None
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        report(jpath, where, f"bbox {bbox!r} is not 4 numbers [x, y, w, h]")
        return None
    label = mapper.lookup(cat_names[ann["category_id"]], jpath, where, report)
    if label is None:
        return None
    _, w, h = sizes[ann["image_id"]]
    x, y, bw, bh = (float(v) for v in bbox)
    box = validate_box((x, y, x + bw, y + bh), w, h, jpath, where, report)
    if box is None:
        return None
    return box, label, bool(ann.get("iscrowd", 0))


def read_coco_ground_truth(path: str | os.PathLike, classes: Sequence[str] | None = None,
                           split: str | None = None) -> DatasetIndex:
    """COCO ground truth for scoring detections: the json alone, no image needed.

    Strict ``read_dataset(path, "coco", classes, split)`` except that image files are neither
    required nor opened when the json gives each image's ``width``/``height`` (see
    ``read_coco(..., need_images=False)``). ``path`` is a json, or a ``synth``-style directory
    holding ``annotations_<split>.json`` / ``annotations.json``.
    """
    jpath = Path(path)
    if jpath.is_dir():
        jpath = coco_json_in_dir(jpath, split)
    return read_coco(jpath, classes, skip_unknown=False, report=Reporter(strict=True),
                     need_images=False)


def coco_dict(samples, classes: Sequence[str], category_ids: Sequence[int]) -> dict:
    """A COCO annotation dict for samples with integer ``image_id``s (file names relative to
    the json are taken from ``Sample.path`` as given)."""
    images, anns = [], []
    for s in samples:
        images.append({"id": s.image_id, "file_name": s.path, "width": s.width, "height": s.height})
        for box, label, ign in zip(s.boxes, s.labels, s.ignore):
            x1, y1, x2, y2 = (float(v) for v in box)
            anns.append({"id": len(anns) + 1, "image_id": s.image_id,
                         "category_id": int(category_ids[label]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": (x2 - x1) * (y2 - y1), "iscrowd": int(ign), "segmentation": []})
    cats = [{"id": int(cid), "name": name, "supercategory": "none"} for name, cid in zip(classes, category_ids)]
    return {"info": {"description": "densedet"}, "images": images, "annotations": anns, "categories": cats}
