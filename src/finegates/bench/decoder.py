"""CPU generation benchmark for decoders: prefill latency, per-token decode latency, memory.

    from finegates.bench.decoder import bench_generation
    result = bench_generation(model, tokenizer, prompt_tokens=256, new_tokens=32, threads=2, runs=5)

Generation has two regimes with different bottlenecks, so they are timed separately:
  prefill  one forward pass over the whole prompt (matrix-matrix work), which fills the KV cache;
  decode   one token at a time against the cache (matrix-vector work, memory-bound), greedy.
The same prompt ids (a fixed English text, tokenized, repeated to length) and the same greedy
loop serve dense and compressed models, so their numbers compare directly. Times are medians of
`runs` timed repetitions after `warmup` untimed ones.

Memory: the process's resident set is sampled every few milliseconds during the timed runs;
`peak_rss_mb` is its maximum and `peak_rss_over_start_mb` the part above the resident set at the
start (activations and KV cache). Both are in-process measurements: compare models measured in
fresh processes of their own (the compress `bench` command does) for deployment numbers.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import torch
import torch.nn as nn

PROMPT_TEXT = (
    "The history of the city begins in the early medieval period, when a small settlement grew up "
    "around a river crossing. Over the following centuries it became a market town, then a centre "
    "of trade and learning, with a cathedral, a university and a busy port. "
)


def prompt_ids(tokenizer, n_tokens: int, vocab_size: int | None = None, seed: int = 0) -> torch.Tensor:
    """[1, n_tokens] prompt ids: a fixed text repeated (random ids if there is no tokenizer)."""
    if n_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {n_tokens}")
    if tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size or 1000, (1, n_tokens), generator=gen)
    base = tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    reps = n_tokens // len(base) + 1
    return torch.tensor([(base * reps)[:n_tokens]], dtype=torch.long)


class _RssSampler:
    """Samples this process's resident set size in a background thread (Linux /proc)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = self.start = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _summary(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    q = lambda p: s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"median": statistics.median(s), "p10": q(0.1), "p90": q(0.9), "min": s[0], "n": len(s)}


@torch.inference_mode()
def _generate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float], list[int]]:
    """(prefill ms, decode ms per token, generated ids): greedy decoding with the KV cache."""
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill = (time.perf_counter() - t0) * 1e3
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    steps, tokens = [], [int(token)]
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        steps.append((time.perf_counter() - t0) * 1e3)
        tokens.append(int(token))
    return prefill, steps, tokens


def bench_generation(model: nn.Module, tokenizer=None, prompt_tokens: int = 256, new_tokens: int = 32,
                     threads: int = 2, runs: int = 5, warmup: int = 1) -> dict:
    """Time prefill and per-token decode of a causal LM on CPU (see the module docstring).

    `new_tokens` counts every generated token; the first comes from the prefill pass, so
    `new_tokens - 1` decode steps are timed per run. Returns medians (ms) and the generated ids
    (equal for a dense model and its exact compression, up to float ties).
    """
    if new_tokens < 2 or runs < 1 or warmup < 0 or threads < 1:
        raise ValueError("bench_generation: new_tokens >= 2, runs >= 1, warmup >= 0, threads >= 1")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"bench_generation measures CPU latency; the model is on {device}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and prompt_tokens + new_tokens > max_pos:
        raise ValueError(f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's {max_pos} positions")
    ids = prompt_ids(tokenizer, prompt_tokens, getattr(model.config, "vocab_size", None))
    was_training, old_threads = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            _generate(model, ids, new_tokens)
        prefill, decode_runs, decode_all = [], [], []
        with _RssSampler() as mem:
            for _ in range(runs):
                p, steps, tokens = _generate(model, ids, new_tokens)
                prefill.append(p)
                decode_runs.append(sum(steps) / len(steps))
                decode_all.extend(steps)
    finally:
        torch.set_num_threads(old_threads)
        model.train(was_training)
    per_token = statistics.median(decode_runs)
    return {
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "threads": threads, "runs": runs,
        "warmup": warmup, "prefill_ms": _summary(prefill),
        "prefill_tokens_per_s": prompt_tokens / (statistics.median(prefill) / 1e3),
        "decode_ms_per_token": {**_summary(decode_runs), "all_steps": _summary(decode_all)},
        "decode_tokens_per_s": 1e3 / per_token,
        "peak_rss_mb": mem.peak, "peak_rss_over_start_mb": mem.peak - mem.start,
        "params": sum(p.numel() for n, p in model.named_parameters() if not n.endswith("theta")),
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "generated_ids": tokens,
    }
