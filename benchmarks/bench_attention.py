"""attention_received: the two-pass Triton kernel vs the explicit-softmax reference (SPEC 7).

CUDA: SD3-medium joint attention at 1024^2 (B=2 CFG, H=24, D=64, 154 prompt queries, N=4096
image keys + 154 prompt keys, bf16) and Flux-like 512-token prompts. CPU (Triton interpreter):
one tiny size, a smoke run of the same code. Each case records TFLOP/s (the kernel does the
Q K^T product twice: 4 * B * H * Tq * Tk * D FLOPs), GB/s (q and k read once), peak memory,
and the accuracy of the statistic (``max_rel_error`` vs a float64 softmax) in ``extra_info``.

Run: ``pytest benchmarks/bench_attention.py --benchmark-json out.json`` (or ``--benchmark-disable``).
"""
import functools

import pytest
import torch

from common import ON_CUDA, PROVIDERS, measure, measure_graph, peak_memory_bytes, peak_memory_reset, record
from sdtm_kernels import ops
from sdtm_kernels.reference import attention as ref

if ON_CUDA:
    SHAPES = [(2, 24, 154, 4096 + 154, 64), (2, 24, 512, 4096 + 512, 128)]  # (B, H, Tq, Tk, D)
    DTYPE = torch.bfloat16
    REPS = 30
else:
    SHAPES = [(1, 2, 13, 80, 16)]
    DTYPE = torch.float32
    REPS = 2


@functools.lru_cache(maxsize=None)
def _inputs(batch, heads, tq, tk, dim, device):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, tq, dim, generator=gen).to(device, DTYPE)
    k = torch.randn(batch, heads, tk, dim, generator=gen).to(device, DTYPE)
    return q, k


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch,heads,tq,tk,dim", SHAPES, ids=lambda v: str(v))
def test_bench_attention_received(benchmark, provider, batch, heads, tq, tk, dim, device):
    q, k = _inputs(batch, heads, tq, tk, dim, device)
    key_slice = (0, tk - tq)  # SD3 layout: image keys first, then the prompt keys
    if provider == "triton":
        fn = functools.partial(ops.attention_received, q, k, key_slice=key_slice, backend="triton")
    elif provider == "reference":
        fn = functools.partial(ref.attention_received, q, k, key_slice, upcast=False)
    else:
        compiled = torch.compile(ref.attention_received)
        fn = functools.partial(compiled, q, k, key_slice, upcast=False)
    got = fn()
    exact = ref.attention_received(q, k, key_slice)  # float64 softmax of the same inputs
    max_rel_error = ((got - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
    assert max_rel_error < 1e-3

    peak_memory_reset(device)
    timing = measure(fn, device=device, reps=REPS, warmup=1 if not ON_CUDA else 3)
    peak = peak_memory_bytes(device)
    graph = measure_graph(fn, device=device, reps=REPS) if ON_CUDA else {}
    benchmark.pedantic(fn, rounds=REPS, iterations=1, warmup_rounds=1)
    bytes_moved = (q.numel() + k.numel()) * q.element_size() + batch * (key_slice[1] - key_slice[0]) * 4
    info = record(
        benchmark, op="attention_received", provider=provider, shape=(batch, heads, tq, tk, dim), dtype=DTYPE,
        bytes_moved=bytes_moved, timing=timing, device=device, peak_bytes=peak,
        flops=4 * batch * heads * tq * tk * dim, max_rel_error=max_rel_error,
        attention_matrix_bytes=batch * heads * tq * tk * 4, **graph,
    )
    assert info["gbps"] > 0
