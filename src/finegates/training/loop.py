"""The one training loop: every objective (classification, language modelling, pretraining) and
every method runs through `fit`, so each gets resume, data parallelism and the non-finite guard.

An objective is a data source, a loss and an evaluation (`Objective`); a method decides what
trains and adds a loss term (methods/registry.py); the plan (`Plan`) says how long, how often to
evaluate and checkpoint, and how the learning rate moves. nanoGPT's "one loop, variants as data".

RUN_DIR/
  config.json        resolved config (+ recipe, versions): enough to rebuild the model
  metrics.jsonl      one line per evaluation
  trace.jsonl        every `trace_every` steps: loss, penalty, lambda, removed fraction, gate stats
  trainable.safetensors   every trained tensor (gates, head, trained biases): small
  checkpoint/state.pt     everything to resume bit-exactly (checkpoint.py); removed once complete
  metrics.json       final metrics, "complete": true; written last, so its presence marks a complete run

Every file is written atomically (data/files.py). A non-finite loss or gradient stops the run with
the last good checkpoint kept (or, with `skip_nonfinite`, skips that batch and counts it).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from ..core.distributed import Processes, all_finite, barrier, broadcast, local_slice, processes, wrap
from ..core.model import gate_trace
from ..data.outputs import Kind, output_folder
from ..data.files import append_jsonl, write_json
from .checkpoint import CHECKPOINT, RunError, nonfinite, restore_checkpoint, save_checkpoint, save_trainable, truncate_log
from .methods.registry import Method
from .plan import LoopState, Plan
from .progress import Progress
from .step_graph import StepReplayer
from .runtime import autocast, peak_memory_mb


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, ...); the message says at which step."""


MAX_NONFINITE_IN_A_ROW = 10  # with skip_nonfinite: more than this means the run has diverged
WARM_STEPS = 3  # `steady_seconds_per_step` leaves out each process's first steps (allocator, kernel choice)


class Objective:
    """What a kind of training feeds the loop: examples, a loss, an evaluation (subclassed per objective)."""

    name = "objective"  # the progress bar's label
    n_examples = 0  # the loop draws batches of indices into 0..n_examples-1
    graph_safe = False  # whether `loss` is device work only, so a step can be a CUDA graph (step_graph.py)
    static_shapes = False  # set by the loop when it replays steps: every full batch must have one shape

    def batch(self, idx: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        """The model inputs (with labels) of the examples `idx`, on `device`."""
        raise NotImplementedError

    def loss(self, runner: nn.Module, batch: dict, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, object, dict]:
        """(loss to minimise, task loss, model outputs, scalars to log) of one batch."""
        with autocast(batch["input_ids"].device):
            out = runner(**batch)
        task_loss = out.loss.float()
        return task_loss, task_loss, out, {}

    def evaluate(self, model: nn.Module, state: LoopState) -> dict:
        """A metrics.jsonl record (without "step"), computed on the main process only."""
        raise NotImplementedError

    def describe(self, record: dict) -> str:
        """The line printed after an evaluation."""
        return ""


def in_run_folder(train, cfg, kind: Kind, inputs: tuple, resume: bool, overwrite: bool) -> dict:
    """`train(cfg, resume, target)` with `cfg.out` the folder the output rule gives (data/outputs.py):
    the run directory itself when new, empty or resumed; else a staging folder that replaces the
    target (`overwrite`) only once the run is complete. `target` is where the run will be."""
    procs = processes(cpu=cfg.device == "cpu")
    with output_folder(cfg.out, kind, inputs=inputs, resume=resume, overwrite=overwrite, procs=procs) as folder:
        return train(replace(cfg, out=folder), resume, cfg.out)


def start_run_dir(out: Path, ckpt: dict | None, procs: Processes, config: dict) -> None:
    """A fresh run clears what an earlier run left there; a resumed one cuts its logs back to the
    checkpoint's step, so no line is repeated. Only the main process touches the folder."""
    if procs.main:
        _prepare_run_dir(out, ckpt, config)
    barrier(procs)


def _prepare_run_dir(out: Path, ckpt: dict | None, config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)
    for tmp in [*out.glob(".*.tmp"), *out.glob("checkpoint/.*.tmp")]:
        tmp.unlink(missing_ok=True)  # half-written files of a killed run (files.atomic_write's temporaries)
    if ckpt is not None:
        for log in ("metrics.jsonl", "trace.jsonl"):
            truncate_log(out / log, ckpt["step"])
        return
    for stale in ("metrics.jsonl", "trace.jsonl", "trainable.safetensors"):
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / CHECKPOINT.parent, ignore_errors=True)
    write_json(out / "config.json", config)


def fit(model: nn.Module, method: Method, groups: list[dict], objective: Objective, plan: Plan, *,
        procs: Processes, device: torch.device, fingerprint: str, config: dict, ckpt: dict | None = None,
        data: str | None = None) -> LoopState:
    """Run the loop to `plan.total_steps` (or the time limit), from `ckpt` when resuming.

    `groups`: the optimizer's parameter groups (method.prepare); `config`: config.json of a fresh
    run; `data`: the training data's fingerprint, checked against a resumed checkpoint."""
    runner = wrap(model, procs)  # DDP over several processes (distributed.py), the model itself otherwise
    # foreach: one multi-tensor update per group, not a Python loop over (hundreds of) gate vectors.
    # Not capturable: its bias corrections divide each parameter by a 0-dim step tensor, shapes that
    # foreach cannot batch, so it ran 440 single-tensor divisions per step for MPNet-base's 220 gate
    # vectors and biases (H200 profile, benchmarks/results/step_profile_gpu, issue 19).
    # The non-capturable step's two `.item()` per parameter read CPU step counts: no device sync.
    # (fused=True would be one kernel, but resumed runs were then not bit-identical to uninterrupted
    # ones: tests/test_resume.py.)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0, betas=plan.betas, foreach=True)
    gen = torch.Generator().manual_seed(plan.seed)
    st = LoopState(data=data)
    if ckpt is not None:
        loop = restore_checkpoint(ckpt, plan.out / CHECKPOINT, model=model, optimizer=optimizer, method=method,
                                  generator=gen, fingerprint=fingerprint)
        if loop.get("data") != data:
            raise RunError(f"{plan.out / CHECKPOINT}: the training data changed since this checkpoint was written")
        st = LoopState(**{k: v for k, v in loop.items() if k in LoopState.__dataclass_fields__})
        st.order, st.history = list(st.order), list(st.history)
    start_run_dir(plan.out, ckpt, procs, config)
    last_ckpt = st.step if ckpt is not None else None
    clipped = [p for g in groups if g.get("clip", True) for p in g["params"]]
    bar = Progress(plan.total_steps, st.step, plan.desc, plan.progress and procs.main, plan.log_every)
    replayer = _replayer(model, method, objective, plan, procs, device, bar)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_step, warm = st.step, None  # steady timing starts after this process's WARM_STEPS
    t_start = time.perf_counter()
    while st.step < plan.total_steps:
        if plan.time_limit_s and time.perf_counter() - t_start > plan.time_limit_s:
            st.stopped_early = True
            bar.write(f"time limit of {plan.time_limit_s:.0f} s reached at step {st.step}")
            break
        if not st.order:
            st.order = torch.randperm(objective.n_examples, generator=gen).tolist()
        idx, st.order = st.order[: plan.batch_size], st.order[plan.batch_size:]
        if plan.lr_factor is not None:
            for g in optimizer.param_groups:  # not the dicts passed in: loading a checkpoint replaces them
                g["lr"] = g["base_lr"] * plan.lr_factor(st.step, g)
        if not model.training:
            model.train()
        t0 = time.perf_counter()
        local = local_slice(idx, procs)
        method.before_step(model, st.step)
        batch = objective.batch(local, device)
        step_fn = _step_fn(runner, model, objective, method, local, st.step)
        done = replayer.step(step_fn, batch, method.graph_key(st.step)) if replayer is not None else None
        if done is None:
            optimizer.zero_grad(set_to_none=True)
            done = step_fn(batch)
        else:
            st.graph_steps += 1
        if replayer is not None and replayer.failed:
            st.graph_fallback = replayer.failed
        loss, task_loss, logs = done
        # a clip at inf measures the norm and scales by exactly 1
        norm = torch.nn.utils.clip_grad_norm_(clipped, plan.grad_clip if plan.grad_clip > 0 else math.inf)
        # the step's one host synchronisation: all processes agree to step or to skip
        bad = None if all_finite(torch.stack([loss.detach(), norm.to(loss.dtype)]), procs) else _why(loss, task_loss, norm)
        if bad is None:
            optimizer.step()
            st.in_a_row = 0
        else:
            st.skipped, st.in_a_row = st.skipped + 1, st.in_a_row + 1
            optimizer.zero_grad(set_to_none=True)
            method.discard_step(model)
            if not plan.skip_nonfinite or st.in_a_row >= MAX_NONFINITE_IN_A_ROW:
                bar.close()
                why = (f"{bad} at step {st.step}, {st.in_a_row} non-finite batches in a row: training diverged"
                       if plan.skip_nonfinite else
                       f"{bad} at step {st.step}: lower --lr, or pass --skip-nonfinite to skip such batches")
                raise TrainingError(_stopped(plan.out, why, last_ckpt))
        method.after_step(model, st.step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        st.t_train += time.perf_counter() - t0
        st.step += 1
        warm = (st.step, st.t_train) if st.step == first_step + WARM_STEPS else warm
        if st.step == plan.total_steps:
            st.peak_mb = peak_memory_mb(device)  # training's peak, before the last evaluation
        bar.update(lambda: {"loss": f"{task_loss.item():.3f}", **method.progress()})
        if procs.main and plan.trace_every and (st.step % plan.trace_every == 0 or st.step == 1):
            lr = {"lr": optimizer.param_groups[0]["lr"]} if plan.lr_factor is not None else {}
            append_jsonl(plan.out / "trace.jsonl", {"step": st.step, "task_loss": task_loss.item(), **lr,
                                                    **_floats(logs), **method.progress(), **gate_trace(model)})
        if st.step in plan.eval_at or st.step == plan.total_steps:
            st.task_loss, st.logs = task_loss.item(), _floats(logs)
            record = broadcast(objective.evaluate(model, st) if procs.main else None, procs)
            record = {"step": st.step, **record, **method.progress()}
            st.history.append(record)
            _check_finite(model, st.step, plan.out, last_ckpt)
            if procs.main:
                append_jsonl(plan.out / "metrics.jsonl", record)
                if plan.save_at_eval:
                    save_trainable(plan.out / "trainable.safetensors", model, fingerprint, st.step,
                                   tensors=method.trainable_state(model))
                bar.write(objective.describe(record) + "".join(f", {k} {v}" for k, v in method.progress().items()))
        if st.step < plan.total_steps and (st.step in plan.eval_at
                                           or (plan.checkpoint_every and st.step % plan.checkpoint_every == 0)):
            _check_finite(model, st.step, plan.out, last_ckpt)
            if procs.main:
                save_checkpoint(plan.out, step=st.step, model=model, optimizer=optimizer, method=method, generator=gen,
                                fingerprint=fingerprint, loop=st.as_dict())
            last_ckpt = st.step
    bar.close()
    if warm is not None and st.step > warm[0]:
        st.steady_seconds_per_step = (st.t_train - warm[1]) / (st.step - warm[0])
    return st


def _step_fn(runner, model, objective: Objective, method: Method, local: list[int], step: int):
    """One step's forward and backward on a batch: (loss, task loss, logs), all left on the device."""
    def run(batch: dict) -> tuple:
        loss, task_loss, out, logs = objective.loss(runner, batch, local)
        extra, method_logs = method.extra_loss(model, step, batch, out)
        loss = loss if extra is None else loss + extra
        loss.backward()
        return loss.detach(), task_loss.detach(), {**method_logs, **logs}
    return run


def _replayer(model: nn.Module, method: Method, objective: Objective, plan: Plan, procs: Processes,
              device: torch.device, bar: Progress) -> StepReplayer | None:
    """Steps replayed as CUDA graphs (step_graph.py) where they can be: one process on a GPU, an
    objective whose loss is device work only; None runs every step eagerly."""
    if not (plan.cuda_graphs and device.type == "cuda" and procs.world == 1 and objective.graph_safe):
        return None
    objective.static_shapes = True
    params = [p for p in model.parameters() if p.requires_grad]
    return StepReplayer(params, lambda: method.discard_step(model), plan.batch_size, bar.write)


def finish_run_dir(out: Path, metrics: dict, procs: Processes) -> dict:
    """Write metrics.json (the mark of a complete run) and drop the checkpoint; main process only."""
    if procs.main:
        write_json(out / "metrics.json", metrics)
        shutil.rmtree(out / CHECKPOINT.parent, ignore_errors=True)  # complete: the result is trainable.safetensors
    barrier(procs)
    return metrics


def _stopped(out: Path, why: str, last_ckpt: int | None) -> str:
    kept = (f"the last good checkpoint (step {last_ckpt}) is kept in {out / CHECKPOINT.parent}"
            if last_ckpt is not None else "no checkpoint had been written yet")
    return f"{why}; {kept}"


def _check_finite(model: nn.Module, step: int, out: Path, last_ckpt: int | None) -> None:
    """Never write NaN/inf tensors: stop, keeping the last good checkpoint."""
    bad = nonfinite({n: p for n, p in model.named_parameters() if p.requires_grad})
    if bad:
        raise TrainingError(_stopped(out, f"trained tensor {bad[0]} is not finite at step {step}", last_ckpt))


def _why(loss: torch.Tensor, task_loss: torch.Tensor, norm: torch.Tensor) -> str:
    """What made a step non-finite (read back only when one is)."""
    if not torch.isfinite(loss):
        return f"loss is {loss.item()} (task loss {task_loss.item():.4g})"
    if not torch.isfinite(norm):
        return f"gradient norm is {norm.item()}"
    return "the loss or gradient of another process is not finite"


def _floats(logs: dict) -> dict:
    """Per-step log values stay on the device until a trace line or a record is written."""
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in logs.items()}
