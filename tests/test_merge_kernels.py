"""Triton merge / prune / unmerge kernels (csrc_triton/merge.py) against the reference.

Runs on CUDA when present, else in the Triton interpreter on CPU (tests/conftest.py).
Shapes stay tiny (N <= 96, C <= 200) so the interpreter run is fast.
"""
import itertools

import pytest
import torch

from helpers import assert_close, random_tokens
from sdtm_kernels import MergePlan, plan_idm, plan_ssm, plan_tome
from sdtm_kernels import ops
from sdtm_kernels.reference import merge as ref

LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)
PLAN_KINDS = ("ssm", "idm", "tome", "identity")
GRID = (8, 8)


def make_plan(kind, batch, device, grid=GRID, seed=0):
    """A plan on ``device`` that merges a real share of the tokens (identity: none)."""
    num_tokens = grid[0] * grid[1]
    metric = random_tokens(batch, num_tokens, 16, device=device, seed=seed)
    if kind == "ssm":  # 2x1 windows: 16 of the 32 windows collapse (released rounding to 16)
        plan = plan_ssm(metric, grid, 16, window=(2, 1))
    elif kind == "idm":
        plan = plan_idm(metric, grid, 32)
    elif kind == "tome":
        plan = plan_tome(metric, grid, min(20, num_tokens - num_tokens // 4),
                         generator=torch.Generator().manual_seed(seed))
    else:
        plan = MergePlan.identity(batch, num_tokens, device=device)
    if kind != "identity":
        assert plan.num_rows < num_tokens
    return plan


def epilogue_terms(plan, channels, dtype, device, gate_dtype=torch.float32, seed=1):
    n = plan.num_tokens
    return {
        "residual": random_tokens(plan.batch_size, n, channels, dtype, device, seed=seed),
        "gate": random_tokens(1, plan.batch_size, channels, gate_dtype, device, seed=seed + 1)[0],
        "cache": random_tokens(plan.batch_size, n, channels, dtype, device, seed=seed + 2),
    }


def reference_unmerge(plan, y, **terms):
    return ref.unmerge(y, plan.row_of_token, blend=plan.blend, **terms)


# -- forward vs reference -----------------------------------------------------------------

@pytest.mark.parametrize("kind", PLAN_KINDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_merge_prune_unmerge_match_reference(kind, dtype, device):
    plan = make_plan(kind, 2, device)
    x = random_tokens(2, plan.num_tokens, 40, dtype, device)
    # Kernel output in dtype vs the reference computed in fp32 (STYLE 5).
    expected = ref.merge_mean(x.float(), plan.row_of_token, plan.num_rows)
    merged = plan.merge(x, backend="triton")
    assert merged.dtype == dtype and merged.shape == (2, plan.num_rows, 40)
    assert_close(merged.float(), expected, dtype)
    # Gathers and pure copies are exact.
    assert torch.equal(plan.merge(x, mode="prune", backend="triton"), ref.prune(x, plan.rep_token))
    unmerged = plan.unmerge(merged, backend="triton")
    assert torch.equal(unmerged, ref.unmerge(merged, plan.row_of_token))
    if kind == "identity":
        assert torch.equal(merged, x) and torch.equal(unmerged, x)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_triton_and_reference_backends_agree_through_plan(dtype, device):
    plan = make_plan("idm", 3, device)
    x = random_tokens(3, plan.num_tokens, 24, dtype, device)
    terms = epilogue_terms(plan, 24, dtype, device)
    y_tri, y_ref = plan.merge(x, backend="triton"), plan.merge(x, backend="reference")
    assert_close(y_tri, y_ref)
    out_tri = plan.unmerge(y_ref, **terms, mcw=0.7, backend="triton")
    out_ref = plan.unmerge(y_ref, **terms, mcw=0.7, backend="reference")
    assert_close(out_tri, out_ref)


@pytest.mark.parametrize("has_residual,has_gate,has_cache", list(itertools.product((False, True), repeat=3)))
@pytest.mark.parametrize("dtype,gate_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.bfloat16)])
def test_unmerge_epilogue_terms(has_residual, has_gate, has_cache, dtype, gate_dtype, device):
    plan = make_plan("tome", 2, device)
    channels = 33
    y = random_tokens(2, plan.num_rows, channels, dtype, device, seed=5)
    terms = epilogue_terms(plan, channels, dtype, device, gate_dtype)
    given = {name: value for name, value in terms.items()
             if {"residual": has_residual, "gate": has_gate, "cache": has_cache}[name]}
    out = plan.unmerge(y, **given, mcw=0.25, backend="triton")
    expected = reference_unmerge(plan, y.float(), mcw=0.25, **{k: v.float() for k, v in given.items()})
    assert out.dtype == dtype
    assert_close(out.float(), expected, dtype)
    if not given:
        assert torch.equal(out, reference_unmerge(plan, y))


def test_unmerge_cache_without_blend_blends_every_token(device):
    plan = make_plan("idm", 2, device)
    y = random_tokens(2, plan.num_rows, 20, device=device)
    cache = random_tokens(2, plan.num_tokens, 20, device=device, seed=3)
    out = ops.unmerge(y, plan.row_of_token, cache=cache, mcw=0.5, backend="triton")
    value = ref.unmerge(y, plan.row_of_token)
    assert_close(out, 0.5 * value + 0.5 * cache)


# -- layouts and awkward shapes -----------------------------------------------------------

def test_strided_inputs(device):
    plan = make_plan("ssm", 3, device)
    n, m, channels = plan.num_tokens, plan.num_rows, 37
    # A channel slice keeps unit stride in C but has a wider token stride.
    big = random_tokens(3, n, channels + 9, device=device)
    x = big[:, :, 5:5 + channels]
    # A transposed batch view: batch stride smaller than token stride.
    y = random_tokens(m, 3, channels, device=device, seed=2).transpose(0, 1)
    residual = random_tokens(n, 3, channels, device=device, seed=3).transpose(0, 1)
    cache = random_tokens(3, n, 2 * channels, device=device, seed=4)[..., ::2]  # no unit stride: copied
    gate = random_tokens(1, channels, 3, device=device, seed=5)[0].t()
    assert x.stride(-1) == 1 and not x.is_contiguous() and y.stride(0) < y.stride(1)
    assert cache.stride(-1) == 2 and gate.stride(-1) == 3
    assert_close(plan.merge(x, backend="triton"), ref.merge_mean(x, plan.row_of_token, m))
    assert torch.equal(plan.merge(x, mode="prune", backend="triton"), ref.prune(x, plan.rep_token))
    terms = {"residual": residual, "gate": gate, "cache": cache}
    out = plan.unmerge(y, **terms, mcw=0.5, backend="triton")
    assert out.is_contiguous()
    assert_close(out, reference_unmerge(plan, y, mcw=0.5, **terms))
    # Index tensors may be views too.
    rows_t = plan.row_of_token.t().contiguous().t()
    assert torch.equal(ops.unmerge(y, rows_t, backend="triton"), ref.unmerge(y, plan.row_of_token))


@pytest.mark.parametrize("channels", [1, 3, 17, 200])
def test_channel_count_differs_from_metric(channels, device):
    plan = make_plan("idm", 2, device)  # metric has C=16
    x = random_tokens(2, plan.num_tokens, channels, device=device)
    merged = plan.merge(x, backend="triton")
    assert_close(merged, ref.merge_mean(x, plan.row_of_token, plan.num_rows))
    terms = epilogue_terms(plan, channels, torch.float32, device)
    assert_close(plan.unmerge(merged, **terms, mcw=0.5, backend="triton"),
                 reference_unmerge(plan, merged, mcw=0.5, **terms))


@pytest.mark.parametrize("batch,grid", [(1, (1, 1)), (1, (4, 4)), (3, (8, 8)), (5, (2, 4))])
def test_small_and_odd_shapes(batch, grid, device):
    n = grid[0] * grid[1]
    if n == 1:
        plan = MergePlan.identity(batch, 1, device=device)
    else:
        plan = make_plan("tome", batch, device, grid=grid)
    x = random_tokens(batch, n, 19, device=device)
    merged = plan.merge(x, backend="triton")
    assert_close(merged, ref.merge_mean(x, plan.row_of_token, plan.num_rows))
    terms = epilogue_terms(plan, 19, torch.float32, device)
    assert_close(plan.unmerge(merged, **terms, mcw=0.5, backend="triton"),
                 reference_unmerge(plan, merged, mcw=0.5, **terms))


def test_one_row_holding_every_token(device):
    # The longest possible member loop: a single row of N tokens.
    n = 64
    rows = torch.zeros(2, n, dtype=torch.int32, device=device)
    token = torch.arange(n, dtype=torch.int32, device=device).repeat(2, 1)
    starts = torch.tensor([[0, n]] * 2, dtype=torch.int32, device=device)
    plan = MergePlan(rows, token, starts, token[:, :1].clone(), torch.ones_like(rows, dtype=torch.bool), n, 1)
    x = random_tokens(2, n, 130, device=device)
    assert_close(plan.merge(x, backend="triton"), x.mean(dim=1, keepdim=True))


def test_zero_and_constant_tokens_stay_finite(device):
    plan = make_plan("idm", 2, device)
    for x in (torch.zeros(2, 64, 8, device=device), torch.full((2, 64, 8), 3.5, device=device)):
        merged = plan.merge(x, backend="triton")
        assert torch.isfinite(merged).all()
        assert torch.equal(merged, x[:, : plan.num_rows])  # mean of equal values is exact
        assert torch.equal(plan.unmerge(merged, backend="triton"), x)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_deterministic(dtype, device):
    plan = make_plan("idm", 2, device)
    x = random_tokens(2, plan.num_tokens, 48, dtype, device)
    terms = epilogue_terms(plan, 48, dtype, device)
    merged = [plan.merge(x, backend="triton") for _ in range(2)]
    assert torch.equal(merged[0], merged[1])
    out = [plan.unmerge(merged[0], **terms, mcw=0.3, backend="triton") for _ in range(2)]
    assert torch.equal(out[0], out[1])
    x.requires_grad_(True)
    grads = [torch.autograd.grad(plan.merge(x, backend="triton").float().square().sum(), x)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


# -- autograd -----------------------------------------------------------------------------

def _tiny_plan(device):
    # 2x4 grid, 2x2 windows: ToMe merges 3 of the 6 candidates (rows of 1 to 4 tokens).
    metric = random_tokens(2, 8, 4, torch.float64, device)
    return plan_tome(metric, (2, 4), 3, generator=torch.Generator().manual_seed(1))


def test_gradcheck_merge_and_prune(device):
    plan = _tiny_plan(device)
    x = random_tokens(2, 8, 3, torch.float64, device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: plan.merge(t, backend="triton"), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: plan.merge(t, mode="prune", backend="triton"), (x,), fast_mode=True)


def test_gradcheck_unmerge_all_terms(device):
    plan = _tiny_plan(device)
    assert bool(plan.blend.any()) and not bool(plan.blend.all())
    y = random_tokens(2, plan.num_rows, 3, torch.float64, device).requires_grad_(True)
    residual = random_tokens(2, 8, 3, torch.float64, device, seed=2).requires_grad_(True)
    gate = random_tokens(1, 2, 3, torch.float64, device, seed=3)[0].requires_grad_(True)
    cache = random_tokens(2, 8, 3, torch.float64, device, seed=4).requires_grad_(True)

    def fn(y, residual, gate, cache):
        return plan.unmerge(y, residual=residual, gate=gate, cache=cache, mcw=0.75, backend="triton")

    assert torch.autograd.gradcheck(fn, (y, residual, gate, cache), fast_mode=True)
    # Plain unmerge: the gradient is a segment sum.
    assert torch.autograd.gradcheck(lambda t: plan.unmerge(t, backend="triton"), (y,), fast_mode=True)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_gradients_match_reference(dtype, device):
    plan = make_plan("idm", 2, device)
    channels = 24
    x = random_tokens(2, plan.num_tokens, channels, dtype, device)
    y = random_tokens(2, plan.num_rows, channels, dtype, device, seed=7)
    terms = epilogue_terms(plan, channels, dtype, device, gate_dtype=torch.float32)
    weight_n = random_tokens(2, plan.num_tokens, channels, torch.float32, device, seed=9)
    weight_m = random_tokens(2, plan.num_rows, channels, torch.float32, device, seed=10)

    def grads(backend):
        # Each op on the same leaves, so only that op's backward is compared.
        xm, xp, yl = (t.clone().requires_grad_(True) for t in (x, x, y))
        residual, gate, cache = (t.clone().requires_grad_(True) for t in terms.values())
        loss = (plan.merge(xm, backend=backend).float() * weight_m).sum()
        loss = loss + (plan.merge(xp, mode="prune", backend=backend).float() * weight_m).sum()
        out = plan.unmerge(yl, residual=residual, gate=gate, cache=cache, mcw=0.6, backend=backend)
        (loss + (out.float() * weight_n).sum()).backward()
        return [leaf.grad for leaf in (xm, xp, yl, residual, gate, cache)]

    for got, want in zip(grads("triton"), grads("reference")):
        assert got.dtype == want.dtype
        assert_close(got.float(), want.float(), want.dtype)


def test_custom_ops_reference_backend_matches_plain_reference(device):
    # The ops' own backward formulas (reference branch) against autograd through reference/merge.py.
    plan = make_plan("tome", 2, device)
    x = random_tokens(2, plan.num_tokens, 12, torch.float64, device)
    y = random_tokens(2, plan.num_rows, 12, torch.float64, device, seed=3)
    terms = epilogue_terms(plan, 12, torch.float64, device, gate_dtype=torch.float64)
    weight = random_tokens(2, plan.num_tokens, 12, torch.float64, device, seed=4)

    def run(use_op):
        leaves = [t.clone().requires_grad_(True) for t in (x, x, y, *terms.values())]
        xm, xp, yl, residual, gate, cache = leaves
        if use_op:
            merged = torch.ops.sdtm.merge(xm, plan.row_of_token, plan.members, plan.row_start, plan.num_rows,
                                          "reference")
            pruned = torch.ops.sdtm.prune(xp, plan.rep_token, "reference")
            out = torch.ops.sdtm.unmerge(yl, plan.row_of_token, residual, gate, cache, plan.blend, 0.25, False, "reference")
        else:
            merged = ref.merge_mean(xm, plan.row_of_token, plan.num_rows)
            pruned = ref.prune(xp, plan.rep_token)
            out = ref.unmerge(yl, plan.row_of_token, residual, gate, cache, plan.blend, 0.25)
        loss = (out * weight).sum() + (merged * weight[:, : plan.num_rows]).sum() + (pruned * merged).sum()
        loss.backward()
        return [out, merged, pruned] + [leaf.grad for leaf in leaves]

    for got, want in zip(run(True), run(False)):
        assert_close(got, want)


# -- torch.library / compile / graphs -----------------------------------------------------

@pytest.mark.parametrize("backend", ("triton", "reference"))
def test_opcheck(backend, device):
    plan = _tiny_plan(device)
    x = random_tokens(2, 8, 3, torch.float32, device).requires_grad_(True)
    y = random_tokens(2, plan.num_rows, 3, torch.float32, device).requires_grad_(True)
    residual, cache = (random_tokens(2, 8, 3, torch.float32, device, seed=s).requires_grad_(True) for s in (2, 3))
    gate = random_tokens(1, 2, 3, torch.float32, device, seed=4)[0].requires_grad_(True)
    grad = random_tokens(2, 8, 3, torch.float32, device, seed=5)
    cases = [
        (torch.ops.sdtm.merge, (x, plan.row_of_token, plan.members, plan.row_start, plan.num_rows, backend)),
        (torch.ops.sdtm.prune, (x, plan.rep_token, backend)),
        (torch.ops.sdtm.unmerge, (y, plan.row_of_token, residual, gate, cache, plan.blend, 0.5, False, backend)),
        (torch.ops.sdtm.unmerge, (y, plan.row_of_token, residual, gate, cache, plan.blend, 0.5, True, backend)),
        (torch.ops.sdtm.unmerge, (y, plan.row_of_token, None, None, None, None, 1.0, False, backend)),
        (torch.ops.sdtm.merge_backward, (y.detach(), plan.row_of_token, plan.row_start, torch.float32, backend)),
        (torch.ops.sdtm.unmerge_backward,
         (grad, plan.row_of_token, plan.num_rows, gate.detach(), plan.blend, 0.5, True, torch.float32, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device):
    plan = make_plan("idm", 2, device)
    x = random_tokens(2, plan.num_tokens, 32, device=device)
    gate = random_tokens(1, 2, 32, device=device, seed=1)[0]

    def block(x, gate):
        merged = plan.merge(x, backend="triton")
        return plan.unmerge(merged * 2.0, residual=x, gate=gate, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    # One compile, forward and backward (the custom ops' autograd through AOTAutograd).
    x_compiled, x_eager = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = compiled(x_compiled, gate)
    expected = x + gate[:, None] * 2.0 * ref.unmerge(ref.merge_mean(x, plan.row_of_token, plan.num_rows),
                                                     plan.row_of_token)
    assert_close(out, expected)
    out.square().sum().backward()
    block(x_eager, gate).square().sum().backward()
    assert_close(x_compiled.grad, x_eager.grad)


def test_cuda_graph_replay_matches_eager(device):
    if device != "cuda":
        pytest.skip("CUDA-graph capture is a CUDA-only check (the CPU run covers the kernels in the interpreter)")
    plan = make_plan("idm", 2, device)
    x = random_tokens(2, plan.num_tokens, 64, torch.bfloat16, device)
    terms = epilogue_terms(plan, 64, torch.bfloat16, device)

    def block(x):
        merged = plan.merge(x, backend="triton") + plan.merge(x, mode="prune", backend="triton")
        return plan.unmerge(merged, **terms, mcw=0.5, backend="triton")

    eager = block(x)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        block(static_x)  # warm up (compiles the kernels) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = block(static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    static_x.copy_(random_tokens(2, plan.num_tokens, 64, torch.bfloat16, device, seed=7))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, block(static_x))

