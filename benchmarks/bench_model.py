"""One block and the whole model: unpatched vs SDTM per backend (SPEC 8, STYLE 14).

Per-op wins can vanish end to end, so this file times what a user runs. Models are built
by ``sdtm_kernels.bench.BenchModel`` with random weights (diffusers SD3 / PixArt when
installed, else the package's own DiT):

* CUDA: SD3-medium (24 joint blocks, C=1536) and PixArt-alpha (28 blocks, C=1152) at
  1024^2 (N=4096) and 2048^2 (N=16384) images, CFG batch 2, bf16.
* CPU: one tiny configuration (2 blocks, C=64, N=256) so that the suite runs in seconds.

Providers: ``unpatched``, ``sdtm-triton`` (the Triton kernels; on CPU in the interpreter, block
only) and ``sdtm-reference``. The SDTM cases run at an SSM step (step 1 of 50 with the
"released" preset: attention and MLP merge) and at an IDM step (step 22: MLP merges); the
state is advanced to that step by its step counter, and every timed call is another call of
the same step (no cached output to blend). Each case records the time (CUDA events, L2
flushed), the speedup vs unpatched, the FLOPs of the call (``sdtm_kernels.bench`` FLOP model,
from the tokens each sub-layer saw), TFLOP/s and the FLOP-bound speedup in ``extra_info``;
``bytes_moved`` is the weights read once plus the input and output activations (a lower
bound). On CUDA every case also tries a CUDA-graph capture and records the replay time (or
``graph_error`` when the call cannot be captured, e.g. a host read in a plan build).

Run: ``pytest benchmarks/bench_model.py --benchmark-json out.json`` (or ``--benchmark-disable``).
"""
import functools

import pytest
import torch

from common import ON_CUDA, measure, measure_graph, peak_memory_bytes, peak_memory_reset, record
from sdtm_kernels import bench as sb

if ON_CUDA:
    MODELS = [(size, px) for size in ("sd3-medium", "pixart-alpha") for px in (1024, 2048)]
    DTYPE = torch.bfloat16
    REPS = 10
    WARMUP = 2
else:
    MODELS = [("cpu-tiny", 256)]
    DTYPE = torch.float32
    REPS = 2
    WARMUP = 0

NUM_STEPS = 50
STEP_OF_MODE = {"ssm": 1, "idm": 22}  # released preset, 50 steps: switch at 20, steps % 3 == 0 protected
PROVIDERS = ("unpatched", "sdtm-triton", "sdtm-reference")


def _spec(size, px):
    if size == "cpu-tiny":
        family = "sd3" if sb.have_diffusers() else "dit"
        return sb.make_spec(family, layers=2, width=64, head_dim=32, latent=px // sb.VAE_FACTOR, text_len=8,
                            text_dim=32, pooled_dim=16)
    base = dict(sb.SIZES[size])
    family = base.pop("family")
    if not sb.have_diffusers():
        family = "dit"  # same widths and depth, the package's own DiT blocks
    return sb.make_spec(family, latent=px // sb.VAE_FACTOR, **base)


@functools.lru_cache(maxsize=1)  # one big model on the device at a time
def _model(size, px):
    return sb.BenchModel(_spec(size, px), "cuda" if ON_CUDA else "cpu", DTYPE, batch=1, seed=0)


def _blocks(bench_model):
    model = bench_model.model
    return model.blocks if bench_model.spec["family"] == "dit" else model.transformer_blocks


@functools.lru_cache(maxsize=1)
def _inputs(size, px):
    """Latent, timestep and the captured inputs of block 0 (from one unpatched call)."""
    bm = _model(size, px)
    gen = torch.Generator().manual_seed(1)
    spec = bm.spec
    latent = torch.randn(bm.model_batch, spec["in_channels"], spec["latent"], spec["latent"], generator=gen)
    latent = latent.to(bm.device, DTYPE)
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = _blocks(bm)[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        bm.forward(latent, _timestep(bm, STEP_OF_MODE["ssm"]))
    handle.remove()
    return latent, captured["call"]


def _timestep(bm, step):
    return torch.full((bm.model_batch,), 1000.0 * (1 - step / NUM_STEPS), device=bm.device, dtype=torch.float32)


def _advance(state, bm, step):
    """Move the state to ``step`` (one begin_call per step, no model call)."""
    for s in range(step + 1):
        state.begin_call(_timestep(bm, s), bm.spec["grid"], text_len=bm.spec["text_len"] or None)
        state.end_call()


def _case(scope, size, px, provider, mode):
    """(callable, state or None). SDTM providers leave the model patched until the next case."""
    bm = _model(size, px)
    latent, (block_args, block_kwargs) = _inputs(size, px)
    bm.unpatch()
    state = None
    if provider != "unpatched":
        backend = provider.split("-", 1)[1]
        state = bm.patch("released", backend, NUM_STEPS)
        _advance(state, bm, STEP_OF_MODE[mode])
    t = _timestep(bm, STEP_OF_MODE.get(mode, 1))
    if scope == "model":
        return (lambda: bm.forward(latent, t)), state
    block = _blocks(bm)[0]
    if state is not None:  # a block called on its own: the step is open, as inside a model call
        state.begin_call(t, bm.spec["grid"], text_len=bm.spec["text_len"] or None)
    return (lambda: block(*block_args, **block_kwargs)), state


def _call_flops(spec, scope, state):
    """FLOPs of the last call (one batch row), from the state's last records (N without SDTM)."""
    layers = 1 if scope == "block" else spec["layers"]
    if state is None or not state.stats:
        flops = sum(sb.block_flops(spec, layer) for layer in range(layers))
        return flops + (sb.call_overhead_flops(spec) if scope == "model" else 0), spec["num_tokens"]
    records = state.stats[-layers:]
    flops = sum(sb.block_flops(spec, r["layer"], r.get("attn"), r.get("mlp"), r.get("cross")) for r in records)
    tokens = sum(r.get("mlp", spec["num_tokens"]) for r in records) / len(records)
    return flops + (sb.call_overhead_flops(spec) if scope == "model" else 0), tokens


_UNPATCHED_MS = {}  # (scope, size, px, device) -> the unpatched case's own median


def _unpatched_ms(scope, size, px, device):
    """Median ms of the unpatched call, the baseline of every SDTM case's speedup: the unpatched
    case's own measurement when it ran (it runs first), so speedups agree with its median."""
    key = (scope, size, px, str(device))
    if key not in _UNPATCHED_MS:
        _UNPATCHED_MS[key] = _measure_unpatched(scope, size, px, device)
    return _UNPATCHED_MS[key]


def _measure_unpatched(scope, size, px, device):
    fn, _ = _case(scope, size, px, "unpatched", "full")
    with torch.no_grad():
        return measure(fn, device=device, reps=REPS, warmup=WARMUP + 1)["median_ms"]


def _cases():
    """(size, px, scope, provider, mode): unpatched once per scope (it does not depend on the
    step); on CPU the Triton interpreter runs one block only (the whole model takes minutes)."""
    out = []
    for size, px in MODELS:
        for scope in ("block", "model"):
            for provider in PROVIDERS:
                if provider == "sdtm-triton" and not ON_CUDA and scope == "model":
                    continue
                for mode in (("full",) if provider == "unpatched" else ("ssm", "idm")):
                    out.append(pytest.param(size, px, scope, provider, mode,
                                            id=f"{scope}-{size}-{px}px-{provider}-{mode}"))
    return out


@pytest.mark.parametrize("size,px,scope,provider,mode", _cases())
def test_bench_model(benchmark, scope, size, px, provider, mode, device):
    bm = _model(size, px)
    fn, state = _case(scope, size, px, provider, mode)
    with torch.no_grad():
        out = fn()
        flops, tokens = _call_flops(bm.spec, scope, state)
        if state is not None:
            records = state.stats[-1:]
            assert records and records[-1]["mode"] == mode  # the case runs the step it names
            assert tokens < bm.spec["num_tokens"]  # the MLP saw merged rows
        peak_memory_reset(device)
        timing = measure(fn, device=device, reps=REPS, warmup=WARMUP)  # fn ran once above
        peak = peak_memory_bytes(device)
        graph = {}
        if ON_CUDA and scope == "model" and state is not None:
            graph = {"graph_error": "not attempted: SDTMState.begin_call reads the timestep on the host per call"}
        elif ON_CUDA:
            graph = measure_graph(fn, device=device, reps=REPS)  # {"graph_error": ...} when not capturable
        benchmark.pedantic(fn, rounds=REPS, iterations=1, warmup_rounds=0)
    if provider == "unpatched":
        _UNPATCHED_MS[(scope, size, px, str(device))] = timing["median_ms"]
    base_ms = _unpatched_ms(scope, size, px, device)
    full_flops, _ = _call_flops(bm.spec, scope, None)
    weights = _blocks(bm)[0] if scope == "block" else bm.model
    weight_bytes = sum(p.numel() * p.element_size() for p in weights.parameters())
    act = out[0] if isinstance(out, tuple) else out
    act_bytes = 2 * act.numel() * act.element_size() if isinstance(act, torch.Tensor) else 0
    info = record(
        benchmark, op=f"{scope}:{size}", provider=provider, shape=(bm.model_batch, bm.spec["num_tokens"],
                                                                  bm.spec["width"]),
        dtype=DTYPE, bytes_moved=weight_bytes + act_bytes, timing=timing, device=device, peak_bytes=peak,
        flops=flops * bm.model_batch, mode=mode, image_px=px, family=bm.spec["family"],
        layers=1 if scope == "block" else bm.spec["layers"], mean_mlp_tokens=tokens,
        speedup=base_ms / timing["median_ms"], flop_bound_speedup=full_flops / flops, **graph,
    )
    assert info["tflops"] > 0 and info["flop_bound_speedup"] >= 1.0
