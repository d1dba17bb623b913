"""Top-k selection by radix select, and the plan build by ranks and prefix sums.

``topk_rank`` (equivalent PyTorch, per batch row)::

    chosen = torch.sort(scores, descending=True, stable=True).indices[:k]   # ties: lower index
    mask = zeros(n, bool); mask[chosen] = True
    rank = where(mask, cumsum(mask) - 1, -1)          # rank among the chosen, ascending index

No sort: scores become order-preserving integer keys, the k-th largest key is found by a
bitwise binary search (32 counting passes over the row, most significant bit first), then
every key above it is taken plus the lowest-index keys equal to it until there are k.

``group_rank``: ``rank[t] = #{s < t : key[s] == key[t]}`` (position of a token among the
members of its group, members in ascending order), by blocked all-pairs comparison of
earlier tokens; O(N^2) integer compares, no sort.

``assemble_plan``: ``reference.plans.assemble_plan`` with the stable argsort replaced by
``members[row_start[row] + rank_in_row] = token``.
"""
from typing import Optional

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


@triton.jit
def _group_rank_kernel(
    rank_ptr,  # int32 [B, N] out: number of earlier tokens with the same key
    stride_rb, stride_ri,  # strides of rank
    key_ptr,  # integer [B, N] group key of each token (e.g. its representative)
    stride_kb, stride_ki,  # strides of key
    n,  # N
    BLOCK: tl.constexpr,  # tokens per program and per comparison step
):
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK + tl.arange(0, BLOCK)
    t_mask = t < n
    k_row = key_ptr + pid_b * stride_kb
    key_t = tl.load(k_row + t.to(tl.int64) * stride_ki, mask=t_mask, other=-1).to(tl.int64)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for s0 in range(0, (pid_t + 1) * BLOCK, BLOCK):  # only earlier tokens matter
        s = s0 + tl.arange(0, BLOCK)
        s_mask = s < n
        key_s = tl.load(k_row + s.to(tl.int64) * stride_ki, mask=s_mask, other=-2).to(tl.int64)
        hit = (key_s[None, :] == key_t[:, None]) & (s[None, :] < t[:, None]) & s_mask[None, :]
        count += tl.sum(hit.to(tl.int32), axis=1)
    tl.store(rank_ptr + pid_b * stride_rb + t.to(tl.int64) * stride_ri, count, mask=t_mask)


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


def group_rank(keys: torch.Tensor) -> torch.Tensor:
    """Launch ``_group_rank_kernel``: int32 ``[B, N]`` with ``#{s < t : keys[s] == keys[t]}``."""
    batch, n = keys.shape
    interpret = _interpreting(keys)
    rank = torch.empty(batch, n, dtype=torch.int32, device=keys.device)
    if batch == 0 or n == 0:
        return rank
    block = 128 if interpret else 64
    _group_rank_kernel[(triton.cdiv(n, block), batch)](
        rank, rank.stride(0), rank.stride(1),
        keys, keys.stride(0), keys.stride(1),
        n,
        BLOCK=block, num_warps=1 if interpret else 4,
    )
    return rank


def assemble_plan(rep_of_token: torch.Tensor, num_rows: int, rank_in_row: Optional[torch.Tensor] = None):
    """Plan tensors ``(row_of_token, members, row_start, rep_token)`` (int32) from
    ``rep_of_token [B, N]``, equal to ``reference.plans.assemble_plan``: rows ordered by their
    lowest member, members ascending inside a row.

    ``rank_in_row`` (the position of each token among its row's members, ascending) may be
    given when the caller knows it (SSM: the position inside the window); otherwise
    ``group_rank`` computes it. Plain torch scatters and cumsums, no host synchronisation.
    """
    batch, num_tokens = rep_of_token.shape
    device = rep_of_token.device
    rep = rep_of_token.long()
    if rank_in_row is None:
        rank_in_row = group_rank(rep)
    rank_in_row = rank_in_row.long()
    token = torch.arange(num_tokens, device=device).expand(batch, num_tokens)
    is_head = rank_in_row == 0  # the lowest member of each group
    # Head of every group, stored at the group's representative (non-heads write to a spare slot).
    head_at_rep = torch.zeros(batch, num_tokens + 1, dtype=torch.long, device=device)
    head_at_rep.scatter_(1, torch.where(is_head, rep, num_tokens), token)
    head = head_at_rep[:, :num_tokens].gather(1, rep)
    row_of_head = torch.cumsum(is_head.long(), dim=1) - 1
    row_of_token = row_of_head.gather(1, head)

    counts = torch.zeros(batch, num_rows, dtype=torch.long, device=device)
    counts.scatter_add_(1, row_of_token, torch.ones_like(row_of_token))
    row_start = torch.nn.functional.pad(torch.cumsum(counts, dim=1), (1, 0))
    position = row_start.gather(1, row_of_token) + rank_in_row
    members = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    members.scatter_(1, position, token)
    rep_token = torch.zeros(batch, num_rows, dtype=torch.long, device=device)
    rep_token.scatter_(1, row_of_token, rep)  # every member writes the same value
    return (row_of_token.to(torch.int32), members.to(torch.int32), row_start.to(torch.int32),
            rep_token.to(torch.int32))
