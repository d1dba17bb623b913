"""Attention received by a slice of keys: two passes, the attention matrix never written.

Equivalent PyTorch (``reference.attention.attention_received``)::

    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)   # [B, H, Tq, Tk]
    received = p.mean(dim=(1, 2))[:, start:end]                    # [B, end - start] float32

Pass 1 (``_row_lse_kernel``): per (batch*head, query block) the log-sum-exp of every query
row over all Tk keys, online max / sum over key tiles with ``tl.dot``; stored ``[B, H, Tq]``.
Pass 2 (``_received_kernel``): per (key block of the slice, batch) one program loops over the
heads and query blocks and accumulates ``exp(q k^T * scale - lse)`` summed over the queries,
then divides by ``H * Tq``. Each program owns its output block: deterministic, no atomics.
Logits are recomputed in pass 2 (2x the QK^T FLOPs of one pass) instead of stored.
"""
import math

import torch
import triton
import triton.language as tl

from .scores import _interpreting, cdiv, dot_operands_fp32, next_power_of_2


@triton.jit
def _row_lse_kernel(
    lse_ptr,  # float32 [B, H, Tq]: log-sum-exp of each query row's scaled logits
    stride_lb, stride_lh, stride_lq,  # strides of lse
    q_ptr,  # [B, H, Tq, D] queries (fp32/fp16/bf16)
    stride_qb, stride_qh, stride_qt, stride_qd,  # strides of q
    k_ptr,  # [B, H, Tk, D] keys
    stride_kb, stride_kh, stride_kt, stride_kd,  # strides of k
    num_heads, num_queries, num_keys, head_dim,  # H, Tq, Tk, D
    scale,  # logit scale (1/sqrt(D) by default)
    DOT_FP32: tl.constexpr,  # fp32 operands for tl.dot (fp32 inputs, or the interpreter)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # next power of two >= D (>= 16)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)

    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_mask = i < num_queries
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = d < head_dim
    q_tile = q_ptr + b * stride_qb + h * stride_qh + i.to(tl.int64)[:, None] * stride_qt + d[None, :] * stride_qd
    q = tl.load(q_tile, mask=i_mask[:, None] & d_mask[None, :], other=0.0)
    q32 = q.to(tl.float32)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    j_base = tl.arange(0, BLOCK_N)
    for j0 in range(0, num_keys, BLOCK_N):
        j = j0 + j_base
        j_mask = j < num_keys
        k_tile = k_ptr + b * stride_kb + h * stride_kh + j.to(tl.int64)[:, None] * stride_kt + d[None, :] * stride_kd
        k = tl.load(k_tile, mask=j_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:
            s = tl.dot(q32, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))  # fp16/bf16 products are exact in the fp32 accumulator
        s = tl.where(j_mask[None, :], s * scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), axis=1)
        row_max = new_max

    lse = row_max + tl.log(row_sum)
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + i.to(tl.int64) * stride_lq, lse, mask=i_mask)


@triton.jit
def _received_kernel(
    out_ptr,  # float32 [B, end - start]: mean attention received by each key of the slice
    stride_ob, stride_on,  # strides of out
    q_ptr,  # [B, H, Tq, D] queries
    stride_qb, stride_qh, stride_qt, stride_qd,  # strides of q
    k_ptr,  # [B, H, Tk, D] keys
    stride_kb, stride_kh, stride_kt, stride_kd,  # strides of k
    lse_ptr,  # float32 [B, H, Tq] from _row_lse_kernel
    stride_lb, stride_lh, stride_lq,  # strides of lse
    num_heads, num_queries, key_start, key_count, head_dim,  # H, Tq, start, end - start, D
    scale,  # logit scale
    inv_count,  # 1 / (H * Tq)
    DOT_FP32: tl.constexpr,  # fp32 operands for tl.dot
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,  # next power of two >= D (>= 16)
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # position in the slice
    n_mask = n < key_count
    j = (key_start + n).to(tl.int64)  # key index
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = d < head_dim
    i_base = tl.arange(0, BLOCK_M)

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    q_head = q_ptr + b * stride_qb  # advanced by one head per iteration (64-bit pointer arithmetic)
    k_head = k_ptr + b * stride_kb
    lse_head = lse_ptr + b * stride_lb
    for _ in range(0, num_heads):
        k = tl.load(k_head + j[:, None] * stride_kt + d[None, :] * stride_kd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        k32 = k.to(tl.float32)
        for i0 in range(0, num_queries, BLOCK_M):
            i = i0 + i_base
            i_mask = i < num_queries
            i64 = i.to(tl.int64)
            q = tl.load(q_head + i64[:, None] * stride_qt + d[None, :] * stride_qd,
                        mask=i_mask[:, None] & d_mask[None, :], other=0.0)
            lse = tl.load(lse_head + i64 * stride_lq, mask=i_mask, other=0.0)
            if DOT_FP32:
                s = tl.dot(q.to(tl.float32), tl.trans(k32), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            p = tl.exp(s * scale - lse[:, None])
            p = tl.where(i_mask[:, None] & n_mask[None, :], p, 0.0)
            acc += tl.sum(p, axis=0)
        q_head += stride_qh
        k_head += stride_kh
        lse_head += stride_lh

    tl.store(out_ptr + b * stride_ob + n.to(tl.int64) * stride_on, acc * inv_count, mask=n_mask)


def attention_blocks(num_queries: int, num_keys: int, head_dim: int, interpret: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps): 64-wide tiles on a GPU (32 for short inputs),
    >= 16 in every ``tl.dot`` dim; tiles up to 64 in the interpreter."""
    block_d = max(16, next_power_of_2(head_dim))
    if interpret:
        return (min(64, max(16, next_power_of_2(num_queries))),
                min(64, max(16, next_power_of_2(num_keys))), block_d, 1)
    block_m = 64 if num_queries > 32 else max(16, next_power_of_2(num_queries))
    block_n = 64 if num_keys > 32 else 32
    num_warps = 4 if block_d <= 64 else 8
    return block_m, block_n, block_d, num_warps


def attention_received(q: torch.Tensor, k: torch.Tensor, key_slice, scale=None) -> torch.Tensor:
    """Launch the two passes; returns float32 ``[B, end - start]``."""
    batch, num_heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    start, end = key_slice
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    interpret = _interpreting(q)
    out = torch.empty(batch, end - start, dtype=torch.float32, device=q.device)
    if batch == 0 or end <= start:
        return out
    block_m, block_n, block_d, num_warps = attention_blocks(num_queries, num_keys, head_dim, interpret)
    dot_fp32 = dot_operands_fp32(q.dtype, interpret)
    lse = torch.empty(batch, num_heads, num_queries, dtype=torch.float32, device=q.device)
    _row_lse_kernel[(cdiv(num_queries, block_m), batch * num_heads)](
        lse, lse.stride(0), lse.stride(1), lse.stride(2),
        q, q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k, k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        num_heads, num_queries, num_keys, head_dim, scale,
        DOT_FP32=dot_fp32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    _received_kernel[(cdiv(end - start, block_n), batch)](
        out, out.stride(0), out.stride(1),
        q, q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k, k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        lse, lse.stride(0), lse.stride(1), lse.stride(2),
        num_heads, num_queries, start, end - start, head_dim, scale, 1.0 / (num_heads * num_queries),
        DOT_FP32=dot_fp32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out
