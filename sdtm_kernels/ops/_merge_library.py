"""``torch.library`` registration of ``sdtm::merge``, ``sdtm::prune``, ``sdtm::unmerge``.

Each op takes an already resolved ``backend``: ``"triton"`` runs ``csrc_triton/merge.py``
(on CPU tensors: in the Triton interpreter), ``"reference"`` runs ``reference/merge.py``.
Custom ops are opaque to ``torch.compile`` (fake implementations give the shapes) and do
no host synchronisation, so they can be captured in CUDA graphs.

Autograd (same kernels on the ``triton`` backend):
    merge:   grad_x[t] = grad[row[t]] / count[row[t]]                (``sdtm::merge_backward``)
    prune:   grad_x = zeros, grad_x[rep_token[m]] = grad[m]
    unmerge: grad_y[m] = gate * sum_{t in row m} w[t] * grad[t]      (``sdtm::unmerge_backward``)
             w = mcw on blend tokens when a cache is given, else 1;
             grad_residual = grad, grad_gate = sum_t grad * v_before_gate,
             grad_cache = (1 - mcw) * gate * grad on blend tokens, 0 elsewhere.
The backward ops themselves are not differentiable (no double backward).

These ops do not check index values (the public ``sdtm_kernels.ops`` wrappers do, on CPU
and in debug mode); whatever the values, neither backend reads out of bounds (the index
contract of ``reference/merge.py`` and ``csrc_triton/merge.py``).
"""
from typing import Optional

import torch
from torch import Tensor

from ..reference import merge as ref

# Private helper ops in the same namespace, used by the backward formulas.
_LIB = "sdtm"


def _kernels():
    # Lazy: ``import sdtm_kernels`` must not import triton.
    from ..csrc_triton import merge as kernels

    return kernels


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_c(index: Tensor, channels: int) -> Tensor:
    return index.long().unsqueeze(-1).expand(-1, -1, channels)


def _csr_from_rows(row_of_token: Tensor, num_rows: int):
    """``members``/``row_start`` of the plan whose rows are ``row_of_token`` (no host sync).
    Tokens whose row is outside ``[0, num_rows)`` sort last, past ``row_start[:, -1]``: no row."""
    rows = row_of_token.long()
    rows = torch.where((rows >= 0) & (rows < num_rows), rows, num_rows)
    members = torch.argsort(rows, dim=1, stable=True).to(torch.int32)
    counts = torch.zeros(rows.shape[0], num_rows + 1, dtype=torch.long, device=rows.device)
    counts.scatter_add_(1, rows, torch.ones_like(rows))
    row_start = torch.nn.functional.pad(torch.cumsum(counts[:, :num_rows], dim=1), (1, 0)).to(torch.int32)
    return members, row_start


# -- merge --------------------------------------------------------------------------------

@torch.library.custom_op(f"{_LIB}::merge", mutates_args=())
def merge(x: Tensor, row_of_token: Tensor, members: Tensor, row_start: Tensor, num_rows: int,
          backend: str) -> Tensor:
    """Segment mean ``[B, N, C] -> [B, M, C]`` over each row's members."""
    if backend == "triton":
        return _kernels().merge_mean(x, members, row_start)
    return ref.segment_mean(x, members, row_start)  # the same plan tensors as the kernel


@merge.register_fake
def _(x, row_of_token, members, row_start, num_rows, backend):
    return x.new_empty(x.shape[0], num_rows, x.shape[2])


@torch.library.custom_op(f"{_LIB}::merge_backward", mutates_args=())
def merge_backward(grad: Tensor, row_of_token: Tensor, row_start: Tensor, dtype: torch.dtype,
                   backend: str) -> Tensor:
    """``grad_x[b, t] = grad[b, row_of_token[b, t]] / count[b, row]``, stored in ``dtype``."""
    if backend == "triton":
        return _kernels().merge_backward(grad, row_of_token, row_start, out_dtype=dtype)
    compute = _compute_dtype(grad.dtype)
    lo, hi = ref.row_bounds(row_start, row_of_token.shape[1])
    counts = (hi - lo).clamp_min(1).to(compute)
    scaled = grad.to(compute) / counts.unsqueeze(-1)
    return ref.gather_rows(scaled, row_of_token).to(dtype)


@merge_backward.register_fake
def _(grad, row_of_token, row_start, dtype, backend):
    return grad.new_empty(grad.shape[0], row_of_token.shape[1], grad.shape[2], dtype=dtype)


def _merge_setup(ctx, inputs, output):
    x, row_of_token, _, row_start, _, backend = inputs
    ctx.save_for_backward(row_of_token, row_start)
    ctx.dtype, ctx.backend = x.dtype, backend


def _merge_grad(ctx, grad):
    row_of_token, row_start = ctx.saved_tensors
    grad_x = torch.ops.sdtm.merge_backward(grad, row_of_token, row_start, ctx.dtype, ctx.backend)
    return grad_x, None, None, None, None, None


merge.register_autograd(_merge_grad, setup_context=_merge_setup)


# -- prune --------------------------------------------------------------------------------

@torch.library.custom_op(f"{_LIB}::prune", mutates_args=())
def prune(x: Tensor, rep_token: Tensor, backend: str) -> Tensor:
    """Representative gather ``out[b, m] = x[b, rep_token[b, m]]``."""
    if backend == "triton":
        return _kernels().prune(x, rep_token)
    return ref.prune(x, rep_token)


@prune.register_fake
def _(x, rep_token, backend):
    return x.new_empty(x.shape[0], rep_token.shape[1], x.shape[2])


def _prune_setup(ctx, inputs, output):
    x, rep_token, _ = inputs
    ctx.save_for_backward(rep_token)
    ctx.num_tokens, ctx.dtype = x.shape[1], x.dtype


def _prune_grad(ctx, grad):
    (rep_token,) = ctx.saved_tensors
    batch, _, channels = grad.shape
    num_tokens = ctx.num_tokens
    # Representatives are distinct tokens, so the scatter has no collisions (deterministic);
    # an out-of-range representative (which read zeros) writes to a spare token that is cut off.
    reps = rep_token.long()
    reps = torch.where((reps >= 0) & (reps < num_tokens), reps, num_tokens)
    grad_x = grad.new_zeros(batch, num_tokens + 1, channels, dtype=ctx.dtype)
    grad_x.scatter_(1, _expand_c(reps, channels), grad.to(ctx.dtype))
    return grad_x[:, :num_tokens], None, None


prune.register_autograd(_prune_grad, setup_context=_prune_setup)


# -- unmerge ------------------------------------------------------------------------------

@torch.library.custom_op(f"{_LIB}::unmerge", mutates_args=())
def unmerge(y: Tensor, row_of_token: Tensor, residual: Optional[Tensor], gate: Optional[Tensor],
            cache: Optional[Tensor], blend: Optional[Tensor], mcw: float, gate_first: bool, backend: str) -> Tensor:
    """``residual + gate[:, None] * where(blend, mcw * v + (1 - mcw) * cache, v)``,
    ``v = y[b, row_of_token[b, t]]``; ``gate_first``: ``residual + where(blend, mcw * g v + (1 - mcw) * cache,
    g v)`` (a cache of gated values). Each term optional."""
    if backend == "triton":
        return _kernels().unmerge(y, row_of_token, residual=residual, gate=gate, cache=cache, blend=blend,
                                  mcw=mcw, gate_first=gate_first)
    return ref.unmerge(y, row_of_token, residual=residual, gate=gate, cache=cache, blend=blend, mcw=mcw,
                       gate_first=gate_first)


@unmerge.register_fake
def _(y, row_of_token, residual, gate, cache, blend, mcw, gate_first, backend):
    return y.new_empty(y.shape[0], row_of_token.shape[1], y.shape[2])


@torch.library.custom_op(f"{_LIB}::unmerge_backward", mutates_args=())
def unmerge_backward(grad: Tensor, row_of_token: Tensor, num_rows: int, gate: Optional[Tensor],
                     blend: Optional[Tensor], mcw: float, has_cache: bool, dtype: torch.dtype,
                     backend: str) -> Tensor:
    """``grad_y[b, m] = gate[b] * sum_{t: row_of_token[b, t] = m} w[b, t] * grad[b, t]``,
    ``w = mcw`` on blend tokens (all tokens without ``blend``) when ``has_cache``, else 1."""
    if backend == "triton":
        members, row_start = _csr_from_rows(row_of_token, num_rows)
        return _kernels().unmerge_backward_y(grad, members, row_start, gate=gate, blend=blend,
                                             mcw=mcw if has_cache else None, out_dtype=dtype)
    compute = _compute_dtype(grad.dtype)
    weighted = grad.to(compute)
    if gate is not None:
        weighted = weighted * gate.to(compute).unsqueeze(1)
    if has_cache:
        scaled = weighted * mcw
        weighted = torch.where(blend.unsqueeze(-1), scaled, weighted) if blend is not None else scaled
    return ref.scatter_rows(weighted, row_of_token, num_rows).to(dtype).contiguous()


@unmerge_backward.register_fake
def _(grad, row_of_token, num_rows, gate, blend, mcw, has_cache, dtype, backend):
    return grad.new_empty(grad.shape[0], num_rows, grad.shape[2], dtype=dtype)


def _unmerge_setup(ctx, inputs, output):
    y, row_of_token, residual, gate, cache, blend, mcw, gate_first, backend = inputs
    ctx.save_for_backward(y, row_of_token, gate, cache, blend)
    ctx.mcw, ctx.backend, ctx.gate_first = mcw, backend, gate_first
    ctx.residual_dtype = residual.dtype if residual is not None else None


def _unmerge_grad(ctx, grad):
    y, row_of_token, gate, cache, blend = ctx.saved_tensors
    mcw, backend = ctx.mcw, ctx.backend
    compute = _compute_dtype(y.dtype)
    grad_y = grad_residual = grad_gate = grad_cache = None
    if ctx.needs_input_grad[0]:
        grad_y = torch.ops.sdtm.unmerge_backward(
            grad, row_of_token, y.shape[1], gate, blend, mcw, cache is not None, y.dtype, backend
        )
    if ctx.needs_input_grad[2]:
        grad_residual = grad.to(ctx.residual_dtype)
    if ctx.needs_input_grad[3]:
        # What the gate multiplies, in the compute dtype, from the same gather kernel: the blended
        # value, or (gate first) the gathered value weighted by mcw on blend tokens.
        blend_in = cache.to(compute) if cache is not None else None
        if ctx.gate_first and cache is not None:  # a zero cache leaves mcw * v on blend tokens
            blend_in = y.new_zeros((), dtype=compute).expand(y.shape[0], row_of_token.shape[1], y.shape[2])
        value = torch.ops.sdtm.unmerge(y.to(compute), row_of_token, None, None, blend_in, blend, mcw, False,
                                       backend)
        grad_gate = (grad.to(compute) * value).sum(dim=1).to(gate.dtype)
    if ctx.needs_input_grad[4]:
        weighted = grad.to(compute) * (1.0 - mcw)
        if gate is not None and not ctx.gate_first:
            weighted = weighted * gate.to(compute).unsqueeze(1)
        if blend is not None:
            weighted = torch.where(blend.unsqueeze(-1), weighted, torch.zeros_like(weighted))
        grad_cache = weighted.to(cache.dtype)
    return grad_y, None, grad_residual, grad_gate, grad_cache, None, None, None, None


unmerge.register_autograd(_unmerge_grad, setup_context=_unmerge_setup)
