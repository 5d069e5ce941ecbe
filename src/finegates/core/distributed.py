"""Data-parallel training over several processes (`accelerate launch` or `torchrun`).

    accelerate launch --num_processes 2 -m finegates.cli train --task sst2 --data-dir glue/SST-2 --out runs/sst2

accelerate sets the process group up (NCCL on GPUs, gloo on CPU); the loop stays the plain one of
train.py with three rules, so a run on N processes trains the same model as on one:

* Every rank draws the same global batch (same seed, same order) and takes its slice
  `idx[rank::N]`; DistributedDataParallel averages the gradients, which for equal slices is the
  gradient of the global batch. `--batch-size` is the *global* batch.
* Every rank starts from the same parameters and applies the same averaged update, so the
  gates stay identical across ranks (the penalty is computed from those same gates on every rank).
* Only the main process evaluates (on the whole dev set: nothing duplicated or dropped) and writes
  files; the scores reach the other ranks by broadcast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # the device accelerate assigned (multi-process only)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def processes(cpu: bool = False) -> Processes:
    """This process's place; sets up the process group when launched with several processes.

    `cpu` (or no CUDA device): gloo between CPU processes, else NCCL, one GPU per process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=cpu or not torch.cuda.is_available())
    return Processes(rank=state.process_index, world=state.num_processes, device=state.device)


def wrap(model: nn.Module, procs: Processes) -> nn.Module:
    """The module the loop calls forward on: DDP over `model` when there are several processes."""
    if not procs.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [procs.device.index] if procs.device is not None and procs.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def local_slice(idx: list[int], procs: Processes) -> list[int]:
    """This rank's share of a global batch (never empty: a tiny last batch is repeated)."""
    return idx[procs.rank::procs.world] or idx[:1]


def all_finite(value: torch.Tensor, procs: Processes) -> bool:
    """True when `value` is finite on every rank: all ranks must agree to step or to skip."""
    flag = torch.isfinite(value).all().to(torch.float32).reshape(1)
    if procs.active:
        import torch.distributed as dist

        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast(obj, procs: Processes):
    """The main process's `obj` on every rank."""
    if not procs.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, procs: Processes) -> list:
    """`obj` of every rank, in rank order (e.g. each GPU's peak memory, which only its own process sees)."""
    if not procs.active:
        return [obj]
    import torch.distributed as dist

    out = [None] * procs.world
    dist.all_gather_object(out, obj)
    return out


def barrier(procs: Processes) -> None:
    if procs.active:
        import torch.distributed as dist

        dist.barrier()


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over the training processes (itself with one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    out = value.clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()
