"""Where and how a run executes: the device, seeding, autocast, peak memory, library versions.

One copy of each for every objective (classification, language modelling, pretraining) and for
evaluation, so a run's numbers never depend on which entry point made them.
"""

from __future__ import annotations

import random
import resource
import sys

import numpy as np
import torch

from ..core.distributed import processes


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on a GPU (fp32 master weights); fp32 on the CPU, or with `enabled=False`."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def versions() -> dict:
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}


def launch(seed: int, device: str, batch_size: int):
    """Seed, find the training processes (distributed.py) and this one's device; check that the
    global batch splits evenly over the processes. Returns (processes, device)."""
    seed_everything(seed)
    procs = processes(cpu=device == "cpu")
    where = procs.device if procs.active and device != "cpu" else pick_device(device)
    if batch_size % procs.world:
        raise ValueError(f"--batch-size {batch_size} (the global batch) must be a multiple of the "
                         f"{procs.world} training processes")
    return procs, where
