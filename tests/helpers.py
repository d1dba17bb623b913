"""Tolerances and comparison helpers shared by the test files (STYLE items 4-5)."""
import torch

# (rtol, atol) per dtype for values computed in fp32 and stored in the input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# Scores are fp32 dot products of normalised vectors: error grows with the reduction length C.
def score_atol(channels: int) -> float:
    return 1e-6 * max(1.0, channels ** 0.5) * 4


def assert_close(actual, expected, dtype=None):
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: actual's)."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def random_tokens(batch, num_tokens, channels, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_tokens, channels, generator=gen).to(device=device, dtype=dtype)


# -- inputs whose arithmetic is exact in any order --------------------------------------------
def sign_tokens(batch, num_tokens, channels=16, device="cpu", seed=0):
    """``[B, N, C]`` float32 tokens with entries +-1: norms are ``sqrt(C)`` (a power of two for
    C = 4, 16, 64, ...) and every dot product is an integer, so cosines are exact multiples of
    ``1 / C`` whatever the summation order. Use them to pin tie rules on any CPU or GPU."""
    root = round(channels ** 0.5)
    if root * root != channels or root & (root - 1):
        raise ValueError(f"channels must be a power of 4 for exact norms, got {channels}")
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (batch, num_tokens, channels), generator=gen).float() * 2 - 1
    return signs.to(device)


# -- plans from two backends: equal where the decisions are clear --------------------------------
# Two backends sum the same fp32 products in different orders (and numpy's matmul rounds by
# position on some CPUs), so similarities agree to a few ulp, not bitwise. Plans are compared
# exactly when every decision has a margin above DECISION_TOL; otherwise by what must hold.
DECISION_TOL = 1e-5
PLAN_FIELDS = ("row_of_token", "members", "row_start", "rep_token", "blend")


def assert_same_plan(actual, expected):
    assert actual.num_rows == expected.num_rows
    for name in PLAN_FIELDS:
        a, e = getattr(actual, name), getattr(expected, name)
        assert torch.equal(a, e), f"{name} differs:\n{a}\n{e}"


def _rows(plan, b):
    rows = {}
    for t, m in enumerate(plan.row_of_token[b].tolist()):
        rows.setdefault(m, []).append(t)
    return list(rows.values())


def _selection_margin(chosen_scores, other_scores):
    if chosen_scores.numel() == 0 or other_scores.numel() == 0:
        return float("inf")
    return float(chosen_scores.min() - other_scores.max())


def assert_ssm_plans_agree(got, want, scores64, window_tokens):
    """SSM plans from two backends. ``scores64 [B, G]``: the window scores in float64;
    ``window_tokens [G, K]``. Equal plans when the R-th and (R+1)-th scores are DECISION_TOL
    apart; otherwise the chosen windows must score within DECISION_TOL of the best choice."""
    assert got.num_rows == want.num_rows
    got.check()
    first_token = {int(toks[0]): g for g, toks in enumerate(window_tokens.tolist())}
    clear = True
    for b in range(got.batch_size):
        chosen = [first_token[r[0]] for r in _rows(got, b) if len(r) > 1]
        mask = torch.zeros(scores64.shape[1], dtype=torch.bool)
        mask[chosen] = True
        margin = _selection_margin(scores64[b][mask], scores64[b][~mask])
        assert margin > -DECISION_TOL, f"batch {b}: a window scoring {-margin:.3g} more was left out"
        want_chosen = [first_token[r[0]] for r in _rows(want, b) if len(r) > 1]
        want_mask = torch.zeros_like(mask)
        want_mask[want_chosen] = True
        clear &= _selection_margin(scores64[b][want_mask], scores64[b][~want_mask]) > DECISION_TOL
    if clear:
        assert_same_plan(got, want)


def assert_bipartite_plans_agree(got, want, metric, rank_score=None):
    """IDM / ToMe plans from two backends. The dst set must be equal (it comes from ``li`` or
    the generator, never from rounding). Equal plans when every merged candidate's top-2 dst
    similarities and the selection boundary are DECISION_TOL apart; otherwise each merged
    candidate must sit with a dst within DECISION_TOL of its best, and the merged candidates
    must rank within DECISION_TOL of the best choice (``rank_score [B, N]`` when candidates are
    ranked by something else than their best similarity)."""
    assert got.num_rows == want.num_rows
    got.check()
    unit = metric.detach().double().cpu()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    clear = True
    for b in range(got.batch_size):
        dst_sets = []
        for plan in (got, want):
            merged = {t for r in _rows(plan, b) if len(r) > 1 for t in r} - set(plan.rep_token[b].tolist())
            dst_sets.append(sorted(set(plan.blend[b].nonzero().squeeze(1).tolist()) - merged))
        assert dst_sets[0] == dst_sets[1], f"batch {b}: dst tokens differ"
        dsts = torch.tensor(dst_sets[0], dtype=torch.long)
        num_tokens = got.num_tokens
        is_dst = torch.zeros(num_tokens, dtype=torch.bool)
        is_dst[dsts] = True
        cands = (~is_dst).nonzero().squeeze(1)
        sims = unit[b, cands] @ unit[b, dsts].T  # [Na, D]
        best = sims.max(dim=1).values if dsts.numel() else torch.zeros(cands.numel(), dtype=torch.float64)
        score = best if rank_score is None else rank_score[b].detach().double().cpu()[cands]
        for plan, check in ((got, True), (want, False)):
            rep_of_token = plan.rep_token[b].long()[plan.row_of_token[b].long()]
            merged = rep_of_token[cands] != cands
            margin = _selection_margin(score[merged], score[~merged])
            if check:
                assert margin > -DECISION_TOL, f"batch {b}: a candidate ranking {-margin:.3g} higher was not merged"
                joined = (dsts[None, :] == rep_of_token[cands][:, None]).float().argmax(dim=1)
                chosen_sim = sims.gather(1, joined[:, None]).squeeze(1)
                assert bool((chosen_sim[merged] >= best[merged] - DECISION_TOL).all()), \
                    f"batch {b}: a candidate joined a dst that is not (nearly) its most similar"
            else:
                top2 = sims.topk(min(2, sims.shape[1]), dim=1).values if sims.shape[1] else sims
                gap = (top2[:, 0] - top2[:, -1]) if sims.shape[1] > 1 else torch.full_like(best, float("inf"))
                clear &= margin > DECISION_TOL and bool((gap[merged] > DECISION_TOL).all())
    if clear:
        assert_same_plan(got, want)


# -- host reads (synchronisation with the GPU) inside watched modules -----------------------------
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
              torch.Tensor.numpy, torch.equal}


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every torch function that reads a tensor value on the host (``HOST_READS``)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def host_reads_in(modules, fn):
    """The host reads made inside the calls of ``modules`` while ``fn()`` runs."""
    reads = HostReads()

    def start(*_):
        reads.__enter__()

    def stop(*_):
        reads.__exit__(None, None, None)

    handles = []
    for module in modules:
        handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return reads.seen
