"""How many processes a run has: one place, used by training (DDP strategy, codebook sync), by codecs that fit
something on the training data before training (semanticodec's k-means: one process only)."""

from __future__ import annotations

import os


def world_size(t) -> int:
    """Processes of a run with trainer settings `t` (accelerator, devices, num_nodes: `TrainerConfig`)."""
    import torch

    d = t.devices
    gpu = t.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if isinstance(d, (list, tuple)):
        n = len(d)
    elif isinstance(d, int):
        n = d if d > 0 else (torch.cuda.device_count() if gpu else os.cpu_count() or 1)
    elif isinstance(d, str) and d != "auto":
        n = len([x for x in d.split(",") if x.strip()]) if "," in d else int(d)
    else:
        n = torch.cuda.device_count() if gpu else 1
    return max(1, n) * t.num_nodes
