"""``densedet export --weights W --format onnx [--out FILE] [--input-size N]``.

The ONNX graph takes ``images [B, 3, H, W]``: RGB float in [0, 1], letterboxed to the
input size (the detector normalises internally) and returns the decoded, pre-NMS
predictions of every prior:

* ``scores [B, A, C]``: class probabilities;
* ``boxes  [B, A, 4]``: xyxy in input pixels.

Score filtering and NMS are left to the consumer (e.g. ``torchvision.ops.batched_nms`` or
onnxruntime-extensions' NMS): NMS in ONNX differs between runtimes, and keeping it out
keeps the graph portable and the parity check exact. To map boxes to the original image,
undo the letterbox: ``(box - [left, top, left, top]) / scale``.

After export the graph is run with onnxruntime (when installed) on a random input and
compared with PyTorch; the maximum absolute difference is printed and a difference above
``--atol`` fails the export.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from densedet.errors import DensedetError


class DecodedOutputs(nn.Module):
    """Wraps a Detector: images -> (scores [B,A,C], boxes [B,A,4]) before NMS."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.detector(images)
        scores, boxes = self.detector.head.decode(raw, raw["priors"])
        return scores, boxes


def export_onnx(model: nn.Module, out: str | Path, input_hw: tuple[int, int], opset: int = 17,
                dynamic_batch: bool = True) -> Path:
    """Write ``model`` (eval mode, CPU) as ONNX at the fixed ``input_hw``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = DecodedOutputs(model.cpu().eval()).eval()
    example = torch.rand(1, 3, *input_hw)
    kwargs = dict(input_names=["images"], output_names=["scores", "boxes"], opset_version=opset,
                  do_constant_folding=True)
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"images": {0: "batch"}, "scores": {0: "batch"}, "boxes": {0: "batch"}}
    try:
        # the TorchScript-based exporter: no onnxscript dependency, and our graphs are static
        torch.onnx.export(wrapper, (example,), str(out), dynamo=False, **kwargs)
    except Exception as e:
        raise DensedetError(f"ONNX export failed: {type(e).__name__}: {e}") from e
    return out


def check_onnx(model: nn.Module, path: str | Path, input_hw: tuple[int, int], atol: float = 1e-3,
               batch: int = 2, seed: int = 0) -> Optional[float]:
    """Max abs difference between onnxruntime and PyTorch on a random batch; None when
    onnxruntime is not installed. Raises DensedetError above ``atol``."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, *input_hw, generator=g)
    with torch.no_grad():
        ref_scores, ref_boxes = DecodedOutputs(model.cpu().eval())(x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, boxes = sess.run(["scores", "boxes"], {"images": x.numpy()})
    diff_scores = float((torch.from_numpy(scores) - ref_scores).abs().max())
    # boxes are in pixels: compare relative to the input size so one tolerance fits both
    diff_boxes = float((torch.from_numpy(boxes) - ref_boxes).abs().max())
    diff = max(diff_scores, diff_boxes / max(input_hw))
    if diff > atol:
        raise DensedetError(f"{path}: onnxruntime differs from PyTorch by {diff:.3g} (scores "
                            f"{diff_scores:.3g}, boxes {diff_boxes:.3g} px) > tolerance {atol}")
    return diff
