"""Step 2: per-kernel timings, Triton and the eager reference side by side.

B=2, N=4096, C=1536, bf16 (SD3-medium at 1024^2) for every op; selection (``topk_rank``),
matching (``bipartite_match``) and the IDM plan also at N=16384 (2048^2). Each row: median /
p20 / p80 microseconds (CUDA events, L2 flushed before each call), GB/s of the ideal unique
bytes against the measured ``Tensor.copy_`` bandwidth, TFLOP/s for the matching (2 * Na * G * C
per batch row), and the first call's seconds (the JIT compile on a cold cache).
"""
import functools
import time

import torch

from .. import plan_idm, plan_ssm
from ..ops import _score_library as lib
from ..ops import bipartite_match, window_scores
from ..reference.schedule import idm_tokens_to_merge
from ..reference.windows import window_token_index
from .timing import copy_bandwidth_gbps, measure

PROVIDERS = ("triton", "reference")
SCORE_OPS = ("window_scores", "bipartite_match", "topk_rank", "plan_ssm", "plan_idm")
LARGE_OPS = ("bipartite_match", "topk_rank", "plan_idm")  # also at N=16384
REMOVE_FRACTION = 0.5


def _inputs(batch, grid, channels, dtype, device):
    n = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(batch, n, channels, generator=gen).to(device, dtype)
    li = torch.randint(0, 4, (batch, n), generator=gen, dtype=torch.int32).to(device)
    dst = window_token_index(grid, (2, 2), device=device)[:, 0]
    is_dst = torch.zeros(n, dtype=torch.bool, device=device)
    is_dst[dst] = True
    cand = torch.arange(n, device=device)[~is_dst]
    return metric, li, cand.expand(batch, -1).contiguous(), dst.expand(batch, -1).contiguous()


def plan_cases(batch, grid, channels, dtype, device, ops):
    """``{op: (fn(backend), bytes moved, flops or None)}`` for the scoring / selection / plan ops."""
    metric, li, cand, dst = _inputs(batch, grid, channels, dtype, device)
    n, size = grid[0] * grid[1], dtype.itemsize
    metric_bytes = batch * n * channels * size
    n_remove = int(n * REMOVE_FRACTION)
    match_flops = 2 * batch * cand.shape[1] * dst.shape[1] * channels
    k = idm_tokens_to_merge(n_remove, cand.shape[1])
    scores = torch.rand(batch, cand.shape[1], generator=torch.Generator().manual_seed(2)).to(device)
    cases = {
        "window_scores": (lambda b: window_scores(metric, grid, li=li, a_s=0.05, backend=b),
                          metric_bytes + batch * n * 4, None),
        "bipartite_match": (lambda b: bipartite_match(metric, cand, dst, backend=b), metric_bytes, match_flops),
        "topk_rank": (lambda b: lib.topk_rank(scores, k, b), 2 * scores.numel() * 4, None),
        "plan_ssm": (lambda b: plan_ssm(metric, grid, n_remove, li=li, backend=b), metric_bytes, None),
        "plan_idm": (lambda b: plan_idm(metric, grid, n_remove, li=li, backend=b), metric_bytes, match_flops),
    }
    return {op: cases[op] for op in ops}


def merge_cases(batch, grid, channels, dtype, device):
    """merge / prune / unmerge cases on an SSM plan removing about half of the tokens."""
    metric, li, _, _ = _inputs(batch, grid, 64, torch.float32, device)  # plans apply to any C
    n = grid[0] * grid[1]
    plan = plan_ssm(metric, grid, int(n * REMOVE_FRACTION), li=li)
    m, size = plan.num_rows, dtype.itemsize
    gen = torch.Generator().manual_seed(1)

    def tokens(rows):
        return torch.randn(batch, rows, channels, generator=gen).to(device, dtype)

    x, y, residual, cache = tokens(n), tokens(m), tokens(n), tokens(n)
    gate = torch.randn(batch, channels, generator=gen).to(device, dtype)
    index_bytes = batch * n * 4
    rows_bytes, tokens_bytes = batch * m * channels * size, batch * n * channels * size
    cases = {
        "merge": (lambda b: plan.merge(x, backend=b), rows_bytes + tokens_bytes + 2 * index_bytes, None),
        "prune": (lambda b: plan.merge(x, mode="prune", backend=b), 2 * rows_bytes + batch * m * 4, None),
        "unmerge": (lambda b: plan.unmerge(y, backend=b), rows_bytes + tokens_bytes + index_bytes, None),
        "unmerge_epilogue": (
            lambda b: plan.unmerge(y, residual=residual, gate=gate, cache=cache, mcw=0.1, backend=b),
            rows_bytes + 3 * tokens_bytes + index_bytes + batch * n + batch * channels * size, None),
    }
    return cases, {"merge_plan": {"num_rows": m, "removed_fraction": plan.num_removed / n}}


def _row(op, provider, shape, dtype, timing, bytes_moved, flops, copy_gbps):
    seconds = timing["median_us"] * 1e-6
    row = {"op": op, "provider": provider, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
           **{k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()},
           "bytes_moved": int(bytes_moved), "gbps": bytes_moved / seconds / 1e9}
    row["pct_of_copy_bandwidth"] = 100.0 * row["gbps"] / copy_gbps
    if flops is not None:
        row["tflops"] = flops / seconds / 1e12
    return row


def kernel_timings(sizes, device, deadline):
    batch, channels, dtype = sizes.batch, sizes.channels, sizes.dtype
    copy = copy_bandwidth_gbps(device, sizes.copy_bytes)
    out = {"copy_bandwidth": copy, "rows": [], "skipped_cases": []}
    groups = (
        (sizes.grid, lambda: (plan_cases(batch, sizes.grid, channels, dtype, device, SCORE_OPS), {})),
        (sizes.grid, lambda: merge_cases(batch, sizes.grid, channels, dtype, device)),
        (sizes.large_grid, lambda: (plan_cases(batch, sizes.large_grid, channels, dtype, device, LARGE_OPS), {})),
    )
    for grid, make in groups:
        cases, extra = make()
        out.update(extra)
        shape = (batch, grid[0] * grid[1], channels)
        for op, (fn, bytes_moved, flops) in cases.items():
            for provider in PROVIDERS:
                if time.perf_counter() > deadline:
                    out["skipped_cases"].append(f"{op}/{provider} N={shape[1]}: step budget spent")
                    continue
                try:
                    timing = measure(functools.partial(fn, provider), device, warmup=sizes.kernel_warmup,
                                     reps=sizes.kernel_reps, deadline=deadline)
                except Exception as exc:  # noqa: BLE001 - one broken op must not hide the other timings
                    out["rows"].append({"op": op, "provider": provider, "shape": list(shape),
                                        "error": f"{type(exc).__name__}: {exc}"[:500]})
                    continue
                out["rows"].append(_row(op, provider, shape, dtype, timing, bytes_moved, flops, copy["copy_gbps"]))
    by_key = {(r["op"], r["shape"][1], r["provider"]): r for r in out["rows"] if "error" not in r}
    for row in out["rows"]:
        ref = by_key.get((row["op"], row["shape"][1], "reference"))
        if row["provider"] == "triton" and ref is not None and "error" not in row:
            row["speedup_vs_reference"] = ref["median_us"] / row["median_us"]
    return out
