"""Token <-> window index arithmetic on a raster ``H x W`` token grid (token ``n = i*W + j``)."""
import torch


def window_token_index(grid, window, device=None) -> torch.Tensor:
    """Token indices of every whole window, ``int64 [G, K]``.

    Windows are numbered in raster order over the ``(H // wh) x (W // ww)`` window grid and
    positions inside a window in raster order, so ``out[g, p]`` is the token at row
    ``(g // gw) * wh + p // ww`` and column ``(g % gw) * ww + p % ww``. Tokens in a partial
    window at the bottom or right edge belong to no window (they are never collapsed).
    """
    height, width = grid
    win_h, win_w = window
    rows = torch.arange(height // win_h, device=device).view(-1, 1, 1, 1) * win_h
    cols = torch.arange(width // win_w, device=device).view(1, -1, 1, 1) * win_w
    dr = torch.arange(win_h, device=device).view(1, 1, -1, 1)
    dc = torch.arange(win_w, device=device).view(1, 1, 1, -1)
    tokens = (rows + dr) * width + (cols + dc)
    return tokens.reshape(-1, win_h * win_w)
