"""The one sample type every reader produces."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    """One annotated image, as read from disk (before any transform).

    Attributes:
        image_id: the image file's stem for VOC/YOLO, the json's own id for COCO.
        path: image file path.
        width, height: image size in pixels, as annotated (checked against the decoded image).
        boxes: ``[N, 4]`` float32 xyxy in pixels.
        labels: ``[N]`` int64 class index into the configured class list (0-based).
        ignore: ``[N]`` bool, objects that neither count nor penalise in evaluation and are
            left out of training targets (VOC ``difficult``, COCO ``iscrowd``).
        source: annotation file the sample came from (for error messages).
    """

    image_id: str | int
    path: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    source: str = ""

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.ignore = np.asarray(self.ignore, dtype=bool).reshape(-1)
        if len(self.ignore) == 0 and len(self.boxes):
            self.ignore = np.zeros(len(self.boxes), bool)  # not given: nothing ignored
        if not (len(self.boxes) == len(self.labels) == len(self.ignore)):
            raise ValueError(f"{self.source or self.path}: boxes/labels/ignore lengths differ")
