"""SSM, IDM and ToMe merge-plan builders (SPEC 3.2, 3.3 and 4), in plain PyTorch.

Every method decides, for each token, which token it is merged into (its representative
``rep_of_token``; itself when it stays alone) plus which tokens take the cache blend;
``assemble_plan`` turns that into the plan tensors of SPEC section 4.

``grid`` / ``window``: ``(H, W)`` / ``(wh, ww)``, or ``(T, H, W)`` / ``(wt, wh, ww)`` for a stack
of frames (``reference.windows``: token ``(t*H + i)*W + j``, windows in window-raster order);
every builder works on the ``[G, K]`` window table, so both are handled by the same code.

Row order (the package's choice): rows are sorted by their lowest member token index, so
singleton rows keep raster order and the order does not depend on which token is the dst.
Members inside a row are in ascending token order.
"""
from typing import NamedTuple, Optional

import torch

from .attention import idm_attention_score
from .schedule import idm_tokens_to_merge, ssm_windows_to_merge
from .similarity import bipartite_match, window_scores
from .windows import window_token_index


class PlanTensors(NamedTuple):
    row_of_token: torch.Tensor  # int32 [B, N]: merged row of each token
    members: torch.Tensor  # int32 [B, N]: tokens grouped by row (CSR column indices)
    row_start: torch.Tensor  # int32 [B, M + 1]: members[row_start[m]:row_start[m+1]] is row m
    rep_token: torch.Tensor  # int32 [B, M]: dst / representative token of each row
    blend: torch.Tensor  # bool [B, N]: tokens that take the cache blend on unmerge
    num_rows: int  # M


def assemble_plan(rep_of_token: torch.Tensor, num_rows: int, blend: torch.Tensor) -> PlanTensors:
    """Plan tensors from ``rep_of_token [B, N]`` (the token each token is merged into).

    Tokens sharing a representative form one row. ``num_rows`` must equal the number of
    distinct representatives; it is a Python int known from the shapes, so nothing here
    reads tensor values on the host.
    """
    batch, num_tokens = rep_of_token.shape
    device = rep_of_token.device
    rep_of_token = rep_of_token.long()
    token = torch.arange(num_tokens, device=device).expand(batch, num_tokens)
    # Lowest member of each group, stored at the group's representative.
    lowest_member = torch.full((batch, num_tokens), num_tokens, device=device, dtype=torch.long)
    lowest_member.scatter_reduce_(1, rep_of_token, token, reduce="amin")
    head_of_token = lowest_member.gather(1, rep_of_token)
    is_head = head_of_token == token
    row_of_head = torch.cumsum(is_head.long(), dim=1) - 1
    row_of_token = row_of_head.gather(1, head_of_token)

    rep_token = torch.zeros(batch, num_rows, device=device, dtype=torch.long)
    rep_token.scatter_(1, row_of_token, rep_of_token)  # every member writes the same value
    counts = torch.zeros(batch, num_rows, device=device, dtype=torch.long)
    counts.scatter_add_(1, row_of_token, torch.ones_like(row_of_token))
    row_start = torch.nn.functional.pad(torch.cumsum(counts, dim=1), (1, 0))
    members = torch.argsort(row_of_token, dim=1, stable=True)
    return PlanTensors(
        row_of_token.to(torch.int32),
        members.to(torch.int32),
        row_start.to(torch.int32),
        rep_token.to(torch.int32),
        blend.to(torch.bool),
        num_rows,
    )


def identity_plan(batch: int, num_tokens: int, device) -> PlanTensors:
    """Every token its own row."""
    token = torch.arange(num_tokens, device=device).expand(batch, num_tokens)
    return assemble_plan(token, num_tokens, torch.zeros(batch, num_tokens, dtype=torch.bool, device=device))


def draw_positions(shape, window_size: int, random_dst: bool, generator: Optional[torch.Generator],
                   device, drawn: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dst position inside a window: ``torch.randint(K, shape, generator=generator)`` or zeros;
    ``drawn`` (positions drawn beforehand, ``[B, >= shape[-1]]``): its first columns instead."""
    if drawn is not None:
        return drawn[..., : shape[-1]].to(device)
    if not random_dst:
        return torch.zeros(shape, dtype=torch.long, device=device)
    draw_device = generator.device if generator is not None else device
    positions = torch.randint(window_size, shape, generator=generator, device=draw_device)
    return positions.to(device)


def candidate_rank_score(best: torch.Tensor, token_score: torch.Tensor, cand_token: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, Na]`` ranking score of the candidates from a per-token score ``[B, N]``:
    ``-inf`` where the candidate has no finite match (a non-finite metric token, or only
    non-finite dsts) or its score is NaN, so such candidates rank last, as with ``best``."""
    score = token_score.to(torch.float32).gather(1, cand_token.long())
    keep = (best > float("-inf")) & ~torch.isnan(score)
    return torch.where(keep, score, float("-inf"))


def top_k_lowest_index_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores per row, ties to the lower index (stable sort)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def ssm_plan(metric, grid, n_remove, window=(2, 2), li=None, a_s=0.05, score="released",
             random_dst=False, generator=None, dst_draw=None) -> PlanTensors:
    """Structure-stage plan (SPEC 3.2): collapse the R best-scoring windows to one row each.

    ``scores = window_scores(...)``; the ``R = ssm_windows_to_merge(n_remove, K, G)`` windows with
    the highest score (ties: lower window index) each become one row. One dst position per
    selected window is drawn as ``randint(K, (B, R))`` (or 0), the k-th draw going to the k-th
    selected window in ascending window order. Blend set: every token of a selected window.
    """
    batch, num_tokens, _ = metric.shape
    device = metric.device
    tokens = window_token_index(grid, window, device=device)  # [G, K]
    num_windows, window_size = tokens.shape
    num_selected = ssm_windows_to_merge(n_remove, window_size, num_windows)
    scores = window_scores(metric, grid, window, li=li, a_s=a_s, score=score)
    selected = torch.sort(top_k_lowest_index_first(scores, num_selected), dim=1).values  # [B, R]
    dst_pos = draw_positions((batch, num_selected), window_size, random_dst, generator, device, dst_draw)

    selected_tokens = tokens[selected]  # [B, R, K]
    dst_token = selected_tokens.gather(2, dst_pos.unsqueeze(-1))  # [B, R, 1]
    rep_of_token = torch.arange(num_tokens, device=device).repeat(batch, 1)
    rep_of_token.scatter_(1, selected_tokens.flatten(1), dst_token.expand_as(selected_tokens).flatten(1))
    blend = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    blend.scatter_(1, selected_tokens.flatten(1), True)
    return assemble_plan(rep_of_token, num_tokens - (window_size - 1) * num_selected, blend)


def _bipartite_plan(metric, window_tokens, dst_pos, num_merged, token_score=None) -> PlanTensors:
    """Shared IDM / ToMe tail: one dst per window, candidates = all other tokens in
    ascending order, each candidate's best dst by cosine, the ``num_merged`` candidates with
    the highest best-similarity (ties: lower token index) merged into their dst.
    ``token_score [B, N]`` (optional) replaces the best-similarity as the ranking score of the
    candidates; the match (each candidate's most similar dst) is unchanged.
    Blend set: every dst token and every merged candidate."""
    batch, num_tokens, _ = metric.shape
    device = metric.device
    num_windows = window_tokens.shape[0]
    dst_token = window_tokens.expand(batch, -1, -1).gather(2, dst_pos.unsqueeze(-1)).squeeze(-1)  # [B, G]
    is_dst = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    is_dst.scatter_(1, dst_token, True)
    # Stable sort puts non-dst tokens first, in ascending token order.
    cand_token = torch.argsort(is_dst.to(torch.int8), dim=1, stable=True)[:, : num_tokens - num_windows]

    best, match = bipartite_match(metric, cand_token, dst_token)
    rank_score = best if token_score is None else candidate_rank_score(best, token_score, cand_token)
    chosen = top_k_lowest_index_first(rank_score, num_merged)  # candidate positions
    merged_token = cand_token.gather(1, chosen)
    merged_into = dst_token.gather(1, match.long().gather(1, chosen))
    rep_of_token = torch.arange(num_tokens, device=device).repeat(batch, 1)
    rep_of_token.scatter_(1, merged_token, merged_into)
    blend = is_dst.clone()
    blend.scatter_(1, merged_token, True)
    return assemble_plan(rep_of_token, num_tokens - num_merged, blend)


def idm_plan(metric, grid, n_remove, window=(2, 2), li=None, random_dst=False, generator=None, dst_draw=None,
             cand_score=None) -> PlanTensors:
    """Detail-stage plan (SPEC 3.3, the released "FIDM").

    dst per window: ``argmax_p li[token(g, p)]`` (first maximum) when ``li`` is given, else a
    ``randint(K, (B, G))`` draw or position 0. ``r = idm_tokens_to_merge(n_remove, N - G)``.
    ``cand_score [B, N]`` (optional) ranks the candidates instead of their best similarity
    (the paper's IDM: ``idm_attention_plan``).
    """
    batch = metric.shape[0]
    device = metric.device
    tokens = window_token_index(grid, window, device=device)
    num_windows, window_size = tokens.shape
    if li is not None:
        dst_pos = li.to(device)[:, tokens].argmax(dim=-1)  # first maximum
    else:
        dst_pos = draw_positions((batch, num_windows), window_size, random_dst, generator, device, dst_draw)
    num_merged = idm_tokens_to_merge(n_remove, metric.shape[1] - num_windows)
    return _bipartite_plan(metric, tokens, dst_pos, num_merged, cand_score)


def idm_attention_plan(metric, grid, n_remove, received, window=(2, 2), li=None, a_d=0.05, random_dst=False,
                       generator=None, dst_draw=None) -> PlanTensors:
    """The paper's inattentiveness-driven IDM (SPEC 7): ``idm_plan`` with the candidates ranked by
    ``P_x = P_ina + a_d * P_fre`` (``reference.attention.idm_attention_score``) instead of their
    best similarity. ``received [B, N]`` is the attention each image token receives from the
    prompt queries. dst choice, ``r`` and the match (most similar dst) are ``idm_plan``'s.
    """
    score = idm_attention_score(received.to(metric.device), li, a_d)
    return idm_plan(metric, grid, n_remove, window=window, li=li, random_dst=random_dst, generator=generator,
                    cand_score=score, dst_draw=dst_draw)


def tome_plan(metric, grid, n_remove, window=(2, 2), random_dst=True, generator=None) -> PlanTensors:
    """ToMe baseline (tomesd style): one random dst position per window, shared by the whole
    batch (a ``randint(K, (G,))`` draw, or 0), the same bipartite matching, and exactly
    ``min(n_remove, N - G)`` tokens merged (no rounding to 16)."""
    batch = metric.shape[0]
    device = metric.device
    tokens = window_token_index(grid, window, device=device)
    num_windows, window_size = tokens.shape
    dst_pos = draw_positions((num_windows,), window_size, random_dst, generator, device).expand(batch, -1)
    num_merged = min(max(n_remove, 0), metric.shape[1] - num_windows)
    return _bipartite_plan(metric, tokens, dst_pos, num_merged)
