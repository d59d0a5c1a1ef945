"""Datasets: readers (VOC, COCO, YOLO), split/check tools, transforms, loader, synthetic data."""
from densedet.data.sample import Sample

__all__ = ["Sample"]
