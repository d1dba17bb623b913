"""Fused plan building: one kernel turns a selection into all plan tensors and the new ``li``.

``ssm_plan`` (equivalent PyTorch: ``reference.plans.ssm_plan`` from the selected windows on)::

    rep_of_token = arange(N); rep_of_token[window tokens of selected g] = dst token of g
    row_of_token, members, row_start, rep_token = assemble_plan(rep_of_token)   # rows by lowest member
    blend = token in a selected window
    li_next = where(independent, 0, li + 1)    # independent: not in blend (prune: or a representative)

SSM rows are whole windows or singletons, ordered by their lowest member ``L``. With
``A(x)`` = #non-lowest tokens of selected windows below ``x`` and ``S(x)`` = #selected windows
whose lowest token is below ``x`` (two prefix sums over the raster order):
``row = L - A(L)`` and ``row_start[row] = L - A(L) + (K - 1) S(L)``; members of a window are in
raster order inside it, so a token's slot is ``row_start + p`` (``p``: its window position).

``bipartite_lists`` (IDM / ToMe): the dst of every window (``argmax li`` over the window, first
maximum, or the drawn position) and the candidates (all other tokens, ascending), by one
prefix sum over the dst indicator.

``bipartite_plan``: the chosen candidates join their matched dst; each group's lowest member
(atomic min, order-free), group sizes (atomic add of ints, order-free), two prefix sums over
heads give rows and row starts, and members are placed by a per-row cursor over token blocks
(a blocked counting sort, ``O(N * BLOCK)``: no all-pairs rank).

Grids are ``(H, W)`` or ``(T, H, W)`` (token ``(t*H + i)*W + j``; windows ``(wt, wh, ww)``
numbered in window-raster order, positions in raster order inside a window, so a window's
position 0 is its lowest token and positions ascend with tokens: the formulas above hold
unchanged). A 2-D grid launches the ``HAS_T=False`` specialisation, the code the kernels had
before 3-D grids.

One program per batch row; phases are separated by barriers. No host synchronisation.
"""
import torch
import triton
import triton.language as tl

from ..reference.windows import grid_3d
from .scores import _interpreting, next_power_of_2, work_buffer


@triton.jit
def _window_of(t, mask, grid_h, grid_w, win_slices, win_rows, win_cols, WIN_T: tl.constexpr, WIN_H: tl.constexpr,
               WIN_W: tl.constexpr, HAS_T: tl.constexpr):
    """For raster tokens ``t``: (inside a whole window, window index, position in the window,
    the window's lowest token). ``grid_h`` and ``win_slices`` (T // wt) are read only when HAS_T."""
    if HAS_T:
        frame_size = grid_h * grid_w
        f = t // frame_size
        r = (t % frame_size) // grid_w
        c = t % grid_w
        wk = f // WIN_T
        wi = r // WIN_H
        wj = c // WIN_W
        inwin = mask & (wk < win_slices) & (wi < win_rows) & (wj < win_cols)
        g = (wk * win_rows + wi) * win_cols + wj
        p = ((f % WIN_T) * WIN_H + r % WIN_H) * WIN_W + c % WIN_W
        lowest = ((wk * WIN_T) * grid_h + wi * WIN_H) * grid_w + wj * WIN_W
    else:
        r = t // grid_w
        c = t % grid_w
        wi = r // WIN_H
        wj = c // WIN_W
        inwin = mask & (wi < win_rows) & (wj < win_cols)
        g = wi * win_cols + wj
        p = (r % WIN_H) * WIN_W + (c % WIN_W)
        lowest = (wi * WIN_H) * grid_w + wj * WIN_W
    return inwin, g, p, lowest


@triton.jit
def _position_offset(q, grid_h, grid_w, WIN_H: tl.constexpr, WIN_W: tl.constexpr, HAS_T: tl.constexpr):
    """Token offset of window position ``q`` from the window's lowest token."""
    if HAS_T:
        offset = (q // (WIN_H * WIN_W)) * (grid_h * grid_w) + ((q // WIN_W) % WIN_H) * grid_w + q % WIN_W
    else:
        offset = (q // WIN_W) * grid_w + q % WIN_W
    return offset


@triton.jit
def _next_li(li_ptr, b, stride_lb, stride_ln, t, mask, in_group, rep, HAS_LI: tl.constexpr,
             PRUNE: tl.constexpr, BLOCK: tl.constexpr):
    """``li + 1``, 0 for tokens outside every merge group (prune mode: and representatives)."""
    if HAS_LI:
        li = tl.load(li_ptr + b * stride_lb + t.to(tl.int64) * stride_ln, mask=mask, other=0).to(tl.int32)
    else:
        li = tl.zeros([BLOCK], dtype=tl.int32)
    independent = ~in_group
    if PRUNE:
        independent = independent | (rep == t)
    return tl.where(independent, 0, li + 1)


@triton.jit
def _ssm_plan_kernel(
    row_ptr,  # int32 [B, N] out: row_of_token (dense)
    members_ptr,  # int32 [B, N] out: members (dense)
    row_start_ptr,  # int32 [B, M + 1] out: row_start (dense)
    rep_ptr,  # int32 [B, M] out: rep_token (dense)
    blend_ptr,  # bool [B, N] out: blend (dense)
    li_out_ptr,  # int32 [B, N] out: the next li (dense; dummy unless WRITE_LI)
    scratch_ptr,  # int32 [B, 2, N]: the prefix sums A and S
    rank_ptr, stride_rb, stride_rg,  # int [B, G]: rank among the selected windows, -1 if not selected
    dst_ptr, stride_db, stride_dk,  # int [B, R]: dst position of the k-th selected window (HAS_DST)
    li_ptr, stride_lb, stride_ln,  # int [B, N]: current li (dummy unless HAS_LI)
    num_tokens, num_rows,  # N, M
    grid_h, grid_w,  # H, W (H read only when HAS_T)
    win_slices, win_rows, win_cols,  # gt = T // wt (read only when HAS_T), gh, gw
    WIN_T: tl.constexpr,  # window depth in frames (1 when not HAS_T)
    WIN_H: tl.constexpr,  # window height
    WIN_W: tl.constexpr,  # window width
    HAS_T: tl.constexpr,  # the grid has a frame axis (T > 1): 3-D window arithmetic
    HAS_DST: tl.constexpr,  # dst positions are given (else position 0)
    HAS_LI: tl.constexpr,  # li is given (else counted from 0)
    PRUNE: tl.constexpr,  # prune mode: representatives are independent too
    WRITE_LI: tl.constexpr,  # write li_next
    BLOCK: tl.constexpr,  # tokens per step
):
    K: tl.constexpr = WIN_T * WIN_H * WIN_W
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    n_row = b * num_tokens
    scr = scratch_ptr + b * 2 * num_tokens

    # Phase 1: exclusive prefix sums A (non-lowest selected tokens) and S (lowest selected tokens).
    carry_a = tl.zeros([1], dtype=tl.int32)
    carry_s = tl.zeros([1], dtype=tl.int32)
    for start in range(0, num_tokens, BLOCK):
        t = start + offs
        mask = t < num_tokens
        inwin, g, p, lowest = _window_of(t, mask, grid_h, grid_w, win_slices, win_rows, win_cols, WIN_T, WIN_H, WIN_W,
                                         HAS_T)
        rank = tl.load(rank_ptr + b * stride_rb + g.to(tl.int64) * stride_rg, mask=inwin, other=-1)
        sel = inwin & (rank >= 0)
        nonlow = (sel & (p != 0)).to(tl.int32)
        low = (sel & (p == 0)).to(tl.int32)
        a = tl.cumsum(nonlow, axis=0) - nonlow + carry_a
        s = tl.cumsum(low, axis=0) - low + carry_s
        tl.store(scr + t, a, mask=mask)
        tl.store(scr + num_tokens + t, s, mask=mask)
        carry_a += tl.sum(nonlow, axis=0)
        carry_s += tl.sum(low, axis=0)
    tl.debug_barrier()

    # Phase 2: every token's row, its slot in members, and the row heads' start and representative.
    for start in range(0, num_tokens, BLOCK):
        t = start + offs
        mask = t < num_tokens
        inwin, g, p, lowest = _window_of(t, mask, grid_h, grid_w, win_slices, win_rows, win_cols, WIN_T, WIN_H, WIN_W,
                                         HAS_T)
        rank = tl.load(rank_ptr + b * stride_rb + g.to(tl.int64) * stride_rg, mask=inwin, other=-1)
        sel = inwin & (rank >= 0)
        head = tl.where(sel, lowest, t)
        a = tl.load(scr + head, mask=mask, other=0)
        s = tl.load(scr + num_tokens + head, mask=mask, other=0)
        row = head - a
        first = row + (K - 1) * s
        slot = first + tl.where(sel, p, 0)
        if HAS_DST:
            dp = tl.load(dst_ptr + b * stride_db + tl.maximum(rank, 0).to(tl.int64) * stride_dk, mask=sel, other=0)
        else:
            dp = tl.zeros([BLOCK], dtype=tl.int32)
        rep = tl.where(sel, lowest + _position_offset(dp, grid_h, grid_w, WIN_H, WIN_W, HAS_T), t)
        tl.store(row_ptr + n_row + t, row, mask=mask)
        tl.store(members_ptr + n_row + slot, t, mask=mask)
        tl.store(blend_ptr + n_row + t, sel, mask=mask)
        is_head = mask & (head == t)
        tl.store(row_start_ptr + b * (num_rows + 1) + row, first, mask=is_head)
        tl.store(rep_ptr + b * num_rows + row, rep, mask=is_head)
        if WRITE_LI:
            li_next = _next_li(li_ptr, b, stride_lb, stride_ln, t, mask, sel, rep, HAS_LI, PRUNE, BLOCK)
            tl.store(li_out_ptr + n_row + t, li_next, mask=mask)
    last = offs == 0
    tl.store(row_start_ptr + b * (num_rows + 1) + num_rows + offs * 0, num_tokens + offs * 0, mask=last)


@triton.jit
def _bipartite_lists_kernel(
    dst_token_ptr,  # int32 [B, G] out: dst token of every window (dense)
    cand_token_ptr,  # int32 [B, N - G] out: the other tokens, ascending (dense)
    li_ptr, stride_lb, stride_ln,  # int [B, N]: li (dst = first argmax over the window) when HAS_LI
    pos_ptr, stride_pb, stride_pg,  # int [B, G]: drawn dst positions (HAS_POS; stride_pb 0: shared)
    num_tokens,  # N
    grid_h, grid_w,  # H, W (H read only when HAS_T)
    win_slices, win_rows, win_cols,  # gt = T // wt (read only when HAS_T), gh, gw
    WIN_T: tl.constexpr,  # window depth in frames (1 when not HAS_T)
    WIN_H: tl.constexpr,  # window height
    WIN_W: tl.constexpr,  # window width
    HAS_T: tl.constexpr,  # the grid has a frame axis (T > 1): 3-D window arithmetic
    HAS_LI: tl.constexpr,  # dst from li, else from pos
    HAS_POS: tl.constexpr,  # drawn positions are given (else position 0)
    BLOCK: tl.constexpr,  # tokens per step
):
    K: tl.constexpr = WIN_T * WIN_H * WIN_W
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    num_windows = win_slices * win_rows * win_cols  # win_slices is 1 (a constant on a GPU) for 2-D grids
    carry = tl.zeros([1], dtype=tl.int32)
    for start in range(0, num_tokens, BLOCK):
        t = start + offs
        mask = t < num_tokens
        inwin, g, p, lowest = _window_of(t, mask, grid_h, grid_w, win_slices, win_rows, win_cols, WIN_T, WIN_H, WIN_W,
                                         HAS_T)
        if HAS_LI:
            best = tl.full([BLOCK], -2147483647, dtype=tl.int64)
            dp = tl.zeros([BLOCK], dtype=tl.int32)
            for q in tl.static_range(K):
                tok = lowest + _position_offset(q, grid_h, grid_w, WIN_H, WIN_W, HAS_T)
                v = tl.load(li_ptr + b * stride_lb + tok.to(tl.int64) * stride_ln, mask=inwin, other=0).to(tl.int64)
                better = v > best  # strictly greater: the first maximum wins
                best = tl.where(better, v, best)
                dp = tl.where(better, q, dp)
        elif HAS_POS:
            dp = tl.load(pos_ptr + b * stride_pb + g.to(tl.int64) * stride_pg, mask=inwin, other=0).to(tl.int32)
        else:
            dp = tl.zeros([BLOCK], dtype=tl.int32)
        is_dst = inwin & (p == dp)
        d = is_dst.to(tl.int32)
        before = tl.cumsum(d, axis=0) - d + carry  # dsts below t
        tl.store(dst_token_ptr + b * num_windows + g, t, mask=is_dst)
        tl.store(cand_token_ptr + b * (num_tokens - num_windows) + (t - before), t, mask=mask & ~is_dst)
        carry += tl.sum(d, axis=0)


@triton.jit
def _bipartite_plan_kernel(
    row_ptr,  # int32 [B, N] out: row_of_token (dense)
    members_ptr,  # int32 [B, N] out: members (dense)
    row_start_ptr,  # int32 [B, M + 1] out: row_start (dense)
    rep_ptr,  # int32 [B, M] out: rep_token (dense)
    blend_ptr,  # bool [B, N] out: blend (dense)
    li_out_ptr,  # int32 [B, N] out: the next li (dense; dummy unless WRITE_LI)
    scratch_ptr,  # int32 [B, 6, N]: representative, group low, group size, cursor, heads below, start
    cand_ptr,  # int32 [B, Na]: candidate tokens (dense)
    dst_token_ptr,  # int32 [B, G]: dst tokens (dense)
    match_ptr, stride_mb, stride_mi,  # int [B, Na]: position in the dst list of each candidate's match
    chosen_ptr, stride_cb, stride_ci,  # int [B, Na]: >= 0 where the candidate is merged
    li_ptr, stride_lb, stride_ln,  # int [B, N]: current li (dummy unless HAS_LI)
    num_tokens, num_rows, num_windows,  # N, M, G
    HAS_LI: tl.constexpr,  # li is given (else counted from 0)
    PRUNE: tl.constexpr,  # prune mode: representatives are independent too
    WRITE_LI: tl.constexpr,  # write li_next
    BLOCK: tl.constexpr,  # tokens per step
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    n = num_tokens
    num_cand = num_tokens - num_windows
    n_row = b * n
    scr = scratch_ptr + b * 6 * n
    rep_s, low_s, size_s, cursor_s, heads_s, start_s = scr, scr + n, scr + 2 * n, scr + 3 * n, scr + 4 * n, scr + 5 * n

    # Phase 0: every token alone.
    for start in range(0, n, BLOCK):
        t = start + offs
        mask = t < n
        tl.store(rep_s + t, t, mask=mask)
        tl.store(low_s + t, t, mask=mask)
        tl.store(size_s + t, tl.full([BLOCK], 1, tl.int32), mask=mask)
        tl.store(cursor_s + t, tl.zeros([BLOCK], tl.int32), mask=mask)
        tl.store(blend_ptr + n_row + t, tl.zeros([BLOCK], tl.int1), mask=mask)
    tl.debug_barrier()

    # Phase 1: chosen candidates join their dst; dsts and merged candidates blend.
    for start in range(0, num_cand, BLOCK):
        i = start + offs
        mask = i < num_cand
        chosen = tl.load(chosen_ptr + b * stride_cb + i.to(tl.int64) * stride_ci, mask=mask, other=-1) >= 0
        cmask = mask & chosen
        cand = tl.load(cand_ptr + b * num_cand + i, mask=cmask, other=0)
        j = tl.load(match_ptr + b * stride_mb + i.to(tl.int64) * stride_mi, mask=cmask, other=0)
        d = tl.load(dst_token_ptr + b * num_windows + j, mask=cmask, other=0)
        tl.store(rep_s + cand, d, mask=cmask)
        tl.atomic_min(low_s + d, cand, mask=cmask)
        tl.atomic_add(size_s + d, tl.full([BLOCK], 1, tl.int32), mask=cmask)
        tl.store(blend_ptr + n_row + cand, tl.full([BLOCK], 1, tl.int1), mask=cmask)
    for start in range(0, num_windows, BLOCK):
        g = start + offs
        mask = g < num_windows
        d = tl.load(dst_token_ptr + b * num_windows + g, mask=mask, other=0)
        tl.store(blend_ptr + n_row + d, tl.full([BLOCK], 1, tl.int1), mask=mask)
    tl.debug_barrier()

    # Phase 2: rows are ordered by their lowest member (the head): prefix sums over heads.
    carry_h = tl.zeros([1], dtype=tl.int32)
    carry_f = tl.zeros([1], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        t = start + offs
        mask = t < n
        rep = tl.load(rep_s + t, mask=mask, other=0)
        low = tl.load(low_s + rep, mask=mask, other=0)
        is_head = mask & (low == t)
        size = tl.where(is_head, tl.load(size_s + rep, mask=mask, other=0), 0)
        h = is_head.to(tl.int32)
        tl.store(heads_s + t, tl.cumsum(h, axis=0) - h + carry_h, mask=mask)
        tl.store(start_s + t, tl.cumsum(size, axis=0) - size + carry_f, mask=mask)
        carry_h += tl.sum(h, axis=0)
        carry_f += tl.sum(size, axis=0)
    tl.debug_barrier()

    # Phase 3: rows, row starts, representatives and the next li; members by a per-row cursor.
    for start in range(0, n, BLOCK):
        t = start + offs
        mask = t < n
        rep = tl.load(rep_s + t, mask=mask, other=0)
        low = tl.load(low_s + rep, mask=mask, other=0)
        row = tl.load(heads_s + low, mask=mask, other=0)
        first = tl.load(start_s + low, mask=mask, other=0)
        tl.store(row_ptr + n_row + t, row, mask=mask)
        is_head = mask & (low == t)
        tl.store(row_start_ptr + b * (num_rows + 1) + row, first, mask=is_head)
        tl.store(rep_ptr + b * num_rows + row, rep, mask=is_head)
        if WRITE_LI:  # mean mode: a dst counts as merged even when no candidate joined it
            blend = tl.load(blend_ptr + n_row + t, mask=mask, other=0) != 0
            li_next = _next_li(li_ptr, b, stride_lb, stride_ln, t, mask, blend, rep, HAS_LI, PRUNE, BLOCK)
            tl.store(li_out_ptr + n_row + t, li_next, mask=mask)
        # Slot: row start + members of the same row in earlier blocks (cursor) + earlier in this block.
        same = (rep[:, None] == rep[None, :]) & (offs[None, :] < offs[:, None]) & mask[None, :]
        earlier = tl.sum(same.to(tl.int32), axis=1)
        cursor = tl.load(cursor_s + rep, mask=mask, other=0)
        tl.store(members_ptr + n_row + first + cursor + earlier, t, mask=mask)
        tl.debug_barrier()
        tl.atomic_add(cursor_s + rep, tl.full([BLOCK], 1, tl.int32), mask=mask)
        tl.debug_barrier()
    last = offs == 0
    tl.store(row_start_ptr + b * (num_rows + 1) + num_rows + offs * 0, num_tokens + offs * 0, mask=last)


def _block(num_tokens: int, interpret: bool, cap: int) -> int:
    return max(16, min(cap, next_power_of_2(max(num_tokens, 1))))


def _li_target(li_out, batch, num_tokens, device):
    """``li_out``: a caller's int32 ``[B, N]`` buffer for the next li (contiguous; it may be the
    current ``li`` itself: each token's counter is read and written by the same lane)."""
    if li_out is None:
        return None
    if li_out.dtype != torch.int32 or li_out.shape != (batch, num_tokens) or not li_out.is_contiguous() \
            or li_out.device != device:
        raise ValueError(f"li_out must be a contiguous int32 [{batch}, {num_tokens}] tensor on {device}, got "
                         f"{li_out.dtype} {list(li_out.shape)} on {li_out.device}")
    return li_out


def _plan_outputs(batch, num_tokens, num_rows, device, write_li, li_out=None):
    row = torch.empty(batch, num_tokens, dtype=torch.int32, device=device)
    members = torch.empty(batch, num_tokens, dtype=torch.int32, device=device)
    row_start = torch.empty(batch, num_rows + 1, dtype=torch.int32, device=device)
    rep = torch.empty(batch, num_rows, dtype=torch.int32, device=device)
    blend = torch.empty(batch, num_tokens, dtype=torch.bool, device=device)
    li_next = None
    if write_li:
        li_next = _li_target(li_out, batch, num_tokens, device)
        if li_next is None:
            li_next = torch.empty(batch, num_tokens, dtype=torch.int32, device=device)
    return row, members, row_start, rep, blend, li_next


def _li_strides(li):
    # li is read with its strides ([B, N] views of a caller's buffer are fine)
    strides = li.stride()
    return strides[0], strides[-1]


def ssm_plan(rank, dst_pos, grid, window, num_rows, li=None, prune=False, write_li=True, li_out=None, work=None):
    """``(row_of_token, members, row_start, rep_token, blend, li_next or None)`` from the window
    ranks ``[B, G]`` of ``topk_rank`` and the dst positions ``[B, R]`` of the selected windows
    (None: position 0). ``grid`` ``(H, W)`` or ``(T, H, W)``, ``window`` of the same length.
    ``li_out``: write the next li there (in place, e.g. into ``li`` itself) instead of a new tensor.
    ``work``: the kernel's scratch from there (``scores.work_buffer``)."""
    batch = rank.shape[0]
    (depth, height, width), (win_t, win_h, win_w) = grid_3d(grid, window)
    num_tokens = depth * height * width
    device = rank.device
    outs = _plan_outputs(batch, num_tokens, num_rows, device, write_li, li_out)
    if batch == 0 or num_tokens == 0:
        return outs
    scratch = work_buffer(work, "ssm_scratch", (batch, 2, num_tokens), torch.int32, device)
    has_dst = dst_pos is not None and dst_pos.numel() > 0  # nothing to read when nothing is selected
    dst = dst_pos if has_dst else rank
    li_arg = li if li is not None else scratch
    _ssm_plan_kernel.run(
        *outs[:5], outs[5] if write_li else scratch, scratch,
        rank, *rank.stride(),
        dst, *dst.stride(),
        li_arg, *_li_strides(li_arg),
        num_tokens, num_rows,
        height, width,
        depth // win_t, height // win_h, width // win_w,
        WIN_T=win_t, WIN_H=win_h, WIN_W=win_w, HAS_T=depth > 1, HAS_DST=has_dst, HAS_LI=li is not None,
        PRUNE=bool(prune), WRITE_LI=bool(write_li), BLOCK=_block(num_tokens, _interpreting(rank), 1024), num_warps=4,
        grid=(batch,), warmup=False,
    )
    return outs


def bipartite_lists(grid, window, batch, device, li=None, dst_pos=None, work=None):
    """``(dst_token [B, G], cand_token [B, N - G])`` int32: the dst of every window from ``li``
    (first argmax), else from ``dst_pos`` (``[B, G]``, or ``[G]`` shared by the batch), else 0.
    ``grid`` ``(H, W)`` or ``(T, H, W)``, ``window`` of the same length. ``work``: see
    ``scores.work_buffer`` (the results are then reused buffers)."""
    (depth, height, width), (win_t, win_h, win_w) = grid_3d(grid, window)
    num_tokens = depth * height * width
    win_slices, win_rows, win_cols = depth // win_t, height // win_h, width // win_w
    num_windows = win_slices * win_rows * win_cols
    dst_token = work_buffer(work, "dst_token", (batch, num_windows), torch.int32, device)
    cand_token = work_buffer(work, "cand_token", (batch, num_tokens - num_windows), torch.int32, device)
    if batch == 0 or num_tokens == 0:
        return dst_token, cand_token
    li_arg = li if li is not None else dst_token
    pos = dst_pos if dst_pos is not None else dst_token
    pos_strides = (0, pos.stride(0)) if pos.dim() == 1 else (pos.stride(0), pos.stride(1))
    _bipartite_lists_kernel.run(
        dst_token, cand_token,
        li_arg, *_li_strides(li_arg),
        pos, *pos_strides,
        num_tokens,
        height, width,
        win_slices, win_rows, win_cols,
        WIN_T=win_t, WIN_H=win_h, WIN_W=win_w, HAS_T=depth > 1, HAS_LI=li is not None, HAS_POS=dst_pos is not None,
        BLOCK=_block(num_tokens, _interpreting(dst_token), 1024), num_warps=4, grid=(batch,), warmup=False,
    )
    return dst_token, cand_token


def bipartite_plan(cand_token, dst_token, match, chosen_rank, num_tokens, num_rows, li=None, prune=False,
                   write_li=True, li_out=None, work=None):
    """``(row_of_token, members, row_start, rep_token, blend, li_next or None)``: the candidates
    with ``chosen_rank >= 0`` join the dst ``dst_token[match]``; everything else stays alone.
    ``li_out`` and ``work`` as for ``ssm_plan``."""
    batch = cand_token.shape[0]
    device = cand_token.device
    outs = _plan_outputs(batch, num_tokens, num_rows, device, write_li, li_out)
    if batch == 0 or num_tokens == 0:
        return outs
    scratch = work_buffer(work, "bipartite_scratch", (batch, 6, num_tokens), torch.int32, device)
    li_arg = li if li is not None else scratch
    block = _block(num_tokens, _interpreting(cand_token), 128)  # the in-block rank compares BLOCK x BLOCK pairs
    _bipartite_plan_kernel.run(
        *outs[:5], outs[5] if write_li else scratch, scratch,
        cand_token, dst_token,
        match, *match.stride(),
        chosen_rank, *chosen_rank.stride(),
        li_arg, *_li_strides(li_arg),
        num_tokens, num_rows, dst_token.shape[1],
        HAS_LI=li is not None, PRUNE=bool(prune), WRITE_LI=bool(write_li), BLOCK=block, num_warps=4,
        grid=(batch,), warmup=False,
    )
    return outs
