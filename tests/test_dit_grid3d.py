"""The DiT state on a ``(T, H, W)`` token grid: the window ``(wh, ww)`` becomes ``(1, wh, ww)`` (windows
inside each frame), the step's plans are the planners' 3-D plans, and the FLOP rule counts 3-D windows."""
import math

import torch

import sdtm_kernels as sk
from sdtm_kernels.dit.config import make_config
from sdtm_kernels.dit.core import block_context
from sdtm_kernels.dit.state import SDTMState
from sdtm_kernels.reference import schedule as ref_schedule

GRID = (2, 8, 6)
N = math.prod(GRID)


def drive(config, metric, timesteps, grid=GRID):
    state = SDTMState(config, num_layers=1)
    contexts = []
    for t in timesteps:
        state.begin_call(float(t), grid, batch=metric.shape[0], device=metric.device)
        contexts.append(block_context(state, 0, metric))
        state.end_call()
    return state, contexts


def test_state_plans_on_a_3d_grid_equal_the_planners():
    torch.manual_seed(0)
    metric = torch.randn(2, N, 16)
    config = make_config(ratio=0.5, deviation=0.1, switch_step=1, protect_steps=3, num_steps=3, random_dst=False,
                         backend="reference", ratio_levels=0)
    state, (protected, ssm, idm) = drive(config, metric, [999, 600, 200])
    assert state.window == (1, 2, 2)
    assert (protected.mode, ssm.mode, idm.mode) == ("protected", "ssm", "idm")
    li = torch.zeros(2, N, dtype=torch.int32)
    n_ssm = math.floor(N * sk.ratio_schedule(1, 3, 0.5, 0.1))
    want = sk.plan_ssm(metric, GRID, n_ssm, window=(1, 2, 2), li=li, a_s=config.a_s, backend="reference")
    assert ssm.plan.num_rows == N - ref_schedule.tokens_removed("ssm", n_ssm, GRID, (1, 2, 2)) < N
    assert torch.equal(ssm.plan.row_of_token, want.row_of_token)
    n_idm = math.floor(N * sk.ratio_schedule(2, 3, 0.5, 0.1))
    want = sk.plan_idm(metric, GRID, n_idm, window=(1, 2, 2), li=want.li_next, backend="reference")
    assert torch.equal(idm.plan.row_of_token, want.row_of_token)


def test_a_3d_window_across_frames_and_the_flop_rule():
    grid = (2, 16, 16)
    n = math.prod(grid)
    metric = torch.randn(2, n, 16)
    config = make_config(ratio=0.5, deviation=0.1, switch_step=1, protect_steps=3, num_steps=3, window=(2, 2, 2),
                         backend="reference", ratio_levels=0)
    state, (_, ssm, _) = drive(config, metric, [999, 600, 200], grid=grid)
    n_remove = math.floor(n * sk.ratio_schedule(1, 3, 0.5, 0.1))
    removed = ref_schedule.tokens_removed("ssm", n_remove, grid, (2, 2, 2))
    assert removed > 0 and ssm.plan.num_rows == n - removed
    rows = ssm.plan.row_of_token
    assert (rows[:, :256].unsqueeze(-1) == rows[:, 256:].unsqueeze(1)).any()  # a row spans both frames
    state.step, state.removal, N = 1, n_remove, n
    c = 16
    saving = state.block_saving("ssm", N, c)
    full = 24 * N * c * c + 4 * N * N * c
    kept = N - removed
    assert saving == (full - (24 * kept * c * c + 4 * kept * kept * c)) / full
