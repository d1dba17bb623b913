"""Applying a plan: merge (segment mean), prune, unmerge with the fused DiT epilogue, li update.

All arithmetic is in float32 (or float64 for float64 inputs); outputs are stored in the
input dtype.

Index contract (the same as the Triton kernels', docs/SEMANTICS.md "Index contract"): no
function here indexes out of bounds whatever the index values, so a bad plan never raises
torch's "index out of bounds" nor trips a CUDA device assert. A gather index outside its
range reads zeros; a row index outside ``[0, M)`` adds to no row; CSR row bounds are clamped
to ``[0, N]``, members outside ``[0, N)`` add nothing, a mean divides by ``max(count, 1)``.
The public ops check the values (CPU always, GPUs in debug mode) before calling these.
"""
import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_rows(src: torch.Tensor, index: torch.Tensor, trusted: bool = False) -> torch.Tensor:
    """``src[b, index[b, t]]`` for ``src [B, M, C]``, ``index [B, N]``; zeros where the index is
    outside ``[0, M)``. ``trusted``: the indices come from a checked plan, so the masking pass over
    ``[B, N, C]`` is skipped (indices are still clamped, so nothing is read out of bounds)."""
    num_rows, channels = src.shape[1], src.shape[2]
    if trusted and num_rows > 0:
        safe = index.long().clamp(0, num_rows - 1)
        return src.gather(1, safe.unsqueeze(-1).expand(-1, -1, channels))
    index = index.long()
    valid = (index >= 0) & (index < num_rows)
    safe = torch.where(valid, index, 0)
    if num_rows == 0:  # nothing to gather from: every index is invalid
        return src.new_zeros(index.shape[0], index.shape[1], channels)
    value = src.gather(1, safe.unsqueeze(-1).expand(-1, -1, channels))
    return torch.where(valid.unsqueeze(-1), value, torch.zeros((), dtype=src.dtype, device=src.device))


def scatter_rows(values: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``out[b, m] = sum_{t: index[b, t] == m} values[b, t]``, ``[B, num_rows, C]``; entries with
    an index outside ``[0, num_rows)`` add to no row (a spare row that is cut off)."""
    batch, _, channels = values.shape
    index = index.long()
    index = torch.where((index >= 0) & (index < num_rows), index, num_rows)
    total = torch.zeros(batch, num_rows + 1, channels, dtype=values.dtype, device=values.device)
    total.scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, channels), values)
    return total[:, :num_rows]


def row_bounds(row_start: torch.Tensor, num_tokens: int):
    """``(lo, hi)`` int64 ``[B, M]``: row m spans the CSR positions ``[lo, hi)``,
    ``lo = clamp(row_start[m], 0, N)``, ``hi = clamp(row_start[m + 1], lo, N)``."""
    bounds = row_start.long().clamp(0, num_tokens)
    lo = bounds[:, :-1]
    return lo, torch.maximum(bounds[:, 1:], lo)


def row_of_position(row_start: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int64 ``[B, N]``: the row whose span holds each CSR position, ``M`` for none.

    Exact for nondecreasing ``row_start`` (every plan that passes the value check). For
    other values the result stays in ``[0, M]`` (no out-of-bounds index) but rows whose
    spans overlap are resolved differently from the Triton kernels, which sum each row's span
    on its own."""
    batch, num_rows = row_start.shape[0], row_start.shape[1] - 1
    position = torch.arange(num_tokens, device=row_start.device).expand(batch, num_tokens).contiguous()
    if num_rows == 0:
        return torch.zeros_like(position)
    lo, hi = row_bounds(row_start, num_tokens)
    row = torch.searchsorted(hi.contiguous(), position, right=True)  # first row with hi > position
    covered = (row < num_rows) & (lo.gather(1, row.clamp_max(num_rows - 1)) <= position)
    return torch.where(covered, row, num_rows)


def segment_mean(x: torch.Tensor, members: torch.Tensor, row_start: torch.Tensor) -> torch.Tensor:
    """CSR segment mean: ``out[b, m] = x[b, members[b, row_start[b, m]:row_start[b, m+1]]].mean(0)``,
    ``[B, M, C]`` (what ``ops.merge`` computes on both backends; an empty row is 0)."""
    batch, num_tokens, channels = x.shape
    num_rows = row_start.shape[1] - 1
    acc_dtype = _compute_dtype(x.dtype)
    values = gather_rows(x.to(acc_dtype), members)  # invalid members read zeros
    total = scatter_rows(values, row_of_position(row_start, num_tokens), num_rows)
    lo, hi = row_bounds(row_start, num_tokens)
    counts = (hi - lo).clamp_min(1).to(acc_dtype)
    return (total / counts.unsqueeze(-1)).to(x.dtype)


def merge_mean(x: torch.Tensor, row_of_token: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Row ``m`` is the mean of the tokens with ``row_of_token == m``:
    ``zeros(B, M, C).index_add_(rows, x) / counts``, per batch row (tokens whose row is outside
    ``[0, M)`` are left out; an empty row is 0)."""
    acc_dtype = _compute_dtype(x.dtype)
    total = scatter_rows(x.to(acc_dtype), row_of_token, num_rows)
    ones = torch.ones(x.shape[0], x.shape[1], 1, dtype=acc_dtype, device=x.device)
    counts = scatter_rows(ones, row_of_token, num_rows).clamp_min(1)
    return (total / counts).to(x.dtype)


def prune(x: torch.Tensor, rep_token: torch.Tensor) -> torch.Tensor:
    """Row ``m`` is its representative token: ``x[b, rep_token[b, m]]`` (zeros for an index
    outside ``[0, N)``)."""
    return gather_rows(x, rep_token)


def unmerge(y, row_of_token, residual=None, gate=None, cache=None, blend=None, mcw=1.0,
            gate_first=False, trusted=False, addend=None) -> torch.Tensor:
    """Copy merged rows back to tokens, with the optional DiT epilogue.

    ``v = y[b, row_of_token[b, t]]`` (0 for a row outside ``[0, M)``); where ``blend`` and a ``cache`` are given,
    ``v = mcw * v + (1 - mcw) * cache``; then ``v = gate[:, None, :] * v`` and
    ``out = residual + v`` for each term that is given. ``gate_first``: the gate multiplies
    ``v`` before the blend (the cache holds gated values, as in the release). ``addend`` (full
    length, like ``residual``): ``gate * addend`` is added before the residual.
    """
    compute = _compute_dtype(y.dtype)
    value = gather_rows(y.to(compute), row_of_token, trusted=trusted)
    if gate is not None and gate_first:
        value = gate.to(compute).unsqueeze(1) * value
    if cache is not None:
        blended = mcw * value + (1.0 - mcw) * cache.to(compute)
        value = torch.where(blend.unsqueeze(-1), blended, value) if blend is not None else blended
    if gate is not None and not gate_first:
        value = gate.to(compute).unsqueeze(1) * value
    return _finish_epilogue(value, residual, gate, addend, compute).to(y.dtype)


def _finish_epilogue(value, residual, gate, addend, compute):
    """``residual + (value + gate * addend)`` in ``compute``, the terms given."""
    if addend is not None:
        extra = addend.to(compute)
        value = value + (gate.to(compute).unsqueeze(1) * extra if gate is not None else extra)
    if residual is not None:
        value = residual.to(compute) + value
    return value


def independent_tokens(row_of_token, rep_token, blend, mode="mean") -> torch.Tensor:
    """Tokens computed on their own (SPEC 3.4): the tokens outside every merge group, i.e. not
    in ``blend`` (SSM: tokens of unselected windows; IDM / ToMe: the unmerged candidates; a dst
    counts as merged even when no candidate joined it, as in the release), plus in ``prune``
    mode every row's representative."""
    alone = ~blend.to(torch.bool)
    if mode == "prune":
        rows = row_of_token.long()
        num_rows = rep_token.shape[1]
        if num_rows == 0:
            return alone
        valid = (rows >= 0) & (rows < num_rows)  # a token of no valid row is no representative
        token = torch.arange(rows.shape[1], device=rows.device)
        alone = alone | (valid & (rep_token.long().gather(1, rows.clamp(0, num_rows - 1)) == token))
    return alone


def update_li(li, row_of_token, rep_token, blend, mode="mean") -> torch.Tensor:
    """``li + 1``, then 0 for independent tokens (SPEC 3.4). Returns a new int32 tensor."""
    if li is None:
        li = torch.zeros(row_of_token.shape, dtype=torch.int32, device=row_of_token.device)
    bumped = li.to(torch.int32) + 1
    return bumped.masked_fill(independent_tokens(row_of_token, rep_token, blend, mode), 0)


# -- passthrough rows -----------------------------------------------------------------------------
# A joint sequence ``[prefix rows, plan tokens, suffix rows]`` (text tokens around an image span):
# the plan applies to the span, the rows around it pass through (merge copies them, unmerge
# gives them the epilogue without the cache).

def span_parts(t: torch.Tensor, prefix: int, suffix: int):
    """``(head, span, tail)`` views of ``t [B, prefix + L + suffix, C]`` along dim 1."""
    span = t.shape[1] - prefix - suffix
    return t.narrow(1, 0, prefix), t.narrow(1, prefix, span), t.narrow(1, prefix + span, suffix)


def join_span(head: torch.Tensor, span: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    parts = [part for part in (head, span, tail) if part.shape[1]]
    return torch.cat(parts, dim=1) if len(parts) != 1 else parts[0]


def passthrough(y, residual=None, gate=None, addend=None) -> torch.Tensor:
    """The unmerge epilogue of passthrough rows, ``residual + gate[:, None] * (y + addend)`` in fp32
    (the kernels' arithmetic), stored in ``y.dtype``."""
    compute = _compute_dtype(y.dtype)
    value = y.to(compute)
    if gate is not None:
        value = gate.to(compute).unsqueeze(1) * value
    return _finish_epilogue(value, residual, gate, addend, compute).to(y.dtype)


def around_span(y, residual, gate, addend, prefix: int, suffix: int, unmerge_span_rows) -> torch.Tensor:
    """``[rows before, unmerge_span_rows(y_span, residual_span, addend_span), rows after]``: the rows of
    ``y`` around the span get the passthrough epilogue (``residual`` and ``addend`` full length)."""
    y_head, y_span, y_tail = span_parts(y, prefix, suffix)
    r_head, r_span, r_tail = span_parts(residual, prefix, suffix) if residual is not None else (None,) * 3
    a_head, a_span, a_tail = span_parts(addend, prefix, suffix) if addend is not None else (None,) * 3
    return join_span(passthrough(y_head, r_head, gate, a_head), unmerge_span_rows(y_span, r_span, a_span),
                     passthrough(y_tail, r_tail, gate, a_tail))


def unmerge_span(y, row_of_token, residual=None, gate=None, cache=None, blend=None, mcw=1.0,
                 gate_first=False, trusted=False, prefix=0, suffix=0, addend=None) -> torch.Tensor:
    """``unmerge`` of the span of ``y [B, prefix + M + suffix, C]``, the rows around it passed
    through (``residual`` and ``addend`` full length; ``cache`` and ``blend`` cover the span's tokens)."""
    if not prefix and not suffix:
        return unmerge(y, row_of_token, residual, gate, cache, blend, mcw, gate_first, trusted, addend)
    return around_span(y, residual, gate, addend, prefix, suffix, lambda y_span, r_span, a_span: unmerge(
        y_span, row_of_token, r_span, gate, cache, blend, mcw, gate_first, trusted, a_span))
