"""densedet: anchor-free dense object detectors built around label assignment.

    import densedet
    model = densedet.load("best.pt")      # or a `densedet convert` output, or yolox_s.pth
    dets = model.predict("img.jpg")

``densedet.load`` and ``densedet.Model`` are imported on first use (:mod:`densedet.api`), so
``import densedet`` stays cheap.
"""
__version__ = "0.1.0"

__all__ = ["Model", "load"]


def __getattr__(name: str):
    if name in ("load", "Model"):
        from densedet import api

        return getattr(api, name)
    raise AttributeError(f"module 'densedet' has no attribute {name!r}")
