"""Top-k selection by radix select, several programs per batch row.

``topk_rank`` (equivalent PyTorch, per batch row)::

    chosen = torch.sort(scores, descending=True, stable=True).indices[:k]   # ties: lower index
    mask = zeros(n, bool); mask[chosen] = True
    rank = where(mask, cumsum(mask) - 1, -1)          # rank among the chosen, ascending index

No sort: scores become order-preserving 32-bit integer keys and the k-th largest key (the
threshold) is found by a radix select, 8 bits per round, most significant digit first: a
256-bin histogram of the next digit over the keys that match the digits fixed so far gives
the digit of the threshold (4 passes over the row). Every key above the threshold is
taken, plus the lowest-index keys equal to it until there are k.

Each row is split into chunks of ``CHUNK`` positions, one program each (grid ``(chunks, B)``,
``topk_grid``). Every program runs the same radix select over its whole row (the row is
small and stays in L2) and, in the same passes, counts the keys above / equal to the
threshold that precede its chunk; then it writes the ranks of its own chunk. No second
launch, no atomics, and bit-identical results for any chunk size.

The plan tensors are built from the ranks by ``plan_build.py``.
"""
import functools

import torch
import triton
import triton.language as tl

from .scores import _interpreting, cdiv, next_power_of_2, work_buffer

TARGET_PROGRAMS = 264  # 2 programs per SM of an H100 (132 SMs)
RADIX_BITS = 8  # digit width of one radix round (4 rounds cover the 32-bit key)


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
    BLOCK: tl.constexpr,  # elements per step of the radix passes over the whole row
    CHUNK: tl.constexpr,  # positions of the row this program writes
):
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    s_row = score_ptr + pid_b * stride_sb
    chunk_start = pid_c * CHUNK

    # Radix select of the k-th largest key, most significant byte first. `prefix` holds the
    # threshold's digits fixed so far; `k_left` how many keys matching them are still needed.
    # The same passes count the keys before this chunk that are above the threshold.
    prefix = tl.zeros([1], dtype=tl.int64)
    k_left = tl.zeros([1], dtype=tl.int32) + k
    above = tl.zeros([1], dtype=tl.int32)  # keys > threshold in the row
    above_before = tl.zeros([1], dtype=tl.int32)  # ... at positions < chunk_start
    equal_before = tl.zeros([1], dtype=tl.int32)  # keys == threshold at positions < chunk_start
    for r in tl.static_range(4):
        shift = 24 - 8 * r  # constexpr: static_range unrolls the rounds
        hist = tl.zeros([256], dtype=tl.int32)
        hist_before = tl.zeros([256], dtype=tl.int32)
        for start in range(0, n, BLOCK):
            idx = start + offs
            mask = idx < n
            key = _order_key(tl.load(s_row + idx.to(tl.int64) * stride_si, mask=mask, other=0.0))
            match = mask & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            digit = ((key >> shift) & 255).to(tl.int32)
            hist += tl.histogram(digit, 256, mask=match)
            hist_before += tl.histogram(digit, 256, mask=match & (idx < chunk_start))
        # suffix[d] = matching keys with digit >= d (non-increasing; suffix[0] >= k_left): the
        # threshold's digit is the largest d with suffix[d] >= k_left (255 when k_left == 0).
        suffix = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
        digit_k = tl.sum((suffix >= k_left).to(tl.int32), axis=0) - 1
        over = bins > digit_k
        gt = tl.sum(tl.where(over, hist, 0), axis=0)
        above += gt
        above_before += tl.sum(tl.where(over, hist_before, 0), axis=0)
        k_left -= gt
        prefix = prefix | (digit_k.to(tl.int64) << shift)
        if r == 3:
            equal_before += tl.sum(tl.where(bins == digit_k, hist_before, 0), axis=0)
    thr = prefix
    need_equal = k - above  # keys equal to the threshold to take, lowest index first

    # This program's chunk: equal keys before it come first among the equal ones.
    idx = chunk_start + tl.arange(0, CHUNK)
    mask = idx < n
    key = _order_key(tl.load(s_row + idx.to(tl.int64) * stride_si, mask=mask, other=0.0))
    equal = (mask & (key == thr)).to(tl.int32)
    equal_rank = equal_before + tl.cumsum(equal, axis=0) - equal
    chosen = mask & ((key > thr) | ((equal != 0) & (equal_rank < need_equal)))
    chosen_i = chosen.to(tl.int32)
    chosen_before = above_before + tl.minimum(equal_before, need_equal)
    rank = chosen_before + tl.cumsum(chosen_i, axis=0) - chosen_i
    r_row = rank_ptr + pid_b * stride_rb
    tl.store(r_row + idx.to(tl.int64) * stride_ri, tl.where(chosen, rank, -1), mask=mask)


@functools.lru_cache(maxsize=256)
def topk_config(batch: int, n: int, interpret: bool):
    """``(grid, BLOCK, CHUNK, num_warps)`` of ``_topk_rank_kernel`` for ``[batch, n]`` scores:
    chunks sized so the launch has about ``TARGET_PROGRAMS`` programs (at least 8 positions
    per chunk on a GPU, 128 in the interpreter, at most one radix block)."""
    block = min(1024 if interpret else 4096, max(16, next_power_of_2(n)))
    want = next_power_of_2(max(1, cdiv(n * batch, TARGET_PROGRAMS)))
    chunk = min(block, max(128 if interpret else 8, want))
    grid = (cdiv(n, chunk), batch)
    return grid, block, chunk, 1 if interpret else (8 if block >= 2048 else 4)


def topk_rank(scores: torch.Tensor, k: int, work=None) -> torch.Tensor:
    """Launch ``_topk_rank_kernel``: int32 ``[B, n]``, the rank of each of the k largest scores
    of its row among them in ascending index order (ties: lower index selected), else -1.
    ``work``: see ``scores.work_buffer`` (the result is then a reused buffer)."""
    batch, n = scores.shape
    interpret = _interpreting(scores)
    if scores.dtype != torch.float32:
        scores = scores.to(torch.float32)
    rank = work_buffer(work, "rank", (batch, n), torch.int32, scores.device)
    if batch == 0 or n == 0:
        return rank
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    grid, block, chunk, num_warps = topk_config(batch, n, interpret)
    _topk_rank_kernel.run(
        rank, n, 1,  # rank's strides (a new dense tensor)
        scores, *scores.stride(),
        n, k,
        BLOCK=block, CHUNK=chunk, num_warps=num_warps, grid=grid, warmup=False,
    )
    return rank
