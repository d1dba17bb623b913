"""The generic path against a fused family on the same block (docs/SEMANTICS.md, "Other DiTs").

PixArt's ``BasicTransformerBlock`` runs three ways: ``unpatched``, ``fused`` (its SDTM forward,
``sdtm_kernels.dit.basic``: the unmerge applies gate, residual and cache blend in one pass) and
``generic`` (the same block described with ``describe_block(BasicTransformerBlock, attn="attn1",
cross="attn2", ff="ff")``: the block's own forward with merges and unmerges around its
sub-modules, the gate and residual applied by the block at full length). Cases: an SSM step
(attention and MLP merge) and an IDM step (MLP), each a call of the same step after the protected
step, so merged sub-layers blend their caches.

* CUDA: a PixArt-alpha block (C=1152, 16 heads of 72) at 1024^2 (N=4096) and 2048^2 (N=16384),
  CFG batch 2, 120 prompt tokens, bf16, Triton kernels.
* CPU: one tiny block (C=64, N=256), reference backend: a smoke run of the same code.

``extra_info``: time, speedup vs unpatched, ``generic_vs_fused`` (fused time / generic time of the
same case), the launches of one block call (``sdtm_kernels.bench.launches``) and the tokens each
sub-layer saw. Run: ``pytest benchmarks/bench_describe.py --benchmark-json out.json``.
"""
import functools

import pytest
import torch

from common import ON_CUDA, measure, measure_graph, peak_memory_bytes, peak_memory_reset, record
from sdtm_kernels import bench as sb

pytest.importorskip("diffusers")

from diffusers.models.attention import BasicTransformerBlock  # noqa: E402
from sdtm_kernels.bench.launches import count_launches, total  # noqa: E402
from sdtm_kernels.dit import describe_block, forget_block  # noqa: E402

if ON_CUDA:
    SIZES = [(1152, 72, 128, 120, 4096), (1152, 72, 256, 120, 4096)]  # width, head_dim, latent, text_len, text_dim
    DTYPE = torch.bfloat16
    REPS, WARMUP = 20, 3
else:
    SIZES = [(64, 32, 32, 8, 32)]
    DTYPE = torch.float32
    REPS, WARMUP = 3, 1

NUM_STEPS = 50
STEP_OF_MODE = {"ssm": 1, "idm": 22}  # released preset, 50 steps: switch at 20, steps % 3 == 0 protected
PATHS = ("unpatched", "fused", "generic")


@functools.lru_cache(maxsize=1)  # one model on the device at a time
def _model(width, head_dim, latent, text_len, text_dim):
    spec = sb.make_spec("pixart", layers=1, width=width, head_dim=head_dim, latent=latent, in_channels=4,
                        text_len=text_len, text_dim=text_dim, pooled_dim=0)
    bm = sb.BenchModel(spec, "cuda" if ON_CUDA else "cpu", DTYPE, batch=1, seed=0)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(bm.model_batch, 4, latent, latent, generator=gen).to(bm.device, DTYPE)
    captured = {}
    block = bm.model.transformer_blocks[0]
    handle = block.register_forward_pre_hook(lambda m, a, k: captured.setdefault("call", (a, k)), with_kwargs=True)
    with torch.no_grad():
        bm.forward(noise, _timestep(bm, 0))
    handle.remove()
    return bm, captured["call"]


def _timestep(bm, step):
    return torch.full((bm.model_batch,), 1000.0 * (1 - step / NUM_STEPS), device=bm.device, dtype=torch.float32)


def _patch(bm, call, path, step):
    """Patch for ``path`` and open a call of ``step`` after running the protected step before it
    (its caches written); returns the state (None unpatched)."""
    bm.unpatch()
    forget_block(BasicTransformerBlock)
    if path == "unpatched":
        return None
    if path == "generic":
        describe_block(BasicTransformerBlock, attn="attn1", cross="attn2", ff="ff")
    state = bm.patch("released", None, NUM_STEPS)
    (args, kwargs), block = call, bm.model.transformer_blocks[0]
    grid, text_len = bm.spec["grid"], bm.spec["text_len"]
    with torch.no_grad():
        for s in range(step + 1):
            state.begin_call(_timestep(bm, s), grid, text_len=text_len, batch=bm.model_batch, device=bm.device)
            if s == step - step % 3:  # the last protected step: the block stores its caches
                block(*args, **kwargs)
            if s < step:
                state.end_call()
    return state


def _cases():
    out = []
    for size in SIZES:
        for path in PATHS:
            for mode in (("full",) if path == "unpatched" else ("ssm", "idm")):
                out.append(pytest.param(size, path, mode, id=f"pixart-block-C{size[0]}-{size[2] * 8}px-{path}-{mode}"))
    return out


_UNPATCHED_MS, _FUSED_MS = {}, {}


@pytest.mark.parametrize("size,path,mode", _cases())
def test_bench_describe(benchmark, size, path, mode, device):
    bm, (args, kwargs) = _model(*size)
    state = _patch(bm, (args, kwargs), path, STEP_OF_MODE.get(mode, 1))
    block = bm.model.transformer_blocks[0]
    fn = functools.partial(block, *args, **kwargs)
    try:
        with torch.no_grad():
            fn()
            last = dict(state.stats[-1]) if state is not None else {}
            if state is not None:
                assert last["mode"] == mode and last["mlp"] < bm.spec["num_tokens"]  # the case runs its step
            _, launches = count_launches(fn)
            peak_memory_reset(device)
            timing = measure(fn, device=device, reps=REPS, warmup=WARMUP)
            peak = peak_memory_bytes(device)
            graph = measure_graph(fn, device=device, reps=REPS) if ON_CUDA else {}
            benchmark.pedantic(fn, rounds=REPS, iterations=1, warmup_rounds=0)
    finally:
        bm.unpatch()
        forget_block(BasicTransformerBlock)
    key = (size, mode)
    if path == "unpatched":
        _UNPATCHED_MS[size] = timing["median_ms"]
    if path == "fused":
        _FUSED_MS[key] = timing["median_ms"]
    n, c = bm.spec["num_tokens"], bm.spec["width"]
    act_bytes = 2 * bm.model_batch * n * c * DTYPE.itemsize
    weight_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    extra = {}
    if size in _UNPATCHED_MS:
        extra["speedup"] = _UNPATCHED_MS[size] / timing["median_ms"]
    if path == "generic" and key in _FUSED_MS:
        extra["generic_vs_fused"] = _FUSED_MS[key] / timing["median_ms"]
    record(benchmark, op="block:pixart-describe", provider=path, shape=(bm.model_batch, n, c), dtype=DTYPE,
           bytes_moved=weight_bytes + act_bytes, timing=timing, device=device, peak_bytes=peak, mode=mode,
           launches=total(launches), attn_tokens=last.get("attn", n), mlp_tokens=last.get("mlp", n),
           cross_tokens=last.get("cross", n), **graph, **extra)
