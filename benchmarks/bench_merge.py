"""merge / unmerge / fused unmerge epilogue: Triton vs the PyTorch reference (SPEC 8).

CUDA: SD3-medium sizes (B=2, N=4096 and 16384, C=1536, bf16) with an SSM plan removing
~50% of the tokens; CUDA-event timing, L2 flushed before every timed call. CPU (Triton
interpreter): tiny sizes, a smoke run of the same code. Each case records bytes moved,
GB/s, % of the measured copy bandwidth and peak memory in ``benchmark.extra_info``.

Run: ``pytest benchmarks/bench_merge.py --benchmark-json out.json`` (or ``--benchmark-disable``).
"""
import functools

import pytest
import torch

from common import ON_CUDA, PROVIDERS, measure, measure_graph, peak_memory_bytes, peak_memory_reset, record
from sdtm_kernels import plan_idm, plan_ssm
from sdtm_kernels.reference import merge as ref

if ON_CUDA:
    SHAPES = [(2, (64, 64), 1536), (2, (128, 128), 1536)]  # (B, grid, C): N = 4096, 16384
    DTYPE = torch.bfloat16
    REPS = 50
else:
    SHAPES = [(1, (8, 8), 32)]
    DTYPE = torch.float32
    REPS = 3

OPS = ("merge", "unmerge", "unmerge_residual_gate")


@functools.lru_cache(maxsize=None)
def _plan(batch, grid, device):
    """~50% of the tokens removed: SSM (2x2 windows) on CUDA, IDM on the 8x8 CPU grid (where
    SSM's rounding to 16 windows would remove all or nothing)."""
    num_tokens = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(batch, num_tokens, 64, generator=gen).to(device)  # plans apply to any C
    if num_tokens >= 1024:
        return plan_ssm(metric, grid, num_tokens // 2)
    return plan_idm(metric, grid, num_tokens // 2)


def _case(op, batch, grid, channels, device):
    """The triton and reference callables for one op, plus bytes moved (ideal, unique bytes)."""
    plan = _plan(batch, grid, device)
    n, m = plan.num_tokens, plan.num_rows
    gen = torch.Generator().manual_seed(1)
    size = DTYPE.itemsize
    if op == "merge":
        x = torch.randn(batch, n, channels, generator=gen).to(device, DTYPE)
        triton_fn = functools.partial(plan.merge, x, backend="triton")
        ref_fn = functools.partial(ref.merge_mean, x, plan.row_of_token, m)
        bytes_moved = (n + m) * batch * channels * size + batch * (2 * n + m + 1) * 4
        return plan, triton_fn, ref_fn, bytes_moved
    y = torch.randn(batch, m, channels, generator=gen).to(device, DTYPE)
    if op == "unmerge":
        triton_fn = functools.partial(plan.unmerge, y, backend="triton")
        ref_fn = functools.partial(ref.unmerge, y, plan.row_of_token)
        bytes_moved = (m + n) * batch * channels * size + batch * n * 4
        return plan, triton_fn, ref_fn, bytes_moved
    residual = torch.randn(batch, n, channels, generator=gen).to(device, DTYPE)
    gate = torch.randn(batch, channels, generator=gen).to(device, DTYPE)
    triton_fn = functools.partial(plan.unmerge, y, residual=residual, gate=gate, backend="triton")
    ref_fn = functools.partial(ref.unmerge, y, plan.row_of_token, residual=residual, gate=gate)
    bytes_moved = (m + 2 * n) * batch * channels * size + batch * channels * size + batch * n * 4
    return plan, triton_fn, ref_fn, bytes_moved


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("batch,grid,channels", SHAPES, ids=lambda v: str(v))
def test_bench_merge(benchmark, op, provider, batch, grid, channels, device):
    plan, triton_fn, ref_fn, bytes_moved = _case(op, batch, grid, channels, device)
    if provider == "triton":
        fn = triton_fn
    elif provider == "reference":
        fn = ref_fn
    else:
        fn = torch.compile(ref_fn.func, fullgraph=True)
        fn = functools.partial(fn, *ref_fn.args, **ref_fn.keywords)
    expected = ref_fn()
    got = fn()
    # Same result as the reference (interpreter bf16 stores may differ by one rounding step).
    torch.testing.assert_close(got.float(), expected.float(), rtol=1.6e-2, atol=1.6e-2)

    peak_memory_reset(device)
    timing = measure(fn, device=device, reps=REPS)
    peak = peak_memory_bytes(device)
    graph = measure_graph(fn, device=device, reps=REPS) if ON_CUDA else {}  # CUDA-graph replay, CUDA only
    benchmark.pedantic(fn, rounds=REPS, iterations=1, warmup_rounds=1)
    info = record(
        benchmark, op=op, provider=provider, shape=(batch, plan.num_tokens, channels), dtype=DTYPE,
        bytes_moved=bytes_moved, timing=timing, device=device, peak_bytes=peak,
        num_rows=plan.num_rows, removed_fraction=plan.num_removed / plan.num_tokens,
        **graph,
    )
    assert info["gbps"] > 0
