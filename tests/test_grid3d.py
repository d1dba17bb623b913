"""3-D token grids ``(T, H, W)`` with windows ``(wt, wh, ww)`` (docs/SEMANTICS.md, "3-D token grids").

Hand-worked plans on small grids built so that every cosine is exactly 0, 1 or 1/sqrt(2)
(basis vectors, zero tokens) or an exact multiple of 1/C (``helpers.sign_tokens``), so tie
rules are pinned on both backends whatever the summation order; random 3-D inputs agree
between the Triton build and the reference (``helpers.assert_*_plans_agree``); a 2-D grid
is exactly the ``T = 1`` case.
"""
import pytest
import torch

import sdtm_kernels as sk
from sdtm_kernels import ops
from sdtm_kernels.ops import _plan_library as plan_lib
from sdtm_kernels.ops import _score_library as lib
from sdtm_kernels.reference import similarity as ref
from sdtm_kernels.reference.schedule import tokens_removed
from sdtm_kernels.reference.windows import grid_3d, num_windows, window_token_index

from helpers import (PLAN_FIELDS, assert_bipartite_plans_agree, assert_same_plan, assert_ssm_plans_agree,
                     random_tokens, score_atol, sign_tokens)

BACKENDS = ("reference", "triton")
E = torch.eye(8)  # basis vectors: cosines 0 or exactly 1
PLANNERS = {"ssm": sk.plan_ssm, "idm": sk.plan_idm, "tome": sk.plan_tome}


def rows_of(plan, b=0):
    starts, members = plan.row_start[b].tolist(), plan.members[b].tolist()
    return [members[starts[m]:starts[m + 1]] for m in range(plan.num_rows)]


def numel(grid):
    n = 1
    for v in grid:
        n *= v
    return n


def assert_same_plan_and_li(a, b):
    assert_same_plan(a, b)
    assert torch.equal(a.li_next, b.li_next)


# -- window layout ----------------------------------------------------------------------------
def test_window_table_is_frame_major_raster():
    # T=2, H=2, W=4 with 2x2x2 windows: two windows, each spans both frames.
    assert window_token_index((2, 2, 4), (2, 2, 2)).tolist() == [[0, 1, 4, 5, 8, 9, 12, 13],
                                                                 [2, 3, 6, 7, 10, 11, 14, 15]]
    # Per-frame windows (1, 2, 2): frame 0's windows first, then frame 1's, then frame 2's.
    assert window_token_index((3, 2, 4), (1, 2, 2)).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13],
                                                                 [10, 11, 14, 15], [16, 17, 20, 21],
                                                                 [18, 19, 22, 23]]
    # T=3 not divisible by wt=2: frame 2 (tokens 16..23) is in no window.
    assert window_token_index((3, 2, 4), (2, 2, 2)).tolist() == window_token_index((2, 2, 4), (2, 2, 2)).tolist()
    # H=3 not divisible by wh=2: row 2 of each frame (8..11, 20..23) is in no window.
    assert window_token_index((2, 3, 4), (2, 2, 2)).tolist() == [[0, 1, 4, 5, 12, 13, 16, 17],
                                                                 [2, 3, 6, 7, 14, 15, 18, 19]]
    # Window positions ascend with the tokens (position 0 is the lowest token).
    index = window_token_index((5, 6, 7), (2, 3, 2))
    assert torch.equal(index, index.sort(dim=1).values)
    assert index.shape == (2 * 2 * 3, 12) and num_windows((5, 6, 7), (2, 3, 2)) == 12


def test_geometry_helpers():
    assert grid_3d((4, 6), (2, 3)) == ((1, 4, 6), (1, 2, 3))
    assert grid_3d((2, 4, 6), (1, 2, 3)) == ((2, 4, 6), (1, 2, 3))
    # The counts of every method follow N, K and G (3x4x4 grid, 2x2x2 windows: G = 4, K = 8).
    assert tokens_removed("ssm", 112, (3, 4, 4), (2, 2, 2)) == 7 * 4  # R = min(16, G = 4)
    assert tokens_removed("ssm", 111, (3, 4, 4), (2, 2, 2)) == 0
    assert tokens_removed("idm", 40, (3, 4, 4), (2, 2, 2)) == 32
    assert tokens_removed("tome", 40, (3, 4, 4), (2, 2, 2)) == 40
    assert tokens_removed("tome", 100, (3, 4, 4), (2, 2, 2)) == 48 - 4


# -- window scores ------------------------------------------------------------------------------
def _metric_with_windows(grid, window, window_vectors, channels=8):
    metric = torch.zeros(1, numel(grid), channels)
    index = window_token_index(grid, window)
    for g, vectors in enumerate(window_vectors):
        metric[0, index[g]] = torch.stack(list(vectors))
    return metric


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score, expected", [
    # identical | frame 0 = a, frame 1 = b (orthogonal) | 7 x a and a zero token
    ("released", [1.0, 32 / 64, 49 / 64]),
    ("paper", [1.0, 24 / 56, 42 / 56]),
])
def test_window_scores_across_frames(device, backend, score, expected):
    a, b, z = E[0], E[1] * 3, torch.zeros(8)
    grid, window = (2, 2, 6), (2, 2, 2)  # G = 3, K = 8
    metric = _metric_with_windows(grid, window, [[a] * 8, [a] * 4 + [b] * 4, [a] * 7 + [z]]).to(device)
    got = ops.window_scores(metric, grid, window=window, score=score, backend=backend)
    torch.testing.assert_close(got.cpu(), torch.tensor([expected]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_scores_priority_bonus_3d(device, backend):
    grid, window = (2, 2, 4), (2, 2, 2)
    metric = _metric_with_windows(grid, window, [[E[0]] * 8, [E[0]] * 8]).to(device)
    li = torch.zeros(1, 16, dtype=torch.int32)
    li[0, [0, 13]] = 8  # window 0, frames 0 and 1; mean li = 1
    got = ops.window_scores(metric, grid, window=window, li=li.to(device), a_s=0.05, backend=backend)
    torch.testing.assert_close(got.cpu(), 1.0 + 0.05 * torch.tensor([[16 / 8 / (1 + 1e-6), 0.0]]))


# -- SSM ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("li_mode", ["mean", "prune"])
def test_ssm_hand_worked_non_divisible_rows(device, backend, li_mode):
    # T=2, H=3, W=4 with 2x2x2 windows: G = 2; row 2 of each frame (8..11, 20..23) is left over and
    # sits between window tokens in raster order, so rows interleave with singletons.
    grid, window = (2, 3, 4), (2, 2, 2)
    metric = sign_tokens(1, 24, 16, device)
    draw = torch.tensor([[5, 7]], device=device)  # window 0 -> position 5 (token 13), window 1 -> 7 (19)
    li = torch.arange(24, dtype=torch.int32, device=device)[None]
    plan = sk.plan_ssm(metric, grid, 112, window=window, li=li, a_s=0.0, dst_draw=draw, backend=backend,
                       li_mode=li_mode)
    assert rows_of(plan) == [[0, 1, 4, 5, 12, 13, 16, 17], [2, 3, 6, 7, 14, 15, 18, 19],
                             [8], [9], [10], [11], [20], [21], [22], [23]]
    assert plan.num_rows == 24 - 2 * 7
    assert plan.rep_token[0].tolist() == [13, 19, 8, 9, 10, 11, 20, 21, 22, 23]
    grouped = [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15, 16, 17, 18, 19]
    assert plan.blend[0].nonzero().squeeze(1).tolist() == grouped
    want_li = torch.zeros(24, dtype=torch.int32)
    want_li[grouped] = torch.arange(24, dtype=torch.int32)[grouped] + 1
    if li_mode == "prune":
        want_li[[13, 19]] = 0
    assert torch.equal(plan.li_next[0].cpu(), want_li)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssm_non_divisible_frames(device, backend):
    # T=3 with windows (2, 2, 2): frame 2 is in no window and never collapses.
    grid, window = (3, 2, 4), (2, 2, 2)
    plan = sk.plan_ssm(sign_tokens(2, 24, 16, device, seed=3), grid, 10_000, window=window, backend=backend)
    assert plan.num_rows == 24 - 2 * 7
    for b in range(2):
        assert rows_of(plan, b) == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]] + [[t] for t in
                                                                                              range(16, 24)]
        assert plan.rep_token[b].tolist()[:2] == [0, 2]  # position 0 without randomness


def _ssm_tie_metric(grid, window, high):
    """Windows in ``high`` hold identical tokens (score 1); the others orthogonal ones (1/K)."""
    index = window_token_index(grid, window)
    size = index.shape[1]
    metric = torch.zeros(1, numel(grid), 8)
    for g in range(index.shape[0]):
        metric[0, index[g]] = E[0].expand(size, 8) if g in high else E[:size] * 2
    return metric


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssm_ties_go_to_lower_window_index_per_frame_windows(device, backend):
    # T=2, H=W=8, windows (1, 2, 2): G = 32 (frame 0: g 0..15, frame 1: g 16..31); R = 16.
    # 20 windows tie at score 1: frame 0's {3, 7, 12, 14} and all of frame 1. Ties go to the lower
    # window index in window-raster order: frame 0's four, then frame 1's windows 16..27.
    grid, window = (2, 8, 8), (1, 2, 2)
    high = {3, 7, 12, 14} | set(range(16, 32))
    metric = _ssm_tie_metric(grid, window, high).to(device)
    plan = sk.plan_ssm(metric, grid, 48, window=window, backend=backend)
    index = window_token_index(grid, window)
    want = sorted(index[g].tolist() for g in sorted(high)[:16])
    assert sorted(r for r in rows_of(plan) if len(r) > 1) == want
    assert plan.num_rows == 128 - 3 * 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssm_ties_across_frames_rounding_and_clamp(device, backend):
    # T=5 (not divisible by 2), H=4, W=16, windows (2, 2, 2): G = 2 * 2 * 8 = 32, K = 8, so
    # R = n_remove // 112 * 16. 20 windows tie at score 1, six in frames 0-1 and windows 16..29 in
    # frames 2-3: the six, then windows 16..25.
    grid, window = (5, 4, 16), (2, 2, 2)
    high = {1, 2, 9, 10, 11, 15} | set(range(16, 30))
    metric = _ssm_tie_metric(grid, window, high).to(device)
    index = window_token_index(grid, window)
    assert sk.plan_ssm(metric, grid, 111, window=window, backend=backend).num_rows == 320  # R = 0
    plan = sk.plan_ssm(metric, grid, 223, window=window, backend=backend)  # R = 16
    assert plan.num_rows == 320 - 7 * 16
    assert sorted(r for r in rows_of(plan) if len(r) > 1) == sorted(index[g].tolist() for g in sorted(high)[:16])
    plan = sk.plan_ssm(metric, grid, 10_000, window=window, backend=backend)  # R clamped to G = 32
    assert plan.num_rows == 320 - 7 * 32
    assert sorted(r for r in rows_of(plan) if len(r) > 1) == sorted(index.tolist())
    assert all(len(r) == 1 for r in rows_of(plan) if r[0] >= 256)  # frame 4 stays alone


# -- IDM / ToMe -----------------------------------------------------------------------------------
def _idm_metric():
    """T=3, H=2, W=4, windows (2, 2, 2): dsts 0 (e0) and 2 (e1) at position 0; frame 2 is leftover."""
    metric = torch.zeros(1, 24, 8)
    metric[0, 0], metric[0, 2] = E[0], E[1]
    for t in (3, 9, 17, 20, 5):
        metric[0, t] = E[0] * 2  # best 1, dst 0
    for t in (1, 6, 12, 22, 14):
        metric[0, t] = E[1] * 4  # best 1, dst 2
    for t in (4, 7, 8, 10, 11, 13, 16, 21):
        metric[0, t] = E[0] + E[1]  # best 1/sqrt(2) for both dsts: the match goes to dst position 0
    for t in (15, 18, 19, 23):
        metric[0, t] = E[2]  # best 0
    return metric


@pytest.mark.parametrize("backend", BACKENDS)
def test_idm_hand_worked_3d(device, backend):
    # Candidates: 22 (leftover frame included), r = 16: the ten best-1 candidates, then the six
    # lowest-index of the eight tied at 1/sqrt(2) (16 and 21 are left), all tied ones into dst 0.
    plan = sk.plan_idm(_idm_metric().to(device), (3, 2, 4), 16, window=(2, 2, 2), backend=backend)
    assert rows_of(plan) == [[0, 3, 4, 5, 7, 8, 9, 10, 11, 13, 17, 20], [1, 2, 6, 12, 14, 22],
                             [15], [16], [18], [19], [21], [23]]
    assert plan.rep_token[0].tolist() == [0, 2, 15, 16, 18, 19, 21, 23]
    blend = sorted([0, 3, 4, 5, 7, 8, 9, 10, 11, 13, 17, 20, 1, 2, 6, 12, 14, 22])
    assert plan.blend[0].nonzero().squeeze(1).tolist() == blend
    assert plan.li_next[0].nonzero().squeeze(1).tolist() == blend


@pytest.mark.parametrize("backend", BACKENDS)
def test_idm_dst_from_li_first_maximum_3d(device, backend):
    # Zero tokens: every best is 0 and every match is dst position 0, so the 16 lowest candidates merge
    # into the first window's dst. li picks the dsts: window 0 [0,1,4,5,8,9,12,13] ties 9 / 12 at 3 -> 9
    # (first maximum); window 1 [2,3,6,7,10,11,14,15] ties 7 / 15 at 2 -> 7.
    li = torch.zeros(1, 24, dtype=torch.int32)
    li[0, [9, 12]], li[0, 13], li[0, [7, 15]] = 3, 1, 2
    metric = torch.zeros(1, 24, 8, device=device)
    plan = sk.plan_idm(metric, (3, 2, 4), 16, window=(2, 2, 2), li=li.to(device), backend=backend)
    merged = [t for t in range(18) if t not in (7, 9)]
    assert rows_of(plan) == [sorted(merged + [9]), [7]] + [[t] for t in range(18, 24)]
    assert plan.rep_token[0].tolist() == [9, 7] + list(range(18, 24))
    want_li = torch.where(plan.blend[0].cpu(), li[0] + 1, 0)
    assert plan.blend[0, :18].all() and not plan.blend[0, 18:].any()
    assert torch.equal(plan.li_next[0].cpu(), want_li)


@pytest.mark.parametrize("backend", BACKENDS)
def test_idm_per_frame_windows_leftover_columns(device, backend):
    # T=2, H=2, W=9 with (1, 2, 2): G = 8, column 8 of each frame (8, 17, 26, 35) is left over and a
    # candidate; dsts at position 0. Sign tokens: cosines are exact multiples of 1/16, so ties in the
    # match and in the selection are real ties on every backend: it must equal the reference.
    metric = sign_tokens(2, 36, 16, device, seed=7)
    plan = sk.plan_idm(metric, (2, 2, 9), 16, window=(1, 2, 2), backend=backend)
    assert_same_plan_and_li(plan, sk.plan_idm(metric, (2, 2, 9), 16, window=(1, 2, 2), backend="reference"))
    dsts = [0, 2, 4, 6, 18, 20, 22, 24]
    for b in range(2):
        assert plan.blend[b, dsts].all()
        assert plan.rep_token[b, plan.row_of_token[b, dsts].long()].tolist() == dsts
    assert plan.num_rows == 36 - 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_tome_shares_the_draw_3d(device, backend):
    metric = sign_tokens(2, 48, 16, device, seed=8)
    gen = torch.Generator().manual_seed(4)
    plan = sk.plan_tome(metric, (3, 4, 4), 20, window=(2, 2, 2), generator=gen, backend=backend)
    assert plan.num_rows == 48 - 20
    draw = torch.randint(8, (4,), generator=torch.Generator().manual_seed(4))
    dsts = window_token_index((3, 4, 4), (2, 2, 2)).gather(1, draw[:, None]).squeeze(1)
    for b in range(2):
        assert plan.blend[b, dsts].all()
        assert torch.equal(plan.rep_token[b, plan.row_of_token[b, dsts].long()].cpu(), dsts)


# -- Triton build == reference build on random 3-D inputs ---------------------------------------------
GRIDS_3D = [  # (B, grid, window, C): G > 16 so that SSM selects
    (2, (2, 8, 12), (2, 2, 2), 24),
    (3, (3, 8, 10), (2, 2, 2), 17),  # T not divisible
    (2, (3, 5, 7), (1, 2, 2), 40),  # H and W not divisible
    (1, (4, 6, 6), (2, 1, 3), 16),
    (2, (5, 4, 4), (1, 2, 1), 32),
]


def _scores64(x, grid, window, li, a_s, score):
    return ref.window_scores(x, grid, window, li=li, a_s=a_s if li is not None else 0.0, score=score,
                             dtype=torch.float64).cpu()


@pytest.mark.parametrize("case", GRIDS_3D)
def test_window_scores_match_reference_3d(device, case):
    batch, grid, window, channels = case
    n = numel(grid)
    x = random_tokens(batch, n, channels, torch.float32, device, seed=n)
    li = torch.randint(0, 5, (batch, n), generator=torch.Generator().manual_seed(1), dtype=torch.int32).to(device)
    for score in ("released", "paper"):
        got = ops.window_scores(x, grid, window=window, li=li, a_s=0.05, score=score, backend="triton")
        want = ref.window_scores(x, grid, window, li=li, a_s=0.05, score=score)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=score_atol(channels))


_LI_OPTIONS = {"li": True, "random_dst": True, "li_mode": "prune"}


@pytest.mark.parametrize("case", GRIDS_3D)
@pytest.mark.parametrize("method, options", [(m, o) for m in ("ssm", "idm", "tome")
                                             for o in ({}, _LI_OPTIONS, {"random_dst": True})
                                             if not (m == "tome" and o.get("li"))])  # ToMe has no li
def test_plans_triton_equal_reference_3d(device, case, method, options):
    batch, grid, window, channels = case
    n = numel(grid)
    x = random_tokens(batch, n, channels, torch.float32, device, seed=n + channels)
    kwargs = dict(options)
    li = None
    if kwargs.pop("li", False):
        li = torch.randint(0, 5, (batch, n), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
        kwargs["li"] = li = li.to(device)
    if method == "tome":
        kwargs.pop("li_mode", None)
    size = window[0] * window[1] * window[2]
    n_remove = {"ssm": (size - 1) * 16 + 5, "idm": n // 2, "tome": n // 3}[method]  # SSM: R = 16
    plans = []
    for backend in ("triton", "reference"):
        gen = torch.Generator().manual_seed(11)
        plans.append(PLANNERS[method](x, grid, n_remove, window=window, generator=gen, backend=backend, **kwargs))
    got, want = plans
    assert got.num_removed == tokens_removed(method, n_remove, grid, window)
    if method == "ssm":
        assert_ssm_plans_agree(got, want, _scores64(x, grid, window, li, 0.05, "released"),
                               window_token_index(grid, window))
    else:
        assert_bipartite_plans_agree(got, want, x)
    if all(torch.equal(getattr(got, f), getattr(want, f)) for f in PLAN_FIELDS):
        assert torch.equal(got.li_next, want.li_next)


@pytest.mark.parametrize("backend", BACKENDS)
def test_idm_attention_3d(device, backend):
    grid, window = (3, 4, 4), (2, 2, 2)
    x = sign_tokens(2, 48, 16, device, seed=9)
    received = torch.randperm(96, generator=torch.Generator().manual_seed(2)).float().view(2, 48).to(device)
    plan = sk.plan_idm_attention(x, grid, 32, received, window=window, backend=backend)
    want = sk.plan_idm_attention(x, grid, 32, received, window=window, backend="reference")
    assert_same_plan_and_li(plan, want)
    assert plan.num_rows == 48 - 32


# -- 2-D is the T = 1 case ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid, window", [((8, 8), (2, 2)), ((7, 9), (3, 2)), ((5, 6), (2, 2))])
def test_single_frame_grid_is_exactly_2d(device, backend, grid, window):
    n = numel(grid)
    x = random_tokens(2, n, 24, torch.float32, device, seed=n)
    li = torch.randint(0, 5, (2, n), generator=torch.Generator().manual_seed(3), dtype=torch.int32).to(device)
    grid3, window3 = (1,) + grid, (1,) + window
    for score in ("released", "paper"):
        assert torch.equal(ops.window_scores(x, grid, window=window, li=li, a_s=0.05, score=score, backend=backend),
                           ops.window_scores(x, grid3, window=window3, li=li, a_s=0.05, score=score,
                                             backend=backend))
    cases = [(sk.plan_ssm, 48, dict(li=li, random_dst=True)), (sk.plan_ssm, 48, dict(score="paper")),
             (sk.plan_idm, 16, dict(li=li)), (sk.plan_idm, 16, dict(random_dst=True, li_mode="prune")),
             (sk.plan_tome, 11, {})]
    for builder, n_remove, kwargs in cases:
        planes = []
        for g, w in ((grid, window), (grid3, window3)):
            gen = torch.Generator().manual_seed(6)
            planes.append(builder(x, g, n_remove, window=w, generator=gen, backend=backend, **kwargs))
        assert_same_plan_and_li(*planes)
    received = torch.rand(2, n, generator=torch.Generator().manual_seed(4)).to(device)
    assert_same_plan_and_li(sk.plan_idm_attention(x, grid, 16, received, window=window, backend=backend),
                            sk.plan_idm_attention(x, grid3, 16, received, window=window3, backend=backend))


# -- arguments -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ssm", "idm", "tome", "scores"])
@pytest.mark.parametrize("grid, window, exc, names", [
    ((2, 4, 4), (2, 2), TypeError, ("window", "grid")),  # lengths differ
    ((4, 8), (1, 2, 2), TypeError, ("window", "grid")),
    ((2, 4, 4, 1), (1, 2, 2, 1), TypeError, ("grid",)),  # four entries
    ((2, 4, 4), (1, 2, 2, 2), TypeError, ("window",)),
    ((2, 4, 2), (1, 2, 2), ValueError, ("grid", "32")),  # 16 tokens, N = 32
    ((0, 4, 8), (1, 2, 2), ValueError, ("grid",)),
    ((2, -4, -4), (1, 2, 2), ValueError, ("grid",)),
    ((2, 4, 4), (0, 2, 2), ValueError, ("window",)),
    ((2, 4, 4), (1, 1, 1), ValueError, ("window",)),  # a single token
    ((2, 4, 4), (3, 2, 2), ValueError, ("window",)),  # larger than the grid along T
    ((1, 4, 8), (2, 1, 1), ValueError, ("window",)),
    ((2, 4, 4), (1, 2, 5), ValueError, ("window",)),
    ((2, 4.0, 4), (1, 2, 2), TypeError, ("grid",)),
    ((2, 4, 4), (1, True, 2), TypeError, ("window",)),
])
def test_bad_grid_or_window_3d(method, grid, window, exc, names):
    metric = torch.randn(2, 32, 8)
    before = metric.clone()
    calls = {"ssm": lambda: sk.plan_ssm(metric, grid, 48, window=window),
             "idm": lambda: sk.plan_idm(metric, grid, 16, window=window),
             "tome": lambda: sk.plan_tome(metric, grid, 16, window=window),
             "scores": lambda: ops.window_scores(metric, grid, window=window)}
    with pytest.raises(exc) as info:
        calls[method]()
    for name in names:
        assert name in str(info.value)
    assert torch.equal(metric, before)


def test_a_3d_grid_needs_a_3d_window():
    # The default window (2, 2) is for 2-D grids: the error says what to pass.
    with pytest.raises(TypeError, match=r"window=\(1, 2, 2\)"):
        sk.plan_ssm(torch.randn(1, 32, 8), (2, 4, 4), 48)


# -- op registration -------------------------------------------------------------------------------------
def test_opcheck_3d(device):
    grid, window = (3, 4, 4), (2, 2, 2)  # G = 4
    x = random_tokens(2, 48, 24, torch.float32, device, seed=40)
    li = torch.randint(0, 5, (2, 48), generator=torch.Generator().manual_seed(1), dtype=torch.int32).to(device)
    for backend in BACKENDS:
        torch.library.opcheck(lib.window_scores, (x, li, 4, 4, 2, 2, 0.05, False, backend, 3, 2))
        torch.library.opcheck(lib.window_scores, (x, None, 4, 4, 1, 2, 0.0, True, backend, 3, 1))
    rank = torch.tensor([[0, -1, 1, -1]] * 2, dtype=torch.int32, device=device)
    dst_pos = torch.tensor([[3, 7]] * 2, dtype=torch.int64, device=device)
    for li_arg in (None, li):
        torch.library.opcheck(plan_lib.ssm_plan_build, (rank, dst_pos, li_arg, 4, 4, 2, 2, 48 - 14, False, 3, 2))
        torch.library.opcheck(plan_lib.bipartite_lists, (x, li_arg, None, 2, 4, 4, 2, 2, 3, 2))
    dst, cand = plan_lib.bipartite_lists(x, None, None, 2, 4, 4, 2, 2, 3, 2)
    assert dst[0].tolist() == window_token_index(grid, window)[:, 0].tolist()
    assert cand.shape == (2, 44)


def test_plan_build_3d_compiles_without_graph_breaks(device):
    torch._dynamo.reset()
    grid, window = (2, 4, 8), (2, 2, 2)

    def build(metric, li):
        ssm = sk.plan_ssm(metric, grid, 112, li=li, window=window, backend="triton")
        idm = sk.plan_idm(metric, grid, 16, li=li, window=window, backend="triton")
        return ssm.row_of_token, ssm.members, ssm.li_next, idm.row_of_token, idm.members, idm.blend

    x = sign_tokens(2, 64, 16, device, seed=41)
    li = torch.randint(0, 5, (2, 64), generator=torch.Generator().manual_seed(1), dtype=torch.int32).to(device)
    got = torch.compile(build, fullgraph=True)(x, li)
    for a, b in zip(got, build(x, li)):
        assert torch.equal(a, b)
