"""Top-k selection by radix select.

``topk_rank`` (equivalent PyTorch, per batch row)::

    chosen = torch.sort(scores, descending=True, stable=True).indices[:k]   # ties: lower index
    mask = zeros(n, bool); mask[chosen] = True
    rank = where(mask, cumsum(mask) - 1, -1)          # rank among the chosen, ascending index

No sort: scores become order-preserving integer keys, the k-th largest key is found by a
bitwise binary search (32 counting passes over the row, most significant bit first), then
every key above it is taken plus the lowest-index keys equal to it until there are k.

The plan tensors are built from the ranks by ``plan_build.py``.
"""
import torch
import triton
import triton.language as tl

from .scores import _interpreting


@triton.jit
def _order_key(s):
    """fp32 -> int64 key in [0, 2^32) with the order of the floats (-0.0 counts as +0.0)."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # flip magnitude bits of negatives
    return key.to(tl.int64) + 2147483648


@triton.jit
def _topk_rank_kernel(
    rank_ptr,  # int32 [B, n] out: rank among the selected (ascending index), -1 if not selected
    stride_rb, stride_ri,  # strides of rank
    score_ptr,  # float32 [B, n] scores
    stride_sb, stride_si,  # strides of scores
    n, k,  # row length, number to select (0 <= k <= n)
    BLOCK: tl.constexpr,  # elements per step along the row
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    s_row = score_ptr + pid_b * stride_sb

    # Largest threshold t with #(key >= t) >= k, i.e. the k-th largest key, bit by bit.
    thr = tl.zeros([1], dtype=tl.int64)
    step = tl.full([1], 2147483648, dtype=tl.int64)
    for _ in range(32):
        trial = thr + step
        count = tl.zeros([1], dtype=tl.int32)
        for start in range(0, n, BLOCK):
            idx = start + offs
            mask = idx < n
            key = _order_key(tl.load(s_row + idx.to(tl.int64) * stride_si, mask=mask, other=0.0))
            count += tl.sum((mask & (key >= trial)).to(tl.int32), axis=0)
        thr = tl.where(count >= k, trial, thr)
        step = step // 2

    above = tl.zeros([1], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        idx = start + offs
        mask = idx < n
        key = _order_key(tl.load(s_row + idx.to(tl.int64) * stride_si, mask=mask, other=0.0))
        above += tl.sum((mask & (key > thr)).to(tl.int32), axis=0)
    need_equal = k - above  # keys equal to the threshold still to take, lowest index first

    equal_seen = tl.zeros([1], dtype=tl.int32)
    chosen_seen = tl.zeros([1], dtype=tl.int32)
    r_row = rank_ptr + pid_b * stride_rb
    for start in range(0, n, BLOCK):
        idx = start + offs
        mask = idx < n
        key = _order_key(tl.load(s_row + idx.to(tl.int64) * stride_si, mask=mask, other=0.0))
        equal = (mask & (key == thr)).to(tl.int32)
        equal_rank = equal_seen + tl.cumsum(equal, axis=0) - equal
        chosen = mask & ((key > thr) | ((equal != 0) & (equal_rank < need_equal)))
        chosen_i = chosen.to(tl.int32)
        rank = chosen_seen + tl.cumsum(chosen_i, axis=0) - chosen_i
        tl.store(r_row + idx.to(tl.int64) * stride_ri, tl.where(chosen, rank, -1), mask=mask)
        equal_seen += tl.sum(equal, axis=0)
        chosen_seen += tl.sum(chosen_i, axis=0)


def topk_rank(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Launch ``_topk_rank_kernel``: int32 ``[B, n]``, the rank of each of the k largest scores
    of its row among them in ascending index order (ties: lower index selected), else -1."""
    batch, n = scores.shape
    interpret = _interpreting(scores)
    scores = scores.to(torch.float32)
    rank = torch.empty(batch, n, dtype=torch.int32, device=scores.device)
    if batch == 0 or n == 0:
        return rank
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    block = min(1024 if interpret else 4096, max(16, triton.next_power_of_2(n)))
    _topk_rank_kernel[(batch,)](
        rank, rank.stride(0), rank.stride(1),
        scores, scores.stride(0), scores.stride(1),
        n, k,
        BLOCK=block, num_warps=1 if interpret else (8 if block >= 2048 else 4),
    )
    return rank
