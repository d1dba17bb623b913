"""Property tests of the public API on the reference backend (CPU plans).

Hypothesis draws awkward shapes on purpose (STYLE item 7): batch 1..3, any H x W grid from
1..9 that the window fits (windows need not divide it), C 1..24, every supported dtype,
``n_remove`` from 0 to well beyond N, ``li`` present or not, random dsts on or off with a
seeded ``torch.Generator``, zero / duplicated / constant tokens and strided inputs.

Expected values are computed here independently (Python loops or float64 index ops), never
with ``sdtm_kernels.reference``. Pure copies (gather/unmerge/prune, singleton rows) are
compared exactly, arithmetic with the per-dtype table of ``tests/helpers.py`` (STYLE item 5).

The runs are derandomized (fixed examples, no example database) so CI is reproducible.
"""
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sdtm_kernels
from sdtm_kernels import MergePlan, ops, plan_idm, plan_ssm, plan_tome, ratio_schedule

from helpers import TOLERANCES

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
WINDOWS = ((2, 2), (1, 2), (2, 1), (3, 2), (2, 3))
METHODS = ("ssm", "idm", "tome")
GRANULE = 16  # the released code merges in multiples of 16


def _settings(max_examples):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    method: str
    batch: int
    grid: tuple
    window: tuple
    channels: int
    dtype: torch.dtype
    n_remove: int
    metric_kind: str  # "randn", "zeros", "some_zero", "duplicates", "constant"
    layout: str  # "contiguous", "padded" (sliced C), "batch_major" (transposed B/N)
    use_li: bool
    li_high: int
    random_dst: bool
    seed: int
    score: str
    backend: Optional[str]

    @property
    def num_tokens(self):
        return self.grid[0] * self.grid[1]

    def tokens(self, seed_offset=0, kind=None, channels=None):
        """A ``[B, N, C]`` tensor in ``self.dtype`` with the requested content and layout."""
        kind = kind or self.metric_kind
        channels = channels or self.channels
        b, n = self.batch, self.num_tokens
        gen = torch.Generator().manual_seed(self.seed * 7919 + seed_offset)
        base = torch.randn(b, n, channels, generator=gen, dtype=torch.float64)
        if kind == "zeros":
            base.zero_()
        elif kind == "some_zero":
            base[torch.rand(b, n, generator=gen) < 0.4] = 0.0
        elif kind == "duplicates":
            src = torch.randint(0, max(1, n // 3), (b, n), generator=gen)
            base = base.gather(1, src.unsqueeze(-1).expand(-1, -1, channels))
        elif kind == "constant":
            base = base[:1, :1].expand(b, n, channels).clone()
        base = base.to(self.dtype)
        return _with_layout(base, self.layout)

    def li(self):
        if not self.use_li:
            return None
        gen = torch.Generator().manual_seed(self.seed * 31 + 5)
        return torch.randint(0, self.li_high + 1, (self.batch, self.num_tokens), generator=gen,
                             dtype=torch.int32)

    def generator(self):
        return torch.Generator().manual_seed(self.seed) if self.random_dst else None


def _with_layout(t, layout):
    """Same values, other strides (unit stride in C always)."""
    if layout == "padded":
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
        wide[..., 1:1 + t.shape[-1]] = t
        out = wide[..., 1:1 + t.shape[-1]]
    elif layout == "batch_major":
        out = t.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        out = t.contiguous()
    assert torch.equal(out, t)
    return out


@st.composite
def cases(draw, methods=METHODS, metric_kinds=("randn", "randn", "zeros", "some_zero", "duplicates", "constant")):
    method = draw(st.sampled_from(methods))
    window = draw(st.sampled_from(WINDOWS))
    # Small grids (N = 1.. , windows that do not divide the grid) and larger ones, where the
    # rounding to multiples of 16 leaves something to merge.
    height = draw(st.one_of(st.integers(window[0], 9), st.integers(max(window[0], 6), 9)))
    width = draw(st.one_of(st.integers(window[1], 9), st.integers(max(window[1], 6), 9)))
    n = height * width
    window_size = window[0] * window[1]
    # Plenty of mass above the rounding thresholds, so that plans are not all identities.
    n_remove = draw(st.one_of(
        st.integers(0, n),
        st.integers(n, 4 * n + 64),
        st.sampled_from([(window_size - 1) * GRANULE, 2 * (window_size - 1) * GRANULE, GRANULE, 2 * GRANULE]),
    ))
    return Case(
        method=method,
        batch=draw(st.integers(1, 3)),
        grid=(height, width),
        window=window,
        channels=draw(st.integers(1, 24)),
        dtype=draw(st.sampled_from(DTYPES)),
        n_remove=n_remove,
        metric_kind=draw(st.sampled_from(metric_kinds)),
        layout=draw(st.sampled_from(("contiguous", "padded", "batch_major"))),
        use_li=draw(st.booleans()) and method != "tome",
        li_high=draw(st.sampled_from([0, 1, 3, 100])),
        random_dst=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 20)),
        score=draw(st.sampled_from(("released", "paper"))),
        backend=draw(st.sampled_from((None, "reference"))),
    )


def build_plan(case, metric=None, li="case"):
    metric = case.tokens() if metric is None else metric
    li = case.li() if li == "case" else li
    common = dict(window=case.window, random_dst=case.random_dst, generator=case.generator(),
                  backend=case.backend)
    if case.method == "ssm":
        return plan_ssm(metric, case.grid, case.n_remove, li=li, score=case.score, **common)
    if case.method == "idm":
        return plan_idm(metric, case.grid, case.n_remove, li=li, **common)
    return plan_tome(metric, case.grid, case.n_remove, **common)


# ---------------------------------------------------------------------------------------------
# Independent expectations
# ---------------------------------------------------------------------------------------------
def window_tokens(grid, window):
    """Token lists of the whole windows in raster window order, positions in raster order."""
    height, width = grid
    wh, ww = window
    out = []
    for gi in range(height // wh):
        for gj in range(width // ww):
            out.append([(gi * wh + di) * width + gj * ww + dj for di in range(wh) for dj in range(ww)])
    return out


def expected_removed(case):
    n = case.num_tokens
    windows = window_tokens(case.grid, case.window)
    g, k = len(windows), case.window[0] * case.window[1]
    if case.method == "ssm":
        return (k - 1) * min(case.n_remove // ((k - 1) * GRANULE) * GRANULE, g)
    if case.method == "idm":
        return min(n - g, case.n_remove) // GRANULE * GRANULE
    return min(case.n_remove, n - g)


def rows_as_lists(plan, b):
    """Row m's member list from the CSR fields (members / row_start)."""
    starts = plan.row_start[b].tolist()
    members = plan.members[b].tolist()
    return [members[starts[m]:starts[m + 1]] for m in range(plan.num_rows)]


def mean_by_row_f64(x, plan):
    """``[B, M, C]`` float64 mean of the tokens with ``row_of_token == m``, via index_add."""
    b, _, c = x.shape
    out = torch.zeros(b, plan.num_rows, c, dtype=torch.float64)
    counts = torch.zeros(b, plan.num_rows, dtype=torch.float64)
    for i in range(b):
        rows = plan.row_of_token[i].long()
        out[i].index_add_(0, rows, x[i].double())
        counts[i].index_add_(0, rows, torch.ones(rows.shape[0], dtype=torch.float64))
    return out / counts.unsqueeze(-1)


def gather_rows(y, index):
    """``y[b, index[b, t]]`` for every b, t (``[B, T, C]``)."""
    return torch.stack([y[i, index[i].long()] for i in range(y.shape[0])])


def singleton_mask(plan):
    counts = plan.row_counts.long()
    return torch.stack([counts[i, plan.row_of_token[i].long()] == 1 for i in range(plan.batch_size)])


def expected_dst_positions(case, li):
    """dst position per window ``[B, G]`` as documented: li argmax (first max), else the
    documented ``randint`` draw from the plan's generator, else 0."""
    windows = window_tokens(case.grid, case.window)
    g, k = len(windows), case.window[0] * case.window[1]
    if case.method == "idm" and li is not None:
        pos = torch.zeros(case.batch, g, dtype=torch.long)
        for b in range(case.batch):
            for w, toks in enumerate(windows):
                vals = [int(li[b, t]) for t in toks]
                pos[b, w] = vals.index(max(vals))
        return pos
    if not case.random_dst:
        return torch.zeros(case.batch, g, dtype=torch.long)
    gen = torch.Generator().manual_seed(case.seed)
    if case.method == "idm":
        return torch.randint(k, (case.batch, g), generator=gen)
    return torch.randint(k, (g,), generator=gen).expand(case.batch, g)


def assert_plan_tensors_equal(p, q):
    for name in ("row_of_token", "members", "row_start", "rep_token", "blend"):
        assert torch.equal(getattr(p, name), getattr(q, name)), name
    assert (p.num_tokens, p.num_rows) == (q.num_tokens, q.num_rows)


# ---------------------------------------------------------------------------------------------
# Plan structure
# ---------------------------------------------------------------------------------------------
@_settings(400)
@given(case=cases())
def test_plan_structure(case):
    metric = case.tokens()
    li = case.li()
    metric_before = metric.clone()
    li_before = None if li is None else li.clone()
    plan = build_plan(case, metric, li)

    # Inputs are not modified; the same generator seed gives the same plan.
    assert torch.equal(metric, metric_before)
    if li is not None:
        assert torch.equal(li, li_before)
    assert_plan_tensors_equal(plan, build_plan(case, metric, li))

    assert isinstance(plan, MergePlan)
    assert plan.check() is plan
    n, b = case.num_tokens, case.batch
    windows = window_tokens(case.grid, case.window)
    window_of_token = {t: w for w, toks in enumerate(windows) for t in toks}
    assert plan.num_tokens == n and plan.batch_size == b
    assert plan.num_removed == expected_removed(case)
    assert plan.num_rows == n - plan.num_removed
    for name, dtype, shape in (("row_of_token", torch.int32, (b, n)), ("members", torch.int32, (b, n)),
                               ("row_start", torch.int32, (b, plan.num_rows + 1)),
                               ("rep_token", torch.int32, (b, plan.num_rows)), ("blend", torch.bool, (b, n))):
        value = getattr(plan, name)
        assert value.dtype == dtype and tuple(value.shape) == shape, name
        assert value.device.type == "cpu"
    assert torch.equal(plan.row_counts.long().sum(1), torch.full((b,), n))
    assert bool((plan.row_counts >= 1).all())

    singletons = singleton_mask(plan)
    if case.method != "ssm":
        # The public matching op on the documented dsts (one per window, window order) and
        # candidates (every other token, ascending), for the whole batch at once.
        dst_pos = expected_dst_positions(case, li)
        dst_all = torch.tensor([[toks[int(dst_pos[i, w])] for w, toks in enumerate(windows)] for i in range(b)])
        cand_all = torch.tensor([[t for t in range(n) if t not in set(row.tolist())] for row in dst_all])
        best, match = ops.bipartite_match(metric, cand_all.reshape(b, n - len(windows)), dst_all)
        assert best.dtype == torch.float32 and match.dtype == torch.int32
        assert torch.isfinite(best).all()
    for i in range(b):
        rows = rows_as_lists(plan, i)
        row_of_token = plan.row_of_token[i].tolist()
        rep = plan.rep_token[i].tolist()
        blend = plan.blend[i].tolist()
        assert sorted(t for r in rows for t in r) == list(range(n))
        firsts = [r[0] for r in rows]
        assert firsts == sorted(set(firsts)), "rows must be ordered by their lowest member"
        for m, r in enumerate(rows):
            assert r == sorted(set(r)), "members ascending inside a row"
            assert all(row_of_token[t] == m for t in r)
            assert rep[m] in r
        multi = [r for r in rows if len(r) > 1]

        if case.method == "ssm":
            # Blend: exactly the tokens of multi-member rows, and those rows are whole windows.
            assert blend == [not s for s in singletons[i].tolist()]
            assert len(multi) * (len(windows[0]) - 1) == plan.num_removed
            selected = []
            for r in multi:
                w = window_of_token[r[0]]
                assert r == sorted(windows[w])
                selected.append(w)
            # The R best windows by the public score op, ties to the lower window index.
            scores = ops.window_scores(metric, case.grid, window=case.window, li=li, a_s=0.05, score=case.score)
            assert torch.isfinite(scores).all()
            order = sorted(range(len(windows)), key=lambda w: (-float(scores[i, w]), w))
            assert selected == sorted(order[:len(multi)])
            if case.metric_kind == "zeros" and li is None:
                assert selected == list(range(len(multi)))  # all scores tie
            # dst of the k-th selected window: position 0, or the k-th documented draw.
            if case.random_dst:
                gen = torch.Generator().manual_seed(case.seed)
                pos = torch.randint(len(windows[0]), (b, len(multi)), generator=gen)[i].tolist()
            else:
                pos = [0] * len(multi)
            for k, r in enumerate(multi):
                assert rep[row_of_token[r[0]]] == windows[selected[k]][pos[k]]
        else:
            # One dst per whole window; each multi row holds exactly one dst (its rep_token);
            # blend = dsts (merged or not) + merged candidates.
            is_dst = [False] * n
            for w, toks in enumerate(windows):
                is_dst[toks[int(dst_pos[i, w])]] = True
            assert sum(is_dst) == len(windows)
            for r in multi:
                dsts = [t for t in r if is_dst[t]]
                assert len(dsts) == 1
                assert rep[row_of_token[r[0]]] == dsts[0]
            for m, r in enumerate(rows):
                if len(r) == 1:
                    assert rep[m] == r[0]
            in_multi = [not s for s in singletons[i].tolist()]
            assert blend == [d or mm for d, mm in zip(is_dst, in_multi)]
            assert sum(in_multi) - len(multi) == plan.num_removed
            # Merged candidates are the top-r of the public bipartite match (ties: lower token)
            # and each one sits in the row of its best dst.
            dst_tok, cand_tok = dst_all[i].tolist(), cand_all[i].tolist()
            assert cand_tok == [t for t in range(n) if not is_dst[t]]
            order = sorted(range(len(cand_tok)), key=lambda j: (-float(best[i, j]), j))
            merged = sorted(cand_tok[j] for j in order[:plan.num_removed])
            assert merged == sorted(t for t in range(n) if in_multi[t] and not is_dst[t])
            for j in order[:plan.num_removed]:
                assert row_of_token[cand_tok[j]] == row_of_token[dst_tok[int(match[i, j])]]


# ---------------------------------------------------------------------------------------------
# Applying plans
# ---------------------------------------------------------------------------------------------
@_settings(350)
@given(case=cases(), x_kind=st.sampled_from(("randn", "randn", "zeros", "some_zero", "duplicates")),
       constant=st.floats(-100.0, 100.0, allow_nan=False, width=16))
def test_merge_mean_and_unmerge(case, x_kind, constant):
    plan = build_plan(case)
    rtol, atol = TOLERANCES[case.dtype]
    x = case.tokens(seed_offset=1, kind=x_kind)
    x_before = x.clone()

    merged = plan.merge(x, backend=case.backend)
    assert merged.dtype == case.dtype and tuple(merged.shape) == (case.batch, plan.num_rows, case.channels)
    assert torch.isfinite(merged).all()
    assert torch.equal(x, x_before)
    assert torch.equal(plan.merge(x, "mean", backend=case.backend), merged)
    torch.testing.assert_close(merged.double(), mean_by_row_f64(x, plan), rtol=rtol, atol=atol)

    singletons = singleton_mask(plan)
    counts = plan.row_counts
    for i in range(case.batch):
        single_rows = (counts[i] == 1).nonzero().flatten()
        # The mean of one value is that value, exactly, in every dtype.
        assert torch.equal(merged[i, single_rows], x[i, plan.rep_token[i, single_rows].long()])

    merged_before = merged.clone()
    restored = plan.unmerge(merged, backend=case.backend)
    assert restored.dtype == case.dtype and tuple(restored.shape) == tuple(x.shape)
    assert torch.equal(merged, merged_before)
    # unmerge is a pure copy: exact gather by row_of_token.
    assert torch.equal(restored, gather_rows(merged, plan.row_of_token))
    assert torch.equal(restored[singletons], x[singletons])
    torch.testing.assert_close(restored.double(), gather_rows(mean_by_row_f64(x, plan), plan.row_of_token),
                               rtol=rtol, atol=atol)

    # A constant tensor merges (and unmerges) to the constant.
    c = torch.tensor(constant, dtype=case.dtype)
    const = torch.full(x.shape, float(c), dtype=case.dtype)
    merged_const = plan.merge(const, backend=case.backend)
    torch.testing.assert_close(merged_const, c.expand(merged_const.shape), rtol=rtol, atol=atol)
    torch.testing.assert_close(plan.unmerge(merged_const), c.expand(x.shape), rtol=rtol, atol=atol)


@_settings(250)
@given(case=cases(), x_kind=st.sampled_from(("randn", "zeros", "some_zero")))
def test_prune_keeps_representatives(case, x_kind):
    plan = build_plan(case)
    x = case.tokens(seed_offset=2, kind=x_kind)
    x_before = x.clone()
    pruned = plan.merge(x, "prune", backend=case.backend)
    assert torch.equal(x, x_before)
    assert pruned.dtype == case.dtype
    assert torch.equal(pruned, x.gather(1, plan.rep_token.long().unsqueeze(-1).expand(-1, -1, case.channels)))
    restored = plan.unmerge(pruned, backend=case.backend)
    # Every member of a row receives its representative, exactly.
    rep_of_token = plan.rep_token.long().gather(1, plan.row_of_token.long())
    assert torch.equal(restored, gather_rows(x, rep_of_token))
    singletons = singleton_mask(plan)
    assert torch.equal(restored[singletons], x[singletons])


@_settings(250)
@given(case=cases(), mode=st.sampled_from(("mean", "prune")), li_kind=st.sampled_from(("none", "int32", "int64")))
def test_update_li(case, mode, li_kind):
    plan = build_plan(case)
    if li_kind == "none":
        li = None
        base = torch.zeros(case.batch, case.num_tokens, dtype=torch.int64)
    else:
        gen = torch.Generator().manual_seed(case.seed + 11)
        li = torch.randint(0, 50, (case.batch, case.num_tokens), generator=gen,
                           dtype=torch.int32 if li_kind == "int32" else torch.int64)
        base = li.long()
    li_before = None if li is None else li.clone()
    if li_kind == "int64":  # only the int32 counter update_li returns (int64 would be truncated)
        with pytest.raises(TypeError, match="li"):
            plan.update_li(li, mode)
        return

    new = plan.update_li(li, mode)
    assert new.dtype == torch.int32 and tuple(new.shape) == (case.batch, case.num_tokens)
    if li is not None:
        assert torch.equal(li, li_before)
        assert new.data_ptr() != li.data_ptr()
    independent = ~plan.blend  # tokens outside every merge group (a dst without candidates is in one)
    if mode == "prune":
        for i in range(case.batch):
            independent[i, plan.rep_token[i].long()] = True
    expected = torch.where(independent, torch.zeros_like(base), base + 1)
    assert torch.equal(new.long(), expected)
    # Default mode is mean.
    assert torch.equal(plan.update_li(li), plan.update_li(li, "mean"))


@_settings(350)
@given(case=cases(), use_residual=st.booleans(), use_gate=st.booleans(), use_cache=st.booleans(),
       mcw=st.one_of(st.sampled_from([0.0, 1.0, 0.1]), st.floats(0.0, 1.0)))
def test_unmerge_epilogue(case, use_residual, use_gate, use_cache, mcw):
    plan = build_plan(case)
    rtol, atol = TOLERANCES[case.dtype]
    y = case.tokens(seed_offset=3, kind="randn")[:, :plan.num_rows]
    y = _with_layout(y.contiguous(), case.layout)
    residual = case.tokens(seed_offset=4, kind="randn") if use_residual else None
    cache = case.tokens(seed_offset=5, kind="randn") if use_cache else None
    gate = case.tokens(seed_offset=6, kind="randn")[:, 0] if use_gate else None
    inputs = [t for t in (y, residual, cache, gate) if t is not None]
    before = [t.clone() for t in inputs]

    out = plan.unmerge(y, residual=residual, gate=gate, cache=cache, mcw=mcw, backend=case.backend)

    for t, t0 in zip(inputs, before):
        assert torch.equal(t, t0), "unmerge modified an input in place"
    assert out.dtype == y.dtype and tuple(out.shape) == (case.batch, case.num_tokens, case.channels)
    assert all(out.data_ptr() != t.data_ptr() for t in inputs)

    value = gather_rows(y.double(), plan.row_of_token)
    if cache is not None:
        blend = plan.blend.unsqueeze(-1)
        value = torch.where(blend, mcw * value + (1.0 - mcw) * cache.double(), value)
    if gate is not None:
        value = gate.double()[:, None, :] * value
    if residual is not None:
        value = residual.double() + value
    torch.testing.assert_close(out.double(), value, rtol=rtol, atol=atol)
    if cache is None and gate is None and residual is None:
        assert torch.equal(out, gather_rows(y, plan.row_of_token))


# ---------------------------------------------------------------------------------------------
# Zero and constant tokens
# ---------------------------------------------------------------------------------------------
@_settings(200)
@given(case=cases(metric_kinds=("zeros", "some_zero", "constant")))
def test_zero_and_constant_tokens_are_finite(case):
    metric = case.tokens()
    li = case.li() if case.method != "tome" else None
    scores = ops.window_scores(metric, case.grid, window=case.window, li=li, a_s=0.05, score=case.score)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    windows = window_tokens(case.grid, case.window)
    assert tuple(scores.shape) == (case.batch, len(windows))
    n = case.num_tokens
    dst = torch.tensor([w[0] for w in windows]).expand(case.batch, -1)
    cand = torch.tensor([t for t in range(n) if t not in set(dst[0].tolist())], dtype=torch.long)
    cand = cand.expand(case.batch, -1)
    best, match = ops.bipartite_match(metric, cand, dst)
    assert best.dtype == torch.float32 and match.dtype == torch.int32
    assert torch.isfinite(best).all()
    assert bool(((match >= 0) & (match < len(windows))).all())
    if case.metric_kind == "zeros":
        # Zero tokens have cosine 0 with everything: every window ties, every match is dst 0.
        assert bool((best == 0).all()) and bool((match == 0).all())
        if li is None:
            assert bool((scores == scores[:, :1]).all())

    plan = build_plan(case, metric, li)
    plan.check()
    assert plan.num_removed == expected_removed(case)
    x = case.tokens(seed_offset=1)
    for mode in ("mean", "prune"):
        merged = plan.merge(x, mode)
        assert torch.isfinite(merged).all()
        assert torch.isfinite(plan.unmerge(merged)).all()


# ---------------------------------------------------------------------------------------------
# Ratio schedule
# ---------------------------------------------------------------------------------------------
@st.composite
def schedules(draw):
    lo = draw(st.floats(0.0, 0.999, allow_nan=False, exclude_max=False))
    hi = draw(st.floats(lo, 0.999, allow_nan=False))
    ratio, deviation = (lo + hi) / 2.0, (hi - lo) / 2.0
    assume(ratio - deviation >= 0.0 and ratio + deviation < 1.0 and deviation >= 0.0)
    num_steps = draw(st.integers(1, 200))
    return ratio, deviation, num_steps


@_settings(500)
@given(params=schedules())
def test_ratio_schedule(params):
    ratio, deviation, num_steps = params
    rhos = [ratio_schedule(step, num_steps, ratio, deviation) for step in range(num_steps)]
    assert all(isinstance(r, float) for r in rhos)
    assert math.isclose(rhos[0], ratio + deviation, rel_tol=0.0, abs_tol=1e-12)
    if num_steps > 1:
        assert math.isclose(rhos[-1], ratio - deviation, rel_tol=0.0, abs_tol=1e-12)
    assert all(a >= b for a, b in zip(rhos, rhos[1:])), "schedule must not increase"
    assert all(0.0 <= r < 1.0 for r in rhos), "rho must stay in [0, 1)"
    # Closed form at a middle step.
    mid = num_steps // 2
    progress = mid / (num_steps - 1) if num_steps > 1 else 0.0
    expected = (ratio - deviation) + 2 * deviation * math.cos(progress * math.pi / 2)
    assert math.isclose(rhos[mid], expected, rel_tol=0.0, abs_tol=1e-12)


@pytest.mark.parametrize("ratio,deviation", [(0.3, 0.2), (0.6, 0.2), (0.0, 0.0), (0.5, 0.0), (0.5, 0.4999)])
def test_ratio_schedule_single_step_and_defaults(ratio, deviation):
    assert math.isclose(ratio_schedule(0, 1, ratio, deviation), ratio + deviation, abs_tol=1e-12)
    assert math.isclose(ratio_schedule(49, 50, ratio, deviation), ratio - deviation, abs_tol=1e-12)
    assert 0.0 <= ratio_schedule(25, 50, ratio, deviation) < 1.0


# ---------------------------------------------------------------------------------------------
# Pinned small cases (readable counterparts of the properties above)
# ---------------------------------------------------------------------------------------------
def test_identity_when_nothing_is_removed():
    metric = torch.randn(2, 6 * 5, 8)
    # Window position 0 of the 3x2 = 6 windows of a 6x5 grid (2x2 windows; column 4 is outside).
    dsts = [0, 2, 10, 12, 20, 22]
    ident = MergePlan.identity(2, 30)
    for plan, blended in ((plan_ssm(metric, (6, 5), 47), []), (plan_idm(metric, (6, 5), 15), dsts),
                          (plan_tome(metric, (6, 5), 0, random_dst=False), dsts)):
        assert plan.num_rows == plan.num_tokens == 30
        assert torch.equal(plan.row_of_token, ident.row_of_token)
        assert torch.equal(plan.members, ident.members)
        assert torch.equal(plan.row_start, ident.row_start)
        assert torch.equal(plan.rep_token, ident.rep_token)
        # SSM blends only collapsed windows; IDM / ToMe blend every dst, merged into or not.
        for i in range(2):
            assert [t for t in range(30) if plan.blend[i, t]] == blended
        assert torch.equal(plan.merge(metric), metric)
        assert torch.equal(plan.unmerge(metric), metric)


def test_ssm_clamps_to_all_windows():
    # 5x5 grid, 2x2 windows: G = 4; asking for far more than N collapses every window (the
    # release crashed here).
    metric = torch.randn(1, 25, 4)
    plan = plan_ssm(metric, (5, 5), 10_000)
    assert plan.num_removed == 3 * 4
    assert plan.row_counts.tolist() == [[4, 4, 1, 1, 4, 4, 1, 1, 1, 1, 1, 1, 1]]
    assert sdtm_kernels.MergePlan is MergePlan
