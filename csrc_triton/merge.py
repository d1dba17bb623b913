"""Applying a merge plan: segment reduction (merge / unmerge backward) and row gather
(prune / unmerge with the fused DiT epilogue / merge backward).

Equivalent PyTorch::

    merge_mean(x, members, row_start)  == zeros(B, M, C).index_add_(1, row_of_token, x) / counts
    prune(x, rep_token)                == x.gather(1, rep_token[..., None].expand(-1, -1, C))
    unmerge(y, row_of_token, ...)      == residual + gate[:, None] * where(blend, mcw * v + (1 - mcw) * cache, v),
                                          v = y.gather(1, row_of_token[..., None].expand(-1, -1, C))

Compute is fp32 (fp64 for fp64 inputs); outputs are dense and stored in the input dtype.
Inputs need a unit stride in C only; every other stride is passed. Batch and token
offsets are int64 so B*N*C may exceed 2**31. No atomics: every output element is written
by exactly one program, and each row sums its members in CSR (ascending token) order, so
results are deterministic.

Index contract (docs/SEMANTICS.md, "Index contract"): the kernels never read out of bounds,
whatever the index values. A gather index outside ``[0, M)`` reads zeros (``v = 0``, the
epilogue still applies); a segment row spans the CSR positions ``[lo, hi)`` with
``lo = clamp(row_start[m], 0, N)`` and ``hi = clamp(row_start[m + 1], lo, N)``, members outside
``[0, N)`` add nothing, and a mean divides by ``max(hi - lo, 1)``. Valid plans are unaffected;
the public ops check the values (CPU always, GPUs in debug mode) before launching.
"""
import os

import torch
import triton
import triton.language as tl

MAX_BLOCK_C = 512  # channels per program; C=1536 (SD3) splits into 3 full blocks
GATHER_TILE = 4096  # elements per gather program (BLOCK_T * BLOCK_C)


@triton.jit
def _segment_reduce_kernel(
    out_ptr, stride_ob, stride_om,  # [B, M, C] output rows, unit stride in C
    src_ptr, stride_sb, stride_sn,  # [B, N, C] tokens, unit stride in C
    members_ptr, stride_mb, stride_mn,  # [B, N] int32 tokens grouped by row (CSR columns)
    start_ptr, stride_rb, stride_rm,  # [B, M + 1] int32 row starts (CSR offsets)
    blend_ptr, stride_bb, stride_bn,  # [B, N] uint8 tokens scaled by mcw (USE_MCW and HAS_BLEND)
    gate_ptr, stride_gb,  # [B, C] per-channel scale of the result (HAS_GATE), unit stride in C
    mcw,  # weight of blended tokens (USE_MCW)
    N, C,  # tokens of src (and length of members), channels
    MEAN: tl.constexpr,  # divide by the member count (merge) instead of a plain sum
    USE_MCW: tl.constexpr,  # scale tokens by mcw (unmerge backward with a cache)
    HAS_BLEND: tl.constexpr,  # only blend tokens are scaled by mcw; else all are
    HAS_GATE: tl.constexpr,  # multiply the result by gate[b]
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    BLOCK_C: tl.constexpr,  # channels per program (power of two)
):
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    mask_c = offs_c < C

    row_start = start_ptr + b * stride_rb + row * stride_rm
    # Row bounds clamped to [0, N] (hi >= lo): a bad row_start never runs past members.
    lo = tl.minimum(tl.maximum(tl.load(row_start), 0), N)
    hi = tl.minimum(tl.maximum(tl.load(row_start + stride_rm), lo), N)
    src_b = src_ptr + b * stride_sb
    acc = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    # Runtime bounds: a plain loop over this row's members, in ascending token order.
    for i in range(lo, hi):
        tok = tl.load(members_ptr + b * stride_mb + i * stride_mn).to(tl.int64)
        tok_ok = (tok >= 0) & (tok < N)  # a member outside [0, N) adds nothing
        # tl.where, not `mask_c & tok_ok`: the interpreter mistypes scalar & vector masks.
        val = tl.load(src_b + tok * stride_sn + offs_c, mask=tl.where(tok_ok, mask_c, False),
                      other=0.0).to(ACC_DTYPE)
        if USE_MCW:
            if HAS_BLEND:
                is_blend = tl.load(blend_ptr + b * stride_bb + tok * stride_bn, mask=tok_ok, other=0) != 0
                val = tl.where(is_blend, val * mcw, val)
            else:
                val = val * mcw
        acc += val
    if MEAN:
        acc = acc / tl.maximum(hi - lo, 1).to(ACC_DTYPE)
    if HAS_GATE:
        gate = tl.load(gate_ptr + b * stride_gb + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
        acc = acc * gate
    tl.store(out_ptr + b * stride_ob + row * stride_om + offs_c, acc.to(out_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _gather_rows_kernel(
    out_ptr, stride_ob, stride_on,  # [B, N, C] output tokens, unit stride in C
    src_ptr, stride_sb, stride_sm,  # [B, M, C] rows to gather, unit stride in C
    index_ptr, stride_ib, stride_in,  # [B, N] int32 row read by each output token
    res_ptr, stride_rb, stride_rn,  # [B, N, C] residual added last (HAS_RESIDUAL)
    gate_ptr, stride_gb,  # [B, C] gate multiplied in (HAS_GATE), unit stride in C
    cache_ptr, stride_cb, stride_cn,  # [B, N, C] cache blended in (HAS_CACHE)
    blend_ptr, stride_bb, stride_bn,  # [B, N] uint8 tokens that take the cache (HAS_BLEND)
    start_ptr, stride_tb, stride_tm,  # [B, M + 1] int32 row starts: divide by count (COUNT_SCALE)
    mcw, one_minus_mcw,  # cache blend weights, mcw * v + (1 - mcw) * cache
    N, M, C,  # output tokens, rows of src, channels
    HAS_RESIDUAL: tl.constexpr,  # out = residual + v
    HAS_GATE: tl.constexpr,  # v = gate[b] * v
    GATE_FIRST: tl.constexpr,  # the gate multiplies v before the cache blend (the cache holds gated values)
    HAS_CACHE: tl.constexpr,  # v = mcw * v + (1 - mcw) * cache
    HAS_BLEND: tl.constexpr,  # cache blend only where blend; else everywhere
    COUNT_SCALE: tl.constexpr,  # v = v / count[row] (merge backward)
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    BLOCK_T: tl.constexpr,  # tokens per program (power of two)
    BLOCK_C: tl.constexpr,  # channels per program (power of two)
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    mask_t = offs_t < N
    mask_c = offs_c < C
    mask = mask_t[:, None] & mask_c[None, :]
    tok = offs_t.to(tl.int64)

    row = tl.load(index_ptr + b * stride_ib + tok * stride_in, mask=mask_t, other=0).to(tl.int64)
    row_ok = mask_t & (row >= 0) & (row < M)  # an index outside [0, M) reads zeros
    src = src_ptr + b * stride_sb + row[:, None] * stride_sm + offs_c[None, :]
    val = tl.load(src, mask=mask & row_ok[:, None], other=0.0).to(ACC_DTYPE)
    if COUNT_SCALE:
        row_start = start_ptr + b * stride_tb + row * stride_tm
        lo = tl.minimum(tl.maximum(tl.load(row_start, mask=row_ok, other=0), 0), N)
        hi = tl.minimum(tl.maximum(tl.load(row_start + stride_tm, mask=row_ok, other=1), lo), N)
        val = val / tl.maximum(hi - lo, 1).to(ACC_DTYPE)[:, None]
    if HAS_GATE:
        gate = tl.load(gate_ptr + b * stride_gb + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
        if GATE_FIRST:
            val = gate[None, :] * val
    if HAS_CACHE:
        if HAS_BLEND:  # the cache is read only where it is blended in
            is_blend = tl.load(blend_ptr + b * stride_bb + tok * stride_bn, mask=mask_t, other=0) != 0
            cache_mask = mask & is_blend[:, None]
        else:
            cache_mask = mask
        cache = tl.load(cache_ptr + b * stride_cb + tok[:, None] * stride_cn + offs_c[None, :], mask=cache_mask,
                        other=0.0)
        blended = mcw * val + one_minus_mcw * cache.to(ACC_DTYPE)
        if HAS_BLEND:
            val = tl.where(is_blend[:, None], blended, val)
        else:
            val = blended
    if HAS_GATE:
        if not GATE_FIRST:
            val = gate[None, :] * val
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + b * stride_rb + tok[:, None] * stride_rn + offs_c[None, :], mask=mask, other=0.0)
        val = res.to(ACC_DTYPE) + val
    out = out_ptr + b * stride_ob + tok[:, None] * stride_on + offs_c[None, :]
    tl.store(out, val.to(out_ptr.dtype.element_ty), mask=mask)


# -- launchers ------------------------------------------------------------------------------

def _check_runnable(t: torch.Tensor):
    # Off CUDA the kernels only run in the interpreter, which must be on before triton's import.
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            f"backend='triton' on a {t.device.type} tensor needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or use backend='reference'"
        )


def _unit_c(t):
    """``t`` with a unit stride in its last dimension (copies only when it has none)."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_c(channels: int) -> int:
    """Next power of two of C, in [16, MAX_BLOCK_C]."""
    return min(max(triton.next_power_of_2(channels), 16), MAX_BLOCK_C)


def _warps(elements: int) -> int:
    return max(1, min(8, elements // 512))


def _check_shape(name, t, shape):
    # The kernels trust these extents (they bound every index read); values need no check.
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _strides(t, ndim):
    """Strides of an optional tensor (zeros for a missing one, whose pointer is never read)."""
    return tuple(t.stride()[:ndim]) if t is not None else (0,) * ndim


def segment_reduce(src, members, row_start, *, mean=True, gate=None, blend=None, mcw=None,
                   out_dtype=None):
    """``out[b, m] = reduce_{t in row m} w[b, t] * src[b, t]`` (then ``* gate[b]``): mean or sum
    over each row's members, ``w = mcw`` on ``blend`` tokens (all tokens when ``blend`` is None)
    when ``mcw`` is given, else 1. ``src [B, N, C]``, ``members [B, N]``, ``row_start [B, M+1]``."""
    _check_runnable(src)
    src, gate = _unit_c(src), _unit_c(gate)
    batch, num_tokens, channels = src.shape
    num_rows = row_start.shape[1] - 1
    _check_shape("members", members, (batch, num_tokens))
    _check_shape("row_start", row_start, (batch, num_rows + 1))
    _check_shape("blend", blend, (batch, num_tokens))
    _check_shape("gate", gate, (batch, channels))
    out = torch.empty(batch, num_rows, channels, dtype=out_dtype or src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    blend_u8 = blend.view(torch.uint8) if blend is not None else None
    block_c = _block_c(channels)
    grid = (num_rows, triton.cdiv(channels, block_c), batch)
    _segment_reduce_kernel[grid](
        out, out.stride(0), out.stride(1),
        src, src.stride(0), src.stride(1),
        members, members.stride(0), members.stride(1),
        row_start, row_start.stride(0), row_start.stride(1),
        blend_u8 if blend_u8 is not None else members, *_strides(blend_u8, 2),
        gate if gate is not None else src, *_strides(gate, 1),
        float(mcw) if mcw is not None else 1.0,
        src.shape[1], channels,
        MEAN=mean, USE_MCW=mcw is not None, HAS_BLEND=blend is not None, HAS_GATE=gate is not None,
        ACC_DTYPE=_acc_dtype(src.dtype), BLOCK_C=block_c,
        num_warps=_warps(block_c * 4),
    )
    return out


def gather_rows(src, index, *, residual=None, gate=None, cache=None, blend=None, mcw=1.0,
                row_start=None, out_dtype=None, gate_first=False):
    """``out[b, t] = src[b, index[b, t]]`` with the optional epilogue (``/ count`` when
    ``row_start`` is given, cache blend, gate, residual). ``src [B, M, C]``, ``index [B, N]``."""
    _check_runnable(src)
    src, residual, gate, cache = _unit_c(src), _unit_c(residual), _unit_c(gate), _unit_c(cache)
    batch, num_rows, channels = src.shape
    num_tokens = index.shape[1]
    _check_shape("index", index, (batch, num_tokens))
    for name, t in (("residual", residual), ("cache", cache)):
        _check_shape(name, t, (batch, num_tokens, channels))
    _check_shape("blend", blend, (batch, num_tokens))
    _check_shape("gate", gate, (batch, channels))
    _check_shape("row_start", row_start, (batch, num_rows + 1))
    out = torch.empty(batch, num_tokens, channels, dtype=out_dtype or src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    blend_u8 = blend.view(torch.uint8) if blend is not None else None
    block_c = _block_c(channels)
    block_t = min(max(GATHER_TILE // block_c, 1), triton.next_power_of_2(num_tokens))
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(channels, block_c), batch)
    _gather_rows_kernel[grid](
        out, out.stride(0), out.stride(1),
        src, src.stride(0), src.stride(1),
        index, index.stride(0), index.stride(1),
        residual if residual is not None else src, *_strides(residual, 2),
        gate if gate is not None else src, *_strides(gate, 1),
        cache if cache is not None else src, *_strides(cache, 2),
        blend_u8 if blend_u8 is not None else index, *_strides(blend_u8, 2),
        row_start if row_start is not None else index, *_strides(row_start, 2),
        float(mcw), 1.0 - float(mcw),
        num_tokens, src.shape[1], channels,
        HAS_RESIDUAL=residual is not None, HAS_GATE=gate is not None, GATE_FIRST=bool(gate_first),
        HAS_CACHE=cache is not None,
        HAS_BLEND=blend is not None, COUNT_SCALE=row_start is not None,
        ACC_DTYPE=_acc_dtype(src.dtype), BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=_warps(block_t * block_c),
    )
    return out


def merge_mean(x, members, row_start):
    """Segment mean: ``out[b, m] = x[b, members[b, row_start[b, m]:row_start[b, m+1]]].mean(0)``."""
    return segment_reduce(x, members, row_start, mean=True)


def prune(x, rep_token):
    """Representative gather: ``out[b, m] = x[b, rep_token[b, m]]``."""
    return gather_rows(x, rep_token)


def unmerge(y, row_of_token, residual=None, gate=None, cache=None, blend=None, mcw=1.0, gate_first=False):
    """``residual + gate[:, None] * where(blend, mcw * v + (1 - mcw) * cache, v)``,
    ``v = y[b, row_of_token[b, t]]``; with ``gate_first`` the gate multiplies ``v`` before the
    blend (a cache of gated values): ``residual + where(blend, mcw * g v + (1 - mcw) * cache, g v)``.
    Each term optional. Stored in ``y.dtype``."""
    return gather_rows(y, row_of_token, residual=residual, gate=gate, cache=cache, blend=blend, mcw=mcw,
                       gate_first=gate_first)


def merge_backward(grad, row_of_token, row_start, out_dtype=None):
    """``grad_x[b, t] = grad[b, row] / count[b, row]``, ``row = row_of_token[b, t]``."""
    return gather_rows(grad, row_of_token, row_start=row_start, out_dtype=out_dtype)


def unmerge_backward_y(grad, members, row_start, gate=None, blend=None, mcw=None, out_dtype=None):
    """``grad_y[b, m] = gate[b] * sum_{t in row m} w[b, t] * grad[b, t]`` with ``w = mcw`` on
    blend tokens when a cache was blended (``mcw`` given), else 1."""
    return segment_reduce(grad, members, row_start, mean=False, gate=gate, blend=blend, mcw=mcw,
                          out_dtype=out_dtype)
