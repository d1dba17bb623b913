"""``MergePlan``: the one representation every merging method produces (SPEC section 4)."""
from dataclasses import InitVar, dataclass
from typing import Optional

import torch

from .backend import resolve_backend
from .ops import apply as plan_ops
from ._validation import check_int, check_same_device, check_tensor, debug_enabled
from .reference import merge as ref_merge

MERGE_MODES = ("mean", "prune")


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


@dataclass(eq=False)
class MergePlan:
    """Which tokens share a row after merging, for a batch ``[B, N]`` of token grids.

    Fields:
        row_of_token  int32 [B, N]   merged row of each token (unmerge gathers by it)
        members       int32 [B, N]   tokens grouped by row, ascending inside a row (CSR)
        row_start     int32 [B, M+1] ``members[row_start[m]:row_start[m+1]]`` are row m's tokens
        rep_token     int32 [B, M]   representative (dst) token of each row (prune, positions)
        blend         bool  [B, N]   tokens that take ``mcw * value + (1 - mcw) * cache``
        num_tokens    N, num_rows M  Python ints; ``num_removed = N - M``

    Rows are ordered by their lowest member token, so singletons keep raster order. A plan
    knows tokens only by index: it serves 2-D ``(H, W)`` and 3-D ``(T, H, W)`` grids alike
    (tokens in raster order, ``(t*H + i)*W + j``; see ``planning``).
    Construction checks shapes and dtypes always; it checks the contents (every token in
    exactly one non-empty row, counts summing to N, representatives inside their rows) when
    ``validate=True``, or by default for CPU tensors outside ``torch.compile`` and, in debug
    mode (``sdtm_kernels.ops.set_debug(True)`` / ``SDTM_DEBUG=1``), on every device (on a GPU
    that check synchronises with the host: call ``plan.check()`` explicitly there otherwise).
    The plans of SDTM's patched blocks (eager, Triton backend: ``ops._block_path``) are built
    without these checks, their contents checked in debug mode only, on CPU as on a GPU.
    """

    row_of_token: torch.Tensor
    members: torch.Tensor
    row_start: torch.Tensor
    rep_token: torch.Tensor
    blend: torch.Tensor
    num_tokens: int
    num_rows: int
    validate: InitVar[Optional[bool]] = None

    # Set by the planners: the next frequency counter, ``update_li(li, li_mode)`` of the li the
    # plan was built with (the Triton build writes it in the plan kernel). Not dataclass fields.
    li_next = None
    li_mode = None
    # A bound on the members per row known from the construction (SSM plans: the window size),
    # or None. Lets the Triton merge skip its long-row pass.
    max_members = None
    # The block path's launch arguments (``ops._block_path.BlockApply``), set on the plans that
    # ``SDTMState.build_plan`` built: their merge / unmerge launch without checking the plan again.
    _fast = None
    _blend_u8 = None  # (blend.view(uint8), its strides), made by the block path's first unmerge

    @classmethod
    def _trusted(cls, row_of_token, members, row_start, rep_token, blend, num_tokens: int, num_rows: int):
        """A plan from tensors the package built with the right layout (no checks: the block path
        checks the contents only in debug mode, ``plan.check()``)."""
        plan = cls.__new__(cls)
        plan.row_of_token, plan.members, plan.row_start = row_of_token, members, row_start
        plan.rep_token, plan.blend, plan.num_tokens, plan.num_rows = rep_token, blend, num_tokens, num_rows
        return plan

    def __getstate__(self):  # pickles and copies take the checked way (no launch arguments, no buffers)
        state = dict(self.__dict__)
        state.pop("_fast", None)
        state.pop("_blend_u8", None)
        return state

    def __post_init__(self, validate):
        self._check_layout()
        if validate is None:
            validate = (self.row_of_token.device.type == "cpu" or debug_enabled()) and not _is_compiling()
        if validate:
            self.check()

    # -- properties -------------------------------------------------------------------------
    @property
    def num_removed(self) -> int:
        return self.num_tokens - self.num_rows

    @property
    def batch_size(self) -> int:
        return self.row_of_token.shape[0]

    @property
    def device(self) -> torch.device:
        return self.row_of_token.device

    @property
    def row_counts(self) -> torch.Tensor:
        """int32 [B, M]: members per row."""
        return self.row_start[:, 1:] - self.row_start[:, :-1]

    @classmethod
    def identity(cls, batch: int, num_tokens: int, device=None) -> "MergePlan":
        """Every token in its own row (``merge`` and ``unmerge`` are copies)."""
        token = torch.arange(num_tokens, dtype=torch.int32, device=device).repeat(batch, 1)
        starts = torch.arange(num_tokens + 1, dtype=torch.int32, device=device).repeat(batch, 1)
        blend = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
        return cls(token, token.clone(), starts, token.clone(), blend, num_tokens, num_tokens)

    # -- validation -------------------------------------------------------------------------
    def _check_layout(self):
        # Python ints (SymInts under torch.compile with dynamic shapes pass through).
        for name in ("num_tokens", "num_rows"):
            value = getattr(self, name)
            if not isinstance(value, torch.SymInt):
                setattr(self, name, check_int(name, value, minimum=0))
        n, m = self.num_tokens, self.num_rows
        if not 0 <= m <= n or (n > 0 and m == 0):
            raise ValueError(f"num_rows must be in [1, num_tokens={n}], got {m}")
        batch = self.row_of_token.shape[0] if isinstance(self.row_of_token, torch.Tensor) else None
        expected = {
            "row_of_token": ((batch, n), torch.int32),
            "members": ((batch, n), torch.int32),
            "row_start": ((batch, m + 1), torch.int32),
            "rep_token": ((batch, m), torch.int32),
            "blend": ((batch, n), torch.bool),
        }
        for name, (shape, dtype) in expected.items():
            value = check_tensor(name, getattr(self, name), ndim=2, dtypes=(dtype,))
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
            check_same_device(name, value, "row_of_token", self.row_of_token)

    def check(self) -> "MergePlan":
        """Full content check (reads values: a host synchronisation on a GPU)."""
        batch, n, m = self.batch_size, self.num_tokens, self.num_rows
        rows = self.row_of_token.long()
        token = torch.arange(n, device=self.device)

        def fail(message):
            raise ValueError(f"invalid MergePlan: {message}")

        if bool(((rows < 0) | (rows >= m)).any()):
            fail(f"row_of_token has values outside [0, {m})")
        if not torch.equal(self.members.long().sort(dim=1).values, token.expand(batch, n)):
            fail("members is not a permutation of the tokens")
        counts = self.row_counts.long()
        if bool((self.row_start[:, 0] != 0).any()) or bool((self.row_start[:, -1] != n).any()):
            fail(f"row_start must start at 0 and end at N={n}")
        if bool((counts < 1).any()):
            fail("every row must have at least one member (row_start must increase strictly)")
        expected_rows = torch.repeat_interleave(
            torch.arange(m, device=self.device).expand(batch, m).reshape(-1), counts.reshape(-1)
        ).view(batch, n)
        if not torch.equal(rows.gather(1, self.members.long()), expected_rows):
            fail("members and row_start disagree with row_of_token")
        members = self.members.long()
        same_row = expected_rows[:, 1:] == expected_rows[:, :-1]
        if bool((same_row & (members[:, 1:] <= members[:, :-1])).any()):
            fail("members must ascend inside each row")
        reps = self.rep_token.long()
        if bool(((reps < 0) | (reps >= n)).any()) or not torch.equal(
            rows.gather(1, reps), torch.arange(m, device=self.device).expand(batch, m)
        ):
            fail("rep_token must name a member of its own row")
        return self

    def _check_length(self, name, value, length, symbol):
        # The ops check ranks, dtypes and batch; only the plan knows N and M.
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() == 3 and value.shape[1] != length:
            raise ValueError(f"{name} must have shape [B, {symbol}={length}, C] for this plan, got {list(value.shape)}")

    # -- applying the plan ------------------------------------------------------------------
    def merge(self, x: torch.Tensor, mode: str = "mean", backend=None, *, prefix: int = 0,
              suffix: int = 0) -> torch.Tensor:
        """``[B, N, C] -> [B, M, C]``. ``mean``: each row is the mean of its members.
        ``prune``: each row is its representative token, ``x.gather(1, rep_token)``.
        ``prefix`` / ``suffix``: ``x`` is a joint sequence ``[B, prefix + N + suffix, C]`` (e.g. text
        tokens around the image): those rows are copied around the merged ones, in the same launch
        on the Triton backend, ``[B, prefix + M + suffix, C]``."""
        fast = self._fast
        if fast is not None and backend == fast.backend:
            out = fast.merge(self, x, mode, prefix, suffix)
            if out is not None:
                return out
        prefix, suffix = self._passthrough(prefix, suffix)
        self._check_length("x", x, prefix + self.num_tokens + suffix, "prefix + N + suffix" if prefix or suffix else "N")
        if mode == "mean":
            backend = resolve_backend(backend, x.device, "merge")
            return plan_ops.plan_merge(x, self.row_of_token, self.members, self.row_start, self.num_rows, backend,
                                       self.max_members, prefix=prefix, suffix=suffix)
        if mode == "prune":
            backend = resolve_backend(backend, x.device, "prune")
            return plan_ops.plan_prune(x, self.rep_token, backend, prefix=prefix, suffix=suffix)
        raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")

    def unmerge(self, y, *, residual=None, gate=None, cache=None, mcw: float = 1.0, gate_first: bool = False,
                backend=None, prefix: int = 0, suffix: int = 0, addend=None):
        """``[B, M, C] -> [B, N, C]``: ``v = y.gather(1, row_of_token)``, then
        ``v = where(blend, mcw * v + (1 - mcw) * cache, v)`` when ``cache`` is given, and
        ``out = residual + gate[:, None, :] * v`` for the terms given. ``gate_first``: the gate
        multiplies ``v`` before the blend (a cache of gated values, the release's rule). Inputs
        are not modified. One fused kernel on the Triton backend.
        ``prefix`` / ``suffix``: ``y`` is ``[B, prefix + M + suffix, C]``; those rows pass through
        (``residual + gate * y``, no cache) around the unmerged tokens: ``residual`` and the
        result are ``[B, prefix + N + suffix, C]``, ``cache`` covers the plan's N tokens.
        ``addend`` (shaped like ``residual``, ``y``'s dtype): ``gate * addend`` is added to every
        token too, in the same launch (a second output term of a block, e.g. the attention half of
        a fused output projection whose MLP half is ``y``)."""
        fast = self._fast
        if fast is not None and backend == fast.backend:
            out = fast.unmerge(self, y, residual, gate, cache, mcw, gate_first, prefix, suffix, addend)
            if out is not None:
                return out
        prefix, suffix = self._passthrough(prefix, suffix)
        self._check_length("y", y, prefix + self.num_rows + suffix, "prefix + M + suffix" if prefix or suffix else "M")
        backend = resolve_backend(backend, y.device, "unmerge")
        return plan_ops.plan_unmerge(y, self.row_of_token, residual, gate, cache, self.blend, mcw, bool(gate_first),
                                     backend, prefix=prefix, suffix=suffix, addend=addend)

    @staticmethod
    def _passthrough(prefix, suffix):
        if type(prefix) is int and type(suffix) is int and prefix == suffix == 0:  # the common case, no check calls
            return 0, 0
        return check_int("prefix", prefix, minimum=0), check_int("suffix", suffix, minimum=0)

    def update_li(self, li: Optional[torch.Tensor] = None, mode: str = "mean") -> torch.Tensor:
        """New frequency counter (SPEC 3.4): ``li + 1``, reset to 0 on tokens computed
        independently: tokens outside every merge group (not in ``blend``: a dst counts as
        merged even when no candidate joined it, as in the release); in ``prune`` mode also
        every representative.
        ``li=None`` means all zeros. ``li`` must be the int32 counter this method returns
        (a ``TypeError`` for any other dtype: a wider counter would be truncated, a narrower
        one could wrap). Returns a new int32 ``[B, N]`` tensor."""
        if mode not in MERGE_MODES:
            raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
        if li is not None:
            check_tensor("li", li, ndim=2)
            if tuple(li.shape) != tuple(self.row_of_token.shape):
                raise ValueError(f"li must have shape {list(self.row_of_token.shape)}, got {list(li.shape)}")
            if li.dtype.is_floating_point or li.dtype == torch.bool or li.is_complex():
                raise TypeError(f"li must be an integer tensor, got {li.dtype}")
            if li.dtype != torch.int32:
                raise TypeError(f"li must be the int32 counter update_li returns, got {li.dtype} "
                                "(convert it with li.to(torch.int32) if its values fit)")
            check_same_device("li", li, "the plan", self.row_of_token)
        return ref_merge.update_li(li, self.row_of_token, self.rep_token, self.blend, mode)


def join_shards(plan: MergePlan, shards: int) -> MergePlan:
    """One plan over ``shards`` consecutive slabs of tokens from a plan that planned each slab as
    a batch row of its own: ``[B * shards, n]`` (row ``b * shards + s`` is slab ``s`` of sample
    ``b``) -> ``[B, shards * n]``. Slab ``s`` keeps its tokens ``[s * n, (s + 1) * n)`` and its
    rows ``[s * M, (s + 1) * M)``, so the rows stay ordered by their lowest member and no row
    spans two slabs. Views and index shifts only (no host read)."""
    shards = check_int("shards", shards, minimum=1)
    if shards == 1:
        return plan
    rows, n = plan.row_of_token.shape
    if rows % shards:
        raise ValueError(f"join_shards: the plan's batch ({rows}) is not a multiple of shards={shards}")
    batch, m = rows // shards, plan.num_rows
    step = torch.arange(shards, dtype=torch.int32, device=plan.device).view(1, shards, 1)

    def joined(t, width, offset):
        return (t.reshape(batch, shards, width) + step * offset).reshape(batch, shards * width)

    total = shards * n
    row_start = torch.cat([joined(plan.row_start[:, :m], m, n),
                           torch.full((batch, 1), total, dtype=torch.int32, device=plan.device)], dim=1)
    out = MergePlan(joined(plan.row_of_token, n, m), joined(plan.members, n, n), row_start,
                    joined(plan.rep_token, m, n), plan.blend.reshape(batch, total), num_tokens=total,
                    num_rows=shards * m, validate=debug_enabled() and not _is_compiling())
    out.max_members, out.li_mode = plan.max_members, plan.li_mode
    if plan.li_next is not None:
        out.li_next = plan.li_next.reshape(batch, total)  # a view: the li buffer the planner wrote into
    return out
