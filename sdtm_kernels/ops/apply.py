"""Applying a plan to token tensors, dispatched to the reference or the Triton kernels.

``backend="triton"`` calls the ``torch.ops.sdtm.*`` custom ops (registered in
``_merge_library``: autograd with the same kernels, fake implementations for
``torch.compile``). ``backend="reference"`` calls ``reference/merge.py`` directly: it is plain
differentiable, traceable PyTorch, and the first custom-op call imports ``torch._dynamo``,
which imports triton - CPU users of the reference should not pay for that. The custom ops
accept ``"reference"`` too and give the same results.

Index contract (docs/SEMANTICS.md, "Index contract"), the same on both backends:

* which plan tensors are read: ``merge`` reads ``members`` and ``row_start`` (forward, CSR
  segment mean) and ``row_of_token`` with ``row_start`` (backward); ``prune`` reads
  ``rep_token``; ``unmerge`` reads ``row_of_token`` (and ``blend``).
* value check: ``row_of_token`` in ``[0, M)``, ``members`` and ``rep_token`` in ``[0, N)``,
  ``row_start`` from 0 to N and nondecreasing, else a ``ValueError`` naming the argument,
  with the same message on both backends. It reads tensor values, so it runs for CPU
  tensors (eager mode) and on GPUs only in debug mode (``set_debug(True)`` or
  ``SDTM_DEBUG=1``): no host synchronisation in the hot path.
* without the check nothing is read out of bounds: a gather index out of range reads
  zeros, CSR row bounds are clamped to ``[0, N]`` and out-of-range members add nothing
  (``torch.ops.sdtm.*`` called directly never checks values).
"""
import torch

from .._validation import (
    FLOAT_DTYPES,
    check_float,
    check_index_values,
    check_int,
    check_row_start_values,
    check_same_device,
    check_tensor,
    values_checked,
)
from ..backend import resolve_backend
from ..reference import merge as ref
from . import _merge_library  # noqa: F401 - registers torch.ops.sdtm.merge / prune / unmerge


def _check_tokens(name, value, batch, length, channels=None):
    """A floating ``[batch, length, C]`` tensor (``C == channels`` when given)."""
    check_tensor(name, value, ndim=3, dtypes=FLOAT_DTYPES)
    expected = [batch, length, "C" if channels is None else channels]
    if value.shape[0] != batch or value.shape[1] != length or (channels is not None and value.shape[2] != channels):
        raise ValueError(f"{name} must have shape {expected} for this plan, got {list(value.shape)}")


def _check_index(name, value, shape, like, like_name, dtype=None):
    """An integer (or ``dtype``) index tensor of ``shape`` on ``like``'s device."""
    check_tensor(name, value, ndim=len(shape))
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {value.dtype}")
    if dtype is None and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer index tensor, got {value.dtype}")
    if list(value.shape) != list(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
    check_same_device(name, value, like_name, like)


def _check_merge_args(x, row_of_token, members, row_start, num_rows):
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("row_of_token", row_of_token, ndim=2)
    batch, num_tokens = row_of_token.shape
    num_rows = check_int("num_rows", num_rows, minimum=1 if num_tokens else 0)
    _check_tokens("x", x, batch, num_tokens)
    _check_index("row_of_token", row_of_token, (batch, num_tokens), x, "x")
    _check_index("members", members, (batch, num_tokens), x, "x")
    _check_index("row_start", row_start, (batch, num_rows + 1), x, "x")
    if values_checked(x):
        check_index_values("row_of_token", row_of_token, num_rows, "num_rows")
        check_index_values("members", members, num_tokens, "N")
        check_row_start_values("row_start", row_start, num_tokens)
    return num_rows


def _check_unmerge_args(y, row_of_token, residual, gate, cache, blend, mcw, check_values=True):
    check_tensor("y", y, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("row_of_token", row_of_token, ndim=2)
    batch, num_tokens = row_of_token.shape
    channels = y.shape[-1]
    if y.shape[0] != batch:
        raise ValueError(f"y has batch {y.shape[0]} but row_of_token has B={batch}")
    _check_index("row_of_token", row_of_token, (batch, num_tokens), y, "y")
    if check_values and values_checked(y):
        check_index_values("row_of_token", row_of_token, y.shape[1], "M")
    for name, value in (("residual", residual), ("cache", cache)):
        if value is not None:
            _check_tokens(name, value, batch, num_tokens, channels)
            if value.dtype != y.dtype:
                raise TypeError(f"{name} has dtype {value.dtype} but y has {y.dtype}")
            check_same_device(name, value, "y", y)
    if gate is not None:  # any float dtype: adaLN gates are often kept in fp32
        check_tensor("gate", gate, ndim=2, dtypes=FLOAT_DTYPES)
        if list(gate.shape) != [batch, channels]:
            raise ValueError(f"gate must have shape [B, C] = {[batch, channels]}, got {list(gate.shape)}")
        check_same_device("gate", gate, "y", y)
    if blend is not None:
        _check_index("blend", blend, (batch, num_tokens), y, "y", dtype=torch.bool)
    mcw = check_float("mcw", mcw)
    if not 0.0 <= mcw <= 1.0:
        raise ValueError(f"mcw must be in [0, 1], got {mcw}")
    return mcw


def merge(x, row_of_token, members, row_start, num_rows: int, *, backend=None):
    """Segment mean ``[B, N, C] -> [B, M, C]``. Equivalent to
    ``out[b, m] = x[b, members[b, row_start[b, m]:row_start[b, m+1]]].mean(0)``.

    Both backends compute the forward from ``members`` / ``row_start``; ``row_of_token`` is
    read by the backward (``grad_x[t] = grad[row_of_token[t]] / count``). All three must
    describe the same partition (``MergePlan.check()``); their value ranges are checked on
    CPU tensors and in debug mode (see the module docstring)."""
    num_rows = _check_merge_args(x, row_of_token, members, row_start, num_rows)
    backend = resolve_backend(backend, x.device, "merge")
    if backend == "reference":
        return ref.segment_mean(x, members, row_start)
    return torch.ops.sdtm.merge(x, row_of_token, members, row_start, num_rows, backend)


def prune(x, rep_token, *, backend=None):
    """Representative gather. Equivalent to ``x.gather(1, rep_token[..., None].expand(-1, -1, C))``."""
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("rep_token", rep_token, ndim=2)
    if x.shape[0] != rep_token.shape[0]:
        raise ValueError(f"x has batch {x.shape[0]} but rep_token has B={rep_token.shape[0]}")
    _check_index("rep_token", rep_token, tuple(rep_token.shape), x, "x")
    if values_checked(x):
        check_index_values("rep_token", rep_token, x.shape[1], "N")
    backend = resolve_backend(backend, x.device, "prune")
    if backend == "reference":
        return ref.prune(x, rep_token)
    return torch.ops.sdtm.prune(x, rep_token, backend)


def unmerge(y, row_of_token, *, residual=None, gate=None, cache=None, blend=None, mcw=1.0, gate_first=False,
            backend=None):
    """Unmerge with the fused DiT epilogue, every term optional. Equivalent to
    ``v = y.gather(1, row_of_token[..., None].expand(-1, -1, C))``; ``v = where(blend, mcw*v + (1-mcw)*cache, v)``
    when a cache is given (all tokens without ``blend``); ``out = residual + gate[:, None] * v``.
    ``gate_first=True`` applies the gate before the blend, for a cache of gated values (the
    release's rule): ``out = residual + where(blend, mcw * gate * v + (1 - mcw) * cache, gate * v)``."""
    mcw = _check_unmerge_args(y, row_of_token, residual, gate, cache, blend, mcw)
    backend = resolve_backend(backend, y.device, "unmerge")
    if backend == "reference":
        return ref.unmerge(y, row_of_token, residual=residual, gate=gate, cache=cache, blend=blend, mcw=mcw,
                           gate_first=bool(gate_first))
    return torch.ops.sdtm.unmerge(y, row_of_token, residual, gate, cache, blend, mcw, bool(gate_first), backend)


# -- the plan's own fast path ------------------------------------------------------------------
# ``MergePlan.merge / unmerge`` pass tensors of a plan that was built by the planners or checked
# when it was constructed, so their values are not checked again per op (once per plan, not
# once per op). In eager mode without autograd the launcher (or the reference function) is
# called directly: the custom-op dispatch costs more host time than the kernel at DiT sizes.
# Under torch.compile or when a gradient is needed, the registered op runs (fake, autograd).

def _direct(*tensors) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _merge_kernels():
    from ..csrc_triton import merge as kernels  # lazy: import sdtm_kernels does not import triton

    return kernels


def _check_plan_input(x, index):
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    if x.shape[0] != index.shape[0]:
        raise ValueError(f"x has batch {x.shape[0]} but the plan has B={index.shape[0]}")
    check_same_device("x", x, "the plan", index)


def _spanned(fn, x, prefix, suffix):
    """``fn`` on the span of ``x`` between ``prefix`` and ``suffix`` rows, which pass through."""
    head, span, tail = ref.span_parts(x, prefix, suffix)
    return ref.join_span(head, fn(span), tail)


def plan_merge(x, row_of_token, members, row_start, num_rows: int, backend: str, max_members=None,
               prefix: int = 0, suffix: int = 0):
    """``merge`` for a trusted plan (resolved ``backend``; only ``x`` is checked). ``max_members``:
    a bound on the plan's row sizes (SSM plans: the window size), which spares the long-row pass.
    ``prefix`` / ``suffix``: rows of ``x`` before and after the plan's tokens, copied through."""
    _check_plan_input(x, row_of_token)
    if backend != "reference" and _direct(x):  # one launch for the joint sequence
        return _merge_kernels().merge_mean(x, members, row_start, max_members=max_members, prefix=prefix,
                                           suffix=suffix)
    if prefix or suffix:
        return _spanned(lambda span: plan_merge(span, row_of_token, members, row_start, num_rows, backend,
                                                max_members), x, prefix, suffix)
    if backend == "reference":  # a consistent plan: one scatter by row (members / row_start agree)
        return ref.merge_mean(x, row_of_token, num_rows)
    return torch.ops.sdtm.merge(x, row_of_token, members, row_start, num_rows, backend)


def plan_prune(x, rep_token, backend: str, prefix: int = 0, suffix: int = 0):
    """``prune`` for a trusted plan (resolved ``backend``; only ``x`` is checked)."""
    _check_plan_input(x, rep_token)
    if backend != "reference" and _direct(x):
        return _merge_kernels().prune(x, rep_token, prefix=prefix, suffix=suffix)
    if prefix or suffix:
        return _spanned(lambda span: plan_prune(span, rep_token, backend), x, prefix, suffix)
    if backend == "reference":
        return ref.prune(x, rep_token)
    return torch.ops.sdtm.prune(x, rep_token, backend)


def _check_addend(addend, y, length):
    check_tensor("addend", addend, ndim=3, dtypes=FLOAT_DTYPES)
    if addend.shape[0] != y.shape[0] or addend.shape[1] != length or addend.shape[2] != y.shape[2]:
        raise ValueError(f"addend must have shape {[y.shape[0], length, y.shape[2]]} (the output's), "
                         f"got {list(addend.shape)}")
    if addend.dtype != y.dtype:
        raise TypeError(f"addend has dtype {addend.dtype} but y has {y.dtype}")
    check_same_device("addend", addend, "y", y)


def plan_unmerge(y, row_of_token, residual, gate, cache, blend, mcw, gate_first, backend: str,
                 prefix: int = 0, suffix: int = 0, addend=None):
    """``unmerge`` for a trusted plan: the plan tensors' values are not checked again. ``prefix`` /
    ``suffix``: rows of ``y`` (and ``residual``) around the plan's rows, which take
    ``residual + gate * y`` and no cache. ``addend`` (shaped like the output): ``+ gate * addend``."""
    if y.dim() != 3 or y.shape[0] != row_of_token.shape[0]:
        raise ValueError(f"y must have shape [B={row_of_token.shape[0]}, M, C], got {list(y.shape)}")
    if addend is not None:
        _check_addend(addend, y, row_of_token.shape[1] + prefix + suffix)
    span_y, span_residual = y, residual
    if prefix or suffix:
        num_tokens = row_of_token.shape[1]
        if residual is not None and (residual.dim() != 3 or residual.shape[1] != prefix + num_tokens + suffix):
            raise ValueError(f"residual must have shape [B, prefix + N + suffix = {prefix + num_tokens + suffix}, C], "
                             f"got {list(residual.shape)}")
        if y.shape[1] < prefix + suffix:
            raise ValueError(f"y has {y.shape[1]} rows, fewer than prefix + suffix = {prefix + suffix}")
        span_y = y.narrow(1, prefix, y.shape[1] - prefix - suffix)
        span_residual = None if residual is None else residual.narrow(1, prefix, num_tokens)
    mcw = _check_unmerge_args(span_y, row_of_token, span_residual, gate, cache, None, mcw, check_values=False)
    if addend is not None and backend != "reference" and not _direct(y, residual, gate, cache, addend):
        # the registered op has no addend: fold it into the (checked) residual (autograd, torch.compile)
        residual, addend = ref.passthrough(addend, residual, gate), None
    if backend == "reference":
        return ref.unmerge_span(y, row_of_token, residual=residual, gate=gate, cache=cache, blend=blend, mcw=mcw,
                                gate_first=gate_first, trusted=True, prefix=prefix, suffix=suffix, addend=addend)
    if _direct(y, residual, gate, cache):
        return _merge_kernels().unmerge(y, row_of_token, residual=residual, gate=gate, cache=cache, blend=blend,
                                        mcw=mcw, gate_first=gate_first, prefix=prefix, suffix=suffix, addend=addend)
    if prefix or suffix:  # the registered op on the span (the addend is folded in above)
        def span_op(y_span, r_span, _):
            return torch.ops.sdtm.unmerge(y_span, row_of_token, r_span, gate, cache, blend, mcw, gate_first, backend)

        return ref.around_span(y, residual, gate, None, prefix, suffix, span_op)
    return torch.ops.sdtm.unmerge(y, row_of_token, residual, gate, cache, blend, mcw, gate_first, backend)
