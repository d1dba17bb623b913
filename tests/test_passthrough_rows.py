"""Passthrough rows: ``MergePlan.merge / unmerge(..., prefix=P, suffix=S)`` on a joint sequence
``[P rows, the plan's N tokens, S rows]`` (text tokens around the image span of Flux's single
block). The rows around the span are copied by the merge and take ``residual + gate * y`` (no
cache) in the unmerge, in the same launch on the Triton backend.

Expected values are the composition the option replaces: the plan applied to the span on the
reference backend, the rows around it copied / ``residual + gate * y`` in fp32, joined with a cat.
The copies are exact; everything else is compared with a tolerance (rounding order may differ).
"""
import pytest
import torch

import sdtm_kernels as sk
from sdtm_kernels.reference import merge as ref

B, H, W, C = 2, 8, 8, 48  # C not a power of two: masked channel tiles
N = H * W
SPANS = [(0, 0), (5, 0), (0, 3), (7, 2)]


def _plans():
    metric = torch.randn(B, N, C, generator=torch.Generator().manual_seed(0))
    return {"ssm": sk.plan_ssm(metric, (H, W), 16, backend="reference"),
            "idm": sk.plan_idm(metric, (H, W), 16, backend="reference")}


PLANS = _plans()


def _tokens(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix,suffix", SPANS)
@pytest.mark.parametrize("kind", ["ssm", "idm"])
@pytest.mark.parametrize("mode", ["mean", "prune"])
def test_merge_copies_the_rows_around_the_span(mode, kind, prefix, suffix, dtype, backend):
    plan = PLANS[kind]
    x = _tokens(B, prefix + N + suffix, C, dtype=dtype)
    out = plan.merge(x, mode=mode, backend=backend, prefix=prefix, suffix=suffix)
    assert out.shape == (B, prefix + plan.num_rows + suffix, C) and out.dtype == dtype
    assert torch.equal(out[:, :prefix], x[:, :prefix])  # copies: exact
    assert torch.equal(out[:, prefix + plan.num_rows:], x[:, prefix + N:])
    span = plan.merge(x[:, prefix:prefix + N], mode=mode, backend="reference")
    torch.testing.assert_close(out[:, prefix:prefix + plan.num_rows], span, **_tol(dtype))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix,suffix", SPANS)
@pytest.mark.parametrize("kind", ["ssm", "idm"])
@pytest.mark.parametrize("with_cache", [False, True])
def test_unmerge_gives_the_rows_around_the_span_the_epilogue_without_cache(with_cache, kind, prefix, suffix,
                                                                           dtype, backend):
    plan = PLANS[kind]
    m = plan.num_rows
    y = _tokens(B, prefix + m + suffix, C, dtype=dtype, seed=2)
    residual = _tokens(B, prefix + N + suffix, C, dtype=dtype, seed=3)
    gate = _tokens(B, C, seed=4).to(dtype)
    terms = dict(cache=_tokens(B, N, C, dtype=dtype, seed=5), mcw=0.25, gate_first=True) if with_cache else {}
    out = plan.unmerge(y, residual=residual, gate=gate, backend=backend, prefix=prefix, suffix=suffix, **terms)
    assert out.shape == residual.shape and out.dtype == dtype
    span = plan.unmerge(y[:, prefix:prefix + m], residual=residual[:, prefix:prefix + N], gate=gate,
                        backend="reference", **terms)
    expected = torch.cat([ref.passthrough(y[:, :prefix], residual[:, :prefix], gate), span,
                          ref.passthrough(y[:, prefix + m:], residual[:, prefix + N:], gate)], dim=1)
    torch.testing.assert_close(out, expected, **_tol(dtype))


def test_passthrough_rows_are_what_the_stock_expression_gives_in_fp32():
    plan = PLANS["ssm"]
    y, residual, gate = _tokens(B, 4 + plan.num_rows, C, seed=6), _tokens(B, 4 + N, C, seed=7), _tokens(B, C, seed=8)
    out = plan.unmerge(y, residual=residual, gate=gate, backend="triton", prefix=4)
    torch.testing.assert_close(out[:, :4], residual[:, :4] + gate[:, None] * y[:, :4], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradients_flow_through_passthrough_rows(backend):
    """The autograd path (the registered ops on the span, the rows around it in torch ops) gives
    the eager values and the gradients of the composition."""
    plan = PLANS["idm"]
    prefix, suffix, m = 3, 2, plan.num_rows
    x = _tokens(B, prefix + N + suffix, C, seed=9).requires_grad_(True)
    gate = _tokens(B, C, seed=10).requires_grad_(True)
    rows = plan.merge(x, backend=backend, prefix=prefix, suffix=suffix)
    out = plan.unmerge(rows * 2.0, residual=x, gate=gate, backend=backend, prefix=prefix, suffix=suffix)
    out.square().sum().backward()
    with torch.no_grad():
        eager = plan.unmerge(plan.merge(x, backend=backend, prefix=prefix, suffix=suffix) * 2.0, residual=x,
                             gate=gate, backend=backend, prefix=prefix, suffix=suffix)
    torch.testing.assert_close(out.detach(), eager, atol=1e-5, rtol=1e-5)
    x2, gate2 = x.detach().clone().requires_grad_(True), gate.detach().clone().requires_grad_(True)
    head, span, tail = x2[:, :prefix], x2[:, prefix:prefix + N], x2[:, prefix + N:]
    merged = torch.cat([head, plan.merge(span, backend="reference"), tail], dim=1) * 2.0
    full = torch.cat([x2[:, :prefix] + gate2[:, None] * merged[:, :prefix],
                      plan.unmerge(merged[:, prefix:prefix + m], residual=span, gate=gate2, backend="reference"),
                      x2[:, prefix + N:] + gate2[:, None] * merged[:, prefix + m:]], dim=1)
    full.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gate.grad, gate2.grad, atol=1e-4, rtol=1e-4)


def test_a_plan_with_passthrough_rows_only_copies():
    plan = sk.MergePlan.identity(B, 0)
    x = _tokens(B, 6, C, seed=11)
    assert torch.equal(plan.merge(x, backend="triton", prefix=4, suffix=2), x)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_passthrough_arguments(backend):
    plan = PLANS["ssm"]
    x = _tokens(B, 3 + N, C)
    with pytest.raises(ValueError, match="x must have shape"):
        plan.merge(x, backend=backend, prefix=2)  # one row too many for prefix=2
    with pytest.raises(ValueError, match="prefix must be >= 0"):
        plan.merge(x, backend=backend, prefix=-3, suffix=6)
    with pytest.raises(TypeError, match="suffix must be an int"):
        plan.merge(x, backend=backend, prefix=3, suffix=0.0)
    y = _tokens(B, 3 + plan.num_rows, C)
    with pytest.raises(ValueError, match="y must have shape"):
        plan.unmerge(y, backend=backend, prefix=4)
    with pytest.raises(ValueError, match="residual must have shape"):
        plan.unmerge(y, residual=_tokens(B, N, C), backend=backend, prefix=3)
    with pytest.raises(ValueError, match="cache must have shape"):
        plan.unmerge(y, residual=x, cache=_tokens(B, 3 + N, C), backend=backend, prefix=3)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix,suffix", [(0, 0), (5, 2)])
@pytest.mark.parametrize("with_cache", [False, True])
def test_addend_is_gated_and_added_to_every_row(with_cache, prefix, suffix, dtype, backend):
    """``unmerge(..., addend=a)`` = ``unmerge(..., residual=residual + gate * a)`` (one launch instead
    of two: Flux-type single blocks add the attention half of their fused output projection)."""
    plan = PLANS["idm"]
    m = plan.num_rows
    y = _tokens(B, prefix + m + suffix, C, dtype=dtype, seed=12)
    residual = _tokens(B, prefix + N + suffix, C, dtype=dtype, seed=13)
    addend = _tokens(B, prefix + N + suffix, C, dtype=dtype, seed=14)
    gate = _tokens(B, C, seed=15)
    terms = dict(cache=_tokens(B, N, C, dtype=dtype, seed=16), mcw=0.25, gate_first=True) if with_cache else {}
    out = plan.unmerge(y, residual=residual, gate=gate, addend=addend, backend=backend, prefix=prefix,
                       suffix=suffix, **terms)
    folded = (residual.float() + gate[:, None] * addend.float()).to(dtype)
    expected = plan.unmerge(y, residual=folded, gate=gate, backend="reference", prefix=prefix, suffix=suffix,
                            **terms)
    torch.testing.assert_close(out, expected, **_tol(dtype))
    if dtype == torch.float32:  # autograd path: the registered op on the folded residual
        y_grad = y.clone().requires_grad_(True)
        out_grad = plan.unmerge(y_grad, residual=residual, gate=gate, addend=addend, backend=backend,
                                prefix=prefix, suffix=suffix, **terms)
        torch.testing.assert_close(out_grad.detach(), out, atol=1e-5, rtol=1e-5)
        out_grad.sum().backward()
        assert y_grad.grad is not None and torch.isfinite(y_grad.grad).all()


def test_bad_addend():
    plan = PLANS["ssm"]
    y = _tokens(B, plan.num_rows, C)
    with pytest.raises(ValueError, match="addend must have shape"):
        plan.unmerge(y, residual=_tokens(B, N, C), addend=_tokens(B, N + 1, C), backend="triton")
    with pytest.raises(TypeError, match="addend has dtype"):
        plan.unmerge(y, residual=_tokens(B, N, C), addend=_tokens(B, N, C, dtype=torch.bfloat16), backend="reference")


def test_addend_on_the_autograd_path_checks_the_residual_first():
    """The registered op has no addend: it is folded into the residual, after the residual's checks."""
    plan = PLANS["ssm"]
    y = _tokens(B, plan.num_rows, C).requires_grad_(True)
    addend, gate = _tokens(B, N, C), _tokens(B, C)
    with pytest.raises(ValueError, match="residual must have shape"):
        plan.unmerge(y, residual=_tokens(B, 1, C), gate=gate, addend=addend, backend="triton")
    with pytest.raises(TypeError, match="residual has dtype"):
        plan.unmerge(y, residual=_tokens(B, N, C).double(), gate=gate, addend=addend, backend="triton")
    with pytest.raises(ValueError, match="gate must have rank 2"):
        plan.unmerge(y, residual=_tokens(B, N, C), gate=gate[:, None], addend=addend, backend="triton")


def test_launcher_span_without_rows_copies_the_rows_around_it():
    from sdtm_kernels.csrc_triton import merge as kernels

    x = _tokens(B, 3 + 2, C)  # prefix 3, an empty span, suffix 2
    empty = torch.zeros(B, 0, dtype=torch.int32)
    out = kernels.merge_mean(x, empty, torch.zeros(B, 1, dtype=torch.int32), prefix=3, suffix=2)
    assert torch.equal(out, x)
