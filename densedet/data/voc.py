"""Pascal VOC reader (``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/*.txt``) and writer.

Coordinates: VOC's 1-based inclusive pixel indices become continuous xyxy with
``(xmin - 1, ymin - 1, xmax, ymax)`` (see :mod:`densedet.data.readers`); ``write_voc_xml`` does
the inverse. ``difficult`` becomes the ignore flag; missing ``difficult``, ``truncated``,
``pose``, ``segmented`` and ``depth`` tags are fine. A missing or zero ``size`` is read from
the image header.

Cache (``read_dataset(..., cache=True)``): only the pure first stage, the texts of each xml,
is cached, keyed by the file's size and mtime (ns); class mapping, image lookup and validation
run every time. So the cache cannot go stale: an edited xml is re-read, a changed class list or
a deleted image is seen. Location: ``$DENSEDET_CACHE_DIR`` or ``~/.cache/densedet``, one
``voc-<hash of the root>.json`` per dataset (JSON, never pickle; a corrupt file is rebuilt).

Split lists (``ImageSets/Main/<split>.txt``): one id per line, optionally followed by a
``-1/0/1`` flag; ids may contain spaces and non-ASCII UTF-8 (see :func:`parse_split_line`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from densedet.data.index import (ClassMapper, DatasetIndex, Reporter, find_image, image_size,
                                 make_sample, read_class_file, validate_box)
from densedet.data.sample import Sample
from densedet.errors import DensedetError


def voc_classes(root: Path, classes: Sequence[str] | None) -> list[str]:
    """The class list: as given, else ``classes.txt`` in the root (written by ``synth``)."""
    if classes is not None:
        return list(classes)
    class_file = root / "classes.txt"
    if class_file.is_file():
        return read_class_file(class_file)
    raise DensedetError(f"{root}: VOC datasets need a class list (pass classes / --classes, "
                        "or put a classes.txt with one name per line in the dataset root)")


# The flag VOC's per-class lists put after an id (``000005 -1``): absent, neutral, present.
_SPLIT_FLAGS = frozenset({"-1", "0", "1"})


def parse_split_line(line: str, known: Callable[[str], bool] | None = None) -> str | None:
    """The image id on one ImageSets line, or None for a blank line.

    A line is an id, optionally followed by whitespace and a ``-1``/``0``/``1`` flag (VOC's
    per-class lists). Ids may contain spaces and any UTF-8 (``densedet split`` writes file
    stems as they are, e.g. ``im 0002 é``), so the id is the whole line minus that flag, not
    its first token. A line that is a ``known`` id as a whole is taken whole, so an id that
    itself ends in `` 1`` survives. Leading/trailing whitespace is not part of an id.
    """
    text = line.strip()
    if not text:
        return None
    if known is not None and known(text):
        return text
    parts = text.rsplit(None, 1)
    return parts[0] if len(parts) == 2 and parts[1] in _SPLIT_FLAGS else text


def read_split_list(list_file: Path, known: Callable[[str], bool] | None = None
                    ) -> list[tuple[str, int]]:
    """``(id, line number)`` per non-blank line of a UTF-8 list (see :func:`parse_split_line`;
    ``known`` tells whether an id exists, to settle ids ending in a flag-like word)."""
    if not list_file.is_file():
        raise DensedetError(f"{list_file}: split list not found")
    data = list_file.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: editors on Windows may prepend a BOM
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DensedetError(f"{list_file}: line {line}: not valid UTF-8 ({e.reason}); save the "
                            "list as UTF-8") from None
    entries = []
    # split on "\n" only: str.splitlines() would also break ids at \x85, \u2028, ...
    for n, line in enumerate(text.split("\n"), start=1):
        stem = parse_split_line(line, known)
        if stem is not None:
            entries.append((stem, n))
    return entries


class RawCache:
    """Stage-1 results per xml file name, each stored with the file's (size, mtime_ns).

    Stored as JSON, never pickle: the cache directory may be shared or writable by others, and
    unpickling a planted file runs arbitrary code. A cache that is unreadable, of another
    version or malformed (wholly or per entry) is ignored and rebuilt.
    """

    VERSION = 2  # 1 was the pickle format (voc-*.pkl), never read again

    def __init__(self, root: Path) -> None:
        base = Path(os.environ.get("DENSEDET_CACHE_DIR") or Path.home() / ".cache" / "densedet")
        digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
        self.path = base / f"voc-{digest}.json"
        self.entries: dict[str, tuple[tuple[int, int], dict]] = {}
        self.dirty = False
        try:
            with open(self.path, encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, ValueError):  # ValueError: bad JSON or bad UTF-8
            return  # no cache yet, or an unreadable one: rebuild it
        if isinstance(stored, dict) and stored.get("version") == self.VERSION \
                and isinstance(stored.get("entries"), dict):
            for name, entry in stored["entries"].items():
                parsed = _cache_entry(entry)
                if parsed is not None:
                    self.entries[name] = parsed

    def get(self, xml: Path) -> dict:
        """The raw texts of ``xml``, parsed again when its size or mtime changed."""
        st = xml.stat()
        key = (st.st_size, st.st_mtime_ns)
        hit = self.entries.get(xml.name)
        if hit is not None and hit[0] == key:
            return hit[1]
        raw = load_voc_xml(xml)
        self.entries[xml.name] = (key, raw)
        self.dirty = True
        return raw

    def save(self) -> None:
        """Write atomically (a temporary file in the same directory, then ``os.replace``: a
        reader never sees half a file); failing to write only costs speed."""
        if not self.dirty:
            return
        payload = {"version": self.VERSION,
                   "entries": {name: {"key": list(key), "raw": raw}
                               for name, (key, raw) in self.entries.items()}}
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=self.path.parent,
                                             prefix=self.path.name, suffix=".tmp",
                                             delete=False) as f:
                tmp = f.name
                json.dump(payload, f, ensure_ascii=False, separators=(",", ":"))
            os.replace(tmp, self.path)
        except OSError:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def _cache_entry(entry: object) -> tuple[tuple[int, int], dict] | None:
    """A stored ``{"key": [size, mtime_ns], "raw": {...}}`` back to ``(key, raw)``, or None
    when ``raw`` lacks the shape :func:`load_voc_xml` returns (that xml is then re-parsed, so a
    damaged entry can never crash stage 2). JSON turns the ``error`` tuple into a list, which
    parse_voc_xml unpacks the same way."""
    if not isinstance(entry, dict):
        return None
    key, raw = entry.get("key"), entry.get("raw")
    if not (isinstance(key, list) and len(key) == 2 and all(type(v) is int for v in key)
            and isinstance(raw, dict)):
        return None
    if "error" in raw:
        err = raw["error"]
        ok = isinstance(err, list) and len(err) == 2 and all(isinstance(v, str) for v in err)
    else:
        objects = raw.get("objects")
        ok = _texts(raw, ("filename", "width", "height")) and isinstance(objects, list) and all(
            isinstance(o, dict) and _texts(o, ("name", "difficult")) and "bndbox" in o
            and (o["bndbox"] is None or _texts(o["bndbox"], COORDS)) for o in objects)
    return ((key[0], key[1]), raw) if ok else None


def _texts(d: object, keys: Sequence[str]) -> bool:
    """``d`` is a dict holding every key, each a str or None (an optional xml text)."""
    return isinstance(d, dict) and all(k in d and (d[k] is None or isinstance(d[k], str)) for k in keys)


def read_voc(path: str | os.PathLike, classes: Sequence[str] | None, split: str | None,
             skip_unknown: bool, report: Reporter, cache: bool = False) -> DatasetIndex:
    """Read a VOC root into a DatasetIndex (see :func:`densedet.data.readers.read_dataset`)."""
    root = Path(path)
    ann_dir = root / "Annotations"
    if not ann_dir.is_dir():
        raise DensedetError(f"{root}: not a VOC dataset root (no Annotations/ directory)")
    mapper = ClassMapper(voc_classes(root, classes), skip_unknown)
    if split is None:
        xml_files = sorted(ann_dir.glob("*.xml"))
    else:
        list_file = root / "ImageSets" / "Main" / f"{split}.txt"
        xml_files = []

        def known(stem: str) -> bool:  # settles ids ending in a flag-like word ("im 1")
            return (ann_dir / f"{stem}.xml").is_file()

        for stem, line in read_split_list(list_file, known):
            xml = ann_dir / f"{stem}.xml"
            if xml.is_file():
                xml_files.append(xml)
            else:
                report(list_file, f"line {line}", f"no annotation file {xml}")
    raw_cache = RawCache(root) if cache else None
    samples = []
    for xml in xml_files:
        raw = raw_cache.get(xml) if raw_cache is not None else None
        sample = parse_voc_xml(xml, root / "JPEGImages", mapper, report, raw)
        if sample is not None:
            samples.append(sample)
    if raw_cache is not None:
        raw_cache.save()
    return DatasetIndex(samples=samples, classes=mapper.classes,
                        category_ids=list(range(len(mapper.classes))), skipped=mapper.skipped,
                        root=str(root), fmt="voc")


COORDS = ("xmin", "ymin", "xmax", "ymax")


def load_voc_xml(xml: Path) -> dict:
    """Stage 1, a pure function of the file's bytes (so it can be cached): the raw texts.

    Returns ``{"error": (where, message)}`` for an unusable file, else ``{"filename", "width",
    "height", "objects": [{"name", "bndbox" (tag -> text, or None), "difficult"}]}``.
    """
    try:
        ann = ET.parse(xml).getroot()
    except ET.ParseError as e:
        line = e.position[0] if getattr(e, "position", None) else 0
        return {"error": (f"line {line}", f"malformed XML ({e})")}
    if ann.tag != "annotation":
        return {"error": ("", f"root element is <{ann.tag}>, expected <annotation>")}
    size = ann.find("size")
    objects = []
    for obj in ann.findall("object"):
        bnd = obj.find("bndbox")
        objects.append({"name": _text(obj, "name"), "difficult": _text(obj, "difficult"),
                        "bndbox": None if bnd is None else {t: _text(bnd, t) for t in COORDS}})
    return {"filename": _text(ann, "filename"),
            "width": _text(size, "width") if size is not None else None,
            "height": _text(size, "height") if size is not None else None, "objects": objects}


def parse_voc_xml(xml: Path, image_dir: Path, mapper: ClassMapper, report: Reporter,
                  raw: dict | None = None) -> Sample | None:
    """Stage 2: one annotation file (or its cached ``raw`` texts) -> Sample, or None when the
    file itself is unusable. Image lookup and validation always run, so a cache cannot hide a
    deleted image or a changed class list."""
    raw = load_voc_xml(xml) if raw is None else raw
    if "error" in raw:
        report(xml, *raw["error"])
        return None
    stem = xml.stem
    image = find_image(image_dir, stem, raw["filename"])
    if image is None:
        report(xml, "", f"image not found in {image_dir} (tried filename tag and {stem}.jpg/.png/...)")
        return None
    size = _read_size(raw, xml, image, report)
    if size is None:
        return None
    width, height = size
    objects = []
    for k, obj in enumerate(raw["objects"], start=1):
        parsed = _parse_object(obj, k, xml, width, height, mapper, report)
        if parsed is not None:
            objects.append(parsed)
    return make_sample(stem, image, width, height, objects, xml)


def _text(el: ET.Element, tag: str) -> str | None:
    child = el.find(tag)
    return child.text.strip() if child is not None and child.text and child.text.strip() else None


def _read_size(raw: dict, xml: Path, image: Path, report: Reporter) -> tuple[int, int] | None:
    """Annotated (width, height); from the image header when the tag is absent or zero
    (some converters write 0)."""
    try:
        w, h = int(float(raw["width"] or 0)), int(float(raw["height"] or 0))
    except ValueError:
        report(xml, "<size>", "width/height are not numbers")
        return None
    if w > 0 and h > 0:
        return w, h
    try:
        return image_size(image)
    except OSError as e:
        report(image, "", f"cannot read image header ({e})")
        return None


def _parse_object(obj: dict, k: int, xml: Path, width: int, height: int, mapper: ClassMapper,
                  report: Reporter) -> tuple[np.ndarray, int, bool] | None:
    """One object's texts (k counts from 1) -> (box, label, ignore) or None."""
    name = obj["name"]
    where = f"object {k}" + (f" ({name!r})" if name else "")
    if name is None:
        report(xml, where, "missing <name>")
        return None
    bnd = obj["bndbox"]
    if bnd is None:
        report(xml, where, "missing <bndbox>")
        return None
    missing = [t for t in COORDS if bnd[t] is None]
    if missing:
        report(xml, where, f"<bndbox> lacks {', '.join('<' + t + '>' for t in missing)}")
        return None
    try:
        xmin, ymin, xmax, ymax = (float(bnd[t]) for t in COORDS)
        difficult = int(float(obj["difficult"] or 0))
    except ValueError:
        report(xml, where, "bndbox/difficult values are not numbers")
        return None
    label = mapper.lookup(name, xml, where, report)
    if label is None:
        return None
    # 1-based inclusive pixel indices -> continuous pixel edges (the frame training and model
    # predictions use): width xmax - xmin + 1, the devkit's. A VOC detections file is given in
    # the XML's own frame and densedet.evaluate (det_frame="voc") shifts it the same way, so
    # its AP is the devkit's; see docs/eval.md.
    box = validate_box((xmin - 1.0, ymin - 1.0, xmax, ymax), width, height, xml, where, report)
    if box is None:
        return None
    return box, label, bool(difficult)


def write_voc_xml(path: str | os.PathLike, filename: str, width: int, height: int,
                  boxes: np.ndarray, names: Sequence[str], difficult: Sequence[bool] | None = None,
                  depth: int = 3) -> None:
    """Write one VOC annotation. ``boxes`` are continuous xyxy with integer coordinates
    (pixel edges); they are stored as 1-based inclusive indices ``(x1 + 1, y1 + 1, x2, y2)``."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "JPEGImages"
    ET.SubElement(ann, "filename").text = filename
    size = ET.SubElement(ann, "size")
    for tag, v in (("width", width), ("height", height), ("depth", depth)):
        ET.SubElement(size, tag).text = str(int(v))
    ET.SubElement(ann, "segmented").text = "0"
    difficult = difficult if difficult is not None else [False] * len(names)
    for box, name, diff in zip(np.asarray(boxes).reshape(-1, 4), names, difficult):
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(int(bool(diff)))
        bnd = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bnd, tag).text = str(v)
    ET.indent(ann)
    ET.ElementTree(ann).write(path, encoding="utf-8", xml_declaration=False)
