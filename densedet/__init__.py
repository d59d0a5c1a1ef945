"""densedet: anchor-free dense object detectors built around label assignment."""
__version__ = "0.1.0"
