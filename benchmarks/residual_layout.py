"""Should closed residual-stream features be cut out (gather/scatter) or kept as baked scaling?

Residual-side gates (columns of q/k/v/up/gate, rows of o/down) scale the hidden stream that every
layer shares. Cutting a closed feature out of one layer's matrices needs a gather of the layer's
input before q/k/v/up and a scatter of o/down's output back into the full stream. This times one
MiniLM-L6-sized block's linear work both ways, at several fractions of closed residual features:

    .venv/bin/python benchmarks/residual_layout.py   # -> benchmarks/results/residual_layout.json

Run at 2 threads, batch 8 x seq 128, fp32 (the compression benchmark's setting).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

D, INTER, BATCH, SEQ, THREADS, RUNS = 384, 1536, 8, 128, 2, 20


def timed(fn, runs: int = RUNS) -> tuple[float, float]:
    """(median, min) milliseconds; min is the steadier figure on a shared, loaded machine."""
    for _ in range(5):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(out), min(out)


def block_fns(frac: float):
    """(dense-with-scaling, gather/scatter) versions of one block's seven matmuls."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, SEQ, D, generator=g)
    keep = torch.sort(torch.randperm(D, generator=g)[: int(round(D * (1 - frac)))]).values
    w_in = [torch.randn(n, D, generator=g) for n in (D, D, D, INTER)]  # q, k, v, up
    w_out = [torch.randn(D, n, generator=g) for n in (D, INTER)]  # o, down
    w_in_k = [w[:, keep].contiguous() for w in w_in]
    w_out_k = [w[keep].contiguous() for w in w_out]
    h_attn, h_mlp = torch.randn(BATCH, SEQ, D, generator=g), torch.randn(BATCH, SEQ, INTER, generator=g)
    inv = torch.full((D,), len(keep), dtype=torch.long)
    inv[keep] = torch.arange(len(keep))

    def dense():
        for w in w_in:
            F.linear(x, w)
        return x + F.linear(h_attn, w_out[0]) + F.linear(h_mlp, w_out[1])

    def cut():
        xk = x.index_select(-1, keep)  # one gather shared by q, k, v, up (best case)
        for w in w_in_k:
            F.linear(xk, w)
        spread = lambda y: F.pad(y, (0, 1)).index_select(-1, inv)  # noqa: E731  scatter back
        return x + spread(F.linear(h_attn, w_out_k[0])) + spread(F.linear(h_mlp, w_out_k[1]))

    return dense, cut


def main() -> None:
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()
    rows = []
    for frac in (0.05, 0.1, 0.25, 0.5):
        dense, cut = block_fns(frac)
        t_dense, t_cut = [], []
        for _ in range(3):  # alternate, so a neighbour's load hits both
            t_dense.append(timed(dense))
            t_cut.append(timed(cut))
        med_d, med_c = statistics.median(t[0] for t in t_dense), statistics.median(t[0] for t in t_cut)
        min_d, min_c = min(t[1] for t in t_dense), min(t[1] for t in t_cut)
        rows.append({"closed_residual_fraction": frac, "ms_scaling": med_d, "ms_gather_scatter": med_c,
                     "ratio_median": med_c / med_d, "ms_scaling_min": min_d, "ms_gather_scatter_min": min_c,
                     "ratio_min": min_c / min_d, "matmul_flops_ratio": 1 - frac})
        print(rows[-1])
    out = Path(__file__).parent / "results" / "residual_layout.json"
    out.write_text(json.dumps({"load_avg_before": load_before, "setting": {"hidden": D, "intermediate": INTER, "batch": BATCH, "seq": SEQ,
                                           "threads": THREADS, "runs": RUNS}, "load_avg": os.getloadavg(),
                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
