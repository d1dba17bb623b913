"""Hand-worked checks of every rule of SPEC section 3 on small grids with constructed
similarities. Each test would fail if its rule were broken."""
import math

import pytest
import torch

import sdtm_kernels as sk
from sdtm_kernels import ops
from sdtm_kernels.reference import window_token_index

E = torch.eye(8)  # basis vectors: cosines of 0 or exactly 1


def tokens_of_window(grid, window, g):
    return window_token_index(grid, window)[g].tolist()


def rows_of(plan, b=0):
    """Rows as sorted token lists, via the CSR fields."""
    starts = plan.row_start[b].tolist()
    members = plan.members[b].tolist()
    return [members[starts[m]:starts[m + 1]] for m in range(plan.num_rows)]


# --- 3.1 ratio schedule -------------------------------------------------------------------
def test_ratio_schedule_cosine_curve():
    assert sk.ratio_schedule(0, 50, 0.3, 0.2) == pytest.approx(0.5)
    assert sk.ratio_schedule(49, 50, 0.3, 0.2) == pytest.approx(0.1)
    mid = 0.1 + 0.4 * math.cos(0.5 * math.pi / 2)
    assert sk.ratio_schedule(1, 3, 0.3, 0.2) == pytest.approx(mid)
    assert sk.ratio_schedule(0, 1, 0.3, 0.2) == pytest.approx(0.5)  # progress 0 for one step


# --- 2 / 3.2 window layout ---------------------------------------------------------------
def test_windows_on_non_square_non_divisible_grid():
    # 5x7 grid, 2x2 windows: a 2x3 window grid; row 4 and column 6 belong to no window.
    index = window_token_index((5, 7), (2, 2))
    assert index.tolist() == [
        [0, 1, 7, 8], [2, 3, 9, 10], [4, 5, 11, 12],
        [14, 15, 21, 22], [16, 17, 23, 24], [18, 19, 25, 26],
    ]
    assert window_token_index((4, 6), (2, 3)).tolist() == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11],
                                                          [12, 13, 14, 18, 19, 20], [15, 16, 17, 21, 22, 23]]


# --- 3.2 step 1: window similarity ----------------------------------------------------------
def _metric_with_windows(window_vectors, grid=(2, 4)):
    """A metric whose 2x2 windows hold the given 4 vectors each (raster order inside)."""
    metric = torch.zeros(1, grid[0] * grid[1], 2)
    index = window_token_index(grid, (2, 2))
    for g, vectors in enumerate(window_vectors):
        metric[0, index[g]] = torch.tensor(vectors, dtype=torch.float32)
    return metric


@pytest.mark.parametrize("score, expected", [
    # identical | a,a,b,b orthogonal | a,a,a,0 | a,-a,a,-a
    ("released", [1.0, 8 / 16, 9 / 16, 0.0]),
    ("paper", [1.0, 4 / 12, 6 / 12, -4 / 12]),
])
def test_window_score_diagonal_inclusive_and_paper_mean(score, expected):
    a, b, z = [1.0, 0.0], [0.0, 3.0], [0.0, 0.0]
    neg = [-2.0, 0.0]
    metric = _metric_with_windows([[a, a, a, a], [a, a, b, b], [a, a, a, z], [a, neg, a, neg]], grid=(2, 8))
    got = ops.window_scores(metric, (2, 8), score=score)
    torch.testing.assert_close(got, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_window_score_priority_bonus():
    a = [1.0, 0.0]
    metric = _metric_with_windows([[a, a, a, a], [a, a, a, a]])
    li = torch.tensor([[4, 0, 4, 0, 0, 0, 0, 0]], dtype=torch.int32)  # window 0 = tokens 0,1,4,5
    mean_li = 1.0
    expected_bonus = torch.tensor([[(4 + 0 + 0 + 0) / 4 / (mean_li + 1e-6), (0 + 4 + 0 + 0) / 4 / (mean_li + 1e-6)]])
    got = ops.window_scores(metric, (2, 4), li=li, a_s=0.05)
    torch.testing.assert_close(got, 1.0 + 0.05 * expected_bonus)


# --- 3.2 steps 3-6: SSM selection, rounding, clamp, ties, rows ----------------------------
def _ssm_metric(num_windows_high, grid=(16, 8)):
    """Windows 0..num_windows_high-1 hold identical tokens (score 1); the rest hold four
    orthogonal tokens (score 1/4)."""
    index = window_token_index(grid, (2, 2))
    metric = torch.zeros(1, grid[0] * grid[1], 8)
    for g in range(index.shape[0]):
        metric[0, index[g]] = E[0].expand(4, 8) if g < num_windows_high else E[:4] * 2
    return metric


@pytest.mark.parametrize("n_remove, windows_merged", [(0, 0), (47, 0), (48, 16), (95, 16), (96, 32), (10_000, 32)])
def test_ssm_rounding_to_multiples_of_48_and_clamp(n_remove, windows_merged):
    metric = _ssm_metric(0)  # 16x8 grid: G = 32 windows
    plan = sk.plan_ssm(metric, (16, 8), n_remove)
    assert plan.num_removed == 3 * windows_merged
    assert plan.num_rows == 128 - 3 * windows_merged


def test_ssm_clamps_windows_to_grid():
    metric = torch.randn(2, 36, 4)  # 6x6: G = 9 < 16
    plan = sk.plan_ssm(metric, (6, 6), 48)
    assert plan.num_removed == 27 and plan.num_rows == 9


def test_ssm_general_window_rounding():
    # 3x2 windows (K = 6): multiples of (K-1)*16 = 80 requested tokens per 16 windows.
    metric = torch.randn(1, 12 * 8 * 4, 4)  # grid 12x32 -> G = 4*16 = 64
    assert sk.plan_ssm(metric, (12, 32), 79, window=(3, 2)).num_removed == 0
    assert sk.plan_ssm(metric, (12, 32), 80, window=(3, 2)).num_removed == 80
    assert sk.plan_ssm(metric, (12, 32), 160, window=(3, 2)).num_removed == 160


def test_ssm_selects_best_windows_with_ties_to_lower_index():
    # 20 windows tie at score 1: the 16 lowest-index ones are collapsed.
    metric = _ssm_metric(20)
    plan = sk.plan_ssm(metric, (16, 8), 48)
    index = window_token_index((16, 8), (2, 2))
    groups = [row for row in rows_of(plan) if len(row) > 1]
    assert sorted(groups) == sorted(sorted(index[g].tolist()) for g in range(16))
    # the blend set is every token of a selected window, nothing else
    expected_blend = torch.zeros(128, dtype=torch.bool)
    expected_blend[index[:16].flatten()] = True
    assert torch.equal(plan.blend[0], expected_blend)


def test_ssm_priority_bonus_breaks_ties():
    metric = _ssm_metric(20)
    li = torch.zeros(1, 128, dtype=torch.int32)
    index = window_token_index((16, 8), (2, 2))
    li[0, index[19]] = 5  # window 19 gets a bonus and beats the tied windows 0..15
    plan = sk.plan_ssm(metric, (16, 8), 48, li=li)
    groups = {tuple(row) for row in rows_of(plan) if len(row) > 1}
    assert tuple(sorted(index[19].tolist())) in groups
    assert tuple(sorted(index[15].tolist())) not in groups


def test_ssm_rows_are_window_means_and_order_is_by_lowest_token():
    x = torch.arange(16, dtype=torch.float32).view(1, 16, 1)
    metric = torch.ones(1, 16, 2)  # every window scores 1; 4x4 grid: G = 4 <= 16 -> all merge
    plan = sk.plan_ssm(metric, (4, 4), 48)
    assert rows_of(plan) == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    merged = plan.merge(x)
    assert merged.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert plan.rep_token[0].tolist() == [0, 2, 8, 10]  # position 0 without randomness
    assert torch.equal(plan.unmerge(merged)[0, :, 0], merged[0, plan.row_of_token[0].long(), 0])


def test_ssm_random_dst_is_one_draw_of_shape_B_R_in_window_order():
    metric = torch.ones(2, 16, 2)
    plan = sk.plan_ssm(metric, (4, 4), 48, random_dst=True, generator=torch.Generator().manual_seed(7))
    draw = torch.randint(4, (2, 4), generator=torch.Generator().manual_seed(7))
    index = window_token_index((4, 4), (2, 2))
    expected = index.gather(1, draw.T).T  # [B, R]: window g's token at the drawn position
    assert torch.equal(plan.rep_token.long(), expected)
    pruned = plan.merge(torch.arange(16.0).view(1, 16, 1).repeat(2, 1, 1), mode="prune")
    assert torch.equal(pruned[..., 0].long(), expected)


def test_ssm_leaves_tokens_outside_whole_windows_alone():
    metric = torch.ones(1, 35, 3)  # 5x7: G = 6, all collapsed
    plan = sk.plan_ssm(metric, (5, 7), 48)
    assert plan.num_removed == 18
    counts = plan.row_counts[0].long()[plan.row_of_token[0].long()]
    edge = [t for t in range(35) if t // 7 == 4 or t % 7 == 6]
    assert counts[edge].tolist() == [1] * len(edge)


# --- 3.3 IDM --------------------------------------------------------------------------------
def _idm_metric():
    """8x8 grid, 16 windows. dst (position 0) of window g is e_(g mod 8), so windows g and
    g+8 hold duplicate dsts. Candidates are the all-ones vector (best cos 1/sqrt(8)) except
    20 chosen ones, which copy a basis vector (best cos exactly 1, a tie among them)."""
    grid = (8, 8)
    index = window_token_index(grid, (2, 2))
    metric = torch.ones(1, 64, 8)
    for g in range(16):
        metric[0, index[g, 0]] = E[g % 8]
    dst_tokens = set(index[:, 0].tolist())
    candidates = [t for t in range(64) if t not in dst_tokens]
    chosen = candidates[5:25]
    for i, t in enumerate(chosen):
        metric[0, t] = 4 * E[i % 8]
    return metric, index, chosen


def test_idm_merges_top_r_with_ties_to_lower_token_and_first_max_dst():
    metric, index, chosen = _idm_metric()
    plan = sk.plan_idm(metric, (8, 8), 16)
    assert plan.num_removed == 16
    merged = chosen[:16]  # tie on best == 1: lower token indices win
    rows = plan.row_of_token[0]
    for i, t in enumerate(merged):
        # candidate equal to e_(i%8): dsts of windows i%8 and i%8+8 tie, the lower position wins
        assert rows[t] == rows[index[i % 8, 0]]
    for t in chosen[16:]:
        assert plan.row_counts[0, rows[t]] == 1
    # blend: every dst token and every merged candidate
    expected_blend = torch.zeros(64, dtype=torch.bool)
    expected_blend[index[:, 0]] = True
    expected_blend[merged] = True
    assert torch.equal(plan.blend[0], expected_blend)


def test_idm_group_mean():
    metric, index, chosen = _idm_metric()
    plan = sk.plan_idm(metric, (8, 8), 16)
    x = torch.randn(1, 64, 5, dtype=torch.float64)
    merged = plan.merge(x)
    # window 0's dst absorbs candidates chosen[0] and chosen[8] (both e_0)
    row = plan.row_of_token[0, index[0, 0]]
    expected = x[0, [index[0, 0].item(), chosen[0], chosen[8]]].mean(0)
    torch.testing.assert_close(merged[0, row], expected)


@pytest.mark.parametrize("n_remove, merged", [(0, 0), (15, 0), (16, 16), (31, 16), (32, 32), (1000, 48)])
def test_idm_rounding_to_multiples_of_16(n_remove, merged):
    plan = sk.plan_idm(torch.randn(2, 64, 4), (8, 8), n_remove)  # Na = 48
    assert plan.num_removed == merged


def test_idm_dst_is_first_maximum_of_li():
    metric = torch.randn(1, 64, 4)
    index = window_token_index((8, 8), (2, 2))
    li = torch.zeros(1, 64, dtype=torch.int32)
    li[0, index[3, 2]] = 2
    li[0, index[3, 3]] = 2  # tie inside window 3: position 2 (first maximum) wins
    li[0, index[5, 1]] = 1
    plan = sk.plan_idm(metric, (8, 8), 0, li=li)
    dst = torch.zeros(64, dtype=torch.bool)
    dst[index[:, 0]] = True
    dst[index[3, 0]] = False
    dst[index[3, 2]] = True
    dst[index[5, 0]] = False
    dst[index[5, 1]] = True
    assert torch.equal(plan.blend[0], dst)  # nothing merged: blend is exactly the dst set


def test_idm_candidates_include_tokens_outside_windows():
    # 5x7 grid: 6 windows, 29 candidates including row 4 and column 6.
    metric = torch.ones(1, 35, 3)
    metric[0, 34] = torch.tensor([1.0, 1.0, 1.0])
    plan = sk.plan_idm(metric, (5, 7), 16)
    assert plan.num_removed == 16
    # all cos ties at 1: the 16 lowest candidate tokens merge into window 0's dst (token 0)
    candidates = [t for t in range(35) if t not in {0, 2, 4, 14, 16, 18}]
    assert rows_of(plan)[0] == [0] + candidates[:16]


def test_idm_zero_tokens_stay_finite():
    metric = torch.zeros(3, 64, 4)
    plan = sk.plan_idm(metric, (8, 8), 32)
    assert plan.num_removed == 32
    best, _ = ops.bipartite_match(metric, torch.arange(1, 64, 2).repeat(3, 1), torch.arange(0, 64, 2).repeat(3, 1))
    assert torch.isfinite(best).all() and (best == 0).all()
    assert torch.isfinite(plan.merge(metric)).all()


# --- ToMe baseline --------------------------------------------------------------------------
def test_tome_merges_exact_count_with_dst_shared_across_batch():
    metric = torch.randn(3, 64, 6)
    plan = sk.plan_tome(metric, (8, 8), 21, generator=torch.Generator().manual_seed(3))
    assert plan.num_removed == 21  # no rounding to 16
    draw = torch.randint(4, (16,), generator=torch.Generator().manual_seed(3))
    index = window_token_index((8, 8), (2, 2))
    dst = index.gather(1, draw.view(-1, 1)).flatten()
    expected = torch.zeros(64, dtype=torch.bool)
    expected[dst] = True
    for b in range(3):
        # every multi-member row is led by one of the shared dsts
        reps = plan.rep_token[b][plan.row_counts[b] > 1]
        assert expected[reps.long()].all()
        assert torch.equal(plan.blend[b] & expected, expected)


# --- 3.4 li ------------------------------------------------------------------------------
def test_li_update_mean_and_prune_modes():
    metric, index, chosen = _idm_metric()
    plan = sk.plan_idm(metric, (8, 8), 16)
    li = torch.full((1, 64), 3, dtype=torch.int32)
    mean_li = plan.update_li(li, mode="mean")
    prune_li = plan.update_li(li, mode="prune")
    merged = chosen[:16]
    used_dsts = {index[i % 8, 0].item() for i in range(16)}
    all_dsts = set(index[:, 0].tolist())
    assert used_dsts < all_dsts  # some dsts absorb no candidate
    for t in range(64):
        # The release counts every dst as merged in mean mode, also one no candidate joined:
        # only the unmerged candidates are reset.
        in_group = t in merged or t in all_dsts
        assert mean_li[0, t] == (4 if in_group else 0)
        assert prune_li[0, t] == (4 if t in merged else 0)  # dsts are computed on their own
    assert torch.equal(li, torch.full((1, 64), 3, dtype=torch.int32))  # not modified in place
    assert torch.equal(plan.update_li(None), plan.update_li(torch.zeros_like(li)))


def test_li_update_after_ssm():
    plan = sk.plan_ssm(torch.ones(1, 16, 2), (4, 4), 48)  # all four windows collapsed
    assert plan.update_li(None).tolist() == [[1] * 16]
    prune_li = plan.update_li(None, mode="prune")[0]
    assert prune_li.tolist() == [0 if t in (0, 2, 8, 10) else 1 for t in range(16)]


# --- 3.5 unmerge blend ------------------------------------------------------------------------
def test_unmerge_blend_only_on_blend_tokens():
    metric = _ssm_metric(20)
    plan = sk.plan_ssm(metric, (16, 8), 48)
    y = torch.randn(1, plan.num_rows, 3, dtype=torch.float64)
    cache = torch.randn(1, 128, 3, dtype=torch.float64)
    out = plan.unmerge(y, cache=cache, mcw=0.1)
    plain = plan.unmerge(y)
    blend = plan.blend[0]
    torch.testing.assert_close(out[0, blend], 0.1 * plain[0, blend] + 0.9 * cache[0, blend])
    assert torch.equal(out[0, ~blend], plain[0, ~blend])


def test_unmerge_epilogue_residual_and_gate():
    plan = sk.plan_ssm(torch.ones(2, 16, 2), (4, 4), 48)
    y = torch.randn(2, 4, 3, dtype=torch.float64)
    residual = torch.randn(2, 16, 3, dtype=torch.float64)
    gate = torch.randn(2, 3, dtype=torch.float64)
    out = plan.unmerge(y, residual=residual, gate=gate)
    expected = residual + gate[:, None, :] * plan.unmerge(y)
    torch.testing.assert_close(out, expected)


# --- odd batch: per-sample plans -----------------------------------------------------------
@pytest.mark.parametrize("planner", ["ssm", "idm"])
def test_odd_batch_plans_are_per_sample(planner):
    metric = torch.randn(3, 96, 6)  # 8x12 grid
    build = {"ssm": sk.plan_ssm, "idm": sk.plan_idm}[planner]
    batched = build(metric, (8, 12), 48)
    for b in range(3):
        alone = build(metric[b:b + 1], (8, 12), 48)
        for field in ("row_of_token", "members", "row_start", "rep_token", "blend"):
            assert torch.equal(getattr(batched, field)[b], getattr(alone, field)[0]), field
