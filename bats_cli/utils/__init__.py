"""Layer 1: the process around a run: memory, device and threads, distributed ranks, signals, progress, provenance."""
