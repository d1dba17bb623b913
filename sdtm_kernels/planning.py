"""Public plan builders: ``ratio_schedule``, ``plan_ssm``, ``plan_idm``, ``plan_idm_attention``,
``plan_tome``.

They validate arguments, pick the backend and wrap the plan tensors in a ``MergePlan``.
Building a plan reads no tensor values on the host (no ``.item()``): plan sizes follow
from the shapes and ``n_remove``, which are Python ints.
"""
import torch

from ._validation import (
    check_float,
    check_float_tokens,
    check_generator,
    check_grid,
    check_int,
    check_li,
    check_ratio_deviation,
    check_same_device,
    check_tensor,
)
from .backend import resolve_backend
from .ops import _score_library as lib
from .plan import MergePlan
from .reference import attention as ref_attention
from .reference import plans as ref_plans
from .reference import schedule as ref_schedule
from .reference.windows import window_token_index

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


def _common_checks(metric, grid, n_remove, window, li=None, generator=None):
    check_float_tokens("metric", metric)
    grid, window = check_grid(grid, window, metric.shape[1])
    n_remove = check_int("n_remove", n_remove, minimum=0)
    check_li(li, metric)
    check_generator(generator)
    return grid, window, n_remove


def _wrap(tensors: ref_plans.PlanTensors, num_tokens: int) -> MergePlan:
    return MergePlan(
        tensors.row_of_token, tensors.members, tensors.row_start, tensors.rep_token, tensors.blend,
        num_tokens=num_tokens, num_rows=tensors.num_rows,
    )


def plan_ssm(metric, grid, n_remove, *, window=(2, 2), li=None, a_s=0.05, score="released",
             random_dst=False, generator=None, backend=None) -> MergePlan:
    """Structure-stage plan (SSM, SPEC 3.2): collapse the best-scoring windows.

    Plain PyTorch meaning, per batch row::

        score[g] = cos_gram(metric[window g]).mean() + a_s * mean(li[window g]) / (li.mean() + 1e-6)
        R = min(n_remove // ((K - 1) * 16) * 16, G)          # released rounding, clamped
        selected = sort(score, descending, stable)[:R]         # ties: lower window index
        each selected window -> one row (mean of its K tokens); other tokens stay alone

    ``score="paper"`` uses the off-diagonal Gram mean. ``li`` is the ``[B, N]`` frequency
    counter (None: no bonus). ``random_dst`` draws each selected window's dst position
    (``randint(K, (B, R), generator=generator)``), which matters for ``prune`` and ``li``.
    """
    grid, window, n_remove = _common_checks(metric, grid, n_remove, window, li, generator)
    a_s = check_float("a_s", a_s)
    if score not in SCORE_VARIANTS:
        raise ValueError(f"score must be one of {SCORE_VARIANTS}, got {score!r}")
    if resolve_backend(backend, metric.device, "plan_ssm") == "triton":
        return _ssm_triton(metric, grid, n_remove, window, li, a_s, score, bool(random_dst), generator)
    tensors = ref_plans.ssm_plan(metric, grid, n_remove, window=window, li=li, a_s=a_s, score=score,
                                 random_dst=bool(random_dst), generator=generator)
    return _wrap(tensors, metric.shape[1])


def plan_idm(metric, grid, n_remove, *, window=(2, 2), li=None, random_dst=False, generator=None,
             backend=None) -> MergePlan:
    """Detail-stage plan (IDM, the released "FIDM", SPEC 3.3): bipartite merging.

    Plain PyTorch meaning, per batch row::

        dst[g]  = window g's token with the largest li (first max), else random / position 0
        cand    = every other token, ascending (tokens outside whole windows included)
        best, match = (normalize(metric[cand]) @ normalize(metric[dst]).T).max(-1)
        r = min(N - G, n_remove) // 16 * 16
        the r candidates with the largest best (ties: lower token) join their dst's row
    """
    grid, window, n_remove = _common_checks(metric, grid, n_remove, window, li, generator)
    if resolve_backend(backend, metric.device, "plan_idm") == "triton":
        return _idm_triton(metric, grid, n_remove, window, li, bool(random_dst), generator)
    tensors = ref_plans.idm_plan(metric, grid, n_remove, window=window, li=li, random_dst=bool(random_dst),
                                 generator=generator)
    return _wrap(tensors, metric.shape[1])


def plan_idm_attention(metric, grid, n_remove, received, *, a_d=0.05, window=(2, 2), li=None, random_dst=False,
                       generator=None, backend=None) -> MergePlan:
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
    """
    grid, window, n_remove = _common_checks(metric, grid, n_remove, window, li, generator)
    check_tensor("received", received, ndim=2)
    if not received.dtype.is_floating_point:
        raise TypeError(f"received must be a floating tensor, got {received.dtype}")
    if tuple(received.shape) != tuple(metric.shape[:2]):
        raise ValueError(f"received must have shape [B, N] = {tuple(metric.shape[:2])}, got {tuple(received.shape)}")
    check_same_device("received", received, "metric", metric)
    a_d = check_float("a_d", a_d)
    score = ref_attention.idm_attention_score(received, li, a_d)  # elementwise, no host sync
    if resolve_backend(backend, metric.device, "plan_idm") == "triton":
        return _idm_triton(metric, grid, n_remove, window, li, bool(random_dst), generator, cand_score=score)
    tensors = ref_plans.idm_plan(metric, grid, n_remove, window=window, li=li, random_dst=bool(random_dst),
                                 generator=generator, cand_score=score)
    return _wrap(tensors, metric.shape[1])


def plan_tome(metric, grid, n_remove, *, window=(2, 2), random_dst=True, generator=None,
              backend=None) -> MergePlan:
    """ToMe baseline plan (tomesd style) for comparison.

    Like ``plan_idm`` but the dst position of each window is drawn once and shared by the
    whole batch (``randint(K, (G,))``, or 0 without randomness) and exactly
    ``min(n_remove, N - G)`` tokens are merged (no rounding to 16). Plain PyTorch meaning::

        dst[g]  = window g's token at position randint(K, (G,))[g] (0 without randomness), all rows
        best, match = (normalize(metric[cand]) @ normalize(metric[dst]).T).max(-1)
        the min(n_remove, N - G) candidates with the largest best (ties: lower token) join their dst
    """
    grid, window, n_remove = _common_checks(metric, grid, n_remove, window, None, generator)
    if resolve_backend(backend, metric.device, "plan_tome") == "triton":
        return _tome_triton(metric, grid, n_remove, window, bool(random_dst), generator)
    tensors = ref_plans.tome_plan(metric, grid, n_remove, window=window, random_dst=bool(random_dst),
                                  generator=generator)
    return _wrap(tensors, metric.shape[1])


# -- Triton path -------------------------------------------------------------------------------
# Same decisions as reference/plans.py, with the sorts replaced: top-k by radix select
# (ops.topk_rank), the candidate list and the plan tensors by prefix sums and scatters. The
# random draws are the reference's, in the same shapes and order, so a seeded generator gives
# the same plan on both backends. Nothing reads tensor values on the host.

def _plan(metric, rep_of_token, num_rows, blend, rank_in_row=None) -> MergePlan:
    row_of_token, members, row_start, rep_token = lib.assemble_plan(rep_of_token, num_rows, rank_in_row, "triton")
    return MergePlan(row_of_token, members, row_start, rep_token, blend,
                     num_tokens=metric.shape[1], num_rows=num_rows)


def _ssm_triton(metric, grid, n_remove, window, li, a_s, score, random_dst, generator) -> MergePlan:
    batch, num_tokens, _ = metric.shape
    device = metric.device
    tokens = window_token_index(grid, window, device=device)  # [G, K]
    num_windows, window_size = tokens.shape
    num_selected = ref_schedule.ssm_windows_to_merge(n_remove, window_size, num_windows)
    scores = lib.window_scores(metric, li if a_s != 0.0 else None, grid[0], grid[1], window[0], window[1],
                               a_s, score == "paper", "triton")
    rank = lib.topk_rank(scores, num_selected, "triton").long()  # [B, G]: k-th selected in window order
    selected = rank >= 0
    dst_pos = ref_plans.draw_positions((batch, num_selected), window_size, random_dst, generator, device)
    if num_selected > 0:  # the k-th draw goes to the k-th selected window
        window_dst = dst_pos.gather(1, rank.clamp_min(0))
    else:
        window_dst = torch.zeros(batch, num_windows, dtype=torch.long, device=device)
    window_tokens = tokens.expand(batch, -1, -1)  # [B, G, K]
    dst_token = window_tokens.gather(2, window_dst.unsqueeze(-1))  # [B, G, 1]
    in_selected = selected.unsqueeze(-1).expand(-1, -1, window_size)
    flat_tokens = window_tokens.reshape(batch, -1)
    rep_of_token = torch.arange(num_tokens, device=device).repeat(batch, 1)
    rep_of_token.scatter_(1, flat_tokens, torch.where(in_selected, dst_token, window_tokens).reshape(batch, -1))
    blend = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    blend.scatter_(1, flat_tokens, in_selected.reshape(batch, -1))
    # Members of a window ascend with the position p, so p is the rank inside the row.
    position = torch.arange(window_size, device=device).expand(batch, num_windows, -1)
    rank_in_row = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
    rank_in_row.scatter_(1, flat_tokens, torch.where(in_selected, position, 0).reshape(batch, -1))
    num_rows = num_tokens - (window_size - 1) * num_selected
    return _plan(metric, rep_of_token, num_rows, blend, rank_in_row)


def _bipartite_triton(metric, window_tokens, dst_pos, num_merged, cand_score=None) -> MergePlan:
    batch, num_tokens, _ = metric.shape
    device = metric.device
    num_windows = window_tokens.shape[0]
    num_cand = num_tokens - num_windows
    dst_token = window_tokens.expand(batch, -1, -1).gather(2, dst_pos.unsqueeze(-1)).squeeze(-1)  # [B, G]
    is_dst = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    is_dst.scatter_(1, dst_token, True)
    token = torch.arange(num_tokens, device=device).expand(batch, num_tokens)
    # Candidates in ascending token order: the slot of a non-dst is the count of non-dsts before it;
    # dsts write to a spare slot that is cut off.
    slot = torch.cumsum((~is_dst).long(), dim=1) - 1
    cand_token = torch.zeros(batch, num_cand + 1, dtype=torch.long, device=device)
    cand_token.scatter_(1, torch.where(is_dst, num_cand, slot), token)
    cand_token = cand_token[:, :num_cand]

    best, match = lib.bipartite_match(metric, cand_token, dst_token, "triton")
    rank_score = best if cand_score is None else cand_score.to(torch.float32).gather(1, cand_token)
    chosen = lib.topk_rank(rank_score.contiguous(), num_merged, "triton") >= 0  # [B, Na]
    merged_into = dst_token.gather(1, match.long())
    target = torch.where(chosen, cand_token, num_tokens)  # unchosen -> spare slot
    rep_of_token = torch.arange(num_tokens + 1, device=device).repeat(batch, 1)
    rep_of_token.scatter_(1, target, merged_into)
    blend = torch.zeros(batch, num_tokens + 1, dtype=torch.bool, device=device)
    blend.scatter_(1, target, True)
    blend = blend[:, :num_tokens] | is_dst
    return _plan(metric, rep_of_token[:, :num_tokens], num_tokens - num_merged, blend)


def _idm_triton(metric, grid, n_remove, window, li, random_dst, generator, cand_score=None) -> MergePlan:
    batch, num_tokens, _ = metric.shape
    device = metric.device
    tokens = window_token_index(grid, window, device=device)
    num_windows, window_size = tokens.shape
    if li is not None:
        dst_pos = li[:, tokens].argmax(dim=-1)  # first maximum
    else:
        dst_pos = ref_plans.draw_positions((batch, num_windows), window_size, random_dst, generator, device)
    num_merged = ref_schedule.idm_tokens_to_merge(n_remove, num_tokens - num_windows)
    return _bipartite_triton(metric, tokens, dst_pos, num_merged, cand_score)


def _tome_triton(metric, grid, n_remove, window, random_dst, generator) -> MergePlan:
    batch, num_tokens, _ = metric.shape
    device = metric.device
    tokens = window_token_index(grid, window, device=device)
    num_windows, window_size = tokens.shape
    dst_pos = ref_plans.draw_positions((num_windows,), window_size, random_dst, generator, device)
    num_merged = min(n_remove, num_tokens - num_windows)
    return _bipartite_triton(metric, tokens, dst_pos.expand(batch, -1), num_merged)
