"""Compression-ratio schedule and the token-count rounding rules of the released code.

The counts depend on the grid only through ``N``, ``K`` (tokens per window) and ``G`` (whole
windows), so 2-D ``(H, W)`` and 3-D ``(T, H, W)`` grids follow the same rules
(``tokens_removed``).
"""
import math

from .windows import num_windows as _num_windows
from .windows import window_size as _window_size

# The released code merges in multiples of 16 tokens (kernel/tile friendly counts).
MERGE_GRANULE = 16


def ratio_schedule(step: int, num_steps: int, ratio: float, deviation: float) -> float:
    """Fraction of tokens to remove at ``step`` (SPEC 3.1).

    ``progress = step / (num_steps - 1)`` (0 when ``num_steps == 1``) and
    ``rho = (ratio - deviation) + 2 * deviation * cos(progress * pi / 2)``: ``ratio + deviation``
    at the first step, ``ratio - deviation`` at the last.
    """
    progress = step / (num_steps - 1) if num_steps > 1 else 0.0
    return (ratio - deviation) + 2.0 * deviation * math.cos(progress * math.pi / 2.0)


def tokens_requested(num_tokens: int, rho: float) -> int:
    """``r_req = floor(N * rho)``, never negative."""
    return max(0, math.floor(num_tokens * rho))


def ssm_windows_to_merge(n_remove: int, window_size: int, num_windows: int) -> int:
    """SSM windows collapsed: ``R = floor(r_req / ((K-1) * 16)) * 16``, clamped to ``G``.

    For 2x2 windows this is the released ``r_req // 48 * 16``; the release crashed for R > G.
    """
    per_granule = (window_size - 1) * MERGE_GRANULE
    return min(max(n_remove, 0) // per_granule * MERGE_GRANULE, num_windows)


def idm_tokens_to_merge(n_remove: int, num_candidates: int) -> int:
    """IDM candidates merged: ``r = floor(min(Na, r_req) / 16) * 16``."""
    return min(num_candidates, max(n_remove, 0)) // MERGE_GRANULE * MERGE_GRANULE


TOKEN_REMOVING_METHODS = ("ssm", "idm", "tome")


def tokens_removed(method: str, n_remove: int, grid, window) -> int:
    """``N - M``: tokens a ``method`` plan removes for ``n_remove`` requested tokens on ``grid``
    (``(H, W)`` or ``(T, H, W)``) with ``window`` of the same length. Shapes only, no tensors.

    ``"ssm"``: ``(K - 1) * ssm_windows_to_merge(n_remove, K, G)``; ``"idm"``:
    ``idm_tokens_to_merge(n_remove, N - G)``; ``"tome"``: ``min(n_remove, N - G)``.
    """
    num_tokens = 1
    for v in grid:
        num_tokens *= v
    size, count = _window_size(window), _num_windows(grid, window)
    if method == "ssm":
        return (size - 1) * ssm_windows_to_merge(n_remove, size, count)
    if method == "idm":
        return idm_tokens_to_merge(n_remove, num_tokens - count)
    if method == "tome":
        return min(max(n_remove, 0), num_tokens - count)
    raise ValueError(f"method must be one of {TOKEN_REMOVING_METHODS}, got {method!r}")
