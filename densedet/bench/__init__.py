"""Benchmarks that ship with the package (``densedet bench``, ``benchmarks/*.py``):
assignment speed and memory (:mod:`.assign`), training speed per preset
(:mod:`.train_speed`) and the comparison with Ultralytics' YOLOv8n (:mod:`.ultralytics`)."""
