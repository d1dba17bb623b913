"""The block path: the plans of SDTM's patched blocks, built and applied with their arguments
checked once per transformer call instead of once per op (eager mode, Triton backend).

``planning.block_planner`` makes the public planner's checks on a block's arguments and returns
a ``BlockPlanner``: the launch constants of that plan kind for metrics of that shape, dtype and
device (window grid, merge counts, row counts), computed once. ``SDTMState.build_plan`` keeps
one per call and kind of metric and calls it for every block of the call: the launchers run
directly (no custom-op dispatch, no re-validation), and the plan is made without layout checks
(the kernels write that layout). Its content is checked in debug mode (``set_debug(True)`` /
``SDTM_DEBUG=1``, read once per call), on CPU as on a GPU, so that CPU timings mean what GPU
timings mean.

The plans carry a ``BlockApply``: ``MergePlan.merge`` / ``unmerge`` with the backend the plan
was built for launch the merge kernels from it. Its checks are the extents the kernels trust
(shapes, dtypes, devices), made inline; any other input (a wrong shape, a tensor that needs a
gradient, ``torch.compile``) goes the checked way, which raises the public error or dispatches
the registered op.
"""
import torch

from .._validation import FLOAT_DTYPES, call_debug
from ..plan import MergePlan
from ..reference import attention as ref_attention
from ..reference import plans as ref_plans
from ..reference import schedule as ref_schedule
from ..reference.windows import grid_3d, num_windows, window_size


class BlockApply:
    """``merge`` / ``unmerge`` launches of the plans of one ``BlockPlanner`` (``batch`` rows on
    ``device``; ``expanded``: one plan row shared by the batch, stride 0)."""

    __slots__ = ("backend", "device", "batch", "kernels", "work", "row_strides", "member_strides", "start_strides",
                 "rep_strides")

    def __init__(self, backend, device, batch: int, num_tokens: int, num_rows: int, expanded: bool = False,
                 work=None):
        from ..csrc_triton import merge as kernels  # lazy: import sdtm_kernels does not import triton

        self.backend, self.device, self.batch, self.kernels, self.work = backend, device, batch, kernels, work
        step = 0 if expanded else 1  # the plan tensors are dense (from the plan kernels) or expanded rows
        self.row_strides = self.member_strides = (num_tokens * step, 1)
        self.start_strides = ((num_rows + 1) * step, 1)
        self.rep_strides = (num_rows * step, 1)

    def _takes(self, t, shape, dtype=None):
        """``(t, t.stride())`` when ``t`` is a plain tensor of ``shape`` on the plan's device (of
        ``dtype`` when given, else any float dtype) that needs no gradient here (``t`` copied when
        it has no unit stride in C); None otherwise."""
        if t.__class__ is not torch.Tensor or t.shape != shape or t.device != self.device \
                or (t.dtype != dtype if dtype is not None else t.dtype not in FLOAT_DTYPES) \
                or (t.requires_grad and torch.is_grad_enabled()):
            return None
        strides = t.stride()
        if strides[-1] != 1 and shape[-1] > 1:
            t = t.contiguous()
            strides = t.stride()
        return t, strides

    def merge(self, plan, x, mode, prefix, suffix):
        """``plan.merge(x, mode, prefix=, suffix=)``, or None where the checked path must run."""
        if prefix.__class__ is not int or suffix.__class__ is not int or prefix < 0 or suffix < 0 \
                or x.__class__ is not torch.Tensor or x.dim() != 3 or torch.compiler.is_compiling():
            return None
        taken = self._takes(x, (self.batch, prefix + plan.num_tokens + suffix, x.shape[2]))
        if taken is None:
            return None
        x, strides = taken
        if mode == "mean":
            return self.kernels.segment_launch(x, strides, plan.members, self.member_strides, plan.row_start,
                                               self.start_strides, plan.num_tokens, plan.num_rows,
                                               max_members=plan.max_members, prefix=prefix, suffix=suffix,
                                               work=self.work)
        if mode == "prune":
            return self.kernels.gather_launch(x, strides, plan.rep_token, self.rep_strides, plan.num_rows,
                                              prefix=prefix, suffix=suffix)
        return None

    def unmerge(self, plan, y, residual, gate, cache, mcw, gate_first, prefix, suffix, addend=None):
        """``plan.unmerge(y, ...)``, or None where the checked path must run."""
        if prefix.__class__ is not int or suffix.__class__ is not int or prefix < 0 or suffix < 0 \
                or y.__class__ is not torch.Tensor or y.dim() != 3 or torch.compiler.is_compiling() \
                or (mcw.__class__ is not float and mcw.__class__ is not int) or not 0.0 <= mcw <= 1.0:
            return None
        batch, channels, dtype = self.batch, y.shape[2], y.dtype
        taken = self._takes(y, (batch, prefix + plan.num_rows + suffix, channels))
        if taken is None:
            return None
        y, strides = taken
        res_arg = cache_arg = add_arg = self.kernels.NO_TENSOR  # (tensor, its first 2 strides) or (None, 0, 0)
        if residual is not None:
            taken = self._takes(residual, (batch, prefix + plan.num_tokens + suffix, channels), dtype)
            if taken is None:
                return None
            res_arg = (taken[0], taken[1][0], taken[1][1])
        if addend is not None:
            taken = self._takes(addend, (batch, prefix + plan.num_tokens + suffix, channels), dtype)
            if taken is None:
                return None
            add_arg = (taken[0], taken[1][0], taken[1][1])
        if cache is not None:
            taken = self._takes(cache, (batch, plan.num_tokens, channels), dtype)
            if taken is None:
                return None
            cache_arg = (taken[0], taken[1][0], taken[1][1])
        if gate is not None:
            taken = self._takes(gate, (batch, channels))
            if taken is None:
                return None
            gate = taken[0]
        blend = plan._blend_u8
        if blend is None:
            blend = plan._blend_u8 = (plan.blend.view(torch.uint8), *self.row_strides)  # the rows' layout
        return self.kernels.gather_launch(y, strides, plan.row_of_token, self.row_strides, plan.num_tokens,
                                          residual=res_arg, gate=gate, cache=cache_arg, blend=blend,
                                          mcw=float(mcw), gate_first=bool(gate_first), prefix=prefix, suffix=suffix,
                                          addend=add_arg)


class BlockPlanner:
    """SSM (``kind="ssm"``) or IDM plans for ``[batch, num_tokens, C]`` metrics on ``grid``, the
    arguments checked by ``planning.block_planner``: the Triton launches of ``planning``'s
    ``_ssm_triton`` / ``_idm_triton`` (the same kernels, constexprs and draws) from constants
    computed here once. ``work``: a dict for the launches' temporaries (scores, ranks, matches,
    scratch; ``csrc_triton.scores.work_buffer``), reused by every plan it builds."""

    def __init__(self, kind, batch, num_tokens, grid, window, n_remove, li_mode, backend, device, a_s=0.0,
                 a_d=0.0, work=None):
        from ..csrc_triton import match, plan_build, scores, select  # lazy, as in planning

        self._scores, self._select, self._build, self._match = scores, select, plan_build, match
        self.kind, self.batch, self.num_tokens, self.device = kind, batch, num_tokens, device
        self.grid, self.window = grid_3d(grid, window)
        self.window_tokens, windows = window_size(window), num_windows(grid, window)
        if kind == "ssm":
            self.count = ref_schedule.ssm_windows_to_merge(n_remove, self.window_tokens, windows)  # windows merged
            self.num_rows = num_tokens - (self.window_tokens - 1) * self.count
        else:
            self.count = ref_schedule.idm_tokens_to_merge(n_remove, num_tokens - windows)  # candidates merged
            self.num_rows = num_tokens - self.count
        self.li_mode, self.prune, self.a_s, self.a_d, self.work = li_mode, li_mode == "prune", a_s, a_d, work
        self.apply = BlockApply(backend, device, batch, num_tokens, self.num_rows, work=work)
        self._shared = {}  # batch -> BlockApply of the plan expanded to it

    def ssm(self, metric, li, dst_pos, li_out) -> MergePlan:
        """``plan_ssm`` (released score); ``dst_pos``: the drawn positions ``[>= B, >= R]`` or None."""
        grid, window, work = self.grid, self.window, self.work
        scores = self._scores.window_scores(metric, grid, window, li=li if self.a_s != 0.0 else None, a_s=self.a_s,
                                            work=work)
        rank = self._select.topk_rank(scores, self.count, work=work)
        outs = self._build.ssm_plan(rank, dst_pos if self.count else None, grid, window, self.num_rows, li=li,
                                    prune=self.prune, li_out=li_out, work=work)
        plan = self._plan(outs)
        plan.max_members = self.window_tokens  # rows are whole windows or single tokens
        return plan

    def idm(self, metric, li, dst_pos, li_out, received=None) -> MergePlan:
        """``plan_idm`` (``plan_idm_attention`` with ``received``); the dsts from ``li`` when given,
        else at ``dst_pos`` (``[>= B, G]``), else at position 0."""
        if li is not None:
            dst_pos = None
        build, work = self._build, self.work
        dst_token, cand_token = build.bipartite_lists(self.grid, self.window, metric.shape[0], self.device,
                                                      li=li if dst_pos is None else None, dst_pos=dst_pos, work=work)
        best, match = self._match.bipartite_match(metric, cand_token, dst_token, work=work)
        if received is not None:
            score = ref_attention.idm_attention_score(received, li, self.a_d)  # elementwise, no host sync
            best = ref_plans.candidate_rank_score(best, score, cand_token).contiguous()
        chosen = self._select.topk_rank(best, self.count, work=work)
        return self._plan(build.bipartite_plan(cand_token, dst_token, match, chosen, self.num_tokens, self.num_rows,
                                               li=li, prune=self.prune, li_out=li_out, work=work))

    def _plan(self, outs) -> MergePlan:
        plan = MergePlan._trusted(*outs[:5], self.num_tokens, self.num_rows)
        plan.li_next, plan.li_mode, plan._fast = outs[5], self.li_mode, self.apply
        if call_debug():  # full checks on request only (a host synchronisation on a GPU)
            plan._check_layout()
            plan.check()
        return plan

    def shared(self, plan, batch: int) -> MergePlan:
        """The batch-1 ``plan`` repeated for ``batch`` rows (views), as ``dit.state.expand_plan``."""
        apply = self._shared.get(batch)
        if apply is None:
            apply = self._shared[batch] = BlockApply(self.apply.backend, self.device, batch, self.num_tokens,
                                                     self.num_rows, expanded=True, work=self.work)
        out = MergePlan._trusted(plan.row_of_token.expand(batch, -1), plan.members.expand(batch, -1),
                                 plan.row_start.expand(batch, -1), plan.rep_token.expand(batch, -1),
                                 plan.blend.expand(batch, -1), self.num_tokens, self.num_rows)
        out.max_members, out.li_mode, out._fast = plan.max_members, plan.li_mode, apply
        out.li_next = plan.li_next.expand(batch, -1)
        return out
