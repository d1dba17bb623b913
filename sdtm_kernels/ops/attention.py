"""Attention received by a slice of keys (SPEC 7: the paper's inattentiveness statistic)."""
import math

import torch

from .._validation import check_float, check_int, check_same_device, check_tensor
from ..backend import resolve_backend
from . import _attention_library as lib

ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def attention_received(q, k, *, key_slice, scale=None, backend=None):
    """Mean attention each key in ``key_slice`` receives: float32 ``[B, end - start]``.

    Equivalent to ``torch.softmax(q @ k.transpose(-1, -2) * scale, -1).mean((1, 2))[:, start:end]``
    with ``q [B, H, Tq, D]`` (e.g. the prompt tokens' queries), ``k [B, H, Tk, D]`` (all keys of
    the joint attention), ``key_slice = (start, end)`` and ``scale`` default ``1 / sqrt(D)``.
    The softmax runs over all Tk keys; the result is averaged over heads and queries. The
    Triton kernel never materialises the ``[B, H, Tq, Tk]`` attention matrix.
    """
    check_tensor("q", q, ndim=4, dtypes=ATTENTION_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=ATTENTION_DTYPES)
    check_same_device("k", k, "q", q)
    if q.dtype != k.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}; pass both in one dtype")
    for dim, name in ((0, "batch B"), (1, "heads H"), (3, "head dim D")):
        if q.shape[dim] != k.shape[dim]:
            raise ValueError(f"k has {name}={k.shape[dim]} but q has {q.shape[dim]} "
                             f"(q {tuple(q.shape)}, k {tuple(k.shape)})")
    if q.shape[2] == 0:
        raise ValueError("q must hold at least one query (Tq >= 1)")
    if q.shape[3] == 0:
        raise ValueError("q and k must have a head dim D >= 1")
    if not isinstance(key_slice, (tuple, list)) or len(key_slice) != 2:
        raise TypeError(f"key_slice must be a pair of ints (start, end), got {key_slice!r}")
    start = check_int("key_slice[0]", key_slice[0], minimum=0)
    end = check_int("key_slice[1]", key_slice[1], minimum=0)
    num_keys = k.shape[2]
    if not start < end <= num_keys:
        raise ValueError(f"key_slice must satisfy 0 <= start < end <= Tk={num_keys}, got ({start}, {end})")
    if scale is not None:
        scale = check_float("scale", scale)
        if scale <= 0.0:
            raise ValueError(f"scale must be > 0, got {scale}")
    else:
        scale = 1.0 / math.sqrt(q.shape[3])
    backend = resolve_backend(backend, q.device, "attention_received")
    return lib.attention_received(q, k, start, end, scale, backend)
