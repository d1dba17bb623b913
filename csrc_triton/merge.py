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
by exactly one program, in a fixed summation order, so results are deterministic.

Segment reduction in two passes, so that one huge row (an exactly constant region merges
~1,500 tokens into one row at SD3 1024^2) does not serialise on one program: the first
(``_segment_chunk_kernel``, one program per whole chunk of ``SEG_CHUNK`` CSR positions) sums
the chunks that lie inside one row; the second (``_segment_reduce_kernel``, one program per
row) adds the members before the row's first whole chunk and after its last one to those chunk
sums (``segment_row_steps``: at most ~2 * SEG_CHUNK / SEG_ROW_TILE + L / (SEG_CHUNK * 8) steps).

Index contract (docs/SEMANTICS.md, "Index contract"): the kernels never read out of bounds,
whatever the index values. A gather index outside ``[0, M)`` reads zeros (``v = 0``, the
epilogue still applies); a segment row spans the CSR positions ``[lo, hi)`` with
``lo = clamp(row_start[m], 0, N)`` and ``hi = clamp(row_start[m + 1], lo, N)``, members outside
``[0, N)`` add nothing, and a mean divides by ``max(hi - lo, 1)``. Valid plans are unaffected;
the public ops check the values (CPU always, GPUs in debug mode) before launching.
"""
import functools

import torch
import triton
import triton.language as tl

from .scores import INTERPRETED, cdiv, next_power_of_2, work_buffer

MAX_BLOCK_C = 512  # channels per program; C=1536 (SD3) splits into 3 full blocks
GATHER_TILE = 4096  # elements per gather program (BLOCK_T * BLOCK_C)
SEG_CHUNK = 32  # member positions per chunk of the segment reduction's first pass
SEG_ROW_TILE = 4  # members per step of a row program (a 2x2 window's row in one step)
SEARCH_WIDTH = 128  # row starts probed per round of the first pass's row search


@triton.jit
def _add_members(
    acc,  # [BLOCK_C] running sum
    p_lo, p_hi,  # CSR positions [p_lo, p_hi) to add
    members_b, stride_mn,  # this batch row's members
    src_b, stride_sn,  # this batch row's tokens
    blend_b, stride_bn,  # this batch row's blend flags (USE_MCW and HAS_BLEND)
    offs_c, mask_c,  # channels
    mcw, N,
    USE_MCW: tl.constexpr, HAS_BLEND: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,  # members per step
):
    """``acc + sum_{p in [p_lo, p_hi)} w * src[members[p]]``, BLOCK_T members per step."""
    for p0 in range(p_lo, p_hi, BLOCK_T):
        pos = p0 + tl.arange(0, BLOCK_T)
        pos_ok = pos < p_hi
        tok = tl.load(members_b + pos.to(tl.int64) * stride_mn, mask=pos_ok, other=-1).to(tl.int64)
        tok_ok = pos_ok & (tok >= 0) & (tok < N)  # a member outside [0, N) adds nothing
        val = tl.load(src_b + tok[:, None] * stride_sn + offs_c[None, :], mask=tok_ok[:, None] & mask_c[None, :],
                      other=0.0).to(ACC_DTYPE)
        if USE_MCW:
            if HAS_BLEND:
                is_blend = tl.load(blend_b + tok * stride_bn, mask=tok_ok, other=0) != 0
                val = tl.where(is_blend[:, None], val * mcw, val)
            else:
                val = val * mcw
        acc += tl.sum(val, axis=0)
    return acc


@triton.jit
def _segment_chunk_kernel(
    part_ptr, stride_pb, stride_pk,  # [B, N // CHUNK, C] ACC_DTYPE out: sums of whole chunks, unit stride in C
    flag_ptr, stride_fb, stride_fk,  # [B, N // CHUNK] int32 out: 1 where part holds the chunk's sum
    src_ptr, stride_sb, stride_sn,  # [B, N, C] tokens, unit stride in C
    members_ptr, stride_mb, stride_mn,  # [B, N] int32 tokens grouped by row (CSR columns)
    start_ptr, stride_rb, stride_rm,  # [B, M + 1] int32 row starts (CSR offsets)
    blend_ptr, stride_bb, stride_bn,  # [B, N] uint8 tokens scaled by mcw (USE_MCW and HAS_BLEND)
    mcw,  # weight of blended tokens (USE_MCW)
    N, M, C,  # tokens of src (and length of members), rows, channels
    search_rounds,  # rounds of the row search: SEARCH_W ** search_rounds >= M
    USE_MCW: tl.constexpr,  # scale tokens by mcw
    HAS_BLEND: tl.constexpr,  # only blend tokens are scaled by mcw; else all are
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    CHUNK: tl.constexpr,  # CSR positions per chunk
    SEARCH_W: tl.constexpr,  # row starts probed per search round
    BLOCK_T: tl.constexpr,  # members per step (divides CHUNK)
    BLOCK_C: tl.constexpr,  # channels per program (power of two)
):
    """First pass: the weighted sum of the members at CSR positions [k * CHUNK, (k+1) * CHUNK)
    when they all belong to one row (the row that holds position k * CHUNK); else nothing."""
    chunk = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    p0 = chunk * CHUNK

    # The row holding p0: the last m with clamp(row_start[m], 0, N) <= p0, by a SEARCH_W-ary
    # search (starts are nondecreasing in a valid plan; any values stay in bounds).
    start_b = start_ptr + b * stride_rb
    probes = tl.arange(0, SEARCH_W)
    base = p0 * 0  # candidate rows [base, base + span)
    span = base + M
    for _ in range(search_rounds):
        step = (span + SEARCH_W - 1) // SEARCH_W
        m = base + probes * step
        ok = m < base + span
        v = tl.minimum(tl.maximum(tl.load(start_b + m.to(tl.int64) * stride_rm, mask=ok, other=0), 0), N)
        below = tl.sum((ok & (v <= p0)).to(tl.int32), axis=0)
        new_base = base + tl.maximum(below - 1, 0) * step
        span = tl.minimum(step, base + span - new_base)
        base = new_base
    row_start = start_b + base.to(tl.int64) * stride_rm
    lo = tl.minimum(tl.maximum(tl.load(row_start), 0), N)
    hi = tl.minimum(tl.maximum(tl.load(row_start + stride_rm), lo), N)
    full = (lo <= p0) & (hi >= p0 + CHUNK)

    acc = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    acc = _add_members(acc, p0, tl.where(full, p0 + CHUNK, p0), members_ptr + b * stride_mb, stride_mn,
                       src_ptr + b * stride_sb, stride_sn, blend_ptr + b * stride_bb, stride_bn, offs_c, mask_c,
                       mcw, N, USE_MCW, HAS_BLEND, ACC_DTYPE, BLOCK_T)
    tl.store(part_ptr + b * stride_pb + chunk.to(tl.int64) * stride_pk + offs_c, acc,
             mask=tl.where(full, mask_c, False))
    tl.store(flag_ptr + b * stride_fb + chunk * stride_fk, full.to(tl.int32), mask=pid_c == 0)


@triton.jit
def _segment_reduce_kernel(
    out_ptr, stride_ob, stride_om,  # [B, M, C] output rows, unit stride in C
    src_ptr, stride_sb, stride_sn,  # [B, N, C] tokens, unit stride in C
    members_ptr, stride_mb, stride_mn,  # [B, N] int32 tokens grouped by row (CSR columns)
    start_ptr, stride_rb, stride_rm,  # [B, M + 1] int32 row starts (CSR offsets)
    blend_ptr, stride_bb, stride_bn,  # [B, N] uint8 tokens scaled by mcw (USE_MCW and HAS_BLEND)
    gate_ptr, stride_gb,  # [B, C] per-channel scale of the result (HAS_GATE), unit stride in C
    part_ptr, stride_pb, stride_pk,  # [B, N // CHUNK, C] chunk sums of _segment_chunk_kernel (HAS_CHUNKS)
    flag_ptr, stride_fb, stride_fk,  # [B, N // CHUNK] int32: which chunk sums are there (HAS_CHUNKS)
    mcw,  # weight of blended tokens (USE_MCW)
    N, M, C,  # tokens of the segmented span of src (and length of members), its rows, channels
    prefix,  # passthrough rows: out[:prefix] = src[:prefix]; the segmented span starts at src[prefix]
    MEAN: tl.constexpr,  # divide by the member count (merge) instead of a plain sum
    USE_MCW: tl.constexpr,  # scale tokens by mcw (unmerge backward with a cache)
    HAS_BLEND: tl.constexpr,  # only blend tokens are scaled by mcw; else all are
    HAS_GATE: tl.constexpr,  # multiply the result by gate[b]
    HAS_CHUNKS: tl.constexpr,  # a first pass ran (N >= CHUNK)
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    CHUNK: tl.constexpr,  # CSR positions per chunk of the first pass
    BLOCK_T: tl.constexpr,  # members per step
    BLOCK_K: tl.constexpr,  # chunk sums per step
    BLOCK_C: tl.constexpr,  # channels per program (power of two)
):
    """Second pass, one program per (row, channel block): the members before the row's first
    whole chunk and after its last one, plus the chunk sums of the first pass in between. A
    row of L members takes at most 2 * CHUNK / BLOCK_T + L / (CHUNK * BLOCK_K) + 1 steps.
    Output rows outside ``[prefix, prefix + M)`` are passthrough rows: copies of the src rows
    before and after the segmented span (``src[prefix + N + j]`` for output row ``prefix + M + j``)."""
    out_row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    mask_c = offs_c < C
    row = out_row - prefix
    if (row < 0) | (row >= M):
        src_row = tl.where(row < 0, out_row, out_row - M + N)
        val = tl.load(src_ptr + b * stride_sb + src_row * stride_sn + offs_c, mask=mask_c, other=0.0)
        tl.store(out_ptr + b * stride_ob + out_row * stride_om + offs_c, val.to(out_ptr.dtype.element_ty),
                 mask=mask_c)
    else:
        _segment_row(out_ptr + b * stride_ob + out_row * stride_om, src_ptr + b * stride_sb + (out_row - row) * stride_sn,
                     stride_sn, members_ptr + b * stride_mb, stride_mn, start_ptr + b * stride_rb + row * stride_rm,
                     stride_rm, blend_ptr + b * stride_bb, stride_bn, gate_ptr + b * stride_gb,
                     part_ptr + b * stride_pb, stride_pk, flag_ptr + b * stride_fb, stride_fk, offs_c, mask_c,
                     mcw, N, MEAN, USE_MCW, HAS_BLEND, HAS_GATE, HAS_CHUNKS, ACC_DTYPE, CHUNK, BLOCK_T, BLOCK_K,
                     BLOCK_C)


@triton.jit
def _segment_row(
    out_row_ptr, src_b, stride_sn, members_b, stride_mn, row_start, stride_rm, blend_b, stride_bn, gate_b,
    part_b, stride_pk, flag_b, stride_fk, offs_c, mask_c, mcw, N,
    MEAN: tl.constexpr, USE_MCW: tl.constexpr, HAS_BLEND: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_CHUNKS: tl.constexpr, ACC_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One segmented row of ``_segment_reduce_kernel`` (pointers already at this batch row)."""
    # Row bounds clamped to [0, N] (hi >= lo): a bad row_start never runs past members.
    lo = tl.minimum(tl.maximum(tl.load(row_start), 0), N)
    hi = tl.minimum(tl.maximum(tl.load(row_start + stride_rm), lo), N)
    acc = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    if HAS_CHUNKS:
        k_first = (lo + CHUNK - 1) // CHUNK  # whole chunks [k_first, k_last) of the row
        k_last = hi // CHUNK
        has_mid = k_first < k_last
        head_end = tl.where(has_mid, k_first * CHUNK, hi)
        tail_start = tl.where(has_mid, k_last * CHUNK, hi)
    else:
        head_end = hi
        tail_start = hi
    acc = _add_members(acc, lo, head_end, members_b, stride_mn, src_b, stride_sn, blend_b, stride_bn, offs_c,
                       mask_c, mcw, N, USE_MCW, HAS_BLEND, ACC_DTYPE, BLOCK_T)
    if HAS_CHUNKS:
        missing = k_first * 0
        for k0 in range(k_first, k_last, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_last
            flag = tl.load(flag_b + k * stride_fk, mask=k_ok, other=0)
            have = k_ok & (flag != 0)
            part = tl.load(part_b + k.to(tl.int64)[:, None] * stride_pk + offs_c[None, :],
                           mask=have[:, None] & mask_c[None, :], other=0.0)
            acc += tl.sum(part, axis=0)
            missing += tl.sum((k_ok & (flag == 0)).to(tl.int32), axis=0)
        if missing > 0:  # only when row_start decreases somewhere (an invalid plan)
            for k in range(k_first, k_last):
                absent = tl.load(flag_b + k * stride_fk) == 0
                acc = _add_members(acc, k * CHUNK, tl.where(absent, k * CHUNK + CHUNK, k * CHUNK), members_b,
                                   stride_mn, src_b, stride_sn, blend_b, stride_bn, offs_c, mask_c, mcw, N,
                                   USE_MCW, HAS_BLEND, ACC_DTYPE, BLOCK_T)
    acc = _add_members(acc, tail_start, hi, members_b, stride_mn, src_b, stride_sn, blend_b, stride_bn, offs_c,
                       mask_c, mcw, N, USE_MCW, HAS_BLEND, ACC_DTYPE, BLOCK_T)
    if MEAN:
        acc = acc / tl.maximum(hi - lo, 1).to(ACC_DTYPE)
    if HAS_GATE:
        gate = tl.load(gate_b + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
        acc = acc * gate
    tl.store(out_row_ptr + offs_c, acc.to(out_row_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _gather_rows_kernel(
    out_ptr, stride_ob, stride_on,  # [B, N, C] output tokens, unit stride in C
    src_ptr, stride_sb, stride_sm,  # [B, M, C] rows to gather, unit stride in C
    index_ptr, stride_ib, stride_in,  # [B, N] int32 row read by each output token
    res_ptr, stride_rb, stride_rn,  # [B, N, C] residual added last (HAS_RESIDUAL)
    add_ptr, stride_ab, stride_an,  # [B, N, C] full-length term added, times the gate (HAS_ADDEND)
    gate_ptr, stride_gb,  # [B, C] gate multiplied in (HAS_GATE), unit stride in C
    cache_ptr, stride_cb, stride_cn,  # [B, N, C] cache blended in (HAS_CACHE)
    blend_ptr, stride_bb, stride_bn,  # [B, N] uint8 tokens that take the cache (HAS_BLEND)
    start_ptr, stride_tb, stride_tm,  # [B, M + 1] int32 row starts: divide by count (COUNT_SCALE)
    mcw, one_minus_mcw,  # cache blend weights, mcw * v + (1 - mcw) * cache
    N, M, C,  # gathered tokens (length of index), gathered rows of src, channels
    prefix, total,  # passthrough: output tokens [0, prefix) and [prefix + N, total) read src rows directly
    HAS_RESIDUAL: tl.constexpr,  # out = residual + v
    HAS_ADDEND: tl.constexpr,  # v = v + gate[b] * addend (after the cache blend)
    HAS_GATE: tl.constexpr,  # v = gate[b] * v
    GATE_FIRST: tl.constexpr,  # the gate multiplies v before the cache blend (the cache holds gated values)
    HAS_CACHE: tl.constexpr,  # v = mcw * v + (1 - mcw) * cache
    HAS_BLEND: tl.constexpr,  # cache blend only where blend; else everywhere
    COUNT_SCALE: tl.constexpr,  # v = v / count[row] (merge backward)
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    BLOCK_T: tl.constexpr,  # tokens per program (power of two)
    BLOCK_C: tl.constexpr,  # channels per program (power of two)
):
    """Output token ``prefix + t`` (t < N) gathers src row ``prefix + index[t]`` with the epilogue;
    the passthrough tokens before and after (``out[prefix + N + j]`` from ``src[prefix + M + j]``)
    take the residual and the gate but never the cache."""
    offs_o = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    mask_o = offs_o < total
    mask_c = offs_c < C
    mask = mask_o[:, None] & mask_c[None, :]
    out_tok = offs_o.to(tl.int64)
    tok = out_tok - prefix  # gathered token, in [0, N) for the gathered span
    gathered = mask_o & (tok >= 0) & (tok < N)
    mask_t = gathered

    row = tl.load(index_ptr + b * stride_ib + tok * stride_in, mask=gathered, other=0).to(tl.int64)
    row_ok = gathered & (row >= 0) & (row < M)  # an index outside [0, M) reads zeros
    src_row = tl.where(gathered, row + prefix, tl.where(tok < 0, out_tok, out_tok - N + M))
    src = src_ptr + b * stride_sb + src_row[:, None] * stride_sm + offs_c[None, :]
    val = tl.load(src, mask=mask & (row_ok | (mask_o & ~gathered))[:, None], other=0.0).to(ACC_DTYPE)
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
        else:
            is_blend = mask_t
        cache = tl.load(cache_ptr + b * stride_cb + tok[:, None] * stride_cn + offs_c[None, :],
                        mask=mask & is_blend[:, None], other=0.0)
        blended = mcw * val + one_minus_mcw * cache.to(ACC_DTYPE)
        val = tl.where(is_blend[:, None], blended, val)
    if HAS_GATE:
        if not GATE_FIRST:
            val = gate[None, :] * val
    if HAS_ADDEND:  # a full-length term (Flux single blocks: the attention half of the output projection)
        extra = tl.load(add_ptr + b * stride_ab + out_tok[:, None] * stride_an + offs_c[None, :], mask=mask,
                        other=0.0).to(ACC_DTYPE)
        if HAS_GATE:
            extra = gate[None, :] * extra
        val = val + extra
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + b * stride_rb + out_tok[:, None] * stride_rn + offs_c[None, :], mask=mask,
                      other=0.0)
        val = res.to(ACC_DTYPE) + val
    out = out_ptr + b * stride_ob + out_tok[:, None] * stride_on + offs_c[None, :]
    tl.store(out, val.to(out_ptr.dtype.element_ty), mask=mask)


# -- launchers ------------------------------------------------------------------------------
# Each public launcher checks the extents the kernels trust, then calls ``segment_launch`` /
# ``gather_launch``, which only launch: ``MergePlan``'s block path calls those directly with the
# strides of the plan tensors it computed once per plan. Launch configurations are computed
# once per shape (``functools.lru_cache``), strides of the dense outputs are written out.

def _check_runnable(t: torch.Tensor):
    # Off CUDA the kernels only run in the interpreter, which is decided when triton.jit made them.
    if not t.is_cuda and not INTERPRETED:
        raise RuntimeError(
            f"backend='triton' on a {t.device.type} tensor needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or use backend='reference'"
        )


def _unit_c(t):
    """``t`` with a unit stride in its last dimension (copies only when it has none)."""
    if t is None or t.stride()[-1] == 1 or t.shape[-1] <= 1:
        return t
    return t.contiguous()


_ACC_DTYPES = {torch.float64: tl.float64}  # else tl.float32


def _acc_dtype(dtype):
    return _ACC_DTYPES.get(dtype, tl.float32)


def _block_c(channels: int) -> int:
    """Next power of two of C, in [16, MAX_BLOCK_C]."""
    return min(max(next_power_of_2(channels), 16), MAX_BLOCK_C)


def _warps(elements: int) -> int:
    return max(1, min(8, elements // 512))


def _check_shape(name, t, shape):
    # The kernels trust these extents (they bound every index read); values need no check.
    if t is not None and t.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _strides(t, ndim):
    """Strides of an optional tensor (zeros for a missing one, whose pointer is never read)."""
    return t.stride()[:ndim] if t is not None else (0,) * ndim


@functools.lru_cache(maxsize=512)
def _segment_config(batch: int, num_tokens: int, num_rows: int, channels: int):
    # ``segment_config``, computed once per shape (shared: the launchers only read it)
    block_c = _block_c(channels)
    c_blocks = cdiv(channels, block_c)
    num_chunks = num_tokens // SEG_CHUNK
    rounds = 0
    while SEARCH_WIDTH ** rounds < num_rows:
        rounds += 1
    tile = max(1, GATHER_TILE // block_c)
    return {
        "block_c": block_c,
        "chunk_grid": (num_chunks, c_blocks, batch) if num_chunks else None,
        "row_grid": (num_rows, c_blocks, batch),
        "search_rounds": rounds,
        "chunk_block_t": min(SEG_CHUNK, tile),
        "block_t": min(SEG_ROW_TILE, tile),
        "block_k": min(SEG_CHUNK, tile),
        "chunk_warps": _warps(min(SEG_CHUNK, tile) * block_c),
        "row_warps": _warps(min(SEG_ROW_TILE, tile) * block_c),
    }


def segment_config(batch: int, num_tokens: int, num_rows: int, channels: int):
    """Launch configuration of the segment reduction (no tensor needed): the first pass over
    whole chunks of ``SEG_CHUNK`` CSR positions (``chunk_grid``, None when N < SEG_CHUNK) and the
    row pass (``row_grid``), with their tile sizes."""
    return dict(_segment_config(batch, num_tokens, num_rows, channels))


def segment_row_steps(lo: int, hi: int, num_tokens: int, channels: int) -> int:
    """Loop steps of the row program for a row at CSR positions ``[lo, hi)`` (valid plan): the
    serial work of the longest row, whatever its length."""
    cfg = _segment_config(1, num_tokens, 1, channels)
    head_end = tail_start = hi
    mid = 0
    if cfg["chunk_grid"] is not None:
        k_first, k_last = -(-lo // SEG_CHUNK), hi // SEG_CHUNK
        if k_first < k_last:
            head_end, tail_start, mid = k_first * SEG_CHUNK, k_last * SEG_CHUNK, k_last - k_first
    bt, bk = cfg["block_t"], cfg["block_k"]
    return -(-(head_end - lo) // bt) + -(-mid // bk) + -(-(hi - tail_start) // bt)


def segment_reduce(src, members, row_start, *, mean=True, gate=None, blend=None, mcw=None,
                   out_dtype=None, max_members=None, prefix=0, suffix=0):
    """``out[b, m] = reduce_{t in row m} w[b, t] * src[b, t]`` (then ``* gate[b]``): mean or sum
    over each row's members, ``w = mcw`` on ``blend`` tokens (all tokens when ``blend`` is None)
    when ``mcw`` is given, else 1. ``src [B, N, C]``, ``members [B, N]``, ``row_start [B, M+1]``.
    ``max_members``: a bound on the row sizes known from the plan's construction (SSM: the window
    size); below ``SEG_CHUNK`` no row holds a whole chunk, so the first pass is not launched.
    ``prefix`` / ``suffix`` (plain merges only): src is ``[B, prefix + N + suffix, C]`` and its
    first and last rows are copied around the reduced rows, ``[B, prefix + M + suffix, C]``."""
    _check_runnable(src)
    src, gate = _unit_c(src), _unit_c(gate)
    batch, length, channels = src.shape
    num_tokens = length - prefix - suffix
    num_rows = row_start.shape[1] - 1
    if (prefix or suffix) and (gate is not None or mcw is not None):
        raise ValueError("segment_reduce: prefix / suffix rows are copied; they take no gate or mcw")
    if num_tokens < 0:
        raise ValueError(f"segment_reduce: src has {length} rows, fewer than prefix + suffix = {prefix + suffix}")
    _check_shape("members", members, (batch, num_tokens))
    _check_shape("row_start", row_start, (batch, num_rows + 1))
    _check_shape("blend", blend, (batch, num_tokens))
    _check_shape("gate", gate, (batch, channels))
    blend_u8 = blend.view(torch.uint8) if blend is not None else None
    return segment_launch(src, src.stride(), members, members.stride(), row_start, row_start.stride(), num_tokens,
                          num_rows, mean=mean, gate=gate, blend=(blend_u8, *_strides(blend_u8, 2)), mcw=mcw,
                          out_dtype=out_dtype, max_members=max_members, prefix=prefix, suffix=suffix)


def segment_launch(src, src_strides, members, member_strides, row_start, start_strides, num_tokens, num_rows, *,
                   mean=True, gate=None, blend=(None, 0, 0), mcw=None, out_dtype=None, max_members=None, prefix=0,
                   suffix=0, work=None):
    """``segment_reduce`` on arguments it checked, with their strides (``src`` and ``gate`` with a
    unit stride in C; ``blend``: ``(uint8 view of blend, its 2 strides)`` or ``(None, 0, 0)``):
    allocates the output and launches. ``work``: the chunk pass's scratch from there
    (``scores.work_buffer``)."""
    batch, length, channels = src.shape
    total = prefix + num_rows + suffix
    out = torch.empty(batch, total, channels, dtype=out_dtype or src.dtype, device=src.device)
    if batch == 0 or channels == 0 or total == 0:
        return out
    if num_rows == 0:  # only passthrough rows (an empty span: N = 0; a plan never has M = 0 < N)
        out.narrow(1, 0, prefix).copy_(src.narrow(1, 0, prefix))
        out.narrow(1, prefix, suffix).copy_(src.narrow(1, prefix + num_tokens, suffix))
        return out
    cfg = _segment_config(batch, num_tokens, num_rows, channels)
    block_c, acc_dtype = cfg["block_c"], _ACC_DTYPES.get(src.dtype, tl.float32)
    has_blend = blend[0] is not None
    blend_arg = blend if has_blend else (members, 0, 0)
    use_mcw = mcw is not None
    mcw_arg = float(mcw) if use_mcw else 1.0
    has_chunks = cfg["chunk_grid"] is not None and (max_members is None or max_members >= SEG_CHUNK)
    if has_chunks:
        num_chunks = cfg["chunk_grid"][0]
        part_dtype = torch.float64 if src.dtype == torch.float64 else torch.float32
        part = work_buffer(work, part_dtype, (batch, num_chunks, channels), part_dtype, src.device)
        flags = work_buffer(work, "flags", (batch, num_chunks), torch.int32, src.device)
        part_arg, flag_arg = (part, num_chunks * channels, channels), (flags, num_chunks, 1)
        span = src.narrow(1, prefix, num_tokens) if prefix else src  # the chunk pass reads the span only
        _segment_chunk_kernel.run(
            *part_arg,
            *flag_arg,
            span, src_strides[0], src_strides[1],
            members, *member_strides,
            row_start, *start_strides,
            *blend_arg,
            mcw_arg,
            num_tokens, num_rows, channels,
            cfg["search_rounds"],
            USE_MCW=use_mcw, HAS_BLEND=has_blend, ACC_DTYPE=acc_dtype,
            CHUNK=SEG_CHUNK, SEARCH_W=SEARCH_WIDTH, BLOCK_T=cfg["chunk_block_t"], BLOCK_C=block_c,
            num_warps=cfg["chunk_warps"], grid=cfg["chunk_grid"], warmup=False,
        )
    else:  # no whole chunk (N < CHUNK): never read
        part_arg, flag_arg = (src, 0, 0), (members, 0, 0)
    row_grid = cfg["row_grid"] if total == num_rows else (total,) + cfg["row_grid"][1:]
    _segment_reduce_kernel.run(
        out, total * channels, channels,  # a new dense tensor
        src, src_strides[0], src_strides[1],
        members, *member_strides,
        row_start, *start_strides,
        *blend_arg,
        gate if gate is not None else src, gate.stride()[0] if gate is not None else 0,
        *part_arg,
        *flag_arg,
        mcw_arg,
        num_tokens, num_rows, channels, prefix,
        MEAN=mean, USE_MCW=use_mcw, HAS_BLEND=has_blend, HAS_GATE=gate is not None, HAS_CHUNKS=has_chunks,
        ACC_DTYPE=acc_dtype, CHUNK=SEG_CHUNK, BLOCK_T=cfg["block_t"], BLOCK_K=cfg["block_k"], BLOCK_C=block_c,
        num_warps=cfg["row_warps"], grid=row_grid, warmup=False,
    )
    return out


@functools.lru_cache(maxsize=512)
def gather_config(batch: int, total: int, channels: int):
    """``(grid, BLOCK_T, BLOCK_C, num_warps)`` of the row gather writing ``[batch, total, channels]``."""
    block_c = _block_c(channels)
    block_t = min(max(GATHER_TILE // block_c, 1), next_power_of_2(total))
    return (cdiv(total, block_t), cdiv(channels, block_c), batch), block_t, block_c, _warps(block_t * block_c)


NO_TENSOR = (None, 0, 0)  # an absent optional tensor of gather_launch / segment_launch (tensor, 2 strides)


def gather_rows(src, index, *, residual=None, gate=None, cache=None, blend=None, mcw=1.0,
                row_start=None, out_dtype=None, gate_first=False, prefix=0, suffix=0, addend=None):
    """``out[b, t] = src[b, index[b, t]]`` with the optional epilogue (``/ count`` when
    ``row_start`` is given, cache blend, gate, residual). ``src [B, M, C]``, ``index [B, N]``.
    ``prefix`` / ``suffix``: ``src`` is ``[B, prefix + M + suffix, C]`` and its first and last rows
    pass through around the gathered ones (residual and gate, no cache): ``out`` and ``residual``
    are ``[B, prefix + N + suffix, C]``; ``cache`` and ``blend`` cover the gathered tokens only.
    ``addend`` (shaped like ``residual``): ``gate * addend`` is added to every output token too."""
    _check_runnable(src)
    src, residual, gate, cache = _unit_c(src), _unit_c(residual), _unit_c(gate), _unit_c(cache)
    addend = _unit_c(addend)
    batch, length, channels = src.shape
    num_rows = length - prefix - suffix
    num_tokens = index.shape[-1]
    total = prefix + num_tokens + suffix
    if num_rows < 0 or (row_start is not None and (prefix or suffix)):
        raise ValueError(f"gather_rows: src has {length} rows, fewer than prefix + suffix = {prefix + suffix}")
    _check_shape("index", index, (batch, num_tokens))
    _check_shape("residual", residual, (batch, total, channels))
    _check_shape("addend", addend, (batch, total, channels))
    _check_shape("cache", cache, (batch, num_tokens, channels))
    _check_shape("blend", blend, (batch, num_tokens))
    _check_shape("gate", gate, (batch, channels))
    _check_shape("row_start", row_start, (batch, num_rows + 1))
    blend_u8 = blend.view(torch.uint8) if blend is not None else None

    def arg(t):
        return (t, *_strides(t, 2))

    return gather_launch(src, src.stride(), index, index.stride(), num_tokens, residual=arg(residual),
                         gate=gate, cache=arg(cache), blend=arg(blend_u8), row_start=arg(row_start), mcw=mcw,
                         out_dtype=out_dtype, gate_first=gate_first, prefix=prefix, suffix=suffix,
                         addend=arg(addend))


def gather_launch(src, src_strides, index, index_strides, num_tokens, *, residual=NO_TENSOR, gate=None,
                  cache=NO_TENSOR, blend=NO_TENSOR, row_start=NO_TENSOR, mcw=1.0, out_dtype=None, gate_first=False,
                  prefix=0, suffix=0, addend=NO_TENSOR):
    """``gather_rows`` on arguments it checked, with their strides (unit strides in C; ``residual``,
    ``addend``, ``cache``, ``blend`` (its uint8 view), ``row_start``: ``(tensor, its first 2 strides)`` or
    ``(None, 0, 0)``): allocates the output and launches."""
    batch, length, channels = src.shape
    total = prefix + num_tokens + suffix
    out = torch.empty(batch, total, channels, dtype=out_dtype or src.dtype, device=src.device)
    if batch == 0 or channels == 0 or total == 0:
        return out
    grid, block_t, block_c, num_warps = gather_config(batch, total, channels)
    has_residual, has_cache, has_blend, count_scale = (residual[0] is not None, cache[0] is not None,
                                                        blend[0] is not None, row_start[0] is not None)
    has_addend = addend[0] is not None
    _gather_rows_kernel.run(
        out, total * channels, channels,  # a new dense tensor
        src, src_strides[0], src_strides[1],
        index, *index_strides,
        *(residual if has_residual else (src, 0, 0)),
        *(addend if has_addend else (src, 0, 0)),
        gate if gate is not None else src, gate.stride()[0] if gate is not None else 0,
        *(cache if has_cache else (src, 0, 0)),
        *(blend if has_blend else (index, 0, 0)),
        *(row_start if count_scale else (index, 0, 0)),
        float(mcw), 1.0 - float(mcw),
        num_tokens, length - prefix - suffix, channels, prefix, total,
        HAS_RESIDUAL=has_residual, HAS_ADDEND=has_addend, HAS_GATE=gate is not None, GATE_FIRST=bool(gate_first),
        HAS_CACHE=has_cache, HAS_BLEND=has_blend, COUNT_SCALE=count_scale,
        ACC_DTYPE=_ACC_DTYPES.get(src.dtype, tl.float32), BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=num_warps, grid=grid, warmup=False,
    )
    return out


def merge_mean(x, members, row_start, max_members=None, prefix=0, suffix=0):
    """Segment mean: ``out[b, m] = x[b, members[b, row_start[b, m]:row_start[b, m+1]]].mean(0)``
    (``max_members``, ``prefix`` / ``suffix`` passthrough rows: see ``segment_reduce``)."""
    return segment_reduce(x, members, row_start, mean=True, max_members=max_members, prefix=prefix, suffix=suffix)


def prune(x, rep_token, prefix=0, suffix=0):
    """Representative gather: ``out[b, m] = x[b, rep_token[b, m]]`` (passthrough rows around)."""
    return gather_rows(x, rep_token, prefix=prefix, suffix=suffix)


def unmerge(y, row_of_token, residual=None, gate=None, cache=None, blend=None, mcw=1.0, gate_first=False,
            prefix=0, suffix=0, addend=None):
    """``residual + gate[:, None] * where(blend, mcw * v + (1 - mcw) * cache, v)``,
    ``v = y[b, row_of_token[b, t]]``; with ``gate_first`` the gate multiplies ``v`` before the
    blend (a cache of gated values): ``residual + where(blend, mcw * g v + (1 - mcw) * cache, g v)``.
    Each term optional. Stored in ``y.dtype``. ``prefix`` / ``suffix``: passthrough rows of ``y``
    around the merged ones (``residual + gate * y`` there, see ``gather_rows``); ``addend``: plus
    ``gate * addend`` everywhere."""
    return gather_rows(y, row_of_token, residual=residual, gate=gate, cache=cache, blend=blend, mcw=mcw,
                       gate_first=gate_first, prefix=prefix, suffix=suffix, addend=addend)


def merge_backward(grad, row_of_token, row_start, out_dtype=None):
    """``grad_x[b, t] = grad[b, row] / count[b, row]``, ``row = row_of_token[b, t]``."""
    return gather_rows(grad, row_of_token, row_start=row_start, out_dtype=out_dtype)


def unmerge_backward_y(grad, members, row_start, gate=None, blend=None, mcw=None, out_dtype=None):
    """``grad_y[b, m] = gate[b] * sum_{t in row m} w[b, t] * grad[b, t]`` with ``w = mcw`` on
    blend tokens when a cache was blended (``mcw`` given), else 1."""
    return segment_reduce(grad, members, row_start, mean=False, gate=gate, blend=blend, mcw=mcw,
                          out_dtype=out_dtype)
