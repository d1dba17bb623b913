"""Bad values inside tensors (project issue 10), on both backends.

* Index values of the drop-in ops (``ops.merge`` / ``ops.prune`` / ``ops.unmerge``): a
  ``ValueError`` naming the argument on CPU tensors (and on any device in debug mode), the
  same message on both backends; without the check (``torch.ops.sdtm.*`` called directly,
  or a GPU without debug mode) nothing is read out of bounds and the result follows the
  documented fallback (an out-of-range gather index reads zeros, out-of-range members add
  nothing, CSR row bounds are clamped to ``[0, N]``).
* ``ops.merge`` computes its forward from ``members`` / ``row_start`` on both backends.
* NaN / inf in the metric: non-finite tokens are never preferred for merging, identically on
  the reference and the Triton kernels (interpreter on CPU).
* Triton planners with batch 0 or C = 0 give the reference's plans.
* ``random_dst`` must be a bool; ``MergePlan.update_li`` takes only the int32 counter.

Inputs are hand-built; value comparisons that involve rounding use tolerances.
"""
import pytest
import torch

from sdtm_kernels import MergePlan, ops, plan_idm, plan_idm_attention, plan_ssm, plan_tome
from sdtm_kernels import _validation
from sdtm_kernels.csrc_triton import merge as kernels
from sdtm_kernels.reference import merge as ref
from sdtm_kernels.reference import plans as ref_plans
from sdtm_kernels.reference.windows import window_token_index

BACKENDS = ("reference", "triton")
FIELDS = ("row_of_token", "members", "row_start", "rep_token", "blend")
B, C = 2, 8
INT32_MAX = 2**31 - 1


def _tokens(*shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.fixture
def ssm_plan():
    # 4x4 grid, 2x2 windows, 2 of the 4 windows collapsed per batch row (windows 0 and 3, then
    # 1 and 2): 10 rows, counts 4 and 1.
    rep = torch.arange(16).repeat(B, 1)
    blend = torch.zeros(B, 16, dtype=torch.bool)  # every token of a collapsed window
    for b, windows in enumerate((([0, 1, 4, 5], [10, 11, 14, 15]), ([2, 3, 6, 7], [8, 9, 12, 13]))):
        for window in windows:
            rep[b, window] = window[0]
            blend[b, window] = True
    tensors = ref_plans.assemble_plan(rep, 10, blend)
    plan = MergePlan(*tensors[:5], num_tokens=16, num_rows=10)
    assert plan.row_counts.tolist() == [[4, 1, 1, 1, 1, 1, 1, 4, 1, 1], [1, 1, 4, 1, 1, 4, 1, 1, 1, 1]]
    return plan


@pytest.fixture(autouse=True)
def _no_debug_leak():
    yield
    _validation.set_debug(None)


def _fields(plan):
    return {name: getattr(plan, name).clone() for name in FIELDS}


def _corrupted(plan, name, index, value):
    fields = _fields(plan)
    fields[name][index] = value
    return fields


# ---------------------------------------------------------------------------------------------
# 1a. Value checks of the drop-in ops: ValueError naming the argument, on both backends
# ---------------------------------------------------------------------------------------------
def _run_op(op, fields, plan, x, y, backend):
    if op == "merge":
        return ops.merge(x, fields["row_of_token"], fields["members"], fields["row_start"], plan.num_rows,
                         backend=backend)
    if op == "prune":
        return ops.prune(x, fields["rep_token"], backend=backend)
    return ops.unmerge(y, fields["row_of_token"], blend=fields["blend"], cache=x, mcw=0.5, backend=backend)


VALUE_CASES = {
    # case: (op, field, index, value)
    "merge_row_of_token_too_big": ("merge", "row_of_token", (0, 3), 10),
    "merge_row_of_token_negative": ("merge", "row_of_token", (1, 0), -1),
    "merge_members_too_big": ("merge", "members", (0, 5), 16),
    "merge_members_huge": ("merge", "members", (1, 2), INT32_MAX),
    "merge_members_negative": ("merge", "members", (0, 0), -7),
    "merge_row_start_past_n": ("merge", "row_start", (0, 3), INT32_MAX),
    "merge_row_start_end_past_n": ("merge", "row_start", (1, -1), 17),
    "merge_row_start_negative_start": ("merge", "row_start", (0, 0), -4),
    "merge_row_start_decreasing": ("merge", "row_start", (1, 4), 0),
    "unmerge_row_of_token_too_big": ("unmerge", "row_of_token", (0, 7), 10),
    "unmerge_row_of_token_huge": ("unmerge", "row_of_token", (1, 15), INT32_MAX),
    "unmerge_row_of_token_negative": ("unmerge", "row_of_token", (1, 1), -1),
    "prune_rep_token_too_big": ("prune", "rep_token", (0, 2), 16),
    "prune_rep_token_negative": ("prune", "rep_token", (1, 0), -2),
}


@pytest.mark.parametrize("case", VALUE_CASES)
def test_bad_index_values_raise_naming_the_argument_on_both_backends(ssm_plan, case):
    op, name, index, value = VALUE_CASES[case]
    fields = _corrupted(ssm_plan, name, index, value)
    x = _tokens(B, 16, C, seed=1)
    y = _tokens(B, ssm_plan.num_rows, C, seed=2)
    before = [t.clone() for t in (x, y, *fields.values())]
    messages = []
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=name) as info:
            _run_op(op, fields, ssm_plan, x, y, backend)
        messages.append(str(info.value))
    assert messages[0] == messages[1], "the two backends report a bad index differently"
    for t, t0 in zip((x, y, *fields.values()), before):
        assert torch.equal(t, t0)


@pytest.mark.parametrize("name", ["row_of_token", "members", "row_start", "rep_token"])
def test_unvalidated_plan_never_reads_out_of_bounds(ssm_plan, name):
    # A plan's tensors are checked once, when the plan is built or constructed (not again per
    # merge / unmerge: the hot path). A plan constructed with validate=False and bad values
    # still never reads out of bounds: the kernels and the reference clamp / mask indices.
    value = {"row_of_token": 99, "members": -1, "row_start": INT32_MAX, "rep_token": 16}[name]
    index = (0, 1) if name != "row_start" else (0, 2)
    fields = _corrupted(ssm_plan, name, index, value)
    with pytest.raises(ValueError):
        MergePlan(**fields, num_tokens=16, num_rows=ssm_plan.num_rows, validate=True)
    plan = MergePlan(**fields, num_tokens=16, num_rows=ssm_plan.num_rows, validate=False)
    x = _tokens(B, 16, C)
    y = _tokens(B, plan.num_rows, C)
    for backend in BACKENDS:
        if name == "rep_token":
            out = plan.merge(x, mode="prune", backend=backend)
        elif name == "row_of_token":
            out = plan.unmerge(y, backend=backend)
        else:
            out = plan.merge(x, backend=backend)
        assert torch.isfinite(out).all()


def test_debug_mode_switches_value_checks_on_for_every_device(monkeypatch):
    meta = torch.empty(2, device="meta")
    cpu = torch.empty(2)
    monkeypatch.delenv("SDTM_DEBUG", raising=False)
    assert _validation.values_checked(cpu) and not _validation.values_checked(meta)
    monkeypatch.setenv("SDTM_DEBUG", "1")
    assert _validation.values_checked(meta)
    monkeypatch.setenv("SDTM_DEBUG", "0")
    assert not _validation.values_checked(meta)
    ops.set_debug(True)
    assert _validation.values_checked(meta) and ops.debug_enabled()
    ops.set_debug(False)
    assert not _validation.values_checked(meta) and _validation.values_checked(cpu)  # CPU: always
    with pytest.raises(TypeError, match="enabled"):
        ops.set_debug("yes")


def test_debug_mode_validates_plans_on_every_device(monkeypatch, ssm_plan):
    monkeypatch.delenv("SDTM_DEBUG", raising=False)
    bad = _corrupted(ssm_plan, "row_of_token", (0, 0), 99)
    calls = []
    monkeypatch.setattr(MergePlan, "check", lambda self: calls.append(self) or self)
    meta = {k: v.to("meta") for k, v in bad.items()}
    MergePlan(**meta, num_tokens=16, num_rows=ssm_plan.num_rows)  # not CPU, debug off: no check
    assert not calls
    ops.set_debug(True)
    MergePlan(**meta, num_tokens=16, num_rows=ssm_plan.num_rows)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------
# 1b. Without the check nothing is read out of bounds: the documented fallback, both backends
# ---------------------------------------------------------------------------------------------
def _raw_merge(x, fields, num_rows, backend):
    return torch.ops.sdtm.merge(x, fields["row_of_token"], fields["members"], fields["row_start"], num_rows,
                                backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [16, -1, INT32_MAX, -INT32_MAX - 1])  # >= M = 10 and >= N = 16
def test_unchecked_gather_index_out_of_range_reads_zeros(ssm_plan, backend, value):
    y = _tokens(B, ssm_plan.num_rows, C, seed=3) + 5.0  # no zeros in y
    rows = ssm_plan.row_of_token.clone()
    rows[0, 4], rows[1, 15] = value, value
    out = torch.ops.sdtm.unmerge(y, rows, None, None, None, None, 1.0, False, backend)
    expected = ref.unmerge(y, ssm_plan.row_of_token)  # exact copies of rows of y
    expected[0, 4], expected[1, 15] = 0.0, 0.0
    assert torch.equal(out, expected)
    # The epilogue still applies to a zero value: residual + gate * ((1 - mcw) * cache).
    residual, cache, gate = _tokens(B, 16, C, seed=4), _tokens(B, 16, C, seed=5), _tokens(B, C, seed=6)
    blend = torch.ones(B, 16, dtype=torch.bool)
    out = torch.ops.sdtm.unmerge(y, rows, residual, gate, cache, blend, 0.25, False, backend)
    want = residual[0, 4] + gate[0] * (0.75 * cache[0, 4])
    torch.testing.assert_close(out[0, 4], want)
    # Prune: a representative out of range gives a zero row.
    x = _tokens(B, 16, C, seed=7) + 5.0
    reps = ssm_plan.rep_token.clone()
    reps[1, 0] = value
    pruned = torch.ops.sdtm.prune(x, reps, backend)
    expected = ref.prune(x, ssm_plan.rep_token)
    expected[1, 0] = 0.0
    assert torch.equal(pruned, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [16, -1, INT32_MAX])
def test_unchecked_member_out_of_range_adds_nothing(ssm_plan, backend, value):
    x = torch.arange(B * 16 * C, dtype=torch.float32).view(B, 16, C)  # integers: exact sums
    fields = _fields(ssm_plan)
    big_row = int((ssm_plan.row_counts[0] == 4).nonzero()[0])
    position = int(ssm_plan.row_start[0, big_row])  # first member of a 4-token row
    lost = int(fields["members"][0, position])
    fields["members"][0, position] = value
    out = _raw_merge(x, fields, ssm_plan.num_rows, backend)
    expected = ref.merge_mean(x, ssm_plan.row_of_token, ssm_plan.num_rows)
    members = ssm_plan.members[0, position:position + 4].long()
    # Powers of two only: (sum of the 3 valid members) / 4 is exact.
    expected[0, big_row] = (x[0, members].sum(0) - x[0, lost]) / 4
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_row_start_out_of_range_stays_in_bounds(ssm_plan, backend):
    x = torch.arange(B * 16 * C, dtype=torch.float32).view(B, 16, C)  # integers: exact sums
    valid = ref.merge_mean(x, ssm_plan.row_of_token, ssm_plan.num_rows)
    fields = _fields(ssm_plan)
    # Batch row 1: the last offset far past N and one far below 0; batch row 0 untouched.
    # Before the fix the Triton kernel looped up to 2**31 members and crashed the process.
    fields["row_start"][1, -1] = INT32_MAX
    fields["row_start"][1, 1] = -INT32_MAX
    out = _raw_merge(x, fields, ssm_plan.num_rows, backend)
    # Clamped bounds [0, 0, rs[2], ..., rs[M-1], 16]: row 0 is empty (0), row 1 spans
    # [0, rs[2]), the other rows are unchanged.
    rs = ssm_plan.row_start[1].long()
    expected = valid.clone()
    expected[1, 0] = 0.0
    expected[1, 1] = x[1, ssm_plan.members[1, : rs[2]].long()].sum(0) / rs[2]
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[0], valid[0]) and torch.equal(out[1, 2:], valid[1, 2:])
    # Every offset far past N: every span clamps to [N, N), empty rows are 0.
    fields["row_start"][1] = INT32_MAX
    out = _raw_merge(x, fields, ssm_plan.num_rows, backend)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[0], valid[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_backward_with_bad_rows_stays_in_bounds(ssm_plan, backend):
    rows = ssm_plan.row_of_token.clone()
    rows[0, 0], rows[1, 3] = INT32_MAX, -5
    y = _tokens(B, ssm_plan.num_rows, C, seed=1).requires_grad_(True)
    gate = _tokens(B, C, seed=2).requires_grad_(True)
    out = torch.ops.sdtm.unmerge(y, rows, None, gate, None, None, 1.0, False, backend)
    out.sum().backward()
    assert torch.isfinite(y.grad).all() and torch.isfinite(gate.grad).all()
    # Merge backward reads row_of_token: the bad tokens get a zero gradient.
    x = _tokens(B, 16, C, seed=3).requires_grad_(True)
    fields = _fields(ssm_plan)
    fields["row_of_token"] = rows
    _raw_merge(x, fields, ssm_plan.num_rows, backend).sum().backward()
    assert x.grad[0, 0].eq(0).all() and x.grad[1, 3].eq(0).all()
    assert torch.isfinite(x.grad).all()
    reps = ssm_plan.rep_token.clone()
    reps[0, 1] = 16
    xp = _tokens(B, 16, C, seed=4).requires_grad_(True)
    torch.ops.sdtm.prune(xp, reps, backend).sum().backward()
    assert xp.grad.shape == xp.shape and torch.isfinite(xp.grad).all()


@pytest.mark.parametrize("value", [16, -3, INT32_MAX])
def test_triton_launchers_never_read_out_of_bounds(ssm_plan, value):
    # The launchers themselves (no op wrapper in between) with garbage everywhere.
    x = _tokens(B, 16, C)
    garbage = torch.full((B, 16), value, dtype=torch.int32)
    starts = torch.full((B, ssm_plan.num_rows + 1), value, dtype=torch.int32)
    assert torch.equal(kernels.merge_mean(x, garbage, ssm_plan.row_start), torch.zeros(B, ssm_plan.num_rows, C))
    merged = kernels.merge_mean(x, ssm_plan.members, starts)
    assert torch.equal(merged, torch.zeros_like(merged))  # every span clamps to empty
    assert torch.equal(kernels.unmerge(x[:, :4], garbage), torch.zeros(B, 16, C))
    assert torch.equal(kernels.merge_backward(x[:, :4], garbage, starts[:, :5]), torch.zeros(B, 16, C))
    out = kernels.unmerge_backward_y(x, garbage, ssm_plan.row_start, gate=x[:, 0])
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match="members"):
        kernels.merge_mean(x, garbage[:, :3], ssm_plan.row_start)  # extents are checked
    with pytest.raises(ValueError, match="row_start"):
        kernels.merge_backward(x[:, :4], garbage, starts)


# ---------------------------------------------------------------------------------------------
# 1c. ops.merge reads members / row_start on both backends
# ---------------------------------------------------------------------------------------------
def test_merge_forward_reads_members_and_row_start_on_both_backends(ssm_plan):
    x = torch.arange(B * 16 * C, dtype=torch.float32).view(B, 16, C)
    valid = ssm_plan.merge(x)
    # An in-range but inconsistent row_of_token (row 0 <-> the last row for two tokens) must
    # not change the forward of either backend.
    rows = ssm_plan.row_of_token.clone()
    rows[:, 0], rows[:, -1] = rows[:, -1].clone(), rows[:, 0].clone()
    outs = [ops.merge(x, rows, ssm_plan.members, ssm_plan.row_start, ssm_plan.num_rows, backend=b)
            for b in BACKENDS]
    assert torch.equal(outs[0], valid) and torch.equal(outs[1], valid)
    # ... while changing members changes both the same way.
    members = ssm_plan.members.clone()
    members[:, [0, -1]] = members[:, [-1, 0]]
    outs = [ops.merge(x, ssm_plan.row_of_token, members, ssm_plan.row_start, ssm_plan.num_rows, backend=b)
            for b in BACKENDS]
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.equal(outs[0], valid)


# ---------------------------------------------------------------------------------------------
# 2. NaN / inf in the metric: never preferred for merging, identically on both backends
# ---------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


def _window_metric():
    # 8x8 grid, 2x2 windows (G = 16): windows 0-7 are constant (score 1, the best), 8-15 random.
    metric = _tokens(1, 64, C, seed=11)
    tokens = window_token_index((8, 8), (2, 2))
    for g in range(8):
        metric[0, tokens[g]] = torch.full((C,), 1.0 + g)
    return metric, tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_with_non_finite_token_scores_minus_inf(backend):
    metric, tokens = _window_metric()
    clean = ops.window_scores(metric, (8, 8), backend=backend)
    bad = metric.clone()
    bad[0, tokens[0, 1], 3] = NAN
    bad[0, tokens[2, 0], 0] = INF
    bad[0, tokens[9, 3], 5] = -INF
    for score in ("released", "paper"):
        got = ops.window_scores(bad, (8, 8), score=score, backend=backend)
        want = ops.window_scores(metric, (8, 8), score=score, backend=backend)
        poisoned = torch.zeros(16, dtype=torch.bool)
        poisoned[[0, 2, 9]] = True
        assert (got[0, poisoned] == -INF).all()
        torch.testing.assert_close(got[0, ~poisoned], want[0, ~poisoned])
    li = torch.arange(64, dtype=torch.int32).view(1, 64)
    got = ops.window_scores(bad, (8, 8), li=li, a_s=0.5, backend=backend)
    assert (got[0, [0, 2, 9]] == -INF).all() and torch.isfinite(got[0, [1, 3, 4]]).all()
    assert torch.isfinite(clean).all()


def _plans_equal(a, b):
    return a.num_rows == b.num_rows and all(torch.equal(getattr(a, k), getattr(b, k)) for k in FIELDS)


def test_ssm_never_prefers_a_poisoned_window():
    # 16x8 grid, 2x2 windows: G = 32, n_remove = 48 -> R = 16. Windows 0-17 are constant
    # (score 1, the best), the rest random (well below 1). Poisoning windows 0 and 3 leaves
    # exactly R = 16 healthy constant windows, so the selection has no near tie.
    metric = _tokens(1, 128, C, seed=12)
    tokens = window_token_index((16, 8), (2, 2))
    for g in range(18):
        metric[0, tokens[g]] = torch.full((C,), 1.0 + g)
    metric[0, tokens[0, 2], 1] = NAN  # ranked first before the fix (NaN sorts as the largest)
    metric[0, tokens[3, 0], 0] = INF
    plans = [plan_ssm(metric, (16, 8), 48, window=(2, 2), backend=b) for b in BACKENDS]
    assert _plans_equal(*plans)
    for plan in plans:
        counts = plan.row_counts[0].long().gather(0, plan.row_of_token[0].long())
        for g in range(32):
            assert (counts[tokens[g]] == (4 if 0 < g < 18 and g != 3 else 1)).all(), g


def test_ssm_with_too_few_finite_windows_still_merges_r_windows():
    metric = torch.full((1, 16, C), NAN)  # every window poisoned: R windows by lowest index
    plans = [plan_ssm(metric, (4, 4), 48, window=(2, 2), backend=b) for b in BACKENDS]
    assert _plans_equal(*plans) and plans[0].num_rows == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_bipartite_match_skips_non_finite_tokens(backend):
    metric = torch.zeros(1, 7, 4)
    metric[0, 0] = torch.tensor([INF, 0.0, 0.0, 0.0])  # dst 0: non-finite (same direction as cand 3)
    metric[0, 1] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # dst 1
    metric[0, 2] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # dst 2
    metric[0, 3] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # cand: best finite dst is 1 (cos 1/sqrt 2)
    metric[0, 4] = torch.tensor([NAN, 1.0, 0.0, 0.0])  # cand: non-finite -> best -inf, match 0
    metric[0, 5] = torch.tensor([0.0, 2.0, 0.0, 0.0])  # cand: dst 2 (cos 1)
    metric[0, 6] = torch.tensor([-INF, 0.0, 0.0, 0.0])  # cand: non-finite
    cand = torch.tensor([[3, 4, 5, 6]])
    best, match = ops.bipartite_match(metric, cand, torch.tensor([[0, 1, 2]]), backend=backend)
    assert match.tolist() == [[1, 0, 2, 0]]
    assert best[0, 1] == -INF and best[0, 3] == -INF
    torch.testing.assert_close(best[0, [0, 2]], torch.tensor([2 ** -0.5, 1.0]))
    # Every dst non-finite: best -inf, match the first dst.
    best, match = ops.bipartite_match(metric, cand, torch.tensor([[0, 4, 6]]), backend=backend)
    assert (best == -INF).all() and match.tolist() == [[0, 0, 0, 0]]


@pytest.mark.parametrize("name", ["cand_idx", "dst_idx"])
@pytest.mark.parametrize("value", [7, -1, INT32_MAX])
def test_bipartite_match_index_values(name, value):
    metric = _tokens(1, 7, 4)
    args = {"cand_idx": torch.tensor([[3, 4, 5, 6]]), "dst_idx": torch.tensor([[0, 1, 2]])}
    args[name] = args[name].clone()
    args[name][0, 1] = value
    messages = []
    for backend in BACKENDS:  # checked: a ValueError naming the argument, the same on both backends
        with pytest.raises(ValueError, match=name) as info:
            ops.bipartite_match(metric, args["cand_idx"], args["dst_idx"], backend=backend)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    for backend in BACKENDS:  # unchecked: the index counts as a non-finite token, never read
        best, match = torch.ops.sdtm.bipartite_match(metric, args["cand_idx"], args["dst_idx"], backend)
        if name == "cand_idx":
            assert best[0, 1] == -INF and match[0, 1] == 0
            assert torch.isfinite(best[0, [0, 2, 3]]).all()
        else:
            assert (match != 1).all() and torch.isfinite(best).all()


def _idm_metric():
    # 8x8 grid, 2x2 windows: dsts are position 0 of each window (no li, no randomness).
    metric = _tokens(1, 64, C, seed=21)
    metric[0, 9, :] = metric[0, 0] * 3.0  # candidate 9 is a copy of dst 0 (cos 1) ...
    metric[0, 9, 2] = NAN  # ... poisoned: it would rank first before the fix
    metric[0, 18, :] = INF  # dst of window 5 (token 18): never a match
    return metric


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["idm", "tome", "idm_attention"])
def test_bipartite_plans_never_merge_non_finite_tokens(method, backend):
    metric = _idm_metric()
    received = torch.rand(1, 64, generator=torch.Generator().manual_seed(3)) + 0.5
    received[0, 9] = 0.0  # the least attended: the paper's score ranks it first
    plan = {
        "idm": lambda: plan_idm(metric, (8, 8), 32, backend=backend),
        "tome": lambda: plan_tome(metric, (8, 8), 40, random_dst=False, backend=backend),
        "idm_attention": lambda: plan_idm_attention(metric, (8, 8), 32, received, backend=backend),
    }[method]()
    assert plan.num_rows < 64
    counts = plan.row_counts[0].long().gather(0, plan.row_of_token[0].long())
    assert counts[9] == 1, "the NaN candidate was merged"
    assert counts[18] == 1, "a candidate was merged into the inf dst"


# ---------------------------------------------------------------------------------------------
# 3. Batch 0 and C = 0: the Triton planners give the reference's plans
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 64, C), (2, 64, 0), (0, 64, 0)])
@pytest.mark.parametrize("method", ["ssm", "idm", "tome", "idm_attention"])
@pytest.mark.parametrize("random_dst", [False, True])
def test_triton_planners_handle_empty_batch_and_channels(shape, method, random_dst):
    metric = torch.zeros(shape) if shape[2] == 0 else _tokens(*shape)
    # li: 0 except window 5 (tokens 18, 19, 26, 27), so priorities are exact (0 or one value).
    li = torch.zeros(shape[0], 64, dtype=torch.int32)
    li[:, [18, 19, 26, 27]] = torch.tensor([3, 10, 7, 10], dtype=torch.int32)
    received = torch.ones(shape[0], 64)

    def build(backend, use_li):
        kw = dict(random_dst=random_dst, generator=torch.Generator().manual_seed(5), backend=backend)
        if method == "ssm":
            return plan_ssm(metric, (8, 8), 48, li=li if use_li else None, **kw)
        if method == "idm":
            return plan_idm(metric, (8, 8), 32, li=li if use_li else None, **kw)
        if method == "idm_attention":
            return plan_idm_attention(metric, (8, 8), 32, received, li=li if use_li else None, **kw)
        return plan_tome(metric, (8, 8), 20, **kw)

    for use_li in (False, True):
        ref_plan, tri_plan = build("reference", use_li), build("triton", use_li)
        assert ref_plan.num_rows < 64
        assert _plans_equal(ref_plan, tri_plan)
        x = _tokens(shape[0], 64, 4)
        for backend in BACKENDS:
            merged = tri_plan.merge(x, backend=backend)
            assert merged.shape == (shape[0], tri_plan.num_rows, 4)
            assert tri_plan.unmerge(merged, backend=backend).shape == x.shape


# ---------------------------------------------------------------------------------------------
# 4. random_dst must be a bool
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ssm", "idm", "tome", "idm_attention"])
@pytest.mark.parametrize("value", ["no", 1, 0, None, 1.0, torch.tensor(True)])
def test_random_dst_must_be_a_bool(method, value, backend):
    metric = _tokens(B, 64, C)
    call = {
        "ssm": lambda: plan_ssm(metric, (8, 8), 48, random_dst=value, backend=backend),
        "idm": lambda: plan_idm(metric, (8, 8), 32, random_dst=value, backend=backend),
        "tome": lambda: plan_tome(metric, (8, 8), 32, random_dst=value, backend=backend),
        "idm_attention": lambda: plan_idm_attention(metric, (8, 8), 32, torch.ones(B, 64), random_dst=value,
                                                    backend=backend),
    }[method]
    with pytest.raises(TypeError, match="random_dst"):
        call()


# ---------------------------------------------------------------------------------------------
# 5. update_li takes only the int32 counter
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.int8, torch.uint8])
def test_update_li_rejects_other_integer_dtypes(ssm_plan, dtype):
    li = torch.ones(B, 16, dtype=dtype)
    if dtype == torch.int64:
        li[0, 0] = 2**40  # would have been truncated to 1 silently
    before = li.clone()
    with pytest.raises(TypeError, match="li"):
        ssm_plan.update_li(li)
    assert torch.equal(li, before)


def test_update_li_round_trip_keeps_int32(ssm_plan):
    li = ssm_plan.update_li(None)
    for _ in range(3):
        li = ssm_plan.update_li(li)
        assert li.dtype == torch.int32
    assert int(li.max()) == 4  # merged tokens counted every step
