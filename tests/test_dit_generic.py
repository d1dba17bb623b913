"""The generic DiT wrapper on a block written like facebookresearch/DiT (no diffusers needed),
and the control flow of SPEC 3.5 checked on it."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdtm_kernels as sk
from sdtm_kernels.dit import (SDTMBlockWrapper, SDTMConfig, SDTMState, attach_state, run_merged,
                              unwrap_dit_blocks, wrap_dit_blocks)

GRID = (16, 16)
N = GRID[0] * GRID[1]
C = 32


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """facebookresearch/DiT models.py DiTBlock."""

    def __init__(self, hidden_size):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class TinyDiT(nn.Module):
    def __init__(self, depth=3, hidden=C):
        super().__init__()
        self.t_embed = nn.Linear(1, hidden)
        self.blocks = nn.ModuleList([DiTBlock(hidden) for _ in range(depth)])

    def forward(self, x, t):
        c = self.t_embed(t.float().reshape(-1, 1) / 1000)
        for block in self.blocks:
            x = block(x, c)
        return x


def dit_modulation(block, c):
    return block.adaLN_modulation(c).chunk(6, dim=1)


TIMESTEPS = [999, 800, 600, 400, 200]


def make(depth=3, seed=0, batch=2):
    torch.manual_seed(seed)
    model = TinyDiT(depth).eval()
    for block in model.blocks:  # non-trivial gates (DiT initialises them to zero)
        nn.init.normal_(block.adaLN_modulation[1].weight, std=0.5)
    x = torch.randn(batch, N, C)
    return model, x


def patch(model, num_steps=len(TIMESTEPS), **options):
    state = SDTMState(SDTMConfig(**options), num_steps=num_steps)
    wrap_dit_blocks(model.blocks, state, modulation=dit_modulation)
    handles = attach_state(model, state, grid=GRID, timestep="t")
    return state, handles


def run(model, x, timesteps=TIMESTEPS):
    with torch.no_grad():
        return [model(x, torch.full((x.shape[0],), t)) for t in timesteps]


def expected_rows(step, stage, num_steps, ratio, deviation, n=N, grid=GRID):
    """Rows after merging by SPEC 3.1-3.3 (2x2 windows)."""
    r_req = math.floor(n * sk.ratio_schedule(step, num_steps, ratio, deviation))
    windows = (grid[0] // 2) * (grid[1] // 2)
    if stage == "ssm":
        return n - 3 * min(r_req // 48 * 16, windows)
    return n - min(n - windows, r_req) // 16 * 16


def test_ratio_zero_reproduces_the_block_exactly():
    model, x = make()
    ref = run(model, x)
    patch(model, ratio=0.0, deviation=0.0, switch_step=1)
    for a, b in zip(ref, run(model, x)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_token_counts_follow_spec_3_5():
    model, x = make()
    ref = run(model, x)
    state, _ = patch(model, ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3)
    out = run(model, x)
    assert all(torch.isfinite(o).all() for o in out)
    assert not torch.allclose(out[1], ref[1], atol=1e-4)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)  # step 0 is protected: exact
    seen = {}
    for rec in state.stats:
        seen[(rec["step"], rec["layer"])] = (rec["mode"], rec["attn"], rec["mlp"])
    assert sorted(seen) == [(s, l) for s in range(5) for l in range(3)]
    for (step, layer), (mode, attn, mlp) in seen.items():
        if step % 3 == 0:
            assert (mode, attn, mlp) == ("protected", N, N)
        elif step <= 2:
            m = expected_rows(step, "ssm", 5, 0.5, 0.1)
            assert m < N and (mode, attn, mlp) == ("ssm", m, m)
        else:
            m = expected_rows(step, "idm", 5, 0.5, 0.1)
            assert m < N and (mode, attn, mlp) == ("idm", N, m)


def test_switch_step_fraction_and_layer_protection():
    model, x = make(depth=4)
    state, _ = patch(model, ratio=0.5, deviation=0.0, switch_step=0.4, protect_steps=None, protect_layers=2)
    run(model, x)  # 5 steps: fraction 0.4 -> last SSM step 2
    for rec in state.stats:
        if rec["layer"] in (0, 2, 3):  # l % 2 == 0 and the last layer
            assert (rec["mode"], rec["attn"], rec["mlp"]) == ("layer", N, N)
        else:
            assert rec["mode"] == ("ssm" if rec["step"] <= 2 else "idm")
            assert rec["mlp"] < N


def test_cache_is_gated_and_blended_after_the_gate():
    """mcw=0: tokens of merge groups take exactly the cached *gated* output of the protected step."""
    model, x = make(depth=1)
    block = model.blocks[0]
    with torch.no_grad():  # gate_mlp = 0, so the block output is x + (attention part)
        block.adaLN_modulation[1].weight[5 * C:] = 0
        block.adaLN_modulation[1].bias[5 * C:] = 0
    state, _ = patch(model, ratio=0.5, deviation=0.0, switch_step=1, protect_steps=3, mcw=0.0)
    state.keep_plans = True
    out = run(model, x, TIMESTEPS[:2])
    cache = state.cache[(0, 0, "attn")]
    torch.testing.assert_close(out[0] - x, cache, rtol=0, atol=1e-6)  # step 0: the gated attention output
    blend = state.stats[-1]["plan"].blend
    assert state.stats[-1]["mode"] == "ssm" and blend.any() and not blend.all()
    got = out[1] - x
    torch.testing.assert_close(got[blend], cache[blend], rtol=0, atol=1e-6)
    assert not torch.allclose(got[~blend], cache[~blend], atol=1e-3)


def test_mcw_matters_only_with_a_cache():
    outs = {}
    for protect in (3, None):
        for mcw in (1.0, 0.1):
            model, x = make()
            patch(model, ratio=0.5, deviation=0.0, switch_step=1, protect_steps=protect, mcw=mcw)
            outs[protect, mcw] = run(model, x, TIMESTEPS[:3])
    assert not torch.allclose(outs[3, 1.0][1], outs[3, 0.1][1], atol=1e-4)  # SSM step with cache
    assert not torch.allclose(outs[3, 1.0][2], outs[3, 0.1][2], atol=1e-4)  # IDM step with cache
    for a, b in zip(outs[None, 1.0], outs[None, 0.1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_steps_calls_generations_and_rng():
    model, x = make(batch=1)  # odd batch: random dst forced off
    state, _ = patch(model, ratio=0.5, deviation=0.0, switch_step=1)
    rng = torch.get_rng_state()
    with torch.no_grad():
        first = []
        for t in TIMESTEPS:  # two calls per step (e.g. split CFG) count one step
            first.append(model(x, torch.tensor([t])))
            model(x, torch.tensor([t]))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is never consumed
    assert [(r["step"], r["call"]) for r in state.stats if r["layer"] == 0] == [(s, c) for s in range(5) for c in (0, 1)]
    assert {k[0] for k in state.cache} == {0, 1}  # each pass has its own cache
    second = run(model, x)  # the first timestep again: a new generation, same result
    assert [r["step"] for r in state.stats if r["layer"] == 0] == list(range(5))
    for a, b in zip(first, second):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_unwrap_restores_and_no_step_context_runs_exactly():
    model, x = make()
    ref = run(model, x)
    state, handles = patch(model, ratio=0.5, deviation=0.0)
    with torch.no_grad():
        c = model.t_embed(torch.full((2, 1), 0.5))
        block = model.blocks[0]
        assert isinstance(block, SDTMBlockWrapper)
        torch.testing.assert_close(block(x, c), block.block(x, c), rtol=0, atol=0)  # no begin_call: exact
    for h in handles:
        h.remove()
    unwrap_dit_blocks(model.blocks)
    assert all(type(b) is DiTBlock for b in model.blocks)
    for a, b in zip(ref, run(model, x)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_wrapper_rejects_missing_submodules():
    with pytest.raises(TypeError, match="attn='to_q'"):
        SDTMBlockWrapper(DiTBlock(8), None, 0, modulation=dit_modulation, attn="to_q")


def test_triton_backend_matches_reference():
    outs = {}
    for backend in ("reference", "triton"):
        model, x = make(depth=1)
        patch(model, ratio=0.5, deviation=0.1, switch_step=1, backend=backend, seed=3)
        outs[backend] = run(model, x, TIMESTEPS[:3])  # protected, SSM, IDM
    for a, b in zip(outs["reference"], outs["triton"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_merged_sublayer_compiles_without_graph_breaks():
    model, x = make(depth=1)
    block = model.blocks[0]
    metric = torch.randn(2, N, C)
    plan = sk.plan_ssm(metric, GRID, 128)
    gate, cache = torch.randn(2, C), torch.randn(2, N, C)

    def sublayer(x, inp, gate, cache):
        return run_merged(plan, block.mlp, inp, x, gate=gate, cache=cache, mcw=0.1)

    compiled = torch.compile(sublayer, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, metric, gate, cache), sublayer(x, metric, gate, cache))
        torch.testing.assert_close(compiled(x, metric, gate, None), sublayer(x, metric, gate, None))


def test_generic_wrapper_runs_without_diffusers(tmp_path):
    code = textwrap.dedent("""
        import sys
        sys.modules["diffusers"] = None  # any import of diffusers fails
        import torch, sdtm_kernels as sk
        from sdtm_kernels.dit import SDTMBlockWrapper, SDTMConfig, SDTMState
        block = torch.nn.Module()
        block.norm1 = torch.nn.LayerNorm(8); block.norm2 = torch.nn.LayerNorm(8)
        block.attn = torch.nn.Linear(8, 8); block.mlp = torch.nn.Linear(8, 8)
        state = SDTMState(SDTMConfig(ratio=0.8, deviation=0.0, protect_steps=None), num_steps=4)
        w = SDTMBlockWrapper(block, state, 0, modulation=lambda b, c: [c] * 6)
        state.begin_call(999, (8, 8))
        out = w(torch.randn(2, 64, 8), torch.randn(2, 8))
        try:
            sk.apply_sdtm(torch.nn.Linear(2, 2), num_steps=4)
        except TypeError as e:
            print("TypeError")
        print(tuple(out.shape), state.stats[0]["attn"], "diffusers" in sys.modules and sys.modules["diffusers"] is not None)
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["TypeError", "(2, 64, 8) 16 False"]
