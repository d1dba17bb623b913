"""SSM window scores: per-window cosine Gram mean plus the ``a_s`` frequency bonus.

Equivalent PyTorch (``reference.similarity.window_scores``)::

    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    gram = unit[:, window_tokens] @ unit[:, window_tokens].transpose(-1, -2)   # [B, G, K, K]
    sim = gram.mean((-2, -1))                    # "released"; "paper": off-diagonal mean
    score = sim + a_s * (li / (li.mean(1) + 1e-6))[:, window_tokens].mean(-1)

Grids are ``(H, W)`` or ``(T, H, W)`` (token ``(t*H + i)*W + j``, windows ``(wt, wh, ww)`` in
window-raster order, ``reference.windows``); a 2-D grid launches the 2-D specialisation
(``HAS_T=False``), the same code as before 3-D grids existed.

The kernel never builds the Gram matrix: ``sum_{p,q} cos(t_p, t_q) = ||sum_p t_p / ||t_p|| ||^2``.
Pass 1 over C accumulates the squared norms of the K tokens of each window, pass 2 the
squared norm of the sum of the normalised tokens (the second read mostly hits L2).
"""
import functools
import os

import torch
import triton
import triton.language as tl

from ..reference.windows import grid_3d

COSINE_EPS = 1e-6
PRIORITY_EPS = 1e-6


@triton.jit
def _window_scores_kernel(
    out_ptr,  # float32 [B, G] window scores
    stride_ob, stride_og,  # strides of out
    x_ptr,  # [B, N, C] metric (fp32/fp16/bf16), unit stride in C not assumed
    stride_xb, stride_xn, stride_xc,  # strides of x
    li_ptr,  # [B, N] integer frequency counter (dummy when HAS_LI is False)
    stride_lb, stride_ln,  # strides of li
    num_tokens, num_windows, channels,  # N, G, C
    grid_h, grid_w,  # H, W: token grid height (read only when HAS_T) and width
    win_rows, win_cols,  # gh, gw: window grid height (read only when HAS_T) and width
    a_s,  # weight of the frequency bonus
    WIN_T: tl.constexpr,  # window depth wt in frames (1 when not HAS_T)
    WIN_H: tl.constexpr,  # window height wh
    WIN_W: tl.constexpr,  # window width ww
    HAS_T: tl.constexpr,  # the grid has a frame axis (T > 1): 3-D window arithmetic
    HAS_LI: tl.constexpr,  # add a_s * window-averaged priority
    PAPER: tl.constexpr,  # off-diagonal mean instead of the full Gram mean
    BLOCK_G: tl.constexpr,  # windows per program
    BLOCK_K: tl.constexpr,  # next power of two >= K
    BLOCK_C: tl.constexpr,  # channels per step
    BLOCK_N: tl.constexpr,  # li entries per step of the row mean
):
    pid_g = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    K: tl.constexpr = WIN_T * WIN_H * WIN_W

    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)  # [BG]
    p = tl.arange(0, BLOCK_K)  # [BK]
    if HAS_T:  # g = (gt * gh + gi) * gw + gj, p = (dt * wh + di) * ww + dj
        slice_windows = win_rows * win_cols
        in_slice = g % slice_windows
        frame = (g // slice_windows)[:, None] * WIN_T + (p // (WIN_H * WIN_W))[None, :]
        row = (in_slice // win_cols)[:, None] * WIN_H + ((p // WIN_W) % WIN_H)[None, :]
        col = (in_slice % win_cols)[:, None] * WIN_W + (p % WIN_W)[None, :]
        token = ((frame * grid_h + row) * grid_w + col).to(tl.int64)  # [BG, BK]
    else:
        row = (g // win_cols)[:, None] * WIN_H + (p // WIN_W)[None, :]
        col = (g % win_cols)[:, None] * WIN_W + (p % WIN_W)[None, :]
        token = (row * grid_w + col).to(tl.int64)  # [BG, BK]
    valid = (g < num_windows)[:, None] & (p < K)[None, :]

    row_ptr = x_ptr + pid_b * stride_xb + token * stride_xn  # [BG, BK]
    c_base = tl.arange(0, BLOCK_C)

    # Pass 1: squared norms of every token of the window.
    sq = tl.zeros([BLOCK_G, BLOCK_K], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + c_base
        mask = valid[:, :, None] & (c < channels)[None, None, :]
        v = tl.load(row_ptr[:, :, None] + c.to(tl.int64)[None, None, :] * stride_xc, mask=mask, other=0.0)
        v = v.to(tl.float32)
        sq += tl.sum(v * v, axis=2)
    # Correctly rounded sqrt / division: on a GPU plain `/` and tl.sqrt compile to approximate
    # instructions, and these values decide the selection.
    inv = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(sq), 1e-6))  # reference clamps the norm to COSINE_EPS
    inv = tl.where(valid, inv, 0.0)

    # Pass 2: ||sum_p unit_p||^2 = sum_{p,q} cos(t_p, t_q).
    total = tl.zeros([BLOCK_G], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + c_base
        mask = valid[:, :, None] & (c < channels)[None, None, :]
        v = tl.load(row_ptr[:, :, None] + c.to(tl.int64)[None, None, :] * stride_xc, mask=mask, other=0.0)
        v = v.to(tl.float32)
        s = tl.sum(v * inv[:, :, None], axis=1)  # [BG, BC]
        total += tl.sum(s * s, axis=1)

    if PAPER:
        diagonal = tl.sum(sq * inv * inv, axis=1)  # 1 per non-zero token, 0 for zero tokens
        sim = tl.div_rn(total - diagonal, float(K * (K - 1)))
    else:
        sim = tl.div_rn(total, float(K * K))

    if HAS_LI:
        li = tl.load(li_ptr + pid_b * stride_lb + token * stride_ln, mask=valid, other=0).to(tl.float32)
        # The row mean of li, in every program: O(N) cached loads instead of two more launches.
        li_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        n_base = tl.arange(0, BLOCK_N)
        for n0 in range(0, num_tokens, BLOCK_N):
            n_idx = n0 + n_base
            li_sum += tl.load(li_ptr + pid_b * stride_lb + n_idx.to(tl.int64) * stride_ln, mask=n_idx < num_tokens,
                              other=0).to(tl.float32)
        mean = tl.div_rn(tl.sum(li_sum, axis=0), num_tokens.to(tl.float32))
        prio = tl.div_rn(li, mean + 1e-6)
        sim = sim + a_s * tl.div_rn(tl.sum(prio, axis=1), float(K))

    # A window holding a non-finite token (NaN / inf channel, or a squared norm past the fp32
    # range: sq is then inf or NaN, and NaN < inf is False) scores -inf, as in the reference.
    window_finite = tl.sum((sq < float("inf")).to(tl.int32), axis=1) == BLOCK_K
    sim = tl.where(window_finite, sim, float("-inf"))

    gmask = g < num_windows
    tl.store(out_ptr + pid_b * stride_ob + g.to(tl.int64) * stride_og, sim, mask=gmask)


# Plain-Python forms of ``triton.cdiv`` / ``triton.next_power_of_2``: in triton 3.x those are
# constexpr functions whose host-side call costs ~1.5 us (argument unwrapping) each, and the
# launchers make a dozen of them per block.
cdiv = getattr(triton.cdiv, "fn", triton.cdiv)
next_power_of_2 = getattr(triton.next_power_of_2, "fn", triton.next_power_of_2)


def work_buffer(work, name, shape, dtype, device):
    """``torch.empty(shape, dtype=dtype, device=device)``; with ``work`` (a caller's dict of scratch
    buffers, kept from launch to launch) the buffer of that name and shape made at the first call:
    a temporary that no caller keeps (the block path reuses them from block to block of a
    transformer call; launches on one stream run in order, so a reuse never overlaps a read)."""
    if work is None:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (name, shape)
    buf = work.get(key)
    if buf is None:
        buf = work[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def dot_operands_fp32(dtype: torch.dtype, interpret: bool) -> bool:
    """Whether ``tl.dot`` gets fp32 operands (``DOT_FP32``). On a GPU fp16/bf16 inputs go to the
    tensor cores as they are (products are exact in the fp32 accumulator). The interpreter
    upcasts them, unless ``SDTM_INTERPRET_HALF_DOT=1``: tests set it to execute the
    half-precision branch that GPUs run."""
    if dtype not in (torch.float16, torch.bfloat16):
        return True
    return interpret and os.environ.get("SDTM_INTERPRET_HALF_DOT", "0") != "1"


def _kernels_interpreted() -> bool:
    """Whether this module's kernels were made for the Triton interpreter: ``triton.jit`` decides
    it when the module is imported (``TRITON_INTERPRET=1`` then), so it is read once."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a triton without the interpreter
        return False
    return isinstance(_window_scores_kernel, InterpretedFunction)


INTERPRETED = _kernels_interpreted()


def _interpreting(t: torch.Tensor) -> bool:
    if t.is_cuda:
        return False
    if not INTERPRETED:
        raise RuntimeError(
            "Triton kernels on CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported, or use backend='reference'"
        )
    return True


@functools.lru_cache(maxsize=None)
def window_score_blocks(num_windows: int, window_size: int, channels: int, interpret: bool):
    """(BLOCK_G, BLOCK_K, BLOCK_C, num_warps): a small tile per program on a GPU (many programs,
    [16, K, 64] elements in registers); big tiles in the interpreter (fewer Python steps)."""
    block_k = next_power_of_2(window_size)
    if interpret:
        return (min(64, next_power_of_2(num_windows)), block_k,
                min(128, max(16, next_power_of_2(channels))), 1)  # >= 16: C may be 0
    block_c = min(128, max(16, next_power_of_2(channels)))
    block_g = max(1, min(16, 1024 // (block_k * block_c) * 4))
    return block_g, block_k, block_c, 4


@functools.lru_cache(maxsize=256)
def _scores_setup(batch, num_tokens, channels, grid, window, interpret):
    """Everything a launch needs that follows from the sizes: ``(num_windows, launch grid, the
    size arguments, the constexprs)`` (computed once per shape)."""
    (depth, height, width), (win_t, win_h, win_w) = grid_3d(grid, window)
    win_rows, win_cols = height // win_h, width // win_w
    num_windows = (depth // win_t) * win_rows * win_cols
    block_g, block_k, block_c, num_warps = window_score_blocks(num_windows, win_t * win_h * win_w, channels,
                                                               interpret)
    sizes = (num_tokens, num_windows, channels, height, width, win_rows, win_cols)
    consts = dict(WIN_T=win_t, WIN_H=win_h, WIN_W=win_w, HAS_T=depth > 1, BLOCK_G=block_g, BLOCK_K=block_k,
                  BLOCK_C=block_c, BLOCK_N=min(1024, next_power_of_2(max(num_tokens, 1))), num_warps=num_warps)
    return num_windows, (cdiv(num_windows, block_g), batch), sizes, consts


def window_scores(metric: torch.Tensor, grid, window, li=None, a_s: float = 0.0, paper: bool = False,
                  work=None) -> torch.Tensor:
    """Launch ``_window_scores_kernel``; returns float32 ``[B, G]``.

    ``metric [B, N, C]`` any strides; ``grid`` ``(H, W)`` or ``(T, H, W)`` with ``window`` of the
    same length; ``li`` int ``[B, N]`` or None (no bonus when None). ``work``: see ``work_buffer``
    (the result is then a reused buffer)."""
    batch, num_tokens, channels = metric.shape
    num_windows, launch, sizes, consts = _scores_setup(batch, num_tokens, channels, tuple(grid), tuple(window),
                                                       _interpreting(metric))
    out = work_buffer(work, "scores", (batch, num_windows), torch.float32, metric.device)
    if batch == 0 or num_windows == 0:
        return out
    has_li = li is not None
    if has_li:
        li_arg, (stride_lb, stride_ln) = li, li.stride()
    else:
        li_arg, stride_lb, stride_ln = out, 0, 0
    _window_scores_kernel.run(
        out, num_windows, 1,  # out's strides (a new dense tensor)
        metric, *metric.stride(),
        li_arg, stride_lb, stride_ln,
        *sizes,
        float(a_s),
        HAS_LI=has_li, PAPER=bool(paper), **consts, grid=launch, warmup=False,
    )
    return out
