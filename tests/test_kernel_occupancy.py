"""Kernels that fill the GPU (issue 11 item 6): top-k, matching and the segment mean of the
merge split their work over many programs, with results independent of the split.

Grid tests compute the launch configuration a GPU would use for SD3-medium at 1024^2
(B=2, N=4096, C=1536: SSM rows of G=1024 window scores, IDM 3072 candidates x 1024 dsts)
without running a kernel. Kernel tests force splits at small sizes (several programs per
row, ties across split boundaries, one huge row) and compare with the reference; they run
on CUDA or in the Triton interpreter.
"""
import pytest
import torch

from helpers import assert_close, random_tokens, sign_tokens
from sdtm_kernels.csrc_triton import match as k_match
from sdtm_kernels.csrc_triton import merge as k_merge
from sdtm_kernels.csrc_triton import select as k_select
from sdtm_kernels.ops import _score_library as lib
from sdtm_kernels.reference import merge as ref_merge
from sdtm_kernels.reference import similarity as ref

H100_SMS = 132
SD3 = {"batch": 2, "tokens": 4096, "channels": 1536, "windows": 1024, "cand": 3072, "dst": 1024}


def _programs(grid):
    count = 1
    for g in grid:
        count *= g
    return count


@pytest.fixture(params=["interpreter", "gpu"])
def config(request, monkeypatch):
    """Run with the launchers' interpreter configuration or with the one a GPU uses (smaller
    tiles and chunks: more splits), in whichever mode the kernels execute."""
    if request.param == "gpu":
        monkeypatch.setattr(k_select, "_interpreting", lambda t: False)
        monkeypatch.setattr(k_match, "_interpreting", lambda t: False)
        if not torch.cuda.is_available():  # the interpreter's bf16 tl.dot is wrong: keep fp32 operands
            monkeypatch.setattr(k_match, "dot_operands_fp32", lambda dtype, interpret: True)
    return request.param


def _interpreting(config):
    """Whether the launchers pick their interpreter configuration under ``config``."""
    return config == "interpreter" and not torch.cuda.is_available()


# -- launch grids at SD3 sizes (no kernel runs) -------------------------------------------------
@pytest.mark.parametrize("n", [SD3["windows"], SD3["cand"]])
def test_topk_grid_fills_an_h100(n):
    grid, block, chunk, _ = k_select.topk_config(SD3["batch"], n, interpret=False)
    assert grid[1] == SD3["batch"] and grid[0] > 1  # several programs per batch row (was 1)
    assert _programs(grid) > H100_SMS
    assert grid[0] * chunk >= n and chunk <= block


def test_match_grid_fills_an_h100():
    cfg = k_match.match_config(SD3["batch"], SD3["cand"], SD3["dst"], SD3["channels"], interpret=False)
    block_m, block_n = cfg["blocks"][:2]
    unsplit = -(-SD3["cand"] // block_m) * SD3["batch"]
    assert unsplit < H100_SMS  # one program per candidate block: 96
    assert cfg["splits"] > 1 and _programs(cfg["match_grid"]) > H100_SMS
    assert cfg["dst_per_split"] % block_n == 0 and cfg["dst_per_split"] * cfg["splits"] >= SD3["dst"]
    assert (cfg["splits"] - 1) * cfg["dst_per_split"] < SD3["dst"]  # no empty split
    assert cfg["combine_grid"] is not None and _programs(cfg["norms_grid"]) > H100_SMS
    # Small problems are not split: one launch writes the result.
    small = k_match.match_config(1, 40, 16, 64, interpret=False)
    assert small["splits"] == 1 and small["combine_grid"] is None


def test_segment_reduce_bounds_the_longest_row():
    n, c = SD3["tokens"], SD3["channels"]
    cfg = k_merge.segment_config(SD3["batch"], n, n - 1500, c)
    assert _programs(cfg["chunk_grid"]) > H100_SMS and _programs(cfg["row_grid"]) > H100_SMS
    # An exactly constant region: one row of ~1,500 members (one program looped 1,500 times).
    for lo in (0, 5, 1000):
        assert k_merge.segment_row_steps(lo, lo + 1500, n, c) <= 32
    assert k_merge.segment_row_steps(7, 11, n, c) == 1  # a 2x2 window's row: one step


# -- top-k with several programs per row -------------------------------------------------------
def _reference_rank(scores, k):
    return lib.topk_rank(scores, k, "reference")


def test_topk_splits_rows_ties_across_chunks(device, config):
    n = 1100 if config == "interpreter" else 600
    grid, _, chunk, _ = k_select.topk_config(2, n, interpret=_interpreting(config))
    assert grid[0] > 2
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (2, n), generator=gen).float() / 4  # 5 values: ties span every chunk
    scores[1, ::7] = float("nan")
    scores[1, 3::11] = float("-inf")
    scores[0, :chunk + 3] = 1.0  # a run of maxima across the first chunk boundary
    scores[0, 2 * chunk - 2:2 * chunk + 2] = -0.0
    scores = scores.to(device)
    for k in (0, 1, chunk - 1, chunk + 2, 517, n - 1, n) if config == "interpreter" else (chunk + 2, n):
        got = lib.topk_rank(scores, k, "triton")
        assert torch.equal(got, _reference_rank(scores, k)), k


def test_topk_splits_rows_permutation(device, config):
    n, k = 900, 333
    gen = torch.Generator().manual_seed(5)
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(3)])
    scores = ((perm.float() - n / 2) / 9.0).to(device)
    got = lib.topk_rank(scores, k, "triton")
    assert torch.equal(got, _reference_rank(scores, k))
    assert torch.equal(got.max(1).values.cpu(), torch.full((3,), k - 1, dtype=torch.int32))


# -- matching with the dsts split across programs --------------------------------------------
def test_match_ties_across_dst_splits(device, config):
    channels = 16
    x = sign_tokens(2, 400, channels, device, seed=21)
    cfg = k_match.match_config(2, 40, 300, channels, interpret=_interpreting(config))
    assert cfg["splits"] >= 3
    per = cfg["dst_per_split"]
    # Token 7's content sits only in splits 1 and 2 (never in split 0): position `per` wins.
    dst = torch.arange(100, 400, device=device).expand(2, -1).clone()
    dst[:, per] = dst[:, per + 1] = dst[:, 2 * per] = dst[:, -1] = 7
    cand = torch.arange(0, 40, device=device).expand(2, -1)
    for dtype in (torch.float32, torch.bfloat16):
        best, match = k_match.bipartite_match(x.to(dtype), cand, dst)
        want_best, want_match = ref.bipartite_match(x.to(dtype), cand, dst)
        assert torch.equal(match, want_match) and torch.equal(best, want_best)  # multiples of 1/16
        assert match[:, 7].tolist() == [per, per] and best[:, 7].tolist() == [1.0, 1.0]
    # Every dst identical: the first position of the first split.
    best, match = k_match.bipartite_match(x, cand, torch.full((2, 300), 9, device=device))
    assert torch.equal(match, torch.zeros_like(match))


def test_match_split_matches_reference(device, config):
    batch, n, channels, num_cand, num_dst = 2, 520, 40, 200, 300
    x = random_tokens(batch, n, channels, torch.float32, device, seed=8)
    x[:, 3] = 0.0
    x[1, 4, 2] = float("inf")  # never matched while a finite dst exists
    gen = torch.Generator().manual_seed(9)
    cand = torch.randint(0, n, (batch, num_cand), generator=gen).to(device)
    dst = torch.randint(0, n, (batch, num_dst), generator=gen).to(device)
    dst[1, 250] = 4
    best, match = k_match.bipartite_match(x, cand, dst)
    want_best, want_match = ref.bipartite_match(x, cand, dst)
    assert k_match.match_config(batch, num_cand, num_dst, channels, _interpreting(config))["splits"] > 1
    finite = torch.isfinite(want_best)
    torch.testing.assert_close(best[finite], want_best[finite], rtol=1e-5, atol=1e-5)
    unit = ref.normalize_tokens(x.nan_to_num(posinf=0.0), torch.float64)
    sims = unit.gather(1, cand[..., None].expand(-1, -1, channels)) @ \
        unit.gather(1, dst[..., None].expand(-1, -1, channels)).transpose(1, 2)
    top2 = sims.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1] > 1e-4) & finite
    assert clear.float().mean() > 0.5 and torch.equal(match[clear], want_match[clear])
    assert not (match[1] == 250).any()


# -- segment mean with one huge row -------------------------------------------------------------
def _huge_row_plan(batch, n, lo, length, device, seed=0):
    """CSR of a plan whose row 1 holds ``length`` shuffled tokens starting at position ``lo``;
    every other token is its own row. Returns ``(members, row_start, row_of_token)``."""
    gen = torch.Generator().manual_seed(seed)
    members, starts, rows = [], [], []
    for _ in range(batch):
        perm = torch.randperm(n, generator=gen)
        big = perm[:length].sort().values[torch.randperm(length, generator=gen)]
        rest = perm[length:]
        order = torch.cat([rest[:lo], big, rest[lo:]])
        sizes = [1] * lo + [length] + [1] * (n - length - lo)
        start = torch.tensor([0] + sizes).cumsum(0)
        row = torch.empty(n, dtype=torch.long)
        for m, (a, b) in enumerate(zip(start[:-1].tolist(), start[1:].tolist())):
            row[order[a:b]] = m
        members.append(order)
        starts.append(start)
        rows.append(row)
    as_int = lambda ts: torch.stack(ts).to(device=device, dtype=torch.int32)  # noqa: E731
    return as_int(members), as_int(starts), as_int(rows)


@pytest.mark.parametrize("lo", [1, 37])
def test_segment_mean_one_huge_row(device, lo):
    batch, n, length, channels = 2, 1600, 1500, 48
    members, row_start, row_of_token = _huge_row_plan(batch, n, lo, length, device)
    num_rows = n - length + 1
    assert k_merge.segment_row_steps(lo, lo + length, n, channels) <= 32
    x = random_tokens(batch, n, channels, torch.float32, device, seed=2)
    want = ref_merge.merge_mean(x, row_of_token, num_rows)
    got = k_merge.merge_mean(x, members, row_start)
    assert_close(got, want)
    assert torch.equal(got, k_merge.merge_mean(x, members, row_start))  # deterministic
    # An exactly constant region stays exactly constant; bf16 in, bf16 out.
    const = torch.full((batch, n, channels), 0.375, device=device).to(torch.bfloat16)
    got = k_merge.merge_mean(const, members, row_start)
    assert got.dtype == torch.bfloat16 and torch.equal(got, const[:, :num_rows])
    # The weighted sum of the unmerge backward (mcw on blend tokens, gate) goes through the chunks too.
    blend = (torch.arange(n, device=device) % 3 == 0).expand(batch, -1).contiguous()
    gate = random_tokens(1, batch, channels, torch.float32, device, seed=3)[0]
    got = k_merge.unmerge_backward_y(x, members, row_start, gate=gate, blend=blend, mcw=0.25)
    weight = torch.where(blend, 0.25, 1.0)[..., None]
    want = torch.stack([torch.zeros(num_rows, channels, dtype=torch.float64, device=device)
                        .index_add_(0, row_of_token[b].long(), (x[b] * weight[b]).double()) for b in range(batch)])
    torch.testing.assert_close(got.double(), want * gate[:, None].double(), rtol=1e-5, atol=1e-4)


def test_segment_mean_huge_row_fp64_and_half(device):
    batch, n, length = 1, 1200, 1100
    members, row_start, row_of_token = _huge_row_plan(batch, n, 0, length, device, seed=4)
    for dtype in (torch.float64, torch.float16):
        x = random_tokens(batch, n, 16, dtype, device, seed=5)
        want = ref_merge.merge_mean(x.double(), row_of_token, n - length + 1)
        assert_close(k_merge.merge_mean(x, members, row_start).double(), want, dtype)


def test_segment_mean_decreasing_row_start_sums_each_span(device):
    # Overlapping spans (an invalid plan, unchecked): each row still sums its own clamped span,
    # including whole chunks that the first pass left out.
    n, channels = 96, 16
    x = torch.arange(n * channels, dtype=torch.float32, device=device).view(1, n, channels) / 64
    members = torch.arange(n, dtype=torch.int32, device=device)[None]
    row_start = torch.tensor([[0, 10, 0, 96]], dtype=torch.int32, device=device)
    got = k_merge.segment_reduce(x, members, row_start, mean=False)
    want = torch.stack([x[0, :10].sum(0), torch.zeros(channels, device=device), x[0].sum(0)])[None]
    torch.testing.assert_close(got, want)


def test_ssm_plans_skip_the_long_row_pass_with_the_same_result():
    """SSM rows are whole windows or single tokens: ``max_members`` (the window size) spares the
    chunk pass, and the merge is the same as with it."""
    import sdtm_kernels as sk

    torch.manual_seed(0)
    metric = torch.randn(2, 256, 32)
    plan = sk.plan_ssm(metric, (16, 16), 120, backend="triton")
    assert plan.max_members == 4 and plan.num_rows < 256
    x = torch.randn(2, 256, 32)
    with_pass = k_merge.merge_mean(x, plan.members, plan.row_start)
    without = k_merge.merge_mean(x, plan.members, plan.row_start, max_members=plan.max_members)
    torch.testing.assert_close(without, with_pass, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plan.merge(x, backend="triton"), with_pass, rtol=1e-6, atol=1e-6)
