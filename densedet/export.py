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

An end-to-end model (``model.end2end``, docs/end2end.md) exports its one-to-one branch with
the top-k in the graph and no NMS: one output ``detections [B, max_det, 6]`` = (x1, y1, x2, y2,
score, class) per image, best first (``max_det`` = ``eval.max_det``; rows past ``A * C`` are
zeros); ``eval.nms=true`` exports its one-to-many head as above instead.

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
from densedet.models.detector import topk_detections


class DecodedOutputs(nn.Module):
    """Wraps a Detector: images -> (scores [B,A,C], boxes [B,A,4]) before NMS."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.detector(images)
        scores, boxes = self.detector.head.decode(raw, raw["priors"])
        return scores, boxes


class EndToEndOutputs(nn.Module):
    """Wraps an end-to-end Detector: images -> ``detections [B, max_det, 6]`` (x1, y1, x2, y2,
    score, class) of its one-to-one branch, top ``max_det`` by score, no NMS."""

    def __init__(self, detector: nn.Module, max_det: int = 100):
        super().__init__()
        self.detector, self.max_det = detector, max_det

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raw = self.detector(images)
        scores, boxes = self.detector.decode_branch(raw, "o2o")
        return topk_detections(scores, boxes, self.max_det)


def export_wrapper(model: nn.Module, nms: Optional[bool] = None, max_det: int = 100) -> nn.Module:
    """The exported module: :class:`EndToEndOutputs` for the one-to-one branch of an
    end-to-end model (``nms`` not true), else :class:`DecodedOutputs`. The model is put in
    eval mode on the CPU, computing only that branch (``Detector.set_branch``)."""
    model = model.cpu().eval()
    branch = model.set_branch(nms)
    wrapper = EndToEndOutputs(model, max_det) if branch == "o2o" else DecodedOutputs(model)
    return wrapper.eval()


def output_names(wrapper: nn.Module) -> list[str]:
    return ["detections"] if isinstance(wrapper, EndToEndOutputs) else ["scores", "boxes"]


def export_onnx(model: nn.Module, out: str | Path, input_hw: tuple[int, int], opset: int = 17,
                dynamic_batch: bool = True, nms: Optional[bool] = None, max_det: int = 100) -> Path:
    """Write ``model`` (eval mode, CPU) as ONNX at the fixed ``input_hw`` (``nms`` and
    ``max_det``: ``eval.nms`` and ``eval.max_det``, for an end-to-end model)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = export_wrapper(model, nms, max_det)
    example = torch.rand(1, 3, *input_hw)
    names = output_names(wrapper)
    kwargs = dict(input_names=["images"], output_names=names, opset_version=opset,
                  do_constant_folding=True)
    if dynamic_batch:
        kwargs["dynamic_axes"] = {n: {0: "batch"} for n in ["images", *names]}
    try:
        # the TorchScript-based exporter: no onnxscript dependency, and our graphs are static
        torch.onnx.export(wrapper, (example,), str(out), dynamo=False, **kwargs)
    except Exception as e:
        raise DensedetError(f"ONNX export failed: {type(e).__name__}: {e}") from e
    if isinstance(wrapper, EndToEndOutputs):  # the tracer leaves [batch, ?, ?]: state it
        import onnx

        graph = onnx.load(str(out))
        dims = graph.graph.output[0].type.tensor_type.shape.dim
        dims[1].dim_value, dims[2].dim_value = max_det, 6
        onnx.save(graph, str(out))
    return out


def detections_difference(got: torch.Tensor, ref: torch.Tensor, size: float) -> float:
    """Largest difference between two ``[B, K, 6]`` top-k detection sets (scores; boxes
    relative to ``size``), robust to the order of near-equal scores: every row of one set
    whose score clears the set's k-th score by more than 1e-5 (so it cannot have been cut at
    the k-th place by a rounding difference) is matched to the closest row of the same class
    in the other set, and the sorted score columns are compared."""
    diff = float((got[..., 4].sort(dim=1, descending=True).values
                  - ref[..., 4].sort(dim=1, descending=True).values).abs().max())
    for a, b in ((got, ref), (ref, got)):
        for x, y in zip(a, b):
            rows = x[x[:, 4] > x[-1, 4] + 1e-5]
            if not len(rows):
                continue
            d = torch.maximum((rows[:, None, 4] - y[None, :, 4]).abs(),
                              (rows[:, None, :4] - y[None, :, :4]).abs().amax(-1) / size)
            d = d.masked_fill(rows[:, None, 5] != y[None, :, 5], float("inf"))
            diff = max(diff, float(d.min(dim=1).values.max()))
    return diff


def check_onnx(model: nn.Module, path: str | Path, input_hw: tuple[int, int], atol: float = 1e-3,
               batch: int = 2, seed: int = 0, nms: Optional[bool] = None,
               max_det: int = 100) -> Optional[float]:
    """Max abs difference between onnxruntime and PyTorch on a random batch; None when
    onnxruntime is not installed. Raises DensedetError above ``atol``."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, *input_hw, generator=g)
    wrapper = export_wrapper(model, nms, max_det)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if isinstance(wrapper, EndToEndOutputs):
        with torch.no_grad():
            ref = wrapper(x)
        (dets,) = sess.run(["detections"], {"images": x.numpy()})
        if tuple(dets.shape) != tuple(ref.shape):
            raise DensedetError(f"{path}: onnxruntime gives detections {tuple(dets.shape)}, "
                                f"PyTorch {tuple(ref.shape)}")
        diff = detections_difference(torch.from_numpy(dets), ref, max(input_hw))
        if diff > atol:
            raise DensedetError(f"{path}: onnxruntime differs from PyTorch by {diff:.3g} "
                                f"(top-k detections) > tolerance {atol}")
        return diff
    with torch.no_grad():
        ref_scores, ref_boxes = wrapper(x)
    scores, boxes = sess.run(["scores", "boxes"], {"images": x.numpy()})
    diff_scores = float((torch.from_numpy(scores) - ref_scores).abs().max())
    # boxes are in pixels: compare relative to the input size so one tolerance fits both
    diff_boxes = float((torch.from_numpy(boxes) - ref_boxes).abs().max())
    diff = max(diff_scores, diff_boxes / max(input_hw))
    if diff > atol:
        raise DensedetError(f"{path}: onnxruntime differs from PyTorch by {diff:.3g} (scores "
                            f"{diff_scores:.3g}, boxes {diff_boxes:.3g} px) > tolerance {atol}")
    return diff
