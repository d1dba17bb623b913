"""Bipartite cosine matching: best dst of every candidate, tiles over dsts with a running max.

Equivalent PyTorch (``reference.similarity.bipartite_match``)::

    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    sim = unit.gather(1, cand_idx) @ unit.gather(1, dst_idx).transpose(-1, -2)   # [B, Na, D]
    best, match = sim.max(-1)          # first maximum: lowest dst position on ties

Rows are gathered by index inside the kernel; dot products of the raw rows are accumulated
in fp32 over C blocks together with the rows' squared norms, and scaled by the inverse
norms afterwards. Neither the ``Na x D`` matrix nor a normalised copy of x is written.
"""
import torch
import triton
import triton.language as tl

from .scores import _interpreting, dot_operands_fp32


@triton.jit
def _bipartite_match_kernel(
    best_ptr,  # float32 [B, Na]: best cosine of each candidate
    stride_bb, stride_bi,  # strides of best
    match_ptr,  # int32 [B, Na]: position in dst_idx of the best dst
    stride_mb, stride_mi,  # strides of match
    x_ptr,  # [B, N, C] metric
    stride_xb, stride_xn, stride_xc,  # strides of x
    cand_ptr,  # integer [B, Na]: candidate token indices
    stride_cb, stride_ci,  # strides of cand_idx
    dst_ptr,  # integer [B, D]: dst token indices
    stride_db, stride_dj,  # strides of dst_idx
    num_cand, num_dst, channels,  # Na, D, C
    num_tokens,  # N: an index outside [0, N) counts as a non-finite token (never read)
    DOT_FP32: tl.constexpr,  # upcast before tl.dot (fp32/fp64 inputs, or the interpreter)
    BLOCK_M: tl.constexpr,  # candidates per program
    BLOCK_N: tl.constexpr,  # dsts per tile
    BLOCK_C: tl.constexpr,  # channels per step
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)

    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_mask = i < num_cand
    cand = tl.load(cand_ptr + pid_b * stride_cb + i.to(tl.int64) * stride_ci, mask=i_mask, other=0).to(tl.int64)
    cand_ok = i_mask & (cand >= 0) & (cand < num_tokens)
    a_row = x_ptr + pid_b * stride_xb + cand * stride_xn  # [BM]
    c_base = tl.arange(0, BLOCK_C)
    j_base = tl.arange(0, BLOCK_N)

    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    for j0 in range(0, num_dst, BLOCK_N):
        j = j0 + j_base
        j_mask = j < num_dst
        dst = tl.load(dst_ptr + pid_b * stride_db + j.to(tl.int64) * stride_dj, mask=j_mask, other=0).to(tl.int64)
        dst_ok = j_mask & (dst >= 0) & (dst < num_tokens)
        b_row = x_ptr + pid_b * stride_xb + dst * stride_xn  # [BN]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        a_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        b_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            c = (c0 + c_base).to(tl.int64)
            c_mask = c < channels
            a = tl.load(a_row[:, None] + c[None, :] * stride_xc, mask=cand_ok[:, None] & c_mask[None, :], other=0.0)
            b = tl.load(b_row[:, None] + c[None, :] * stride_xc, mask=dst_ok[:, None] & c_mask[None, :], other=0.0)
            a32 = a.to(tl.float32)
            b32 = b.to(tl.float32)
            a_sq += tl.sum(a32 * a32, axis=1)
            b_sq += tl.sum(b32 * b32, axis=1)
            if DOT_FP32:
                acc = tl.dot(a32, tl.trans(b32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)  # bf16/fp16 products are exact in fp32
        # Correctly rounded (plain sqrt and `/` are approximate on a GPU): these decide the match.
        inv_a = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(a_sq), 1e-6))  # reference clamps norms to 1e-6
        inv_b = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(b_sq), 1e-6))
        sim = acc * inv_a[:, None] * inv_b[None, :]
        # Pairs with a non-finite token (squared norm inf or NaN; NaN < inf is False) score
        # -inf, as in the reference: such tokens never win a match while a finite one exists.
        pair_ok = (cand_ok & (a_sq < float("inf")))[:, None] & (dst_ok & (b_sq < float("inf")))[None, :]
        sim = tl.where(pair_ok, sim, float("-inf"))
        tile_best = tl.max(sim, axis=1)
        # Lowest j among the tile's maxima; across tiles only a strictly greater value wins.
        tile_arg = tl.min(tl.where(sim == tile_best[:, None], j[None, :], 2147483647), axis=1)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, tile_arg, arg)

    i64 = i.to(tl.int64)
    tl.store(best_ptr + pid_b * stride_bb + i64 * stride_bi, best, mask=i_mask)
    tl.store(match_ptr + pid_b * stride_mb + i64 * stride_mi, arg, mask=i_mask)


def match_blocks(num_cand: int, num_dst: int, channels: int, interpret: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_C, num_warps, num_stages): 64x64x64 tensor-core tiles on a GPU
    (>= 16 in every dot dim), up to 128-wide tiles in the interpreter."""
    if interpret:
        return (min(128, max(16, triton.next_power_of_2(num_cand))),
                min(128, max(16, triton.next_power_of_2(num_dst))),
                min(128, max(16, triton.next_power_of_2(channels))), 1, 1)
    block_m = 64 if num_cand > 32 else 32
    block_n = 64 if num_dst > 32 else 32
    return block_m, block_n, 64, 4, 3


def bipartite_match(metric: torch.Tensor, cand_idx: torch.Tensor, dst_idx: torch.Tensor):
    """Launch ``_bipartite_match_kernel``; returns ``(best float32 [B, Na], match int32 [B, Na])``."""
    batch, _, channels = metric.shape
    num_cand, num_dst = cand_idx.shape[1], dst_idx.shape[1]
    interpret = _interpreting(metric)
    best = torch.empty(batch, num_cand, dtype=torch.float32, device=metric.device)
    match = torch.empty(batch, num_cand, dtype=torch.int32, device=metric.device)
    if batch == 0 or num_cand == 0:
        return best, match
    block_m, block_n, block_c, num_warps, num_stages = match_blocks(num_cand, num_dst, channels, interpret)
    # tl.dot takes fp16/bf16 (fp32 accumulator) or fp32 operands: fp64 metrics are upcast to
    # fp32 like in the interpreter (a float64 dot into the fp32 accumulator does not compile).
    dot_fp32 = dot_operands_fp32(metric.dtype, interpret)
    launch = (triton.cdiv(num_cand, block_m), batch)
    _bipartite_match_kernel[launch](
        best, best.stride(0), best.stride(1),
        match, match.stride(0), match.stride(1),
        metric, metric.stride(0), metric.stride(1), metric.stride(2),
        cand_idx, cand_idx.stride(0), cand_idx.stride(1),
        dst_idx, dst_idx.stride(0), dst_idx.stride(1),
        num_cand, num_dst, channels,
        metric.shape[1],
        DOT_FP32=dot_fp32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c,
        num_warps=num_warps, num_stages=num_stages,
    )
    return best, match
