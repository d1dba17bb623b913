"""Cosine similarity pieces: token normalisation, SSM window scores, bipartite matching.

Non-finite tokens (a NaN or an infinity in any channel, or a float32 squared norm past the
float32 range, |x| above about 1.8e19) are never preferred for merging:
their cosine with every token counts as ``-inf``. An SSM window holding one scores
``-inf``; in bipartite matching a non-finite candidate's best is ``-inf`` (match: position
0), and a non-finite dst is never the match unless every dst is non-finite.
"""
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


def finite_tokens(x: torch.Tensor) -> torch.Tensor:
    """bool ``[B, N]``: tokens whose float32 squared norm is finite, i.e. no NaN or infinity in a
    channel and no overflow of the norm (the kernels test the same sum of squares)."""
    x = x.to(torch.float32)
    return (x * x).sum(dim=-1) < float("inf")  # NaN < inf is False


def window_priority(li: torch.Tensor, grid, window) -> torch.Tensor:
    """Window-averaged frequency priority ``mean_p li[t_p] / (mean_n li + 1e-6)``, ``[B, G]``."""
    li = li.to(torch.float32)
    prio = li / (li.mean(dim=1, keepdim=True) + PRIORITY_EPS)
    tokens = window_token_index(grid, window, device=li.device)
    return prio[:, tokens].mean(dim=-1)


def window_scores(metric, grid, window=(2, 2), li=None, a_s=0.0, score="released",
                  dtype=torch.float32) -> torch.Tensor:
    """SSM window score ``[B, G]`` float32 (SPEC 3.2 steps 1-2), on a ``(H, W)`` or ``(T, H, W)``
    grid (``reference.windows``).

    ``score="released"``: mean of the full K x K cosine Gram matrix of the window's tokens,
    diagonal included (``gram.mean((-2, -1))``). ``score="paper"``: mean of the K*(K-1)
    off-diagonal entries. Plus ``a_s * window_priority(li)`` when ``li`` is given. A window
    holding a non-finite token scores ``-inf``.
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
    window_finite = finite_tokens(metric)[:, tokens].all(dim=-1)  # [B, G]
    sim = torch.where(window_finite, sim, float("-inf"))
    return sim.to(torch.float32)


def bipartite_match(metric, cand_idx, dst_idx, dtype=torch.float32):
    """Best cosine match of each candidate among the dsts.

    ``sim = normalize(metric[cand_idx]) @ normalize(metric[dst_idx]).T`` per batch row;
    returns ``(best, match) = sim.max(-1)`` as ``float32 [B, Na]`` and ``int32 [B, Na]``.
    ``match`` indexes ``dst_idx`` (a position in the dst list, not a token), and on ties it is
    the lowest such position (``torch.max`` returns the first maximum). Pairs involving a
    non-finite token score ``-inf``; so do indices outside ``[0, N)`` (never read).
    """
    batch, num_tokens, channels = metric.shape
    if num_tokens == 0:  # every index is out of range
        shape = (batch, cand_idx.shape[1])
        return (torch.full(shape, float("-inf"), device=metric.device),
                torch.zeros(shape, dtype=torch.int32, device=metric.device))
    unit = normalize_tokens(metric, dtype)
    finite = finite_tokens(metric)

    def rows(index):
        index = index.long()
        ok = (index >= 0) & (index < num_tokens)
        index = torch.where(ok, index, 0)
        return unit.gather(1, index.unsqueeze(-1).expand(-1, -1, channels)), ok & finite.gather(1, index)

    (cand, cand_ok), (dst, dst_ok) = rows(cand_idx), rows(dst_idx)
    sim = torch.where(cand_ok.unsqueeze(-1) & dst_ok.unsqueeze(-2), cand @ dst.transpose(-1, -2), float("-inf"))
    best, match = sim.max(dim=-1)
    return best.to(torch.float32), match.to(torch.int32)
