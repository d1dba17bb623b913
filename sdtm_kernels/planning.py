"""Public plan builders: ``ratio_schedule``, ``plan_ssm``, ``plan_idm``, ``plan_idm_attention``,
``plan_tome``.

They validate arguments, pick the backend and wrap the plan tensors in a ``MergePlan``.
Building a plan reads no tensor values on the host (no ``.item()``): plan sizes follow
from the shapes and ``n_remove``, which are Python ints.

Grids: ``grid=(H, W)`` with ``window=(wh, ww)`` (an image), or ``grid=(T, H, W)`` with
``window=(wt, wh, ww)`` (frames, e.g. video latents; token ``(t*H + i)*W + j``, windows in
window-raster order, ``(1, 2, 2)``: 2x2 windows in each frame, ``(2, 2, 2)``: across two
frames). Same rounding, tie and blend rules; ``(1, H, W)`` with ``(1, wh, ww)`` is exactly
``(H, W)`` with ``(wh, ww)`` (docs/SEMANTICS.md, "3-D token grids").

Non-finite metrics (docs/SEMANTICS.md): a token with a NaN or an infinity in any channel is
never preferred for merging. Its cosine with every token is treated as ``-inf``, so an SSM
window that holds one scores ``-inf``, and in IDM / ToMe such a candidate's best similarity
is ``-inf`` and such a dst is never a candidate's match unless every dst is (then the first
dst). The merge counts are fixed by the shapes, so these tokens are merged only when there
are not enough finite ones; both backends decide identically (inside the score and match
kernels, no extra launch).
"""
import torch

from ._validation import (
    check_bool,
    check_choice,
    check_float,
    check_float_tokens,
    check_generator,
    check_grid,
    check_int,
    check_li,
    check_ratio_deviation,
    check_same_device,
    check_tensor,
    debug_enabled,
)
from .backend import resolve_backend
from .ops import _plan_library as plan_lib
from .ops import _score_library as lib
from .ops._plan_library import triton_call
from .plan import MergePlan
from .reference import attention as ref_attention
from .reference import merge as ref_merge
from .reference import plans as ref_plans
from .reference import schedule as ref_schedule
from .reference.windows import grid_3d, num_windows as count_windows, window_size as count_window_tokens

SCORE_VARIANTS = ("released", "paper")


def ratio_schedule(step: int, num_steps: int, ratio: float, deviation: float) -> float:
    """Fraction of image tokens to remove at ``step`` (SPEC 3.1).

    Equivalent to ``(ratio - deviation) + 2 * deviation * cos(step / (num_steps - 1) * pi / 2)``
    (progress 0 when ``num_steps == 1``). ``ratio - deviation`` must be >= 0 and
    ``ratio + deviation`` < 1 so that every step's fraction lies in [0, 1).
    Multiply by N and floor for ``n_remove``.
    """
    num_steps = check_int("num_steps", num_steps, minimum=1)
    step = check_int("step", step, minimum=0)
    if step >= num_steps:
        raise ValueError(f"step must be < num_steps={num_steps}, got {step}")
    ratio, deviation = check_ratio_deviation(ratio, deviation)
    return ref_schedule.ratio_schedule(step, num_steps, ratio, deviation)


def _check_draw(dst_draw, metric, columns):
    """``dst_draw``: positions drawn beforehand, an integer ``[B, >= columns]`` tensor (or None)."""
    if dst_draw is None:
        return None
    check_tensor("dst_draw", dst_draw, ndim=2)
    if dst_draw.dtype.is_floating_point or dst_draw.dtype == torch.bool or dst_draw.is_complex():
        raise TypeError(f"dst_draw must be an integer tensor, got {dst_draw.dtype}")
    if dst_draw.shape[0] != metric.shape[0] or dst_draw.shape[1] < columns:
        raise ValueError(f"dst_draw must have shape [B={metric.shape[0]}, >= {columns}], got {list(dst_draw.shape)}")
    check_same_device("dst_draw", dst_draw, "metric", metric)
    return dst_draw[:, :columns]


def _common_checks(metric, grid, n_remove, window, li=None, generator=None, random_dst=False):
    check_float_tokens("metric", metric)
    grid, window = check_grid(grid, window, metric.shape[1])
    n_remove = check_int("n_remove", n_remove, minimum=0)
    check_li(li, metric)
    check_generator(generator)
    check_bool("random_dst", random_dst)
    return grid, window, n_remove


LI_MODES = ("mean", "prune")


def _check_built() -> bool:
    """Content checks of a plan the package built: only in debug mode (the builders are tested;
    checking every plan would make CPU timings mean something else than GPU timings)."""
    return debug_enabled() and not torch.compiler.is_compiling()


def _wrap(tensors: ref_plans.PlanTensors, num_tokens: int, li, li_mode, li_out=None) -> MergePlan:
    plan = MergePlan(
        tensors.row_of_token, tensors.members, tensors.row_start, tensors.rep_token, tensors.blend,
        num_tokens=num_tokens, num_rows=tensors.num_rows, validate=_check_built(),
    )
    plan.li_next = ref_merge.update_li(li, plan.row_of_token, plan.rep_token, plan.blend, li_mode)
    if li_out is not None:
        plan.li_next = li_out.copy_(plan.li_next)
    plan.li_mode = li_mode
    return plan


def _check_li_out(li_out, metric):
    """``li_out``: a contiguous int32 ``[B, N]`` buffer the next li is written into (it may be ``li``)."""
    if li_out is None:
        return None
    check_tensor("li_out", li_out, ndim=2)
    if li_out.dtype != torch.int32:
        raise TypeError(f"li_out must be an int32 tensor, got {li_out.dtype}")
    if tuple(li_out.shape) != tuple(metric.shape[:2]) or not li_out.is_contiguous():
        raise ValueError(f"li_out must be a contiguous [B, N] = {list(metric.shape[:2])} tensor, got "
                         f"{list(li_out.shape)} (contiguous: {li_out.is_contiguous()})")
    check_same_device("li_out", li_out, "metric", metric)
    return li_out


def _ssm_checks(metric, grid, n_remove, window, li, a_s, score, random_dst, generator, li_mode, dst_draw, li_out):
    grid, window, n_remove = _common_checks(metric, grid, n_remove, window, li, generator, random_dst)
    li_out = _check_li_out(li_out, metric)
    a_s = check_float("a_s", a_s)
    if score not in SCORE_VARIANTS:
        raise ValueError(f"score must be one of {SCORE_VARIANTS}, got {score!r}")
    li_mode = check_choice("li_mode", li_mode, LI_MODES)
    dst_draw = _check_draw(dst_draw, metric, ref_schedule.ssm_windows_to_merge(
        n_remove, count_window_tokens(window), count_windows(grid, window)))
    return grid, window, n_remove, li_out, a_s, li_mode, dst_draw


def _idm_checks(metric, grid, n_remove, window, li, random_dst, generator, li_mode, dst_draw, li_out):
    grid, window, n_remove = _common_checks(metric, grid, n_remove, window, li, generator, random_dst)
    li_out = _check_li_out(li_out, metric)
    li_mode = check_choice("li_mode", li_mode, LI_MODES)
    dst_draw = _check_draw(dst_draw, metric, count_windows(grid, window))
    return grid, window, n_remove, li_out, li_mode, dst_draw


def _idm_attention_checks(metric, grid, n_remove, received, a_d, window, li, random_dst, generator, li_mode, dst_draw,
                          li_out):
    grid, window, n_remove = _common_checks(metric, grid, n_remove, window, li, generator, random_dst)
    li_out = _check_li_out(li_out, metric)
    check_tensor("received", received, ndim=2)
    if not received.dtype.is_floating_point:
        raise TypeError(f"received must be a floating tensor, got {received.dtype}")
    if tuple(received.shape) != tuple(metric.shape[:2]):
        raise ValueError(f"received must have shape [B, N] = {tuple(metric.shape[:2])}, got {tuple(received.shape)}")
    check_same_device("received", received, "metric", metric)
    a_d = check_float("a_d", a_d)
    li_mode = check_choice("li_mode", li_mode, LI_MODES)
    dst_draw = _check_draw(dst_draw, metric, count_windows(grid, window))
    return grid, window, n_remove, li_out, li_mode, dst_draw, a_d


def block_planner(kind, metric, grid, n_remove, *, window=(2, 2), li=None, a_s=0.05, a_d=0.05, received=None,
                  random_dst=False, generator=None, backend=None, li_mode="mean", dst_draw=None, li_out=None,
                  work=None):
    """The checks ``plan_ssm`` (``kind="ssm"``), ``plan_idm`` or, with ``received``,
    ``plan_idm_attention`` make on these arguments (the same errors), then a
    ``ops._block_path.BlockPlanner`` that builds such plans for arguments like these (the same
    shapes, dtypes and devices) without checking them again: the block path of ``SDTMState``
    (eager, Triton backend). None when the backend is not Triton (the public planner then runs).
    ``work``: the dict of reused temporaries of the launches (``BlockPlanner``), or None."""
    if kind == "ssm":
        grid, window, n_remove, li_out, a_s, li_mode, dst_draw = _ssm_checks(
            metric, grid, n_remove, window, li, a_s, "released", random_dst, generator, li_mode, dst_draw, li_out)
    elif received is None:
        grid, window, n_remove, li_out, li_mode, dst_draw = _idm_checks(metric, grid, n_remove, window, li, random_dst,
                                                                        generator, li_mode, dst_draw, li_out)
    else:
        grid, window, n_remove, li_out, li_mode, dst_draw, a_d = _idm_attention_checks(
            metric, grid, n_remove, received, a_d, window, li, random_dst, generator, li_mode, dst_draw, li_out)
    if resolve_backend(backend, metric.device, "plan_ssm" if kind == "ssm" else "plan_idm") != "triton":
        return None
    from .ops._block_path import BlockPlanner

    return BlockPlanner(kind, metric.shape[0], metric.shape[1], grid, window, n_remove, li_mode, backend,
                        metric.device, a_s=a_s, a_d=a_d, work=work)


def plan_ssm(metric, grid, n_remove, *, window=(2, 2), li=None, a_s=0.05, score="released",
             random_dst=False, generator=None, backend=None, li_mode="mean", dst_draw=None,
             li_out=None) -> MergePlan:
    """Structure-stage plan (SSM, SPEC 3.2): collapse the best-scoring windows.

    Plain PyTorch meaning, per batch row::

        score[g] = cos_gram(metric[window g]).mean() + a_s * mean(li[window g]) / (li.mean() + 1e-6)
        R = min(n_remove // ((K - 1) * 16) * 16, G)          # released rounding, clamped
        selected = sort(score, descending, stable)[:R]         # ties: lower window index
        each selected window -> one row (mean of its K tokens); other tokens stay alone

    ``score="paper"`` uses the off-diagonal Gram mean. ``li`` is the ``[B, N]`` frequency
    counter (None: no bonus). ``random_dst`` draws each selected window's dst position
    (``randint(K, (B, R), generator=generator)``), which matters for ``prune`` and ``li``.
    ``dst_draw`` (positions drawn beforehand, ``[B, >= R]``; values in ``[0, K)``) replaces the
    draw: the k-th selected window takes column k. ``plan.li_next`` is the next counter,
    ``plan.update_li(li, li_mode)`` (built with the plan), written into ``li_out`` when given (a
    contiguous int32 ``[B, N]`` buffer, e.g. ``li`` itself: updated in place).
    """
    grid, window, n_remove, li_out, a_s, li_mode, dst_draw = _ssm_checks(
        metric, grid, n_remove, window, li, a_s, score, random_dst, generator, li_mode, dst_draw, li_out)
    if resolve_backend(backend, metric.device, "plan_ssm") == "triton":
        return _ssm_triton(metric, grid, n_remove, window, li, a_s, score, random_dst, generator, li_mode, dst_draw,
                           li_out)
    tensors = ref_plans.ssm_plan(metric, grid, n_remove, window=window, li=li, a_s=a_s, score=score,
                                 random_dst=random_dst, generator=generator, dst_draw=dst_draw)
    plan = _wrap(tensors, metric.shape[1], li, li_mode, li_out)
    plan.max_members = count_window_tokens(window)
    return plan


def plan_idm(metric, grid, n_remove, *, window=(2, 2), li=None, random_dst=False, generator=None,
             backend=None, li_mode="mean", dst_draw=None, li_out=None) -> MergePlan:
    """Detail-stage plan (IDM, the released "FIDM", SPEC 3.3): bipartite merging.

    Plain PyTorch meaning, per batch row::

        dst[g]  = window g's token with the largest li (first max), else random / position 0
        cand    = every other token, ascending (tokens outside whole windows included)
        best, match = (normalize(metric[cand]) @ normalize(metric[dst]).T).max(-1)
        r = min(N - G, n_remove) // 16 * 16
        the r candidates with the largest best (ties: lower token) join their dst's row

    ``dst_draw`` (``[B, >= G]``, values in ``[0, K)``) replaces the draw when ``li`` is None.
    ``plan.li_next`` is the next counter, ``plan.update_li(li, li_mode)`` (built with the plan),
    written into ``li_out`` when given (as for ``plan_ssm``).
    """
    grid, window, n_remove, li_out, li_mode, dst_draw = _idm_checks(metric, grid, n_remove, window, li, random_dst,
                                                                    generator, li_mode, dst_draw, li_out)
    if resolve_backend(backend, metric.device, "plan_idm") == "triton":
        return _idm_triton(metric, grid, n_remove, window, li, random_dst, generator, li_mode, dst_draw=dst_draw,
                           li_out=li_out)
    tensors = ref_plans.idm_plan(metric, grid, n_remove, window=window, li=li, random_dst=random_dst,
                                 generator=generator, dst_draw=dst_draw)
    return _wrap(tensors, metric.shape[1], li, li_mode, li_out)


def plan_idm_attention(metric, grid, n_remove, received, *, a_d=0.05, window=(2, 2), li=None, random_dst=False,
                       generator=None, backend=None, li_mode="mean", dst_draw=None, li_out=None) -> MergePlan:
    """The paper's inattentiveness-driven IDM (SPEC 7): ``plan_idm`` with the candidates ranked by
    ``P_x = P_ina + a_d * P_fre`` instead of their best similarity.

    Plain PyTorch meaning, per batch row (``received [B, N]``: attention each image token
    receives from the prompt queries, e.g. ``ops.attention_received``)::

        P_ina = 1 - received / received.max()            # not attended -> 1, most attended -> 0
        P_fre = li / (li.mean() + 1e-6)                    # 0 without li
        P_x   = P_ina + a_d * P_fre
        dst, cand, match as plan_idm (match = most similar dst by cosine)
        r = min(N - G, n_remove) // 16 * 16
        the r candidates with the largest P_x (ties: lower token) join their matched dst's row

    ``li_out`` as for ``plan_ssm``.
    """
    grid, window, n_remove, li_out, li_mode, dst_draw, a_d = _idm_attention_checks(
        metric, grid, n_remove, received, a_d, window, li, random_dst, generator, li_mode, dst_draw, li_out)
    score = ref_attention.idm_attention_score(received, li, a_d)  # elementwise, no host sync
    if resolve_backend(backend, metric.device, "plan_idm") == "triton":
        return _idm_triton(metric, grid, n_remove, window, li, random_dst, generator, li_mode, cand_score=score,
                           dst_draw=dst_draw, li_out=li_out)
    tensors = ref_plans.idm_plan(metric, grid, n_remove, window=window, li=li, random_dst=random_dst,
                                 generator=generator, cand_score=score, dst_draw=dst_draw)
    return _wrap(tensors, metric.shape[1], li, li_mode, li_out)


def plan_tome(metric, grid, n_remove, *, window=(2, 2), random_dst=True, generator=None,
              backend=None, li_mode="mean") -> MergePlan:
    """ToMe baseline plan (tomesd style) for comparison.

    Like ``plan_idm`` but the dst position of each window is drawn once and shared by the
    whole batch (``randint(K, (G,))``, or 0 without randomness) and exactly
    ``min(n_remove, N - G)`` tokens are merged (no rounding to 16). Plain PyTorch meaning::

        dst[g]  = window g's token at position randint(K, (G,))[g] (0 without randomness), all rows
        best, match = (normalize(metric[cand]) @ normalize(metric[dst]).T).max(-1)
        the min(n_remove, N - G) candidates with the largest best (ties: lower token) join their dst
    """
    grid, window, n_remove = _common_checks(metric, grid, n_remove, window, None, generator, random_dst)
    li_mode = check_choice("li_mode", li_mode, LI_MODES)
    if resolve_backend(backend, metric.device, "plan_tome") == "triton":
        return _tome_triton(metric, grid, n_remove, window, random_dst, generator, li_mode)
    tensors = ref_plans.tome_plan(metric, grid, n_remove, window=window, random_dst=random_dst,
                                  generator=generator)
    return _wrap(tensors, metric.shape[1], None, li_mode)


# -- Triton path -------------------------------------------------------------------------------
# Same decisions as reference/plans.py in a few fused launches: window scores (li mean inside),
# top-k by radix select (topk_rank), then one kernel that writes every plan tensor and the next
# li (SSM); for IDM / ToMe one kernel for the dst and candidate lists, the match, the selection
# and one kernel for the plan and li. The random draws are the reference's, in the same shapes
# and order, so a seeded generator gives the same plan on both backends. Nothing reads tensor
# values on the host. In eager mode the launchers are called directly (no custom-op dispatch).

def _scores_launch(metric, li, grid_h, grid_w, win_h, win_w, a_s, paper, backend, grid_t=1, win_t=1):
    from .csrc_triton import scores as kernels

    return kernels.window_scores(metric, (grid_t, grid_h, grid_w), (win_t, win_h, win_w), li=li, a_s=a_s,
                                 paper=paper)


def _match_launch(metric, cand_idx, dst_idx, backend):
    from .csrc_triton import match as kernels

    return kernels.bipartite_match(metric, cand_idx, dst_idx)


def _topk_launch(scores, k, backend):
    from .csrc_triton import select as kernels

    return kernels.topk_rank(scores, k)


def _triton_plan(outs, num_tokens, num_rows, li_mode) -> MergePlan:
    plan = MergePlan(*outs[:5], num_tokens=num_tokens, num_rows=num_rows, validate=_check_built())
    plan.li_next, plan.li_mode = outs[5], li_mode
    return plan


def _ssm_triton(metric, grid, n_remove, window, li, a_s, score, random_dst, generator, li_mode,
                dst_draw=None, li_out=None) -> MergePlan:
    batch, num_tokens, _ = metric.shape
    (grid_t, grid_h, grid_w), (win_t, win_h, win_w) = grid_3d(grid, window)
    window_size = count_window_tokens(window)
    num_selected = ref_schedule.ssm_windows_to_merge(n_remove, window_size, count_windows(grid, window))
    scores = triton_call(lib.window_scores, _scores_launch, metric, li if a_s != 0.0 else None, grid_h, grid_w,
                         win_h, win_w, a_s, score == "paper", "triton", grid_t, win_t)
    rank = triton_call(lib.topk_rank, _topk_launch, scores, num_selected, "triton")  # [B, G]
    dst_pos = dst_draw  # position 0 unless drawn: the k-th draw goes to the k-th selected window
    if dst_pos is None and random_dst:
        dst_pos = ref_plans.draw_positions((batch, num_selected), window_size, True, generator, metric.device)
    num_rows = num_tokens - (window_size - 1) * num_selected
    outs = plan_lib.plan_build_call(plan_lib.ssm_plan_build, plan_lib.ssm_plan_launch,
                                    (rank, dst_pos, li, grid_h, grid_w, win_h, win_w, num_rows, li_mode == "prune",
                                     grid_t, win_t), li_out)
    plan = _triton_plan(outs, num_tokens, num_rows, li_mode)
    plan.max_members = window_size  # rows are whole windows or single tokens
    return plan


def _bipartite_triton(metric, grid, window, li, dst_pos, num_merged, li_mode, cand_score=None,
                      li_out=None) -> MergePlan:
    batch, num_tokens, _ = metric.shape
    (grid_t, grid_h, grid_w), (win_t, win_h, win_w) = grid_3d(grid, window)
    dst_token, cand_token = triton_call(plan_lib.bipartite_lists, plan_lib.bipartite_lists_launch, metric,
                                        li if dst_pos is None else None, dst_pos, batch, grid_h, grid_w,
                                        win_h, win_w, grid_t, win_t)
    best, match = triton_call(lib.bipartite_match, _match_launch, metric, cand_token, dst_token, "triton")
    rank_score = best if cand_score is None else ref_plans.candidate_rank_score(best, cand_score, cand_token)
    chosen = triton_call(lib.topk_rank, _topk_launch, rank_score.contiguous(), num_merged, "triton")
    num_rows = num_tokens - num_merged
    outs = plan_lib.plan_build_call(plan_lib.bipartite_plan_build, plan_lib.bipartite_plan_launch,
                                    (cand_token, dst_token, match, chosen, li, num_tokens, num_rows, li_mode == "prune"),
                                    li_out)
    return _triton_plan(outs, num_tokens, num_rows, li_mode)


def _idm_triton(metric, grid, n_remove, window, li, random_dst, generator, li_mode, cand_score=None,
                dst_draw=None, li_out=None) -> MergePlan:
    batch, num_tokens, _ = metric.shape
    window_size, num_windows = count_window_tokens(window), count_windows(grid, window)
    dst_pos = None if li is not None else dst_draw  # from li (first argmax) when given, else drawn, else 0
    if dst_pos is None and li is None and random_dst:
        dst_pos = ref_plans.draw_positions((batch, num_windows), window_size, True, generator, metric.device)
    num_merged = ref_schedule.idm_tokens_to_merge(n_remove, num_tokens - num_windows)
    return _bipartite_triton(metric, grid, window, li, dst_pos, num_merged, li_mode, cand_score, li_out)


def _tome_triton(metric, grid, n_remove, window, random_dst, generator, li_mode) -> MergePlan:
    num_tokens = metric.shape[1]
    window_size, num_windows = count_window_tokens(window), count_windows(grid, window)
    dst_pos = None  # one draw shared by the batch, or position 0
    if random_dst:
        dst_pos = ref_plans.draw_positions((num_windows,), window_size, True, generator, metric.device)
    num_merged = min(n_remove, num_tokens - num_windows)
    return _bipartite_triton(metric, grid, window, None, dst_pos, num_merged, li_mode)
