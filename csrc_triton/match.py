"""Bipartite cosine matching: best dst of every candidate, dsts split across programs.

Equivalent PyTorch (``reference.similarity.bipartite_match``)::

    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    sim = unit.gather(1, cand_idx) @ unit.gather(1, dst_idx).transpose(-1, -2)   # [B, Na, D]
    best, match = sim.max(-1)          # first maximum: lowest dst position on ties

Three steps, no ``Na x D`` matrix and no normalised copy of x:

1. ``_row_norms_kernel``: the inverse norm of every candidate and dst row, once
   (``[B, Na + D]`` fp32; -1 marks a non-finite or out-of-range token).
2. ``_bipartite_match_kernel``: grid ``(Na / BLOCK_M, splits, B)``; each program takes
   BLOCK_M candidates and one contiguous range of the dsts, gathers rows by index, accumulates
   dot products of the raw rows in fp32 over C blocks, scales them by the inverse norms and
   keeps a running (max, lowest argmax) over its dst tiles.
3. ``_match_combine_kernel`` (only with several splits): per candidate, the splits' partial
   results in ascending dst order, a later split winning only with a strictly greater value,
   so equal maxima keep the lowest dst position: the same result as one program over all dsts.

The split count is chosen from the sizes (``match_config``) so that a launch has about
``TARGET_PROGRAMS`` programs; SD3 at 1024^2 (B=2, 3072 x 1024) gets 288 instead of 96.
"""
import functools

import torch
import triton
import triton.language as tl

from .scores import _interpreting, cdiv, dot_operands_fp32, next_power_of_2, work_buffer

TARGET_PROGRAMS = 264  # 2 programs per SM of an H100 (132 SMs)


@triton.jit
def _row_norms_kernel(
    inv_ptr,  # float32 [B, Na + D] out: 1 / max(||row||, 1e-6); -1 for an unusable token
    stride_vb, stride_vr,  # strides of inv
    x_ptr,  # [B, N, C] metric
    stride_xb, stride_xn, stride_xc,  # strides of x
    cand_ptr,  # integer [B, Na]: candidate token indices (rows 0 .. Na-1 of inv)
    stride_cb, stride_ci,  # strides of cand_idx
    dst_ptr,  # integer [B, D]: dst token indices (rows Na .. Na+D-1 of inv)
    stride_db, stride_dj,  # strides of dst_idx
    num_cand, num_dst, channels,  # Na, D, C
    num_tokens,  # N: an index outside [0, N) counts as a non-finite token (never read)
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # channels per step
):
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    is_cand = r < num_cand
    in_range = r < num_cand + num_dst
    ci = tl.load(cand_ptr + pid_b * stride_cb + r.to(tl.int64) * stride_ci, mask=is_cand, other=0)
    dj = tl.load(dst_ptr + pid_b * stride_db + (r - num_cand).to(tl.int64) * stride_dj,
                 mask=in_range & (r >= num_cand), other=0)
    tok = tl.where(is_cand, ci.to(tl.int64), dj.to(tl.int64))
    ok = in_range & (tok >= 0) & (tok < num_tokens)
    row = x_ptr + pid_b * stride_xb + tok * stride_xn  # [BR]
    c_base = tl.arange(0, BLOCK_C)
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = (c0 + c_base).to(tl.int64)
        v = tl.load(row[:, None] + c[None, :] * stride_xc, mask=ok[:, None] & (c < channels)[None, :],
                    other=0.0).to(tl.float32)
        sq += tl.sum(v * v, axis=1)
    # Correctly rounded (plain sqrt and `/` are approximate on a GPU): these decide the match.
    inv = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(sq), 1e-6))  # reference clamps norms to 1e-6
    # A non-finite squared norm (inf or NaN; NaN < inf is False) or an index outside [0, N):
    # such a token's cosine with every token is -inf, as in the reference.
    inv = tl.where(ok & (sq < float("inf")), inv, -1.0)
    tl.store(inv_ptr + pid_b * stride_vb + r.to(tl.int64) * stride_vr, inv, mask=in_range)


@triton.jit
def _bipartite_match_kernel(
    best_ptr,  # float32 [B, S, Na]: best cosine of each candidate within each dst split
    stride_bb, stride_bs, stride_bi,  # strides of best (stride_bs = 0 with one split)
    match_ptr,  # int32 [B, S, Na]: position in dst_idx of that best dst
    stride_mb, stride_ms, stride_mi,  # strides of match
    x_ptr,  # [B, N, C] metric
    stride_xb, stride_xn, stride_xc,  # strides of x
    cand_ptr,  # integer [B, Na]: candidate token indices
    stride_cb, stride_ci,  # strides of cand_idx
    dst_ptr,  # integer [B, D]: dst token indices
    stride_db, stride_dj,  # strides of dst_idx
    inv_ptr,  # float32 [B, Na + D] from _row_norms_kernel (candidates, then dsts)
    stride_vb, stride_vr,  # strides of inv
    num_cand, num_dst, channels,  # Na, D, C
    dst_per_split,  # dsts of one split (a multiple of BLOCK_N); split s covers [s, s + 1) * dst_per_split
    DOT_FP32: tl.constexpr,  # upcast before tl.dot (fp32/fp64 inputs, or the interpreter)
    BLOCK_M: tl.constexpr,  # candidates per program
    BLOCK_N: tl.constexpr,  # dsts per tile
    BLOCK_C: tl.constexpr,  # channels per step
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)

    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_mask = i < num_cand
    i64 = i.to(tl.int64)
    cand = tl.load(cand_ptr + pid_b * stride_cb + i64 * stride_ci, mask=i_mask, other=0).to(tl.int64)
    inv_a = tl.load(inv_ptr + pid_b * stride_vb + i64 * stride_vr, mask=i_mask, other=-1.0)
    a_ok = inv_a > 0.0  # in range, index valid, finite norm
    a_row = x_ptr + pid_b * stride_xb + cand * stride_xn  # [BM]
    c_base = tl.arange(0, BLOCK_C)
    j_base = tl.arange(0, BLOCK_N)

    j_lo = pid_s * dst_per_split
    j_hi = tl.minimum(j_lo + dst_per_split, num_dst)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        j = j0 + j_base
        j_mask = j < j_hi
        j64 = j.to(tl.int64)
        dst = tl.load(dst_ptr + pid_b * stride_db + j64 * stride_dj, mask=j_mask, other=0).to(tl.int64)
        inv_b = tl.load(inv_ptr + pid_b * stride_vb + (num_cand + j64) * stride_vr, mask=j_mask, other=-1.0)
        b_ok = inv_b > 0.0
        b_row = x_ptr + pid_b * stride_xb + dst * stride_xn  # [BN]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            c = (c0 + c_base).to(tl.int64)
            c_mask = c < channels
            a = tl.load(a_row[:, None] + c[None, :] * stride_xc, mask=a_ok[:, None] & c_mask[None, :], other=0.0)
            b = tl.load(b_row[:, None] + c[None, :] * stride_xc, mask=b_ok[:, None] & c_mask[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)  # bf16/fp16 products are exact in fp32
        sim = acc * inv_a[:, None] * inv_b[None, :]
        # Pairs with an unusable token score -inf: such tokens never win a match while a
        # finite one exists.
        sim = tl.where(a_ok[:, None] & b_ok[None, :], sim, float("-inf"))
        tile_best = tl.max(sim, axis=1)
        # Lowest j among the tile's maxima; across tiles only a strictly greater value wins.
        tile_arg = tl.min(tl.where(sim == tile_best[:, None], j[None, :], 2147483647), axis=1)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, tile_arg, arg)

    tl.store(best_ptr + pid_b * stride_bb + pid_s * stride_bs + i64 * stride_bi, best, mask=i_mask)
    tl.store(match_ptr + pid_b * stride_mb + pid_s * stride_ms + i64 * stride_mi, arg, mask=i_mask)


@triton.jit
def _match_combine_kernel(
    best_ptr,  # float32 [B, Na] out: best cosine over all dsts
    stride_bb, stride_bi,  # strides of best
    match_ptr,  # int32 [B, Na] out: its dst position
    stride_mb, stride_mi,  # strides of match
    part_best_ptr,  # float32 [B, S, Na]: per-split best (splits in ascending dst order)
    stride_pb, stride_ps, stride_pi,  # strides of part_best
    part_arg_ptr,  # int32 [B, S, Na]: per-split argmax (a dst position)
    stride_qb, stride_qs, stride_qi,  # strides of part_arg
    num_cand, num_splits,  # Na, S
    BLOCK: tl.constexpr,  # candidates per program
):
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    i = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = i < num_cand
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK], dtype=tl.int32)
    for s in range(0, num_splits):
        pb = tl.load(part_best_ptr + pid_b * stride_pb + s * stride_ps + i * stride_pi, mask=mask,
                     other=float("-inf"))
        pa = tl.load(part_arg_ptr + pid_b * stride_qb + s * stride_qs + i * stride_qi, mask=mask, other=0)
        better = pb > best  # equal best: the earlier split, i.e. the lower dst position, stays
        best = tl.where(better, pb, best)
        arg = tl.where(better, pa, arg)
    tl.store(best_ptr + pid_b * stride_bb + i * stride_bi, best, mask=mask)
    tl.store(match_ptr + pid_b * stride_mb + i * stride_mi, arg, mask=mask)


@functools.lru_cache(maxsize=256)
def match_blocks(num_cand: int, num_dst: int, channels: int, interpret: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_C, num_warps, num_stages): 64x64x64 tensor-core tiles on a GPU
    (>= 16 in every dot dim), up to 128-wide tiles in the interpreter."""
    if interpret:
        return (min(128, max(16, next_power_of_2(num_cand))),
                min(128, max(16, next_power_of_2(num_dst))),
                min(128, max(16, next_power_of_2(channels))), 1, 1)
    block_m = 64 if num_cand > 32 else 32
    block_n = 64 if num_dst > 32 else 32
    return block_m, block_n, 64, 4, 3


@functools.lru_cache(maxsize=256)
def _match_config(batch: int, num_cand: int, num_dst: int, channels: int, interpret: bool):
    # ``match_config``, computed once per shape (shared: the launcher only reads it)
    blocks = match_blocks(num_cand, num_dst, channels, interpret)
    block_m, block_n = blocks[0], blocks[1]
    cand_blocks = cdiv(num_cand, block_m)
    tiles = max(1, cdiv(num_dst, block_n))
    splits = min(tiles, max(1, cdiv(TARGET_PROGRAMS, cand_blocks * batch)))
    tiles_per_split = cdiv(tiles, splits)
    splits = cdiv(tiles, tiles_per_split)
    rows = num_cand + num_dst
    if interpret:
        norms_blocks = (min(128, max(16, next_power_of_2(rows))),
                        min(128, max(16, next_power_of_2(channels))))
        combine_block = min(1024, max(16, next_power_of_2(num_cand)))
    else:
        norms_blocks, combine_block = (32, 128), 256
    return {
        "blocks": blocks, "splits": splits, "dst_per_split": tiles_per_split * block_n,
        "norms_grid": (cdiv(rows, norms_blocks[0]), batch), "norms_blocks": norms_blocks,
        "match_grid": (cand_blocks, splits, batch),
        "combine_grid": (cdiv(num_cand, combine_block), batch) if splits > 1 else None,
        "combine_block": combine_block,
    }


def match_config(batch: int, num_cand: int, num_dst: int, channels: int, interpret: bool):
    """Launch configuration of the three kernels for these sizes (no tensor needed)::

        {"blocks": match_blocks(...), "splits": S, "dst_per_split": ...,
         "norms_grid": ..., "norms_blocks": (BLOCK_R, BLOCK_C), "match_grid": (Na / BM, S, B),
         "combine_grid": ... or None when S == 1, "combine_block": ...}

    S splits the dst tiles so that the match launch has about ``TARGET_PROGRAMS`` programs."""
    return dict(_match_config(batch, num_cand, num_dst, channels, interpret))


def bipartite_match(metric: torch.Tensor, cand_idx: torch.Tensor, dst_idx: torch.Tensor, work=None):
    """Launch the matching kernels; returns ``(best float32 [B, Na], match int32 [B, Na])``.
    ``work``: see ``scores.work_buffer`` (the results are then reused buffers)."""
    batch, num_tokens, channels = metric.shape
    num_cand, num_dst = cand_idx.shape[1], dst_idx.shape[1]
    interpret = _interpreting(metric)
    device = metric.device
    best = work_buffer(work, "best", (batch, num_cand), torch.float32, device)
    match = work_buffer(work, "match", (batch, num_cand), torch.int32, device)
    if batch == 0 or num_cand == 0:
        return best, match
    cfg = _match_config(batch, num_cand, num_dst, channels, interpret)
    block_m, block_n, block_c, num_warps, num_stages = cfg["blocks"]
    splits = cfg["splits"]
    metric_strides, cand_strides, dst_strides = metric.stride(), cand_idx.stride(), dst_idx.stride()

    rows = num_cand + num_dst
    inv = work_buffer(work, "inv", (batch, rows), torch.float32, device)
    _row_norms_kernel.run(
        inv, rows, 1,  # strides of the new dense tensors are written out (no stride() calls)
        metric, *metric_strides,
        cand_idx, *cand_strides,
        dst_idx, *dst_strides,
        num_cand, num_dst, channels, num_tokens,
        BLOCK_R=cfg["norms_blocks"][0], BLOCK_C=cfg["norms_blocks"][1],
        num_warps=1 if interpret else 4, grid=cfg["norms_grid"], warmup=False,
    )

    if splits == 1:  # the match kernel writes the result itself (one split of stride 0)
        part_best, part_arg, part_strides = best, match, (num_cand, 0, 1)
    else:
        part_best = work_buffer(work, "part_best", (batch, splits, num_cand), torch.float32, device)
        part_arg = work_buffer(work, "part_arg", (batch, splits, num_cand), torch.int32, device)
        part_strides = (splits * num_cand, num_cand, 1)
    # tl.dot takes fp16/bf16 (fp32 accumulator) or fp32 operands: fp64 metrics are upcast to
    # fp32 like in the interpreter (a float64 dot into the fp32 accumulator does not compile).
    dot_fp32 = dot_operands_fp32(metric.dtype, interpret)
    _bipartite_match_kernel.run(
        part_best, *part_strides,
        part_arg, *part_strides,
        metric, *metric_strides,
        cand_idx, *cand_strides,
        dst_idx, *dst_strides,
        inv, rows, 1,
        num_cand, num_dst, channels,
        cfg["dst_per_split"],
        DOT_FP32=dot_fp32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c,
        num_warps=num_warps, num_stages=num_stages, grid=cfg["match_grid"], warmup=False,
    )
    if splits > 1:
        _match_combine_kernel.run(
            best, num_cand, 1,
            match, num_cand, 1,
            part_best, *part_strides,
            part_arg, *part_strides,
            num_cand, splits,
            BLOCK=cfg["combine_block"], num_warps=1 if interpret else 2, grid=cfg["combine_grid"], warmup=False,
        )
    return best, match
