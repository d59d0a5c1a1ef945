"""Latency per image of trained models (docs/end2end.md): batch 1, one thread, PyTorch on the
CPU and onnxruntime, NMS included where it runs (torchvision ``batched_nms`` after onnxruntime
for a one-to-many head, as ``Detector.postprocess`` does it).

    python scripts/e2e_latency.py OUT.json NAME=WEIGHTS[:true] ...

``:true`` evaluates an end-to-end model's one-to-many head with NMS (``eval.nms=true``). The
input is the first image of the model's test split (NMS's cost depends on how many boxes clear
the threshold, which noise would not show). Every variant is timed round-robin (ROUNDS rounds
of N calls each), so that the load of a shared machine falls on all of them alike; reported
per variant: the median and the 10th percentile over all calls, in ms.
"""
import json
import statistics
import sys
import time

import onnxruntime as ort
import torch
from torchvision.ops import batched_nms

from densedet.data.dataset import DetectionDataset
from densedet.engine.build import model_from_weights, read_split
from densedet.export import export_onnx

torch.set_num_threads(1)
ROUNDS, N, WARM = 10, 30, 20
THRESHOLDS = (0.001, 0.25)


def nms_post(scores, boxes, thresh, iou, max_det, pre=1000):
    """Detector.postprocess's NMS path on onnxruntime's decoded outputs (one image)."""
    s, b = scores[0], boxes[0]
    C = s.shape[-1]
    top, idx = s.flatten().topk(min(pre, s.numel()))
    keep = top > thresh
    top, idx = top[keep], idx[keep]
    bb = b[idx // C]
    kept = batched_nms(bb, top, idx % C, iou)[:max_det]
    return bb[kept], top[kept], (idx % C)[kept]


fns = {}  # (name, engine, thresh) -> callable
for spec in sys.argv[2:]:
    name, _, rest = spec.partition("=")
    path, _, flag = rest.partition(":")
    nms = True if flag == "true" else None
    model, cfg, classes = model_from_weights(path, overrides=["eval.nms=true"] if nms else [],
                                       log=lambda *a: None)
    branch = model.set_branch(nms)  # the forward computes only this branch
    # a real image (the first of the test split, letterboxed): NMS's cost depends on how many
    # boxes clear the threshold, which noise would not show
    sample = read_split(cfg, "test", classes=classes).samples[0]
    x = DetectionDataset([sample], cfg.input_hw, augment=None)[0][0][None]
    onnx_path = path.replace(".pt", f"_{branch}.onnx")
    export_onnx(model, onnx_path, cfg.input_hw, nms=nms, max_det=cfg.eval.max_det)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    for thresh in THRESHOLDS:
        def pt(model=model, x=x, thresh=thresh, cfg=cfg, nms=nms):
            with torch.no_grad():
                return model.postprocess(model(x), score_thresh=thresh, nms_iou=cfg.eval.nms_iou,
                                         max_det=cfg.eval.max_det, nms=nms)

        if branch == "o2o":
            def ox(sess=sess, xn=xn, thresh=thresh):
                d = sess.run(None, {"images": xn})[0][0]
                return d[d[:, 4] > thresh]
        else:
            def ox(sess=sess, xn=xn, thresh=thresh, cfg=cfg):
                s, b = sess.run(None, {"images": xn})
                return nms_post(torch.from_numpy(s), torch.from_numpy(b), thresh, cfg.eval.nms_iou,
                                cfg.eval.max_det)
        with torch.no_grad():
            raw = model(x)

        def post(model=model, raw=raw, thresh=thresh, cfg=cfg, nms=nms):  # postprocess alone
            return model.postprocess(raw, score_thresh=thresh, nms_iou=cfg.eval.nms_iou,
                                     max_det=cfg.eval.max_det, nms=nms)
        fns[(name, branch, "torch", thresh)] = pt
        fns[(name, branch, "torch postprocess only", thresh)] = post
        fns[(name, branch, "onnxruntime", thresh)] = ox

samples = {k: [] for k in fns}
for k, f in fns.items():
    for _ in range(WARM):
        f()
for _ in range(ROUNDS):
    for k, f in fns.items():
        for _ in range(N):
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
rows = [{"model": k[0], "branch": k[1], "engine": k[2], "score_thresh": k[3],
         "ms_median": round(1e3 * statistics.median(v), 2),
         "ms_p10": round(1e3 * sorted(v)[len(v) // 10], 2)} for k, v in samples.items()]
for r in rows:
    print(r)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
