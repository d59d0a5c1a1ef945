"""The one image decoder: training, evaluation, ``densedet check`` and ``densedet predict`` all
read pixels through :func:`read_image`, so they all see the same pixel grid.

EXIF orientation policy: **ignored everywhere**. VOC, COCO and YOLO annotations (and the
``width``/``height`` they store) refer to the pixel grid as stored in the file, which is also
what image-header readers (Pillow's ``Image.open().size``) report. Honouring the EXIF tag in one
place and not another is how an EXIF-rotated photo ends up predicted on one grid and drawn on
the other, so no code path rotates. ``densedet check`` reports annotations whose size matches
the *rotated* view instead (boxes drawn in a viewer that honoured EXIF).

Truncated files: OpenCV's JPEG decoder (libjpeg) only prints "Premature end of JPEG file" on
stderr, naming no file, and (``cv2.imread``, OpenCV 4.x) returns the partial image with the
missing rows grey. :func:`jpeg_truncated` finds these before decoding by walking the JPEG
marker structure, which costs a few microseconds instead of a second decode. Other formats
(PNG, WebP, TIFF, BMP) make OpenCV fail outright on missing data, which raises here too.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from densedet.errors import DensedetError

# cv2 flags per JPEG DCT reduction: decoding at 1/2, 1/4 or 1/8 inside libjpeg is several
# times faster than a full decode plus a resize (the training loader's fast path).
REDUCED_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
                 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
# EXIF orientations 5-8 are transposing rotations: viewers that honour them swap w and h.
EXIF_TRANSPOSED = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), _SOI, _EOI})


class ImageError(DensedetError):
    """An image file that cannot be used. ``str()`` is ``"<path>: <reason>"``; ``reason`` alone
    is for listings that already name the file (``densedet check``, predict's JSON).

    Attributes:
        path: the file.
        reason: what is wrong and what to do.
        missing: True when the file does not exist.
    """

    def __init__(self, path: str | os.PathLike, reason: str, missing: bool = False) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.missing = missing


def read_image(path: str | os.PathLike, reduction: int = 1) -> np.ndarray:
    """Decode an image file as ``[H, W, 3]`` uint8 BGR on its stored pixel grid (EXIF
    orientation ignored: see the module doc), optionally at 1/``reduction`` size (1, 2, 4 or 8;
    exact DCT scaling for JPEG, a resize by OpenCV for other formats; sizes round up).

    Raises :class:`ImageError` (a ``DensedetError``) naming the file when it is missing,
    unreadable, a truncated JPEG, or not decodable.
    """
    if reduction not in REDUCED_FLAGS:
        raise ValueError(f"reduction must be one of {sorted(REDUCED_FLAGS)}, got {reduction}")
    try:
        # Read the bytes here rather than cv2.imread: the truncation check needs them, and
        # cv2.imread cannot open non-ASCII paths on Windows (``im 0002 é.jpg``).
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError(path, "image file not found", missing=True) from None
    except OSError as e:
        raise ImageError(path, f"cannot read image file ({e.strerror or e})") from None
    if not data:
        raise ImageError(path, "empty image file (0 bytes); copy or export it again, or remove it")
    if jpeg_truncated(data):
        raise ImageError(path, f"truncated JPEG: the data ends after {len(data)} bytes, before "
                               "the end-of-image marker (an interrupted copy or download?); "
                               "copy or export the file again, or remove it")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8),
                             REDUCED_FLAGS[reduction] | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:  # OpenCV raises on some inputs (e.g. an empty buffer) instead of None
        raise ImageError(path, f"cannot decode image ({str(e).strip().splitlines()[-1]})") from None
    if image is None:
        raise ImageError(path, "cannot decode image (corrupt data, or not an image format "
                               "OpenCV reads); re-export it as JPEG or PNG, or remove it")
    return image


def jpeg_truncated(data: bytes) -> bool:
    """True when ``data`` is a JPEG that ends before its end-of-image (EOI) marker.

    Walks the length-prefixed marker segments up to the first start-of-scan (a handful of
    segments, so an EXIF thumbnail's own EOI inside APP1 is skipped, not mistaken for the end);
    after that an ``FF D9`` can only be an EOI, because entropy-coded data stuffs every ``FF``
    byte as ``FF 00``. Data appended after the EOI (phones' "motion photo" videos) is fine.
    Returns False for non-JPEG data and for a malformed header (the decoder judges those).
    A truncated progressive JPEG whose later Huffman tables happen to contain ``FF D9`` is
    missed; OpenCV >= 5 then still refuses the partial decode.
    """
    if not data.startswith(b"\xff\xd8"):
        return False
    n, pos = len(data), 2
    while True:
        while pos < n and data[pos] == 0xFF and pos + 1 < n and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 1 >= n:
            return True  # the header ended before the scan started
        if data[pos] != 0xFF:
            return False  # not a marker where one must be: corrupt, not truncated
        marker = data[pos + 1]
        if marker == _EOI:
            return False  # no scan at all: the decoder reports it
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            return True
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end > n:
            return True  # a segment (APP1 with EXIF, a table, the scan header) is cut off
        pos = end
        if marker == _SOS:
            # the usual file ends with its EOI (checked first: a scan of MBs costs ~1 ms)
            return not data.endswith(b"\xff\xd9") and data.find(b"\xff\xd9", pos) < 0


def exif_orientation(path: str | os.PathLike) -> int:
    """The EXIF orientation tag (1-8; 1 when absent or unreadable). Reads the header only."""
    try:
        with Image.open(path) as im:
            value = im.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except (OSError, SyntaxError, ValueError, TypeError):
        return 1
