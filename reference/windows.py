"""Token <-> window index arithmetic on a raster token grid.

A grid is ``(H, W)`` (an image, token ``n = i*W + j``) or ``(T, H, W)`` (a video or any
stack of frames, token ``n = (t*H + i)*W + j``: frame-major raster order). A window is
``(wh, ww)`` or ``(wt, wh, ww)``, of the grid's length. A 2-D grid is the ``T = 1`` case of a
3-D one: ``(H, W)`` with ``(wh, ww)`` has exactly the windows, numbering and positions of
``(1, H, W)`` with ``(1, wh, ww)``.
"""
import torch


def grid_3d(grid, window):
    """``((T, H, W), (wt, wh, ww))`` as Python ints: a 2-D grid / window gets ``T = wt = 1``.

    ``grid`` and ``window`` must have the same length, 2 or 3 (``ValueError`` otherwise; the
    public API checks them with clearer messages first)."""
    grid, window = tuple(grid), tuple(window)  # plain tuple ops: torch.compile traces them
    if len(grid) != len(window) or len(grid) not in (2, 3):
        raise ValueError(f"grid {grid} and window {window} must both have 2 or both have 3 entries")
    if len(grid) == 2:
        return (1,) + grid, (1,) + window
    return grid, window


def window_grid(grid, window):
    """``(gt, gh, gw) = (T // wt, H // wh, W // ww)``: whole windows along each axis."""
    (t, h, w), (wt, wh, ww) = grid_3d(grid, window)
    return t // wt, h // wh, w // ww


def num_windows(grid, window) -> int:
    """``G``: the number of whole windows, ``prod(grid[d] // window[d])``."""
    slices, rows, cols = window_grid(grid, window)
    return slices * rows * cols


def window_size(window) -> int:
    """``K``: tokens per window, ``prod(window)``."""
    size = 1
    for v in window:
        size *= v
    return size


def window_token_index(grid, window, device=None) -> torch.Tensor:
    """Token indices of every whole window, ``int64 [G, K]``.

    Windows are numbered in raster order over the ``(T // wt) x (H // wh) x (W // ww)`` window
    grid (window-slice major) and positions inside a window in raster order
    (``p = (dt * wh + di) * ww + dj``), so ``out[g, p]`` is the token at frame
    ``gt * wt + dt``, row ``gi * wh + di``, column ``gj * ww + dj`` with
    ``g = (gt * gh + gi) * gw + gj``. For a 2-D grid (``T = wt = 1``) this is row
    ``(g // gw) * wh + p // ww`` and column ``(g % gw) * ww + p % ww``. Tokens in a partial
    window at the end of any axis belong to no window (they are never collapsed).
    """
    (depth, height, width), (win_t, win_h, win_w) = grid_3d(grid, window)
    frames = torch.arange(depth // win_t, device=device).view(-1, 1, 1, 1, 1, 1) * win_t
    rows = torch.arange(height // win_h, device=device).view(1, -1, 1, 1, 1, 1) * win_h
    cols = torch.arange(width // win_w, device=device).view(1, 1, -1, 1, 1, 1) * win_w
    df = torch.arange(win_t, device=device).view(1, 1, 1, -1, 1, 1)
    dr = torch.arange(win_h, device=device).view(1, 1, 1, 1, -1, 1)
    dc = torch.arange(win_w, device=device).view(1, 1, 1, 1, 1, -1)
    tokens = ((frames + df) * height + (rows + dr)) * width + (cols + dc)
    return tokens.reshape(-1, win_t * win_h * win_w)
