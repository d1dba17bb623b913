"""``torch.library`` registration of the scoring and selection ops (namespace ``sdtm``).

Every op takes an already resolved ``backend`` (``"reference"`` or ``"triton"``); the public
wrappers in ``ops/scores.py`` and ``planning.py`` validate and resolve it. Triton is imported
inside the ``"triton"`` branches only, so ``import sdtm_kernels`` never imports it. Each op has
a fake implementation (shapes only) for ``torch.compile`` and meta tensors.

Grids: ``grid_h, grid_w, win_h, win_w`` plus the optional trailing ``grid_t, win_t`` (frames of
a ``(T, H, W)`` grid and of a ``(wt, wh, ww)`` window; default 1, a 2-D grid).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..reference import plans as ref_plans
from ..reference import similarity as ref_similarity


def _check_backend(backend: str) -> None:
    if backend not in ("reference", "triton"):
        raise ValueError(f"backend must be a resolved backend, 'reference' or 'triton', got {backend!r}")


@torch.library.custom_op("sdtm::window_scores", mutates_args=())
def window_scores(metric: Tensor, li: Optional[Tensor], grid_h: int, grid_w: int, win_h: int, win_w: int,
                  a_s: float, paper: bool, backend: str, grid_t: int = 1, win_t: int = 1) -> Tensor:
    """float32 ``[B, G]``: ``cos_gram(metric[:, window]).mean() + a_s * window_mean(li / mean(li))``
    on the ``(grid_t, grid_h, grid_w)`` grid with ``(win_t, win_h, win_w)`` windows."""
    _check_backend(backend)
    grid, window = (grid_t, grid_h, grid_w), (win_t, win_h, win_w)
    if backend == "triton":
        from ..csrc_triton import scores as kernels

        return kernels.window_scores(metric, grid, window, li=li, a_s=a_s, paper=paper)
    score = "paper" if paper else "released"
    return ref_similarity.window_scores(metric, grid, window, li=li, a_s=a_s, score=score).contiguous()


@window_scores.register_fake
def _(metric, li, grid_h, grid_w, win_h, win_w, a_s, paper, backend, grid_t=1, win_t=1):
    num_windows = (grid_t // win_t) * (grid_h // win_h) * (grid_w // win_w)
    return metric.new_empty((metric.shape[0], num_windows), dtype=torch.float32)


@torch.library.custom_op("sdtm::bipartite_match", mutates_args=())
def bipartite_match(metric: Tensor, cand_idx: Tensor, dst_idx: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """``(best float32, match int32) [B, Na]`` = ``(unit[cand] @ unit[dst].T).max(-1)``, first max on ties."""
    _check_backend(backend)
    if backend == "triton":
        from ..csrc_triton import match as kernels

        return kernels.bipartite_match(metric, cand_idx, dst_idx)
    best, match = ref_similarity.bipartite_match(metric, cand_idx, dst_idx)
    return best.contiguous(), match.contiguous()


@bipartite_match.register_fake
def _(metric, cand_idx, dst_idx, backend):
    shape = (metric.shape[0], cand_idx.shape[1])
    return metric.new_empty(shape, dtype=torch.float32), metric.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("sdtm::topk_rank", mutates_args=())
def topk_rank(scores: Tensor, k: int, backend: str) -> Tensor:
    """int32 ``[B, n]``: for the k largest scores of each row (ties: lower index) their rank
    among the chosen in ascending index order, -1 elsewhere."""
    _check_backend(backend)
    if backend == "triton":
        from ..csrc_triton import select as kernels

        return kernels.topk_rank(scores, k)
    chosen = ref_plans.top_k_lowest_index_first(scores, k)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, chosen, True)
    return torch.where(mask, torch.cumsum(mask.int(), dim=1) - 1, -1).to(torch.int32)


@topk_rank.register_fake
def _(scores, k, backend):
    return scores.new_empty(scores.shape, dtype=torch.int32)
