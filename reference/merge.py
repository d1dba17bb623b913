"""Applying a plan: merge (segment mean), prune, unmerge with the fused DiT epilogue, li update.

All arithmetic is in float32 (or float64 for float64 inputs); outputs are stored in the
input dtype.
"""
import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_mean(x: torch.Tensor, row_of_token: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Row ``m`` is the mean of the tokens with ``row_of_token == m``:
    ``zeros(B, M, C).index_add_(rows, x) / counts``, per batch row."""
    batch, _, channels = x.shape
    acc_dtype = _compute_dtype(x.dtype)
    rows = row_of_token.long()
    total = torch.zeros(batch, num_rows, channels, dtype=acc_dtype, device=x.device)
    total.scatter_add_(1, rows.unsqueeze(-1).expand(-1, -1, channels), x.to(acc_dtype))
    counts = torch.zeros(batch, num_rows, dtype=acc_dtype, device=x.device)
    counts.scatter_add_(1, rows, torch.ones_like(rows, dtype=acc_dtype))
    return (total / counts.unsqueeze(-1)).to(x.dtype)


def prune(x: torch.Tensor, rep_token: torch.Tensor) -> torch.Tensor:
    """Row ``m`` is its representative token: ``x[b, rep_token[b, m]]``."""
    return x.gather(1, rep_token.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def unmerge(y, row_of_token, residual=None, gate=None, cache=None, blend=None, mcw=1.0) -> torch.Tensor:
    """Copy merged rows back to tokens, with the optional DiT epilogue.

    ``v = y[b, row_of_token[b, t]]``; where ``blend`` and a ``cache`` are given,
    ``v = mcw * v + (1 - mcw) * cache``; then ``v = gate[:, None, :] * v`` and
    ``out = residual + v`` for each term that is given.
    """
    compute = _compute_dtype(y.dtype)
    value = y.to(compute).gather(1, row_of_token.long().unsqueeze(-1).expand(-1, -1, y.shape[-1]))
    if cache is not None:
        blended = mcw * value + (1.0 - mcw) * cache.to(compute)
        value = torch.where(blend.unsqueeze(-1), blended, value) if blend is not None else blended
    if gate is not None:
        value = gate.to(compute).unsqueeze(1) * value
    if residual is not None:
        value = residual.to(compute) + value
    return value.to(y.dtype)


def independent_tokens(row_of_token, row_start, rep_token, mode="mean") -> torch.Tensor:
    """Tokens computed on their own: singleton rows (``mean``), or additionally every row's
    representative (``prune``, where a representative's row is that token alone)."""
    counts = row_start[:, 1:] - row_start[:, :-1]
    rows = row_of_token.long()
    alone = counts.gather(1, rows) == 1
    if mode == "prune":
        token = torch.arange(rows.shape[1], device=rows.device)
        alone = alone | (rep_token.long().gather(1, rows) == token)
    return alone


def update_li(li, row_of_token, row_start, rep_token, mode="mean") -> torch.Tensor:
    """``li + 1``, then 0 for independent tokens (SPEC 3.4). Returns a new int32 tensor."""
    if li is None:
        li = torch.zeros(row_of_token.shape, dtype=torch.int32, device=row_of_token.device)
    bumped = li.to(torch.int32) + 1
    return bumped.masked_fill(independent_tokens(row_of_token, row_start, rep_token, mode), 0)
