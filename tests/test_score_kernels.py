"""Triton scoring / selection kernels and Triton-built plans against the reference.

Runs unchanged on CUDA and on CPU (Triton interpreter, switched on by conftest.py).
Nothing here depends on how a CPU rounds: tie rules are pinned with +-1 tokens whose
cosines are exact in any summation order (``helpers.sign_tokens``), and plans built from
random data are equal wherever every decision is clear by more than rounding, and otherwise
compared by what must hold (``helpers.assert_*_plans_agree``).
"""
import pytest
import torch

import sdtm_kernels as sk
from sdtm_kernels import ops
from sdtm_kernels.ops import _score_library as lib
from sdtm_kernels.reference import plans as ref_plans
from sdtm_kernels.reference import similarity as ref
from sdtm_kernels.reference.schedule import ssm_windows_to_merge
from sdtm_kernels.reference.windows import window_token_index

from helpers import (assert_bipartite_plans_agree, assert_same_plan, assert_ssm_plans_agree, random_tokens,
                     score_atol, sign_tokens)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, H, W, C, window): square, non-square, windows that do not divide the grid, 3x2 windows,
# C not a multiple of 16, batch 1 and odd batches.
SCORE_SHAPES = [
    (2, 12, 12, 160, (2, 2)),
    (3, 7, 9, 40, (3, 2)),
    (1, 5, 4, 17, (2, 2)),
    (1, 2, 1, 8, (2, 1)),  # one window
]


def random_li(batch, num_tokens, device, seed=1, high=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (batch, num_tokens), generator=gen, dtype=torch.int32).to(device)


# -- window scores ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SCORE_SHAPES)
def test_window_scores_match_reference(device, dtype, shape):
    batch, height, width, channels, window = shape
    x = random_tokens(batch, height * width, channels, dtype, device, seed=sum(shape[:4]))
    x[0, 0] = 0  # a zero token: cosine 0, finite
    li = random_li(batch, height * width, device)
    for score in ("released", "paper"):
        for li_arg, a_s in ((None, 0.0), (li, 0.05)):
            got = ops.window_scores(x, (height, width), window=window, li=li_arg, a_s=a_s, score=score,
                                    backend="triton")
            want = ref.window_scores(x, (height, width), window, li=li_arg, a_s=a_s, score=score)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=score_atol(channels))


def test_window_scores_non_contiguous(device):
    batch, height, width, channels = 2, 6, 10, 40
    n = height * width
    padded = random_tokens(batch, n, channels + 7, torch.float16, device, seed=3)[:, :, 3:3 + channels]
    strided = random_tokens(batch, 2 * n, channels, torch.float32, device, seed=4)[:, ::2]
    batch_major = random_tokens(n, batch, channels, torch.bfloat16, device, seed=5).transpose(0, 1)
    li = random_li(batch, 2 * n, device)[:, ::2]  # strided li as well
    for x in (padded, strided, batch_major):
        assert not x.is_contiguous()
        got = ops.window_scores(x, (height, width), li=li, a_s=0.05, backend="triton")
        want = ref.window_scores(x.contiguous(), (height, width), li=li.contiguous(), a_s=0.05)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=score_atol(channels))


def test_window_scores_constant_and_zero_windows(device):
    x = torch.zeros(1, 16, 24, device=device)
    x[:, 4:8] = 1.0  # rows 1 of the 4x4 grid: constant tokens
    got = ops.window_scores(x, (4, 4), backend="triton")
    want = ref.window_scores(x, (4, 4))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Top windows: 2 constant + 2 zero tokens (4 of 16 Gram entries are 1); bottom windows all zero.
    assert got.max() == pytest.approx(0.25) and got.min() == 0.0


# -- bipartite matching -------------------------------------------------------------------------
MATCH_SHAPES = [  # (B, N, C, Na, D)
    (2, 144, 160, 108, 36),
    (3, 63, 40, 50, 13),
    (1, 20, 17, 1, 3),
    (1, 9, 24, 8, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MATCH_SHAPES)
def test_bipartite_match_matches_reference(device, dtype, shape):
    batch, n, channels, num_cand, num_dst = shape
    x = random_tokens(batch, n, channels, dtype, device, seed=n + channels)
    x[:, 1] = 0  # zero tokens give score 0
    gen = torch.Generator().manual_seed(7)
    cand = torch.randint(0, n, (batch, num_cand), generator=gen).to(device)
    dst = torch.randint(0, n, (batch, num_dst), generator=gen).to(device=device, dtype=torch.int32)
    best, match = ops.bipartite_match(x, cand, dst, backend="triton")
    want_best, want_match = ref.bipartite_match(x, cand, dst)
    assert best.dtype == torch.float32 and match.dtype == torch.int32
    assert torch.isfinite(best).all()
    torch.testing.assert_close(best, want_best, rtol=1e-5, atol=score_atol(channels))
    # Indices agree wherever the top two similarities are farther apart than rounding; elsewhere
    # (duplicate dst tokens, zero tokens, near ties) the chosen dst must be (nearly) the best.
    # Exact tie rules are pinned with exactly representable inputs below.
    unit = ref.normalize_tokens(x, torch.float64)
    full = unit.gather(1, cand.long()[..., None].expand(-1, -1, channels)) @ \
        unit.gather(1, dst.long()[..., None].expand(-1, -1, channels)).transpose(1, 2)
    top2 = full.topk(min(2, num_dst), dim=-1).values
    gap = top2[..., 0] - top2[..., -1] if num_dst > 1 else torch.full_like(top2[..., 0], float("inf"))
    clear = gap > 1e-4
    assert clear.float().mean() > 0.5
    assert torch.equal(match[clear], want_match[clear])
    chosen = full.gather(2, match.long().unsqueeze(-1)).squeeze(-1)
    assert bool((chosen >= top2[..., 0] - 1e-4).all())


def test_bipartite_match_exact_indices_on_permutation(device):
    # Candidate i points at dst perm[i] (plus a smaller pull to another dst): tie-free by construction.
    batch, num_dst, channels = 2, 24, 32
    gen = torch.Generator().manual_seed(11)
    basis = torch.eye(channels)[:num_dst]
    perm = torch.stack([torch.randperm(num_dst, generator=gen) for _ in range(batch)])
    other = (perm + 1 + torch.randint(0, num_dst - 1, perm.shape, generator=gen)) % num_dst
    cand_vecs = basis[perm] * 2.0 + basis[other] * torch.rand(perm.shape + (1,), generator=gen)
    x = torch.cat([basis.expand(batch, -1, -1), cand_vecs], dim=1).to(device)
    dst = torch.arange(num_dst, device=device).expand(batch, -1)
    cand = torch.arange(num_dst, 2 * num_dst, device=device).expand(batch, -1)
    for dtype in DTYPES:
        best, match = ops.bipartite_match(x.to(dtype), cand, dst, backend="triton")
        assert torch.equal(match.cpu(), perm.to(torch.int32))
        assert (best > 0.85).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_bipartite_match_ties_pick_lowest_dst_position(device, dtype):
    # +-1 tokens: every cosine is an exact multiple of 1/16 on any CPU or GPU, so ties are real
    # ties for both backends and the rule (lowest dst position) decides.
    batch, n, channels = 1, 40, 16
    x = sign_tokens(batch, n, channels, device, seed=12)
    x[:, 30] = x[:, 20]  # a second token with identical content
    x[:, 6] = -x[:, 20]  # and its opposite
    x = x.to(dtype)
    # Token 20 at position 7, 30 at position 2, 20 again at position 5: the lowest position wins
    # whenever token 20's content is a candidate's best.
    dst = torch.tensor([[1, 2, 30, 3, 4, 20, 5, 20]], device=device)
    cand = torch.tensor([[20, 30, 6, 0, 7, 8, 9, 10, 11, 12, 13, 14]], device=device)
    best, match = ops.bipartite_match(x, cand, dst, backend="triton")
    want_best, want_match = ref.bipartite_match(x, cand, dst)
    assert torch.equal(match, want_match)
    assert torch.equal(best, want_best)  # exact: multiples of 1/16
    assert match[0, :2].tolist() == [2, 2] and best[0, :2].tolist() == [1.0, 1.0]
    assert set(match[0].tolist()) & {2, 5, 7} <= {2}
    # Ties between different dst tokens: every cosine is one of 33 values, so many candidates
    # have several best dsts; the lowest position wins on both backends.
    many = torch.arange(n, device=device)[None]
    best, match = ops.bipartite_match(x, many, dst, backend="triton")
    want_best, want_match = ref.bipartite_match(x, many, dst)
    assert torch.equal(match, want_match) and torch.equal(best, want_best)
    full = (x[0].float() @ x[0, dst[0]].float().T) / channels
    lowest = torch.stack([(row == row.max()).nonzero()[0, 0] for row in full]).to(torch.int32)
    assert torch.equal(match[0].cpu(), lowest.cpu())
    # Many dst tiles (D > block) full of duplicates: the first tile's max must survive.
    dst_many = torch.full((1, 300), 20, device=device)
    want_best = ref.bipartite_match(x, cand, dst_many[:, :1])[0]
    best_many, match_many = ops.bipartite_match(x, cand, dst_many, backend="triton")
    assert torch.equal(match_many, torch.zeros_like(match_many))
    assert torch.equal(best_many, want_best)  # all cos to token 20, exact


# -- top-k selection ----------------------------------------------------------------------------
def _reference_rank(scores, k):
    return lib.topk_rank(scores, k, "reference")


@pytest.mark.parametrize("n, k", [(1, 1), (1, 0), (37, 0), (37, 37), (144, 48), (2000, 700)])
def test_topk_rank_permutation_scores(device, n, k):
    gen = torch.Generator().manual_seed(n + k)
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(3)])
    scores = ((perm.float() - n / 2) / 7.0).to(device)  # tie-free, negative and positive
    got = lib.topk_rank(scores, k, "triton")
    assert torch.equal(got, _reference_rank(scores, k))
    assert torch.equal((got >= 0).sum(1).cpu(), torch.full((3,), k))
    # The chosen are exactly the k largest.
    chosen_min = torch.where(got >= 0, scores, float("inf")).amin(1)
    rest_max = torch.where(got < 0, scores, float("-inf")).amax(1)
    assert (chosen_min > rest_max).all()


def test_topk_rank_ties_go_to_lower_index(device):
    scores = torch.tensor([[0.5, 1.0, 0.5, 0.5, 2.0, 0.5, -0.0, 0.0, -1.0],
                           [0.0, -0.0, 0.0, -0.0, 3.0, 3.0, 3.0, -1.0, 0.0]], device=device)
    got = lib.topk_rank(scores, 5, "triton")
    want = torch.tensor([[0, 1, 2, 3, 4, -1, -1, -1, -1],
                         [0, 1, -1, -1, 2, 3, 4, -1, -1]], dtype=torch.int32, device=device)  # -0.0 == 0.0
    assert torch.equal(got, want)
    assert torch.equal(got, _reference_rank(scores, 5))
    # Long rows of equal values spanning several blocks.
    flat = torch.zeros(2, 3000, device=device)
    flat[1, 2500:] = 1.0
    got = lib.topk_rank(flat, 1100, "triton")
    assert torch.equal(got, _reference_rank(flat, 1100))


# -- plans: Triton build == reference build ------------------------------------------------------
PLAN_SHAPES = [  # (B, H, W, C, window)
    (2, 12, 12, 64, (2, 2)),
    (3, 9, 10, 24, (3, 2)),
    (1, 7, 6, 17, (2, 2)),
]


def _build_both(builder, x, grid, n_remove, seed=5, **kwargs):
    plans = []
    for backend in ("triton", "reference"):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        plans.append(builder(x, grid, n_remove, generator=gen, backend=backend, **kwargs))
    return plans


def assert_plans_agree(builder, got, want, x, grid, window=(2, 2), li=None, a_s=0.05, score="released", **_):
    """Equal plans where every decision is clear; otherwise what must hold (tests/helpers.py)."""
    if builder is sk.plan_ssm:
        scores64 = ref.window_scores(x, grid, window, li=li, a_s=a_s if li is not None else 0.0, score=score,
                                     dtype=torch.float64).cpu()
        assert_ssm_plans_agree(got, want, scores64, window_token_index(grid, window))
    else:
        assert_bipartite_plans_agree(got, want, x)


@pytest.mark.parametrize("shape", PLAN_SHAPES)
@pytest.mark.parametrize("options", [
    {}, {"score": "paper"}, {"li": True}, {"li": True, "score": "paper", "a_s": 0.5}, {"random_dst": True},
])
def test_ssm_plan_triton_equals_reference(device, shape, options):
    batch, height, width, channels, window = shape
    n = height * width
    x = random_tokens(batch, n, channels, torch.float32, device, seed=n)
    options = dict(options)
    if options.pop("li", False):
        options["li"] = random_li(batch, n, device)
    k = window[0] * window[1]
    for n_remove in (0, (k - 1) * 16, n):  # identity, one granule, clamped to every window
        got, want = _build_both(sk.plan_ssm, x, (height, width), n_remove, window=window, **options)
        assert_plans_agree(sk.plan_ssm, got, want, x, (height, width), window=window, **options)
    num_windows = (height // window[0]) * (width // window[1])
    assert got.num_rows == n - (k - 1) * ssm_windows_to_merge(n, k, num_windows)


@pytest.mark.parametrize("shape", PLAN_SHAPES)
@pytest.mark.parametrize("options", [{}, {"li": True}, {"random_dst": True}])
def test_idm_plan_triton_equals_reference(device, shape, options):
    batch, height, width, channels, window = shape
    n = height * width
    x = random_tokens(batch, n, channels, torch.float32, device, seed=n + 1)
    options = dict(options)
    if options.pop("li", False):
        options["li"] = random_li(batch, n, device, high=3)  # ties inside windows: first maximum
    for n_remove in (0, 16, n):
        got, want = _build_both(sk.plan_idm, x, (height, width), n_remove, window=window, **options)
        assert_plans_agree(sk.plan_idm, got, want, x, (height, width))


@pytest.mark.parametrize("shape", PLAN_SHAPES)
@pytest.mark.parametrize("random_dst", [False, True])
def test_tome_plan_triton_equals_reference(device, shape, random_dst):
    batch, height, width, channels, window = shape
    n = height * width
    x = random_tokens(batch, n, channels, torch.float32, device, seed=n + 2)
    for n_remove in (0, 5, n):
        got, want = _build_both(sk.plan_tome, x, (height, width), n_remove, window=window, random_dst=random_dst)
        assert_plans_agree(sk.plan_tome, got, want, x, (height, width))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plans_low_precision_metric(device, dtype):
    x = random_tokens(2, 144, 48, dtype, device, seed=21)
    li = random_li(2, 144, device)
    for builder, kwargs in ((sk.plan_ssm, {"li": li}), (sk.plan_idm, {"li": li}), (sk.plan_tome, {})):
        got, want = _build_both(builder, x, (12, 12), 64, **kwargs)
        assert_plans_agree(builder, got, want, x, (12, 12), **kwargs)


def test_plan_from_strided_metric(device):
    x = random_tokens(2, 144, 40 + 5, torch.bfloat16, device, seed=22)[:, :, 5:]
    for builder in (sk.plan_ssm, sk.plan_idm, sk.plan_tome):
        got, want = _build_both(builder, x, (12, 12), 60)
        assert_plans_agree(builder, got, want, x, (12, 12))


# -- tie rules through the whole plan --------------------------------------------------------------
def test_equal_window_scores_select_lower_windows(device):
    # Every window holds the same 4 +-1 tokens: all scores equal exactly, the first R windows win.
    height = width = 8
    base = sign_tokens(1, 4, 16, device, seed=30)[0]
    tokens = window_token_index((height, width), (2, 2))
    x = torch.empty(2, height * width, 16, device=device)
    x[:, tokens.reshape(-1)] = base.repeat(tokens.shape[0], 1)
    scores = ops.window_scores(x, (height, width), backend="triton")
    assert (scores == scores[0, 0]).all()
    plan = sk.plan_ssm(x, (height, width), 48, backend="triton")  # R = 16 windows
    expected_blend = torch.zeros(2, height * width, dtype=torch.bool, device=device)
    expected_blend[:, tokens[:16].reshape(-1)] = True
    assert torch.equal(plan.blend, expected_blend)
    assert_same_plan(plan, sk.plan_ssm(x, (height, width), 48, backend="reference"))


def test_equal_best_similarity_merges_lower_candidates(device):
    # All tokens identical (norm 4: cosines exactly 1): every candidate's best is the same, with
    # dst position 0; the lowest r candidates merge.
    height, width = 8, 8
    x = torch.full((3, height * width, 16), 1.0, device=device)
    plan = sk.plan_idm(x, (height, width), 16, backend="triton")
    is_dst = torch.zeros(height * width, dtype=torch.bool)
    is_dst[window_token_index((height, width), (2, 2))[:, 0]] = True
    candidates = (~is_dst).nonzero().squeeze(1)
    merged = candidates[:16]
    expected_rep = torch.arange(height * width)
    expected_rep[merged] = 0  # all join dst position 0 = token 0
    row_of_token = plan.row_of_token[0].cpu().long()
    assert torch.equal(plan.rep_token[0].cpu().long()[row_of_token], expected_rep)
    assert torch.equal(row_of_token[merged], torch.zeros(16, dtype=torch.long))
    assert (row_of_token[candidates[16:]] > 0).all()
    assert_same_plan(plan, sk.plan_idm(x, (height, width), 16, backend="reference"))


# -- op registration and compile --------------------------------------------------------------------
def test_opcheck(device):
    x = random_tokens(2, 36, 24, torch.float32, device, seed=40)
    li = random_li(2, 36, device)
    cand = torch.arange(9, 36, device=device).expand(2, -1).contiguous()
    dst = torch.arange(9, device=device).expand(2, -1).contiguous()
    scores = torch.randn(2, 50).to(device)
    for backend in ("triton", "reference"):
        torch.library.opcheck(lib.window_scores, (x, li, 6, 6, 2, 2, 0.05, False, backend))
        torch.library.opcheck(lib.window_scores, (x, None, 6, 6, 3, 2, 0.0, True, backend))
        torch.library.opcheck(lib.bipartite_match, (x, cand, dst, backend))
        torch.library.opcheck(lib.topk_rank, (scores, 17, backend))
    # The fused plan builds (Triton only).
    from sdtm_kernels.ops import _plan_library as plan_lib

    rank = torch.tensor([[0, -1, 1, -1, 2, -1, -1, -1, 3]] * 2, dtype=torch.int32, device=device)
    dst_pos = torch.zeros(2, 4, dtype=torch.int64, device=device)
    for li_arg in (None, li):
        torch.library.opcheck(plan_lib.ssm_plan_build, (rank, dst_pos, li_arg, 6, 6, 2, 2, 24, False))
        dst, cand = plan_lib.bipartite_lists(x, li_arg, None, 2, 6, 6, 2, 2)
        torch.library.opcheck(plan_lib.bipartite_lists, (x, li_arg, None, 2, 6, 6, 2, 2))
        match = torch.zeros_like(cand)
        chosen = torch.full_like(cand, -1)
        chosen[:, :5] = torch.arange(5, dtype=torch.int32, device=device)
        torch.library.opcheck(plan_lib.bipartite_plan_build, (cand, dst, match, chosen, li_arg, 36, 31, True))


def test_plan_build_compiles_without_graph_breaks(device):
    torch._dynamo.reset()

    def build(metric, li):
        ssm = sk.plan_ssm(metric, (8, 8), 48, li=li, backend="triton")
        idm = sk.plan_idm(metric, (8, 8), 16, li=li, backend="triton")
        return ssm.row_of_token, ssm.members, idm.row_of_token, idm.members, idm.row_start, idm.blend

    x = random_tokens(2, 64, 32, torch.float32, device, seed=41)
    li = random_li(2, 64, device)
    compiled = torch.compile(build, fullgraph=True)
    got = compiled(x, li)
    want = build(x, li)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    ssm_ref = sk.plan_ssm(x, (8, 8), 48, li=li, backend="reference")
    assert torch.equal(got[0], ssm_ref.row_of_token)


def test_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, sdtm_kernels, sdtm_kernels.ops; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_draws_are_shared_with_reference(device):
    # The Triton SSM build consumes the generator exactly like the reference.
    x = random_tokens(2, 64, 16, torch.float32, device, seed=42)
    gens = [torch.Generator().manual_seed(9) for _ in range(2)]
    sk.plan_ssm(x, (8, 8), 48, random_dst=True, generator=gens[0], backend="triton")
    ref_plans.ssm_plan(x, (8, 8), 48, random_dst=True, generator=gens[1])
    assert torch.equal(torch.randint(100, (5,), generator=gens[0]), torch.randint(100, (5,), generator=gens[1]))


def test_positions_drawn_beforehand(device):
    # dst_draw replaces the planner's own draw, on both backends: the k-th selected window takes
    # column k (SSM), window g column g (IDM without li); extra columns are ignored.
    x = random_tokens(2, 64, 16, torch.float32, device, seed=43)
    draw = torch.randint(0, 4, (2, 16), generator=torch.Generator().manual_seed(3)).to(device)
    for builder, n_remove in ((sk.plan_ssm, 48), (sk.plan_idm, 32)):
        plans = [builder(x, (8, 8), n_remove, random_dst=True, dst_draw=draw, backend=b) for b in ("triton", "reference")]
        assert_same_plan(*plans)
    ssm = sk.plan_ssm(x, (8, 8), 48, dst_draw=draw, backend="reference")
    tokens = window_token_index((8, 8), (2, 2))
    for b in range(2):
        selected = [g for g in range(16) if ssm.blend[b, tokens[g, 0]]]
        reps = {int(ssm.rep_token[b, ssm.row_of_token[b, tokens[g, 0]]]) for g in selected}
        assert reps == {int(tokens[g, int(draw[b, k])]) for k, g in enumerate(selected)}
    with pytest.raises(ValueError, match="dst_draw"):
        sk.plan_ssm(x, (8, 8), 48, dst_draw=draw[:, :3])
    with pytest.raises(TypeError, match="dst_draw"):
        sk.plan_idm(x, (8, 8), 32, dst_draw=draw.float())
