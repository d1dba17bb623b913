"""Cosine similarity pieces: token normalisation, SSM window scores, bipartite matching."""
import torch

from .windows import window_token_index

# Norms are clamped to this before dividing, so zero tokens have cosine 0 with everything.
COSINE_EPS = 1e-6
# prio = li / (mean(li) + PRIORITY_EPS), as in the released code.
PRIORITY_EPS = 1e-6


def normalize_tokens(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x / max(||x||, eps)`` along the last dimension, computed in ``dtype``."""
    x = x.to(dtype)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)


def window_priority(li: torch.Tensor, grid, window) -> torch.Tensor:
    """Window-averaged frequency priority ``mean_p li[t_p] / (mean_n li + 1e-6)``, ``[B, G]``."""
    li = li.to(torch.float32)
    prio = li / (li.mean(dim=1, keepdim=True) + PRIORITY_EPS)
    tokens = window_token_index(grid, window, device=li.device)
    return prio[:, tokens].mean(dim=-1)


def window_scores(metric, grid, window=(2, 2), li=None, a_s=0.0, score="released",
                  dtype=torch.float32) -> torch.Tensor:
    """SSM window score ``[B, G]`` float32 (SPEC 3.2 steps 1-2).

    ``score="released"``: mean of the full K x K cosine Gram matrix of the window's tokens,
    diagonal included (``gram.mean((-2, -1))``). ``score="paper"``: mean of the K*(K-1)
    off-diagonal entries. Plus ``a_s * window_priority(li)`` when ``li`` is given.
    """
    tokens = window_token_index(grid, window, device=metric.device)
    k = tokens.shape[1]
    unit = normalize_tokens(metric, dtype)[:, tokens]  # [B, G, K, C]
    gram = unit @ unit.transpose(-1, -2)  # [B, G, K, K]
    if score == "released":
        sim = gram.mean(dim=(-2, -1))
    elif score == "paper":
        off_diagonal = gram.sum(dim=(-2, -1)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
        sim = off_diagonal / (k * (k - 1))
    else:
        raise ValueError(f"score must be 'released' or 'paper', got {score!r}")
    if li is not None and a_s != 0.0:
        sim = sim + a_s * window_priority(li, grid, window).to(sim.dtype)
    return sim.to(torch.float32)


def bipartite_match(metric, cand_idx, dst_idx, dtype=torch.float32):
    """Best cosine match of each candidate among the dsts.

    ``sim = normalize(metric[cand_idx]) @ normalize(metric[dst_idx]).T`` per batch row;
    returns ``(best, match) = sim.max(-1)`` as ``float32 [B, Na]`` and ``int32 [B, Na]``.
    ``match`` indexes ``dst_idx`` (a position in the dst list, not a token), and on ties it is
    the lowest such position (``torch.max`` returns the first maximum).
    """
    unit = normalize_tokens(metric, dtype)
    channels = unit.shape[-1]
    cand = unit.gather(1, cand_idx.long().unsqueeze(-1).expand(-1, -1, channels))
    dst = unit.gather(1, dst_idx.long().unsqueeze(-1).expand(-1, -1, channels))
    best, match = (cand @ dst.transpose(-1, -2)).max(dim=-1)
    return best.to(torch.float32), match.to(torch.int32)
