"""Similarity ops: SSM window scores and bipartite cosine matching."""
import torch

from .._validation import (
    check_float,
    check_float_tokens,
    check_grid,
    check_index_values,
    check_li,
    check_same_device,
    check_tensor,
    values_checked,
)
from ..backend import resolve_backend
from ..reference.windows import grid_3d
from . import _score_library as lib

SCORE_VARIANTS = ("released", "paper")


def window_scores(metric, grid, *, window=(2, 2), li=None, a_s=0.0, score="released", backend=None):
    """SSM window scores ``[B, G]`` float32.

    Equivalent to ``cos_gram(metric[:, window_tokens]).mean((-2, -1)) + a_s * li_priority``
    (``score="paper"``: off-diagonal mean). See ``sdtm_kernels.reference.similarity``.
    ``grid`` is ``(H, W)`` or ``(T, H, W)`` (token ``(t*H + i)*W + j``), ``window`` ``(wh, ww)`` or
    ``(wt, wh, ww)`` of the same length; windows in window-raster order.
    """
    check_float_tokens("metric", metric)
    grid, window = check_grid(grid, window, metric.shape[1])
    check_li(li, metric)
    a_s = check_float("a_s", a_s)
    if score not in SCORE_VARIANTS:
        raise ValueError(f"score must be one of {SCORE_VARIANTS}, got {score!r}")
    backend = resolve_backend(backend, metric.device, "window_scores")
    if a_s == 0.0:
        li = None  # no bonus: the kernel skips reading li
    (grid_t, grid_h, grid_w), (win_t, win_h, win_w) = grid_3d(grid, window)
    return lib.window_scores(metric, li, grid_h, grid_w, win_h, win_w, a_s, score == "paper", backend, grid_t, win_t)


def bipartite_match(metric, cand_idx, dst_idx, *, backend=None):
    """Best cosine match of each candidate among the dsts: ``(best float32 [B, Na], match int32 [B, Na])``.

    Equivalent to ``(normalize(metric[cand_idx]) @ normalize(metric[dst_idx]).T).max(-1)``;
    ``match`` is a position in ``dst_idx``, ties going to the lowest position. Pairs with a
    non-finite token score ``-inf`` (docs/SEMANTICS.md). Index values must be in ``[0, N)``:
    checked on CPU tensors and in debug mode (``ValueError``); unchecked, an index outside
    counts as a non-finite token and is never read, on both backends.
    """
    check_float_tokens("metric", metric)
    for name, idx in (("cand_idx", cand_idx), ("dst_idx", dst_idx)):
        check_tensor(name, idx, ndim=2)
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer index tensor, got {idx.dtype}")
        if idx.shape[0] != metric.shape[0]:
            raise ValueError(f"{name} has batch {idx.shape[0]} but metric has B={metric.shape[0]}")
        check_same_device(name, idx, "metric", metric)
    if dst_idx.shape[1] == 0:
        raise ValueError("dst_idx must hold at least one dst per batch row")
    if values_checked(metric):
        for name, idx in (("cand_idx", cand_idx), ("dst_idx", dst_idx)):
            check_index_values(name, idx, metric.shape[1], "N")
    backend = resolve_backend(backend, metric.device, "bipartite_match")
    return lib.bipartite_match(metric, cand_idx, dst_idx, backend)
