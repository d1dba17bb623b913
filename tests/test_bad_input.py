"""Bad input (SPEC section 9): a clear ValueError / TypeError naming the argument, and no
input modified in place by the failed call.

Only the public API is used: ``ratio_schedule``, ``plan_ssm`` / ``plan_idm`` / ``plan_tome``,
``MergePlan`` and its methods, ``sdtm_kernels.ops`` and ``BackendUnavailableError``. Tensors
on the ``meta`` device stand in for "a tensor on another device".
"""
import math

import pytest
import torch

import sdtm_kernels
from sdtm_kernels import BackendUnavailableError, MergePlan, ops, plan_idm, plan_ssm, plan_tome, ratio_schedule

B, H, W, C = 2, 8, 8, 8
N = H * W
GRID = (H, W)
PLANNERS = {"ssm": plan_ssm, "idm": plan_idm, "tome": plan_tome}
LI_PLANNERS = {"ssm": plan_ssm, "idm": plan_idm}


def _tokens(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.fixture
def metric():
    return _tokens(B, N, C)


@pytest.fixture
def li():
    return torch.randint(0, 5, (B, N), generator=torch.Generator().manual_seed(1), dtype=torch.int32)


@pytest.fixture
def plan(metric):
    p = plan_idm(metric, GRID, 32)
    assert p.num_rows == N - 32  # something is merged, so N != M below
    return p


def raises(exc, argname, fn, *inputs):
    """``fn()`` raises ``exc`` whose message names ``argname``; ``inputs`` are unchanged."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=argname) as info:
        fn()
    for t, t0 in zip(tensors, before):
        assert torch.equal(t, t0), f"a failed call modified an input in place ({argname})"
    return info


# ---------------------------------------------------------------------------------------------
# Planners: metric, grid, window, n_remove, generator, li, score, backend
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", PLANNERS)
@pytest.mark.parametrize("shape", [(N, C), (1, B, N, C), (N,)])
def test_metric_wrong_rank(method, shape):
    metric = _tokens(*shape)
    raises(ValueError, "metric", lambda: PLANNERS[method](metric, GRID, 16), metric)


@pytest.mark.parametrize("method", PLANNERS)
def test_metric_not_a_tensor(method, metric):
    raises(TypeError, "metric", lambda: PLANNERS[method](metric.tolist(), GRID, 16))
    raises(TypeError, "metric", lambda: PLANNERS[method](metric.numpy(), GRID, 16))


@pytest.mark.parametrize("method", PLANNERS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64,
                                   torch.complex128])
def test_metric_unsupported_dtype(method, dtype, metric):
    bad = metric.to(dtype)
    raises(TypeError, "metric", lambda: PLANNERS[method](bad, GRID, 16), bad)


@pytest.mark.parametrize("method", PLANNERS)
@pytest.mark.parametrize("grid", [(8, 7), (7, 8), (4, 4), (16, 8), (1, 63), (64, 2)])
def test_grid_does_not_match_n(method, grid, metric):
    info = raises(ValueError, "grid", lambda: PLANNERS[method](metric, grid, 16), metric)
    assert str(N) in str(info.value)


@pytest.mark.parametrize("method", PLANNERS)
@pytest.mark.parametrize("grid", [64, (8,), (8, 8, 1), [8, 8, 1], "8x8", None, {8: 8}])
def test_grid_not_a_pair(method, grid, metric):
    raises(TypeError, "grid", lambda: PLANNERS[method](metric, grid, 16), metric)


@pytest.mark.parametrize("method", PLANNERS)
@pytest.mark.parametrize("grid", [(8.0, 8), (8, 8.0), (8, "8"), (True, 64), (64, True), (None, 8)])
def test_grid_not_ints(method, grid, metric):
    raises(TypeError, "grid", lambda: PLANNERS[method](metric, grid, 16), metric)


@pytest.mark.parametrize("method", PLANNERS)
@pytest.mark.parametrize("grid", [(0, 64), (64, 0), (-8, -8), (0, 0)])
def test_grid_not_positive(method, grid, metric):
    raises(ValueError, "grid", lambda: PLANNERS[method](metric, grid, 16), metric)


@pytest.mark.parametrize("method", PLANNERS)
@pytest.mark.parametrize("grid,window", [((8, 8), (9, 1)), ((8, 8), (1, 9)), ((8, 8), (9, 9)),
                                         ((2, 32), (3, 2)), ((32, 2), (2, 3)), ((1, 64), (2, 1))])
def test_window_larger_than_grid(method, grid, window, metric):
    raises(ValueError, "window", lambda: PLANNERS[method](metric, grid, 16, window=window), metric)


@pytest.mark.parametrize("method", PLANNERS)
@pytest.mark.parametrize("window,exc", [((1, 1), ValueError), ((0, 2), ValueError), ((2, -1), ValueError),
                                        ((2,), TypeError), (2, TypeError), ((2.0, 2), TypeError),
                                        ((2, 2, 1), TypeError), (None, TypeError)])
def test_window_invalid(method, window, exc, metric):
    raises(exc, "window", lambda: PLANNERS[method](metric, GRID, 16, window=window), metric)


@pytest.mark.parametrize("method", PLANNERS)
@pytest.mark.parametrize("n_remove,exc", [(-1, ValueError), (-100, ValueError), (4.0, TypeError),
                                          (16.5, TypeError), ("16", TypeError), (None, TypeError),
                                          (True, TypeError), (False, TypeError),
                                          (torch.tensor(16), TypeError)])
def test_n_remove_invalid(method, n_remove, exc, metric):
    raises(exc, "n_remove", lambda: PLANNERS[method](metric, GRID, n_remove), metric)


@pytest.mark.parametrize("method", PLANNERS)
@pytest.mark.parametrize("generator", [0, "seed", 1.5, object(), torch.tensor(0)])
def test_generator_not_a_generator(method, generator, metric):
    raises(TypeError, "generator",
           lambda: PLANNERS[method](metric, GRID, 16, random_dst=True, generator=generator), metric)


@pytest.mark.parametrize("method", LI_PLANNERS)
@pytest.mark.parametrize("shape", [(B, N - 1), (B, N + 1), (B + 1, N), (1, N), (N,), (B, N, 1)])
def test_li_wrong_shape(method, shape, metric):
    bad = torch.zeros(shape, dtype=torch.int32)
    raises(ValueError, "li", lambda: LI_PLANNERS[method](metric, GRID, 16, li=bad), metric, bad)


@pytest.mark.parametrize("method", LI_PLANNERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bool, torch.complex64])
def test_li_not_integer(method, dtype, metric):
    bad = torch.ones(B, N, dtype=dtype)
    raises(TypeError, "li", lambda: LI_PLANNERS[method](metric, GRID, 16, li=bad), metric, bad)


@pytest.mark.parametrize("method", LI_PLANNERS)
def test_li_not_a_tensor(method, metric):
    raises(TypeError, "li", lambda: LI_PLANNERS[method](metric, GRID, 16, li=[[0] * N] * B), metric)


@pytest.mark.parametrize("method", LI_PLANNERS)
def test_li_on_another_device(method, metric):
    bad = torch.zeros(B, N, dtype=torch.int32, device="meta")
    info = raises(ValueError, "li", lambda: LI_PLANNERS[method](metric, GRID, 16, li=bad), metric)
    assert "meta" in str(info.value) and "cpu" in str(info.value)


@pytest.mark.parametrize("score", ["paper ", "Released", "offdiag", "", None, 1])
def test_unknown_score_variant(score, metric):
    raises(ValueError, "score", lambda: plan_ssm(metric, GRID, 48, score=score), metric)
    raises(ValueError, "score", lambda: ops.window_scores(metric, GRID, score=score), metric)


@pytest.mark.parametrize("a_s,exc", [(float("nan"), ValueError), (float("inf"), ValueError),
                                     ("0.05", TypeError), (None, TypeError)])
def test_a_s_invalid(a_s, exc, metric):
    raises(exc, "a_s", lambda: plan_ssm(metric, GRID, 48, a_s=a_s), metric)


@pytest.mark.parametrize("backend", ["cuda", "Triton", "REFERENCE", "", "torch", 1])
def test_unknown_backend_string(backend, metric, plan):
    x = _tokens(B, N, C, seed=2)
    y = plan.merge(x)
    calls = [
        lambda: plan_ssm(metric, GRID, 48, backend=backend),
        lambda: plan_idm(metric, GRID, 16, backend=backend),
        lambda: plan_tome(metric, GRID, 16, backend=backend),
        lambda: plan.merge(x, backend=backend),
        lambda: plan.merge(x, "prune", backend=backend),
        lambda: plan.unmerge(y, backend=backend),
        lambda: ops.window_scores(metric, GRID, backend=backend),
        lambda: ops.bipartite_match(metric, plan.members[:, :4], plan.members[:, 4:8], backend=backend),
        lambda: ops.merge(x, plan.row_of_token, plan.members, plan.row_start, plan.num_rows, backend=backend),
        lambda: ops.prune(x, plan.rep_token, backend=backend),
        lambda: ops.unmerge(y, plan.row_of_token, backend=backend),
    ]
    for call in calls:
        raises(ValueError, "backend", call, metric, x, y)


def _op_calls(metric, plan):
    x = _tokens(B, N, C, seed=3)
    y = plan.merge(x)
    return {
        "plan_ssm": lambda backend: plan_ssm(metric, GRID, 48, backend=backend),
        "plan_idm": lambda backend: plan_idm(metric, GRID, 16, backend=backend),
        "plan_tome": lambda backend: plan_tome(metric, GRID, 16, backend=backend),
        "window_scores": lambda backend: ops.window_scores(metric, GRID, backend=backend),
        "bipartite_match": lambda backend: ops.bipartite_match(metric, plan.members[:, :4], plan.members[:, 4:8],
                                                               backend=backend),
        "attention_received": lambda backend: ops.attention_received(metric[:, None, :5], metric[:, None],
                                                                     key_slice=(0, 8), backend=backend),
        "merge": lambda backend: plan.merge(x, backend=backend),
        "prune": lambda backend: plan.merge(x, "prune", backend=backend),
        "unmerge": lambda backend: plan.unmerge(y, backend=backend),
    }


OP_NAMES = ("plan_ssm", "plan_idm", "plan_tome", "window_scores", "bipartite_match", "merge", "prune", "unmerge",
            "attention_received")


@pytest.mark.parametrize("op", OP_NAMES)
def test_reference_backend_runs_every_op(op, metric, plan):
    calls = _op_calls(metric, plan)
    assert calls[op]("reference") is not None
    assert calls[op](None) is not None


def test_triton_op_names_are_public_ops():
    # Every name in TRITON_OPS is one of the public entry points exercised here, so the
    # dynamic check below covers each op that may lack a kernel.
    assert set(sdtm_kernels.backend.TRITON_OPS) <= set(OP_NAMES)


def test_triton_backend_without_kernel_is_unavailable():
    """backend='triton' for an op with no Triton kernel raises BackendUnavailableError naming
    the backend and the op (every public op has a kernel today: use a name that has none)."""
    from sdtm_kernels.backend import resolve_backend

    with pytest.raises(BackendUnavailableError, match="triton") as info:
        resolve_backend("triton", torch.device("cuda"), "not_a_real_op")
    assert "not_a_real_op" in str(info.value)
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch, metric):
    from sdtm_kernels.backend import resolve_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        resolve_backend("triton", metric.device, "merge")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        plan_ssm(metric, GRID, 48, backend="triton")


# ---------------------------------------------------------------------------------------------
# ratio_schedule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,deviation,argname", [
    (0.3, 0.7, "deviation"),  # ratio + deviation >= 1
    (0.5, 0.5, "deviation"),
    (0.9, 0.1, "deviation"),
    (0.1, 0.2, "deviation"),  # ratio - deviation < 0
    (0.0, 0.01, "deviation"),
    (0.5, -0.1, "deviation"),  # negative deviation
    (0.0, -0.0001, "deviation"),
    (1.0, 0.0, "ratio"),
    (1.5, 0.0, "ratio"),
    (-0.1, 0.0, "ratio"),
    (float("nan"), 0.2, "ratio"),
    (float("inf"), 0.2, "ratio"),
    (0.3, float("nan"), "deviation"),
    (0.3, float("inf"), "deviation"),
])
def test_ratio_schedule_rho_out_of_range(ratio, deviation, argname):
    with pytest.raises(ValueError, match=argname):
        ratio_schedule(0, 50, ratio, deviation)


@pytest.mark.parametrize("step,num_steps,exc,argname", [
    (50, 50, ValueError, "step"),
    (51, 50, ValueError, "step"),
    (-1, 50, ValueError, "step"),
    (0, 0, ValueError, "num_steps"),
    (0, -3, ValueError, "num_steps"),
    (1.0, 50, TypeError, "step"),
    (0.5, 50, TypeError, "step"),
    (True, 50, TypeError, "step"),
    (None, 50, TypeError, "step"),
    (0, 50.0, TypeError, "num_steps"),
    (0, True, TypeError, "num_steps"),
    (0, "50", TypeError, "num_steps"),
])
def test_ratio_schedule_bad_steps(step, num_steps, exc, argname):
    with pytest.raises(exc, match=argname):
        ratio_schedule(step, num_steps, 0.3, 0.2)


@pytest.mark.parametrize("ratio,deviation,argname", [("0.3", 0.2, "ratio"), (0.3, None, "deviation"),
                                                     (True, 0.0, "ratio"), (0.3, torch.tensor(0.2), "deviation")])
def test_ratio_schedule_not_numbers(ratio, deviation, argname):
    with pytest.raises(TypeError, match=argname):
        ratio_schedule(0, 50, ratio, deviation)


# ---------------------------------------------------------------------------------------------
# MergePlan.merge / unmerge / update_li
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mean", "prune"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_merge_unsupported_dtype(plan, mode, dtype):
    x = _tokens(B, N, C).to(dtype)
    raises(TypeError, "x", lambda: plan.merge(x, mode), x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_unmerge_unsupported_dtype(plan, dtype):
    y = _tokens(B, plan.num_rows, C)
    good = _tokens(B, N, C, seed=4)
    bad_y = y.to(dtype)
    raises(TypeError, "y", lambda: plan.unmerge(bad_y), bad_y)
    bad_full = good.to(dtype)
    raises(TypeError, "residual", lambda: plan.unmerge(y, residual=bad_full), y, bad_full)
    raises(TypeError, "cache", lambda: plan.unmerge(y, cache=bad_full, mcw=0.5), y, bad_full)
    bad_gate = torch.ones(B, C).to(dtype)
    raises(TypeError, "gate", lambda: plan.unmerge(y, gate=bad_gate), y, bad_gate)


@pytest.mark.parametrize("mode", ["mean", "prune"])
@pytest.mark.parametrize("shape", [(B, N - 1, C), (B, N + 1, C), (B + 1, N, C), (1, N, C), (B, 32, C)])
def test_merge_tensor_of_another_shape(plan, mode, shape):
    x = _tokens(*shape)
    raises(ValueError, "x", lambda: plan.merge(x, mode), x)


@pytest.mark.parametrize("mode", ["mean", "prune"])
@pytest.mark.parametrize("shape", [(B, N, C, 1), (N, C), (N,)])
def test_merge_wrong_rank(plan, mode, shape):
    x = _tokens(*shape)
    raises(ValueError, "x", lambda: plan.merge(x, mode), x)


def test_merge_not_a_tensor(plan):
    raises(TypeError, "x", lambda: plan.merge(_tokens(B, N, C).tolist()))


@pytest.mark.parametrize("rows_delta,batch", [(1, B), (-1, B), (32, B), (0, B + 1), (0, 1)])
def test_unmerge_tensor_of_another_shape(plan, rows_delta, batch):
    y = _tokens(batch, plan.num_rows + rows_delta, C)
    raises(ValueError, "y", lambda: plan.unmerge(y), y)


@pytest.mark.parametrize("shape", [(B, N, C, 1), (N, C)])
def test_unmerge_wrong_rank(plan, shape):
    y = _tokens(*shape)
    raises(ValueError, "y", lambda: plan.unmerge(y), y)


@pytest.mark.parametrize("name", ["residual", "cache"])
@pytest.mark.parametrize("shape", [(B, N - 1, C), (B, N + 1, C), (B, N, C - 1), (B, N, C + 1), (B + 1, N, C),
                                   (1, N, C), (B, 32, C), (N, C)])
def test_residual_and_cache_wrong_shape(plan, name, shape):
    y = _tokens(B, plan.num_rows, C)
    bad = _tokens(*shape, seed=5)
    raises(ValueError, name, lambda: plan.unmerge(y, **{name: bad}, mcw=0.5), y, bad)


@pytest.mark.parametrize("name", ["residual", "cache"])
@pytest.mark.parametrize("y_dtype,other_dtype", [(torch.float32, torch.float64), (torch.float32, torch.float16),
                                                 (torch.bfloat16, torch.float16), (torch.float16, torch.float32)])
def test_residual_and_cache_dtype_differs_from_y(plan, name, y_dtype, other_dtype):
    y = _tokens(B, plan.num_rows, C, dtype=y_dtype)
    bad = _tokens(B, N, C, dtype=other_dtype, seed=5)
    raises(TypeError, name, lambda: plan.unmerge(y, **{name: bad}, mcw=0.5), y, bad)


@pytest.mark.parametrize("shape", [(B, C - 1), (B, C + 1), (B + 1, C), (1, C), (C,), (B, 1, C), (B, N, C)])
def test_gate_wrong_shape(plan, shape):
    y = _tokens(B, plan.num_rows, C)
    gate = _tokens(*shape, seed=6)
    raises(ValueError, "gate", lambda: plan.unmerge(y, gate=gate), y, gate)


@pytest.mark.parametrize("name", ["x", "y", "residual", "cache", "gate"])
def test_tensors_on_another_device(plan, name):
    x = _tokens(B, N, C)
    y = _tokens(B, plan.num_rows, C)
    meta = {"x": x, "y": y, "residual": x, "cache": x, "gate": torch.ones(B, C)}[name].to("meta")
    if name == "x":
        info = raises(ValueError, "x", lambda: plan.merge(meta))
        raises(ValueError, "x", lambda: plan.merge(meta, "prune"))
    elif name == "y":
        info = raises(ValueError, "y", lambda: plan.unmerge(meta))
    else:
        info = raises(ValueError, name, lambda: plan.unmerge(y, **{name: meta}, mcw=0.5), y)
    assert "meta" in str(info.value)


@pytest.mark.parametrize("mcw,exc", [(1.5, ValueError), (-0.1, ValueError), (1.0000001, ValueError),
                                     (-1e-9, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                     ("0.5", TypeError), (None, TypeError), (torch.tensor(0.5), TypeError)])
def test_mcw_outside_unit_interval(plan, mcw, exc):
    y = _tokens(B, plan.num_rows, C)
    cache = _tokens(B, N, C, seed=7)
    raises(exc, "mcw", lambda: plan.unmerge(y, cache=cache, mcw=mcw), y, cache)


@pytest.mark.parametrize("mode", ["max", "Mean", "sum", "", None, 0])
def test_unknown_merge_mode(plan, mode):
    x = _tokens(B, N, C)
    raises(ValueError, "mode", lambda: plan.merge(x, mode), x)
    raises(ValueError, "mode", lambda: plan.update_li(None, mode))


@pytest.mark.parametrize("shape", [(B, N - 1), (B + 1, N), (1, N), (N,), (B, N, 1)])
def test_update_li_wrong_shape(plan, shape):
    li = torch.zeros(shape, dtype=torch.int32)
    raises(ValueError, "li", lambda: plan.update_li(li), li)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.complex64])
def test_update_li_not_integer(plan, dtype):
    li = torch.ones(B, N, dtype=dtype)
    raises(TypeError, "li", lambda: plan.update_li(li), li)


def test_update_li_on_another_device_or_not_a_tensor(plan):
    raises(ValueError, "li", lambda: plan.update_li(torch.zeros(B, N, dtype=torch.int32, device="meta")))
    raises(TypeError, "li", lambda: plan.update_li([[0] * N] * B))


# ---------------------------------------------------------------------------------------------
# ops.bipartite_match / ops.window_scores argument checks
# ---------------------------------------------------------------------------------------------
def _cand_dst(batch=B):
    cand = torch.arange(4, N).expand(batch, -1).contiguous()
    dst = torch.arange(4).expand(batch, -1).contiguous()
    return cand, dst


def test_bipartite_match_empty_dst(metric):
    cand, dst = _cand_dst()
    raises(ValueError, "dst_idx", lambda: ops.bipartite_match(metric, cand, dst[:, :0]), metric, cand)


@pytest.mark.parametrize("name", ["cand_idx", "dst_idx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_bipartite_match_non_integer_indices(metric, name, dtype):
    cand, dst = _cand_dst()
    args = {"cand_idx": cand, "dst_idx": dst}
    args[name] = args[name].to(dtype)
    raises(TypeError, name, lambda: ops.bipartite_match(metric, args["cand_idx"], args["dst_idx"]), metric)


@pytest.mark.parametrize("name", ["cand_idx", "dst_idx"])
def test_bipartite_match_index_shape_and_device(metric, name):
    cand, dst = _cand_dst()
    for bad, exc in ((_cand_dst(B + 1)[name == "dst_idx"], ValueError),  # batch mismatch
                     ({"cand_idx": cand, "dst_idx": dst}[name][0], ValueError),  # rank 1
                     ({"cand_idx": cand, "dst_idx": dst}[name].to("meta"), ValueError),  # device
                     ({"cand_idx": cand, "dst_idx": dst}[name].tolist(), TypeError)):
        args = {"cand_idx": cand, "dst_idx": dst, name: bad}
        raises(exc, name, lambda: ops.bipartite_match(metric, args["cand_idx"], args["dst_idx"]), metric)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_ops_unsupported_metric_dtype(metric, dtype):
    bad = metric.to(dtype)
    cand, dst = _cand_dst()
    raises(TypeError, "metric", lambda: ops.window_scores(bad, GRID), bad)
    raises(TypeError, "metric", lambda: ops.bipartite_match(bad, cand, dst), bad)


def test_window_scores_grid_window_li(metric, li):
    raises(ValueError, "grid", lambda: ops.window_scores(metric, (8, 7)), metric)
    raises(ValueError, "window", lambda: ops.window_scores(metric, GRID, window=(9, 1)), metric)
    raises(ValueError, "window", lambda: ops.window_scores(metric, GRID, window=(1, 1)), metric)
    raises(ValueError, "li", lambda: ops.window_scores(metric, GRID, li=li[:1], a_s=0.05), metric, li)
    raises(TypeError, "li", lambda: ops.window_scores(metric, GRID, li=li.float(), a_s=0.05), metric, li)
    raises(ValueError, "metric", lambda: ops.window_scores(metric[0], GRID), metric)


# ---------------------------------------------------------------------------------------------
# Drop-in ops.merge / ops.prune / ops.unmerge: the same checks as MergePlan's methods
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["merge_int_x", "merge_wrong_n", "prune_rank", "unmerge_batch", "unmerge_int_y",
                                  "unmerge_mcw"])
def test_drop_in_ops_check_their_arguments(plan, case):
    x = _tokens(B, N, C)
    y = plan.merge(x)
    cache = _tokens(B, N, C, seed=8)
    calls = {
        "merge_int_x": (TypeError, "x", lambda: ops.merge(x.long(), plan.row_of_token, plan.members,
                                                          plan.row_start, plan.num_rows)),
        "merge_wrong_n": (ValueError, "x", lambda: ops.merge(x[:, :10], plan.row_of_token, plan.members,
                                                             plan.row_start, plan.num_rows)),
        "prune_rank": (ValueError, "x", lambda: ops.prune(x[0], plan.rep_token)),
        "unmerge_batch": (ValueError, "y", lambda: ops.unmerge(y[:1], plan.row_of_token)),
        "unmerge_int_y": (TypeError, "y", lambda: ops.unmerge(y.long(), plan.row_of_token)),
        "unmerge_mcw": (ValueError, "mcw", lambda: ops.unmerge(y, plan.row_of_token, cache=cache,
                                                               blend=plan.blend, mcw=2.0)),
    }
    exc, argname, call = calls[case]
    raises(exc, argname, call, x, y, cache)


# ---------------------------------------------------------------------------------------------
# MergePlan built from inconsistent tensors
# ---------------------------------------------------------------------------------------------
FIELDS = ("row_of_token", "members", "row_start", "rep_token", "blend")


@pytest.fixture
def ssm_fields():
    # 4x4 grid, 2x2 windows, every window collapsed: rows {0,1,4,5} {2,3,6,7} {8,9,12,13} {10,11,14,15}.
    p = plan_ssm(_tokens(B, 16, C), (4, 4), 48)
    assert p.num_rows == 4 and p.row_counts.tolist() == [[4, 4, 4, 4]] * B
    return {name: getattr(p, name).clone() for name in FIELDS}, p.num_tokens, p.num_rows


def _build(fields, n, m, validate=True, **override):
    values = dict(fields)
    n = override.pop("num_tokens", n)
    m = override.pop("num_rows", m)
    values.update(override)
    return MergePlan(**values, num_tokens=n, num_rows=m, validate=validate)


def test_consistent_fields_build(ssm_fields):
    fields, n, m = ssm_fields
    plan = _build(fields, n, m)
    assert plan.check() is plan
    assert plan.num_removed == 12


def _corrupt(fields, name, fn):
    value = fields[name].clone()
    fn(value)
    return value


CONTENT_CASES = {
    # name: (field, corruption, argname in the message)
    "row_of_token_too_big": ("row_of_token", lambda v: v[0].__setitem__(3, 4), "row_of_token"),
    "row_of_token_negative": ("row_of_token", lambda v: v[1].__setitem__(0, -1), "row_of_token"),
    "row_of_token_disagrees": ("row_of_token", lambda v: v[0].__setitem__(0, 1), "row_of_token"),
    "members_duplicate": ("members", lambda v: v[0].__setitem__(1, v[0, 0].item()), "members"),
    "members_out_of_range": ("members", lambda v: v[1].__setitem__(5, 16), "members"),
    "members_negative": ("members", lambda v: v[0].__setitem__(5, -1), "members"),
    "members_across_rows": ("members", lambda v: v[0].__setitem__(slice(3, 5), v[0, 3:5].flip(0).clone()),
                            "members"),
    "row_start_not_ending_at_n": ("row_start", lambda v: v[:, -1].fill_(15), "row_start"),
    "row_start_past_n": ("row_start", lambda v: v[1, -1].fill_(17), "row_start"),
    "row_start_not_starting_at_0": ("row_start", lambda v: v[:, 0].fill_(1), "row_start"),
    "empty_row": ("row_start", lambda v: v[0, 2].fill_(v[0, 1].item()), "row_start"),
    "decreasing_row_start": ("row_start", lambda v: v[0, 2].fill_(v[0, 3].item() + 1), "row_start"),
    "rep_token_outside_its_row": ("rep_token", lambda v: v[0].__setitem__(0, 15), "rep_token"),
    "rep_token_out_of_range": ("rep_token", lambda v: v[1].__setitem__(2, 16), "rep_token"),
    "rep_token_negative": ("rep_token", lambda v: v[0].__setitem__(3, -1), "rep_token"),
}


@pytest.mark.parametrize("case", CONTENT_CASES)
def test_inconsistent_plan_contents(ssm_fields, case):
    fields, n, m = ssm_fields
    name, corrupt, argname = CONTENT_CASES[case]
    bad = _corrupt(fields, name, corrupt)
    assert not torch.equal(bad, fields[name])
    everything = list(fields.values()) + [bad]
    raises(ValueError, argname, lambda: _build(fields, n, m, **{name: bad}), *everything)
    # validate=False skips the content check (no host sync), an explicit check() still fails.
    plan = _build(fields, n, m, validate=False, **{name: bad})
    raises(ValueError, argname, plan.check, *everything)
    # On CPU, the default is to validate.
    raises(ValueError, argname, lambda: _build(fields, n, m, validate=None, **{name: bad}), *everything)


@pytest.mark.parametrize("name", FIELDS)
def test_plan_field_wrong_dtype(ssm_fields, name):
    fields, n, m = ssm_fields
    wrong = {torch.int32: [torch.int64, torch.int16, torch.float32, torch.bool],
             torch.bool: [torch.int32, torch.uint8, torch.float32]}[fields[name].dtype]
    for dtype in wrong:
        bad = fields[name].to(dtype)
        for validate in (True, False):
            raises(TypeError, name, lambda: _build(fields, n, m, validate=validate, **{name: bad}), bad)


@pytest.mark.parametrize("name", FIELDS)
def test_plan_field_wrong_shape(ssm_fields, name):
    fields, n, m = ssm_fields
    good = fields[name]
    for bad in (good[:, :-1], torch.cat([good, good[:, :1]], 1), good[:1], good[0], good[..., None]):
        # A field's batch is compared with row_of_token's, so a short row_of_token is reported
        # through the first field that disagrees with it; any field name is a clear message.
        argname = name if name != "row_of_token" or bad.dim() != 2 or bad.shape[0] == B else "members"
        for validate in (True, False):
            raises(ValueError, argname, lambda: _build(fields, n, m, validate=validate, **{name: bad}))


@pytest.mark.parametrize("name", FIELDS)
def test_plan_field_not_a_tensor_or_on_another_device(ssm_fields, name):
    fields, n, m = ssm_fields
    raises(TypeError, name, lambda: _build(fields, n, m, **{name: fields[name].tolist()}))
    if name != "row_of_token":
        raises(ValueError, name, lambda: _build(fields, n, m, **{name: fields[name].to("meta")}))
    else:  # everything else then disagrees with row_of_token's device
        raises(ValueError, "row_of_token", lambda: _build(fields, n, m, **{name: fields[name].to("meta")}))


@pytest.mark.parametrize("num_tokens,num_rows,exc,argname", [
    (16, 0, ValueError, "num_rows"),
    (16, 17, ValueError, "num_rows"),
    (16, -1, ValueError, "num_rows"),
    (16, 5, ValueError, "row_start"),  # disagrees with the field shapes
    (15, 4, ValueError, "row_of_token"),
    (16.0, 4, TypeError, "num_tokens"),
    ("16", 4, TypeError, "num_tokens"),
    (16, 4.0, TypeError, "num_rows"),
    (16, None, TypeError, "num_rows"),
    (16, True, TypeError, "num_rows"),
])
def test_plan_sizes_invalid(ssm_fields, num_tokens, num_rows, exc, argname):
    fields, _, _ = ssm_fields
    raises(exc, argname, lambda: _build(fields, num_tokens, num_rows), *fields.values())


def test_identity_plan_and_nothing_modified(plan):
    ident = MergePlan.identity(B, N)
    assert ident.check() is ident and ident.num_removed == 0
    x = _tokens(B, N, C)
    assert torch.equal(ident.merge(x), x) and torch.equal(ident.unmerge(x), x)
    # A failed call in the middle of unmerge's checks leaves every argument untouched.
    y = _tokens(B, plan.num_rows, C)
    residual, cache, gate = _tokens(B, N, C, seed=1), _tokens(B, N, C, seed=2), _tokens(B, C - 1, seed=3)
    raises(ValueError, "gate", lambda: plan.unmerge(y, residual=residual, cache=cache, gate=gate, mcw=0.3),
           y, residual, cache, gate)
    raises(ValueError, "mcw", lambda: plan.unmerge(y, residual=residual, cache=cache, mcw=math.inf),
           y, residual, cache)
