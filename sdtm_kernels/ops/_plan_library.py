"""``torch.library`` registration of the fused plan-building ops (``csrc_triton/plan_build.py``)
and the eager fast path shared by every Triton plan step.

``sdtm::ssm_plan_build``, ``sdtm::bipartite_lists`` and ``sdtm::bipartite_plan_build`` run the
Triton kernels (CPU tensors: the interpreter); fake implementations give the shapes for
``torch.compile``. In eager mode ``triton_call`` calls the launcher directly: the custom-op
dispatch costs tens of microseconds of host time per call, more than the kernels themselves
at DiT sizes, and plans need no autograd.

Grids: ``grid_h, grid_w, win_h, win_w`` plus the optional trailing ``grid_t, win_t`` (frames of
a ``(T, H, W)`` grid and of a ``(wt, wh, ww)`` window; default 1, a 2-D grid).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

PlanOut = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def triton_call(op, launcher, *args):
    """``launcher(*args)`` in eager mode, the registered ``op(*args)`` under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return op(*args)
    return launcher(*args)


def _kernels():
    from ..csrc_triton import plan_build  # lazy: import sdtm_kernels does not import triton

    return plan_build


def plan_build_call(op, launcher, args, li_out=None):
    """A plan-build op whose next li goes into ``li_out`` (a caller's static buffer) when given:
    written by the kernel in eager mode, copied from the op's output under ``torch.compile`` (the
    registered ops are functional)."""
    if li_out is None:
        return triton_call(op, launcher, *args)
    if torch.compiler.is_compiling():
        outs = op(*args)
        li_out.copy_(outs[5])
        return (*outs[:5], li_out)
    return launcher(*args, li_out=li_out)


def ssm_plan_launch(rank, dst_pos, li, grid_h, grid_w, win_h, win_w, num_rows, prune, grid_t=1, win_t=1,
                    li_out=None):
    return _kernels().ssm_plan(rank, dst_pos, (grid_t, grid_h, grid_w), (win_t, win_h, win_w), num_rows, li=li,
                               prune=prune, li_out=li_out)


@torch.library.custom_op("sdtm::ssm_plan_build", mutates_args=())
def ssm_plan_build(rank: Tensor, dst_pos: Optional[Tensor], li: Optional[Tensor], grid_h: int, grid_w: int,
                   win_h: int, win_w: int, num_rows: int, prune: bool, grid_t: int = 1, win_t: int = 1) -> PlanOut:
    """``(row_of_token, members, row_start, rep_token, blend, li_next)`` of an SSM plan from the
    window ranks ``[B, G]`` (``topk_rank``) and the selected windows' dst positions ``[B, R]``."""
    return ssm_plan_launch(rank, dst_pos, li, grid_h, grid_w, win_h, win_w, num_rows, prune, grid_t, win_t)


def _fake_plan(like, batch, num_tokens, num_rows):
    new = like.new_empty
    return (new((batch, num_tokens), dtype=torch.int32), new((batch, num_tokens), dtype=torch.int32),
            new((batch, num_rows + 1), dtype=torch.int32), new((batch, num_rows), dtype=torch.int32),
            new((batch, num_tokens), dtype=torch.bool), new((batch, num_tokens), dtype=torch.int32))


@ssm_plan_build.register_fake
def _(rank, dst_pos, li, grid_h, grid_w, win_h, win_w, num_rows, prune, grid_t=1, win_t=1):
    return _fake_plan(rank, rank.shape[0], grid_t * grid_h * grid_w, num_rows)


def bipartite_lists_launch(like, li, dst_pos, batch, grid_h, grid_w, win_h, win_w, grid_t=1, win_t=1):
    return _kernels().bipartite_lists((grid_t, grid_h, grid_w), (win_t, win_h, win_w), batch, like.device, li=li,
                                      dst_pos=dst_pos)


@torch.library.custom_op("sdtm::bipartite_lists", mutates_args=())
def bipartite_lists(like: Tensor, li: Optional[Tensor], dst_pos: Optional[Tensor], batch: int, grid_h: int,
                    grid_w: int, win_h: int, win_w: int, grid_t: int = 1, win_t: int = 1) -> Tuple[Tensor, Tensor]:
    """int32 ``(dst_token [B, G], cand_token [B, N - G])`` on ``like``'s device: each window's dst
    (first ``argmax li``, else ``dst_pos``, else position 0) and the other tokens, ascending."""
    return bipartite_lists_launch(like, li, dst_pos, batch, grid_h, grid_w, win_h, win_w, grid_t, win_t)


@bipartite_lists.register_fake
def _(like, li, dst_pos, batch, grid_h, grid_w, win_h, win_w, grid_t=1, win_t=1):
    num_windows = (grid_t // win_t) * (grid_h // win_h) * (grid_w // win_w)
    return (like.new_empty((batch, num_windows), dtype=torch.int32),
            like.new_empty((batch, grid_t * grid_h * grid_w - num_windows), dtype=torch.int32))


def bipartite_plan_launch(cand_token, dst_token, match, chosen_rank, li, num_tokens, num_rows, prune, li_out=None):
    return _kernels().bipartite_plan(cand_token, dst_token, match, chosen_rank, num_tokens, num_rows, li=li,
                                     prune=prune, li_out=li_out)


@torch.library.custom_op("sdtm::bipartite_plan_build", mutates_args=())
def bipartite_plan_build(cand_token: Tensor, dst_token: Tensor, match: Tensor, chosen_rank: Tensor,
                         li: Optional[Tensor], num_tokens: int, num_rows: int, prune: bool) -> PlanOut:
    """``(row_of_token, members, row_start, rep_token, blend, li_next)`` of an IDM / ToMe plan:
    candidates with ``chosen_rank >= 0`` join ``dst_token[match]``."""
    return bipartite_plan_launch(cand_token, dst_token, match, chosen_rank, li, num_tokens, num_rows, prune)


@bipartite_plan_build.register_fake
def _(cand_token, dst_token, match, chosen_rank, li, num_tokens, num_rows, prune):
    return _fake_plan(cand_token, cand_token.shape[0], num_tokens, num_rows)
