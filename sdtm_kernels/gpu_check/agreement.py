"""Step 4: plan agreement between the Triton and reference backends at SD3 size.

Both backends compute the same fp32 cosine scores with a different summation order, so a
decision whose margin is below the rounding error may legitimately go either way. For each
plan tensor the differing entries are counted; each differing *decision* is then explained
(or not) by its margin in the reference scores:

* SSM window selection: margin = |score - threshold|, threshold midway between the k-th and
  (k+1)-th largest window scores;
* IDM matching: margin = gap between a candidate's best and second-best dst similarity;
* IDM selection: margin = |best - threshold| as for SSM.

A difference is "explained" when its margin is at most the rounding threshold
``2 * max |score_triton - score_reference|`` (each side may be off by that much), floored at
``ROUNDING_FLOOR * sqrt(C)``. Unexplained differences point at a kernel bug.
"""
import math

import torch

from .. import plan_idm, plan_ssm
from ..ops import _score_library as lib
from ..ops import bipartite_match, window_scores
from ..reference import similarity as ref_similarity
from ..reference.schedule import idm_tokens_to_merge, ssm_windows_to_merge
from ..reference.windows import window_token_index

PLAN_TENSORS = ("row_of_token", "members", "row_start", "rep_token", "blend")
ROUNDING_FLOOR = 1e-6  # fp32 dot products of unit vectors: error grows like sqrt(C) * eps
REMOVE_FRACTION = 0.5  # the released schedule's first merged steps


def compare_plans(a, b):
    """Differing entries per plan tensor (-1 when the shapes differ, e.g. another row count)."""
    out = {}
    for name in PLAN_TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        out[name] = int((x != y).sum()) if x.shape == y.shape else -1
    return out


def _threshold(scores, k):
    """Per batch row, midway between the k-th and (k+1)-th largest score ([B, 1])."""
    top = scores.topk(min(k + 1, scores.shape[1]), dim=1).values
    if k >= scores.shape[1]:
        return top[:, -1:] - 1.0
    return (top[:, k - 1:k] + top[:, k:k + 1]) / 2


def _explain(differs, margin, rounding):
    margin = margin[differs]
    return {"differing": int(differs.sum()), "explained_by_rounding": int((margin <= rounding).sum()),
            "smallest_margin_of_differing": float(margin.min()) if margin.numel() else None,
            "largest_margin_of_differing": float(margin.max()) if margin.numel() else None}


def _selection(scores_ref, scores_tri, k, rounding):
    chosen_ref = lib.topk_rank(scores_ref.contiguous(), k, "reference") >= 0
    chosen_tri = lib.topk_rank(scores_tri.contiguous(), k, "triton") >= 0
    margin = (scores_ref - _threshold(scores_ref, k)).abs() if k > 0 else torch.zeros_like(scores_ref)
    return _explain(chosen_ref != chosen_tri, margin, rounding)


def _ssm(metric, grid, n_remove, floor):
    channels = metric.shape[-1]
    s_ref = window_scores(metric, grid, backend="reference")
    s_tri = window_scores(metric, grid, backend="triton")
    score_diff = float((s_ref - s_tri).abs().max())
    rounding = max(2 * score_diff, floor * math.sqrt(channels))
    k = ssm_windows_to_merge(n_remove, 4, s_ref.shape[1])
    plans = [plan_ssm(metric, grid, n_remove, a_s=0.0, backend=b) for b in ("reference", "triton")]
    return {"windows_selected": k, "max_score_diff": score_diff, "rounding_threshold": rounding,
            "plan_differing_entries": compare_plans(*plans),
            "selection": _selection(s_ref, s_tri, k, rounding)}


def _idm(metric, grid, n_remove, floor):
    batch, num_tokens, channels = metric.shape
    dst = window_token_index(grid, (2, 2), device=metric.device)[:, 0]  # position-0 dst (no li, no randomness)
    is_dst = torch.zeros(num_tokens, dtype=torch.bool, device=metric.device)
    is_dst[dst] = True
    cand = torch.arange(num_tokens, device=metric.device)[~is_dst]
    cand_idx, dst_idx = cand.expand(batch, -1).contiguous(), dst.expand(batch, -1).contiguous()
    best_ref, match_ref = bipartite_match(metric, cand_idx, dst_idx, backend="reference")
    best_tri, match_tri = bipartite_match(metric, cand_idx, dst_idx, backend="triton")
    score_diff = float((best_ref - best_tri).abs().max())
    rounding = max(2 * score_diff, floor * math.sqrt(channels))
    unit = ref_similarity.normalize_tokens(metric)
    top2 = (unit[:, cand] @ unit[:, dst].transpose(1, 2)).topk(2, dim=-1).values  # [B, Na, 2]
    k = idm_tokens_to_merge(n_remove, cand.numel())
    plans = [plan_idm(metric, grid, n_remove, backend=b) for b in ("reference", "triton")]
    return {"candidates_merged": k, "max_best_diff": score_diff, "rounding_threshold": rounding,
            "plan_differing_entries": compare_plans(*plans),
            "matching": _explain(match_ref != match_tri, top2[..., 0] - top2[..., 1], rounding),
            "selection": _selection(best_ref, best_tri, k, rounding)}


def plan_agreement(sizes, device, deadline):
    from ..cli import synthetic_tokens  # here: the cli module imports this package

    (h, w), channels, batch = sizes.grid, sizes.channels, sizes.batch
    n = h * w
    n_remove = int(n * REMOVE_FRACTION)
    metrics = {
        "gaussian": torch.randn(batch, n, channels, generator=torch.Generator().manual_seed(0)),
        # smooth structure plus per-token detail, closer to a DiT's hidden states (more near-ties)
        "smooth_plus_detail": synthetic_tokens(batch, h, w, channels, detail=0.3, seed=0),
    }
    out = {"shape": [batch, n, channels], "dtype": str(sizes.dtype).replace("torch.", ""), "n_remove": n_remove,
           "metrics": {}}
    for name, metric in metrics.items():
        metric = metric.to(device, sizes.dtype)
        out["metrics"][name] = {"ssm": _ssm(metric, sizes.grid, n_remove, ROUNDING_FLOOR),
                                "idm": _idm(metric, sizes.grid, n_remove, ROUNDING_FLOOR)}
    unexplained = 0
    for per_metric in out["metrics"].values():
        for decisions in (per_metric["ssm"]["selection"], per_metric["idm"]["matching"],
                          per_metric["idm"]["selection"]):
            unexplained += decisions["differing"] - decisions["explained_by_rounding"]
    out["unexplained_differences"] = unexplained
    return out
