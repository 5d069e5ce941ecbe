"""A training step's forward and backward, captured once as a CUDA graph and replayed.

Why: on a GPU, a base-size model's step at batch 16 x 128 is bound by the host, not the device.
MPNet-base with gates issues thousands of small kernels per step (each gate's noise and clamp, the
gated matmuls' scalings, casts, LayerNorms), and Python issues them more slowly than the GPU runs
them: 0.135 s per step, where LoRA, with fewer kernels, takes 0.047 (benchmarks/results/
train_cost_gpu.md, before this module). A CUDA graph records a step's kernels once and replays them
in one call (PyTorch's "whole-network capture"), so a step costs what the GPU does.

What a graph needs, and where the loop provides it:
- fixed shapes: the objective pads every batch to one length (`Objective.static_shapes`); a batch
  of another shape (an epoch's short last batch) runs eagerly;
- no host values that change inside the step: the method refills its device scalars in
  `Method.before_step` and says what else its step depends on (`Method.graph_key`: a new key
  captures again, None runs eagerly);
- gradients in fixed buffers: the graph writes the ones it allocated when captured, and `run`
  points each parameter's `.grad` at them again (an eager step in between replaces them).
Clipping, the finite check and the optimizer step stay outside the graph, as in the eager step.
"""

from __future__ import annotations

from typing import Callable

import torch

WARMUP = 2  # eager passes before capture: lazily made state (cuBLAS workspaces, buffers) exists by then


def shapes(batch: dict[str, torch.Tensor]) -> tuple:
    """What a captured step's inputs must match: every tensor's name, shape and dtype."""
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))


class StepGraph:
    """One captured step: `fn(batch)` runs forward and backward and returns what the loop reads."""

    def __init__(self, fn: Callable[[dict], tuple], batch: dict[str, torch.Tensor], params: list[torch.Tensor],
                 discard: Callable[[], None], key) -> None:
        device = next(iter(batch.values())).device
        self.key, self.params = key, params
        self.static = {k: v.clone() for k, v in batch.items()}
        self.constants = PinnedConstants()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                _clear(params)
                fn(self.static)
        torch.cuda.current_stream(device).wait_stream(side)
        discard()  # what the warm-up passes gathered (Taylor sums) belongs to no step
        _clear(params)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), self.constants:
            self.outputs = fn(self.static)
        self.grads = [p.grad for p in params]  # the graph's gradient buffers (None: a parameter it does not reach)

    def run(self, batch: dict[str, torch.Tensor]) -> tuple:
        """This batch's step: its inputs copied into the graph's, the step replayed, the gradients in `.grad`."""
        for k, v in batch.items():
            self.static[k].copy_(v, non_blocking=True)
        self.graph.replay()
        for p, g in zip(self.params, self.grads):
            p.grad = g
        return self.outputs


class PinnedConstants(torch.overrides.TorchFunctionMode):
    """Host-to-device copies made while a step is captured, served from one pinned host buffer.

    A capture allows a host-to-device copy only from pinned memory, and model code makes such
    copies: transformers' attention-mask code (`torch.tensor(0.0, device=...)`, taken only while
    capturing: with no padding the eager passes skip the mask), MPNet's relative position buckets
    in some transformers versions (computed on the host, then `.to(device)`). Within a step of fixed
    shapes their data is a constant of the code (shapes, not batch values: the batch is on the
    device already), so the graph may copy it again from the same pinned bytes at each replay.
    The buffer is allocated before the capture (a capture cannot allocate pinned memory) and lives
    as long as the graph (this object is kept with it); a step that needs more fails its capture
    with a message, and the loop runs eagerly.
    """

    def __init__(self, capacity: int = 1 << 20) -> None:
        super().__init__()
        self.pool = torch.empty(capacity, dtype=torch.uint8).pin_memory()
        self.used = 0

    def send(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`host` copied to `device` from the pool (asynchronous: the copy is a node of the graph)."""
        data = host.detach().contiguous().reshape(-1).view(torch.uint8)
        start = -(-self.used // 64) * 64  # aligned for any dtype
        if start + data.numel() > self.pool.numel():
            raise RuntimeError(f"step_graph: more than {self.pool.numel()} bytes of host constants in one step")
        slot = self.pool[start:start + data.numel()]
        slot.copy_(data)
        self.used = start + data.numel()
        return slot.view(host.dtype).view(host.shape).to(device, non_blocking=True)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.tensor and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cuda":
            return self.send(torch.tensor(*args, **{**kwargs, "device": "cpu"}), torch.device(kwargs["device"]))
        if func in (torch.Tensor.to, torch.Tensor.cuda) and args and isinstance(args[0], torch.Tensor) \
                and args[0].device.type == "cpu":
            device, dtype = _target(func, args[1:], kwargs)
            if device is not None and device.type == "cuda":
                return self.send(args[0] if dtype is None else args[0].to(dtype), device)
        return func(*args, **kwargs)


def _target(func, args: tuple, kwargs: dict) -> tuple[torch.device | None, torch.dtype | None]:
    """Where `tensor.to(*args, **kwargs)` / `tensor.cuda(*args, **kwargs)` sends a tensor, and as what dtype
    (None, None for a call this does not understand: it then runs unchanged)."""
    try:
        if func is torch.Tensor.cuda:
            device = args[0] if args else kwargs.get("device")
            if device is None:
                return torch.device("cuda", torch.cuda.current_device()), None
            return (torch.device("cuda", device) if isinstance(device, int) else torch.device(device)), None
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **{k: v for k, v in kwargs.items() if k != "copy"})
        return device, dtype
    except (TypeError, RuntimeError, ValueError):
        return None, None


def _clear(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


class StepReplayer:
    """The loop's side: replays the current graph, captures a new one when the key changes, and says
    when a step must run eagerly (returns None): another batch size, a method key of None, or a
    capture that failed (the model does something a graph cannot hold; said once, then eager)."""

    def __init__(self, params: list[torch.Tensor], discard: Callable[[], None], batch_size: int,
                 say: Callable[[str], None]) -> None:
        self.params, self.discard, self.batch_size, self.say = params, discard, batch_size, say
        self.current: StepGraph | None = None
        self.failed: str | None = None  # why capture failed: the run's metrics say it
        self.captures = 0

    def step(self, fn: Callable[[dict], tuple], batch: dict[str, torch.Tensor], method_key) -> tuple | None:
        if self.failed or method_key is None or next(iter(batch.values())).shape[0] != self.batch_size:
            return None
        key = (shapes(batch), method_key)
        if self.current is None or self.current.key != key:
            self.current = None  # the old graph's memory goes before the new one is captured
            try:
                self.current = StepGraph(fn, batch, self.params, self.discard, key)
            except RuntimeError as e:
                self.failed = f"CUDA graph capture failed ({str(e).splitlines()[0][:160]}); training steps run eagerly"
                self.discard()
                _clear(self.params)
                self.say(self.failed)
                return None
            self.captures += 1
        return self.current.run(batch)
