"""Applying a plan to token tensors, dispatched to the reference or the Triton kernels."""
from ..backend import resolve_backend
from ..reference import merge as ref


def merge(x, row_of_token, members, row_start, num_rows: int, *, backend=None):
    """Segment mean: ``out[b, m] = x[b, members[b, row_start[b, m]:row_start[b, m+1]]].mean(0)``."""
    resolve_backend(backend, x.device, "merge")
    return ref.merge_mean(x, row_of_token, num_rows)


def prune(x, rep_token, *, backend=None):
    """Representative gather: ``out[b, m] = x[b, rep_token[b, m]]``."""
    resolve_backend(backend, x.device, "prune")
    return ref.prune(x, rep_token)


def unmerge(y, row_of_token, *, residual=None, gate=None, cache=None, blend=None, mcw=1.0, backend=None):
    """``v = y[b, row_of_token[b, t]]``; ``v = mcw*v + (1-mcw)*cache`` on ``blend`` tokens when a
    cache is given; ``out = residual + gate[:, None] * v`` for the terms that are given."""
    resolve_backend(backend, y.device, "unmerge")
    return ref.unmerge(y, row_of_token, residual=residual, gate=gate, cache=cache, blend=blend, mcw=mcw)
