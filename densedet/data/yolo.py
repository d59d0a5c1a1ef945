"""YOLO (Ultralytics-style) reader and writer.

Layout: a data yaml with ``path`` (root; relative paths resolve against the yaml's directory),
``train``/``val``/``test`` (each an image directory, a ``.txt`` list of image paths, or a list
of those; relative to ``path``) and ``names`` (list, or dict ``{index: name}``). Labels live
where the image path has its last ``images`` directory replaced by ``labels``, with a ``.txt``
suffix; one object per line ``class cx cy w h`` normalised to [0, 1] (a polygon
``class x1 y1 x2 y2 ...`` is accepted and turned into its bounding box, as Ultralytics does).
A missing or empty label file means an image without objects. YOLO has no ignore flag.

A directory without a yaml works too: images under ``images/`` (``images/<split>`` when a split
is given), names from ``classes`` or a ``classes.txt``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from densedet.data.index import (IMAGE_EXTENSIONS, ClassMapper, DatasetIndex, Reporter, image_size,
                                 make_sample, read_class_file, validate_box)
from densedet.data.sample import Sample
from densedet.errors import DensedetError

SPLIT_KEYS = ("train", "val", "test")


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` in the path becomes ``/labels/``, suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def load_data_yaml(path: Path) -> dict:
    """Parse a data yaml; malformed yaml is an error naming the file and line."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise DensedetError(f"{path}: {where}malformed YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise DensedetError(f"{path}: expected a mapping with path/train/val/names")
    return data


def yaml_names(data: dict, path: Path) -> list[str]:
    """``names`` as a list (a dict must have keys 0..n-1)."""
    names = data.get("names")
    if isinstance(names, dict):
        keys = sorted(int(k) for k in names)
        if keys != list(range(len(keys))):
            raise DensedetError(f"{path}: 'names' keys must be 0..{len(keys) - 1}, got {keys}")
        names = [str(names[k] if k in names else names[str(k)]) for k in keys]
    elif isinstance(names, list):
        names = [str(n) for n in names]
    else:
        raise DensedetError(f"{path}: 'names' must be a list or a dict of class names")
    if "nc" in data and int(data["nc"]) != len(names):
        raise DensedetError(f"{path}: nc={data['nc']} but {len(names)} names")
    return names


def _list_images(entry: str, root: Path, source: Path) -> list[Path]:
    """Images of one yaml entry: a directory (searched recursively) or a .txt list."""
    p = Path(entry)
    p = p if p.is_absolute() else root / p
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
    if p.is_file() and p.suffix == ".txt":
        out = []
        for line in p.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                q = Path(line)
                out.append(q if q.is_absolute() else (p.parent / q if (p.parent / q).exists() else root / q))
        return out
    raise DensedetError(f"{source}: image source {entry!r} not found (looked for {p})")


def _image_sources(path: Path, split: str | None) -> tuple[Path, list[Path], dict]:
    """(root, image paths, yaml dict or {}) for a yaml file or a directory."""
    yml = path
    if path.is_dir():
        found = [path / n for n in ("data.yaml", "dataset.yaml", "data.yml")] + sorted(path.glob("*.yaml"))
        yml = next((f for f in found if f.is_file()), None)
        if yml is None:
            images_dir = path / "images" / split if split else path / "images"
            if not images_dir.is_dir():
                raise DensedetError(f"{images_dir}: no such image directory")
            return path, sorted(f for f in images_dir.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS), {}
    data = load_data_yaml(yml)
    root = Path(data.get("path") or ".")
    root = root if root.is_absolute() else (yml.parent / root)
    keys = [split] if split else [k for k in SPLIT_KEYS if data.get(k)]
    images: list[Path] = []
    for key in keys:
        entries = data.get(key)
        if not entries:
            raise DensedetError(f"{yml}: no {key!r} entry")
        for entry in entries if isinstance(entries, list) else [entries]:
            images += _list_images(str(entry), root, yml)
    # Keep order, drop repeats (the same image listed under two keys).
    return root, list(dict.fromkeys(images)), {**data, "_yaml": yml}


def read_yolo(path: str | os.PathLike, classes: Sequence[str] | None, split: str | None,
              skip_unknown: bool, report: Reporter) -> DatasetIndex:
    """Read a YOLO dataset into a DatasetIndex (see :func:`densedet.data.readers.read_dataset`)."""
    path = Path(path)
    root, images, data = _image_sources(path, split)
    if data:
        file_names = yaml_names(data, data["_yaml"])
    elif classes is not None:
        file_names = list(classes)
    elif (root / "classes.txt").is_file():
        file_names = read_class_file(root / "classes.txt")
    else:
        raise DensedetError(f"{path}: no data yaml; pass classes / --classes or add classes.txt")
    mapper = ClassMapper(classes if classes is not None else file_names, skip_unknown)
    samples = []
    for image in images:
        s = parse_yolo_labels(image, file_names, mapper, report)
        if s is not None:
            samples.append(s)
    return DatasetIndex(samples=samples, classes=mapper.classes, category_ids=list(range(len(mapper.classes))),
                        skipped=mapper.skipped, root=str(path), fmt="yolo")


def parse_yolo_labels(image: Path, file_names: list[str], mapper: ClassMapper, report: Reporter) -> Sample | None:
    """One image and its label file -> Sample (None when the image is missing/unreadable)."""
    labels = label_path(image)
    try:
        width, height = image_size(image)
    except FileNotFoundError:
        report(image, "", f"image not found (listed for labels {labels})")
        return None
    except OSError as e:
        report(image, "", f"cannot read image header ({e})")
        return None
    objects = []
    if labels.is_file():
        try:
            text = labels.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            report(labels, "", f"not a UTF-8 text file ({e.reason} at byte {e.start})")
            return None
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                obj = _parse_line(line, n, labels, width, height, file_names, mapper, report)
                if obj is not None:
                    objects.append(obj)
    return make_sample(image.stem, image, width, height, objects, labels)


def _parse_line(line: str, n: int, labels: Path, width: int, height: int, file_names: list[str],
                mapper: ClassMapper, report: Reporter) -> tuple[np.ndarray, int, bool] | None:
    where = f"line {n}"
    tokens = line.split()
    if len(tokens) != 5 and (len(tokens) < 7 or len(tokens) % 2 == 0):
        report(labels, where, f"expected 'class cx cy w h' (5 values) or a polygon, got {len(tokens)} values")
        return None
    try:
        cls_f = float(tokens[0])
        values = np.array([float(t) for t in tokens[1:]], np.float64)
    except ValueError:
        report(labels, where, f"non-numeric value in {line.strip()!r}")
        return None
    if not (0 <= cls_f < len(file_names) and cls_f == int(cls_f)):  # also rejects nan/inf
        report(labels, where, f"class index {tokens[0]} out of range 0..{len(file_names) - 1}")
        return None
    label = mapper.lookup(file_names[int(cls_f)], labels, where, report)
    if label is None:
        return None
    if len(tokens) == 5:
        cx, cy, w, h = values
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    else:
        xs, ys = values[0::2], values[1::2]
        box = (xs.min(), ys.min(), xs.max(), ys.max())
    box = np.array(box) * np.array([width, height, width, height])
    box = validate_box(box, width, height, labels, where, report)
    return None if box is None else (box, label, False)


def write_yolo(index: DatasetIndex, out_dir: str | os.PathLike, split: str = "train",
               copy: bool = False) -> Path:
    """Export ``index`` as split ``split`` of a YOLO dataset in ``out_dir``; return the yaml.

    Images go to ``images/<split>/`` as symlinks (``copy=True`` copies), named
    ``<image_id><suffix>`` so ids stay unique; labels to ``labels/<split>/``. Ignored objects
    (VOC difficult, COCO crowd) are left out, since YOLO cannot mark them. ``data.yaml`` is
    created or updated: call once per split (train, val, ...) with the same class list; until a
    ``val`` split is written, ``val`` points at the first split written (Ultralytics needs one).
    """
    out = Path(out_dir).resolve()
    img_dir, lab_dir = out / "images" / split, out / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    for s in index.samples:
        src = Path(s.path).resolve()
        dst = img_dir / f"{s.image_id}{src.suffix.lower()}"
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        if copy:
            shutil.copyfile(src, dst)
        else:
            os.symlink(src, dst)
        (lab_dir / f"{s.image_id}.txt").write_text(_label_lines(s), encoding="utf-8")
    yml = out / "data.yaml"
    data: dict[str, Any] = load_data_yaml(yml) if yml.is_file() else {}
    if data and yaml_names(data, yml) != list(index.classes):
        raise DensedetError(f"{yml}: exists with other class names; write to another directory")
    data.update({"path": str(out), split: f"images/{split}", "names": list(index.classes)})
    # Ultralytics refuses a yaml without 'val': point it at this split until a val split is written.
    data.setdefault("val", f"images/{split}")
    data = {"path": data.pop("path"), **{k: data[k] for k in SPLIT_KEYS if k in data},
            "names": data["names"], **{k: v for k, v in data.items() if k not in (*SPLIT_KEYS, "names")}}
    yml.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return yml


def _label_lines(s: Sample) -> str:
    """Normalised ``class cx cy w h`` lines, ignored objects left out."""
    lines = []
    for box, label, ign in zip(s.boxes, s.labels, s.ignore):
        if ign:
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        cx, cy = (x1 + x2) / 2 / s.width, (y1 + y2) / 2 / s.height
        w, h = (x2 - x1) / s.width, (y2 - y1) / s.height
        lines.append(f"{int(label)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return "".join(line + "\n" for line in lines)
