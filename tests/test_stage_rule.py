"""``min_saving``: a merged block that would save less than this fraction of a block's FLOPs
runs exactly instead (its plan would cost more than it saves). On by default in the "fast"
preset (3%), off in "released" (faithful to the release)."""
import pytest
import torch

from sdtm_kernels.dit import SDTMConfig
from sdtm_kernels.dit.config import make_config
from sdtm_kernels.dit.state import SDTMState

from test_dit_generic import C, GRID, N, TIMESTEPS, make, patch, run


def _flops(n, c=C):
    return 24 * n * c * c + 4 * n * n * c


def test_block_saving_by_hand():
    state = SDTMState(SDTMConfig(ratio=0.3, deviation=0.2, switch_step=1, protect_steps=None), num_steps=5)
    state.begin_call(999.0, GRID)
    # step 0 (SSM): rho = 0.5 -> 128 requested -> R = 128 // 48 * 16 = 32 windows -> 96 tokens removed
    assert state.block_saving("ssm", N, C) == pytest.approx((_flops(N) - _flops(N - 96)) / _flops(N))
    # IDM at the same step: min(N - G, 128) // 16 * 16 = 128 candidates merged, MLP only
    assert state.block_saving("idm", N, C) == pytest.approx(16 * 128 * C * C / _flops(N))


def test_unprofitable_stage_runs_exactly():
    model, x = make(depth=2)
    exact = run(model, x)
    # The IDM steps of this schedule save at most about 11% of a block: 0.2 skips them, the SSM
    # steps (about 51%) still merge.
    state, handles = patch(model, ratio=0.3, deviation=0.2, switch_step=1, protect_steps=None, min_saving=0.2)
    out = run(model, x)
    modes = {(r["step"], r["mode"]) for r in state.stats}
    assert {m for s, m in modes if s <= 1} == {"ssm"} and {m for s, m in modes if s > 1} == {"skip"}
    assert all(r["attn"] == r["mlp"] == N for r in state.stats if r["mode"] == "skip")
    assert all(r["mlp"] < N for r in state.stats if r["mode"] == "ssm")
    for step in range(2, len(TIMESTEPS)):  # a skipped step is the exact model (same input every call)
        assert torch.equal(out[step], exact[step])
    assert not torch.equal(out[0], exact[0])
    for handle in handles:
        handle.remove()


def test_presets():
    assert make_config("fast").min_saving == 0.03
    assert make_config("released").min_saving == 0.0 == SDTMConfig().min_saving
    assert make_config("fast", min_saving=0.0).min_saving == 0.0
    with pytest.raises(ValueError, match="min_saving"):
        SDTMConfig(min_saving=1.0)
    with pytest.raises(TypeError, match="min_saving"):
        SDTMConfig(min_saving="a lot")
