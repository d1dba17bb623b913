"""SDTM under ``torch.compile``: whole generations compile to a few graphs, with no recompile-limit
hit, no skipped frame and no new graph in a second generation (docs/SEMANTICS.md, "Compiled models").

* whole model (``model.compile()``): the only graph breaks are the transformer hook's per-call
  bookkeeping (``begin_call`` / ``end_call``, kept in Python on purpose: 2 sites); the blocks see
  one graph per step kind;
* regional (every patched block ``compile(fullgraph=True)``, as ``compile_repeated_blocks`` does):
  no break at all (``fullgraph``), one graph per block type and step kind.

``fail_on_recompile_limit_hit`` turns a limit hit into an error. A 12-step generation at the default
settings (released preset, ``ratio_levels=3``) has a protected kind and up to 3 structure and 3 detail
levels. The plans are built with the reference backend here (plain torch ops, fast to trace); one
test compiles the Triton path (custom ops); SD3 compiles with inductor, Flux and PixArt with aot_eager
(inductor for all three passes too, but its cold CPU compile costs about 45 s per family).
"""
import pytest
import torch

pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.dit import get_state  # noqa: E402
from sdtm_kernels.dit.patch import _patched_blocks, graphs_per_block  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from test_dit_diffusers import build  # noqa: E402

STEPS = 5
TIMESTEPS = [1000.0 - 1000.0 * i / STEPS for i in range(STEPS)]


def compile_model(model, how, backend):
    if how == "whole":
        model.compile(backend=backend)
    elif getattr(model, "_repeated_blocks", None):  # Flux: diffusers' regional compilation
        model.compile_repeated_blocks(backend=backend, fullgraph=True)
    else:
        for block in _patched_blocks(model):
            block.compile(backend=backend, fullgraph=True)


def compiled_generations(name, how, backend="eager", sdtm_backend="reference", timesteps=TIMESTEPS, second=True,
                         layers=2, **options):
    model, run = build(name, layers=layers)
    sk.apply_sdtm(model, num_steps=len(timesteps), backend=sdtm_backend, **options)
    eager = run(timesteps)
    eager_stats = [dict(r) for r in get_state(model).stats]
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            compile_model(model, how, backend)
            first = run(timesteps)
            graphs = counters["stats"]["unique_graphs"]
            compiled_stats = [dict(r) for r in get_state(model).stats]
            second = run(timesteps) if second else first
            new_graphs = counters["stats"]["unique_graphs"] - graphs
            breaks = [str(reason) for reason in counters["graph_break"]]
    finally:
        torch._dynamo.reset()
    return dict(model=model, eager=eager, first=first, second=second, graphs=graphs, new_graphs=new_graphs,
                breaks=breaks, eager_stats=eager_stats, compiled_stats=compiled_stats)


def kinds(stats):
    return {(r["mode"], r.get("attn"), r.get("mlp")) for r in stats}


@pytest.mark.parametrize("name", ["sd3", "flux", "pixart"])
@pytest.mark.parametrize("how", ["whole", "regional"])
def test_generations_compile_to_a_few_graphs(name, how):
    res = compiled_generations(name, how)
    state = get_state(res["model"])
    per_block = graphs_per_block(state.config)
    merged = kinds(res["eager_stats"]) - {("protected", 256, 256)}
    assert {m for m, _, _ in merged} == {"ssm", "idm"}  # the generation merges in both stages
    assert res["new_graphs"] == 0  # a second generation at the same resolution: no new graph
    if how == "whole":
        # the transformer's graphs: one per step kind (+ the hook's resume frames)
        assert res["graphs"] <= per_block + 2, res["graphs"]
        assert len(res["breaks"]) <= 2 and all("SDTMTransformerHook" in b for b in res["breaks"]), res["breaks"]
    else:
        types = len({type(b) for b in _patched_blocks(res["model"])})
        assert res["graphs"] <= 2 * types * per_block, res["graphs"]
        assert not res["breaks"]
    # the compiled blocks' statistics are collected by end_call: the same records as eager
    assert kinds(res["compiled_stats"]) == kinds(res["eager_stats"])
    assert len(res["compiled_stats"]) == len(res["eager_stats"])
    for a, b, c in zip(res["eager"], res["first"], res["second"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_triton_path_compiles_whole_generations():
    """The Triton plan builds and merges as custom ops inside the graph (no break, no opaque call)."""
    res = compiled_generations("sd3", "whole", sdtm_backend="triton", timesteps=[999.0, 600.0, 200.0], second=False,
                               layers=1)
    assert len(res["breaks"]) <= 2 and all("SDTMTransformerHook" in b for b in res["breaks"]), res["breaks"]
    assert not any("Generator" in b or "Opaque" in b for b in res["breaks"])
    for a, b in zip(res["eager"], res["first"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# inductor's CPU code generation compiles C++ (about 45 s per family with a cold cache): CI runs it
# for SD3; Flux and PixArt go through the same AOT pipeline without code generation (aot_eager).
@pytest.mark.parametrize("name, how, backend", [("sd3", "whole", "inductor"), ("flux", "regional", "aot_eager"),
                                                ("pixart", "regional", "aot_eager")])
def test_inductor_and_aot_generations(name, how, backend):
    res = compiled_generations(name, how, backend=backend, timesteps=[999.0, 600.0, 200.0], layers=1)
    state = get_state(res["model"])
    types = len({type(b) for b in _patched_blocks(res["model"])})
    assert res["new_graphs"] == 0
    if how == "whole":
        assert len(res["breaks"]) <= 2 and res["graphs"] <= graphs_per_block(state.config) + 2
    else:
        assert not res["breaks"] and res["graphs"] <= 2 * types * graphs_per_block(state.config)
    for a, b in zip(res["eager"], res["first"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_buffers_keep_their_storage_across_steps():
    """CUDA-graph readiness: li, the step's draws and (after a compiled protected step) the caches
    are static buffers updated in place, so a captured graph reads and writes the same memory."""
    model, run = build("sd3", layers=2)
    sk.apply_sdtm(model, num_steps=STEPS, backend="reference")
    state = get_state(model)
    torch._dynamo.reset()
    try:
        compile_model(model, "whole", "eager")
        run(TIMESTEPS)

        def pointers():
            return ({call: buf.data_ptr() for call, buf in state._li_buffers.items()},
                    state._draw_buffer.data_ptr(), {key: v.data_ptr() for key, v in state.cache.items()})

        before = pointers()
        assert before[0] and before[2]
        run(TIMESTEPS)
        assert pointers() == before
    finally:
        torch._dynamo.reset()


def test_protect_layers_and_min_saving_stay_bounded():
    res = compiled_generations("sd3", "regional", protect_layers=2, min_saving=0.03, ratio=0.6)
    state = get_state(res["model"])
    types = len({type(b) for b in _patched_blocks(res["model"])})
    assert res["new_graphs"] == 0 and not res["breaks"]
    assert res["graphs"] <= 2 * types * graphs_per_block(state.config)
