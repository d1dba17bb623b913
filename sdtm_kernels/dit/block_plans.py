"""The plans of ``SDTMState``: ``build_plan`` builds one block's merge plan from its metric, with
the call's removal count, window, ``li`` buffer and dst draws.

Eager mode takes the block path: the planner's arguments are checked at the first block of a call
with a metric of that kind (``_block_entry``: a ``_BlockEntry`` holding ``planning.block_planner``'s
planner), later blocks launch the Triton kernels without checks (``_block_plan``). A compiled block,
and every block with ``config.shards > 1`` (slabs: each planned on its own, joined afterwards), goes
the public planners' checked way.
"""
import torch

from ..plan import MergePlan, join_shards
from ..planning import block_planner, plan_idm, plan_idm_attention, plan_ssm
from .buffers import BlockSlot
from .parallel import slab_rows


class BlockPlans:
    """``SDTMState.build_plan`` and its block path. Per generation (``_reset_block_path``):
    ``_block_plans`` (this call's entries, by kind of metric) and ``_work`` (device -> the block
    path's reused temporaries)."""

    def _reset_block_path(self):
        self._block_plans = {}  # the block path of this call: (mode, batch, shape, dtype, device, ...) -> entry
        self._work = {}  # device -> the block path's reused temporaries (per generation)

    def build_plan(self, metric: torch.Tensor, mode: str, batch: int, received=None, layer=0):
        """Plan for one block from its attention-input ``metric`` ``[b, N, C]`` (b = batch, or
        1 for a plan shared by the batch); updates ``li`` in place. ``received [b, N]`` (IDM with
        ``idm_score="attention"``): attention each image token receives from the prompt.
        ``layer``: the block's ``BlockSlot`` (or its layer index).

        Eager mode takes the block path: the planner's arguments are checked at the first block of
        a call with a metric of that kind (``_block_entry``), later blocks launch the Triton
        kernels without checks (``ops._block_path``; debug mode, read once per call, checks the
        plans' contents)."""
        slot = layer if layer.__class__ is BlockSlot else self._slot_of(layer)
        if not torch.compiler.is_compiling():  # eager: the block path, arguments checked once per call
            key = (mode, batch, metric.shape, metric.dtype, metric.device, received is None)
            entry = self._block_plans.get(key)
            if entry is None or entry.config is not self.config:
                entry = self._block_plans[key] = self._block_entry(metric, mode, batch, received, slot)
            if entry.planner is not None:
                return self._block_plan(entry, slot, metric, mode, batch, received)
        cfg = self.config
        self._ensure_generator(metric.device)  # made by begin_call when the caller gives the device
        li_buf = self._call_li(batch, metric.shape[1], metric.device)
        random_dst = cfg.random_dst and batch % 2 == 0
        # Structure plans read li as a bonus (zeros == none); detail plans take their dsts from li
        # only once a block wrote it.
        plan_li = None if (mode != "ssm" and self.li_fresh) else li_buf[: metric.shape[0]]
        needs_draw = random_dst and (mode == "ssm" or plan_li is None)  # IDM with li: dsts from li
        draw = self._slot_draw(slot, metric) if needs_draw else None
        # the next li is written in place into the buffer (by the plan kernel in eager mode)
        common = dict(window=self.window, li=plan_li, random_dst=random_dst, generator=self.generator,
                      backend=cfg.backend, li_mode=cfg.merge_mode, dst_draw=draw, li_out=li_buf[: metric.shape[0]])
        n_remove, shards, source = self.removal, cfg.shards, metric
        if shards > 1:  # every slab planned on its own: slabs become batch rows, joined afterwards
            source, received = slab_rows(metric, shards), slab_rows(received, shards)
            for name in ("li", "li_out", "dst_draw"):
                common[name] = slab_rows(common[name], shards, repeat=name == "dst_draw")
        if mode == "ssm":
            plan = plan_ssm(source, self.plan_grid, n_remove, a_s=cfg.a_s, **common)
        elif received is not None:
            plan = plan_idm_attention(source, self.plan_grid, n_remove, received, a_d=cfg.a_d, **common)
        else:
            plan = plan_idm(source, self.plan_grid, n_remove, **common)
        if shards > 1:
            plan = join_shards(plan, shards)
        self.li_fresh = False
        self._li_written[self.call] = True
        if metric.shape[0] != batch:  # a plan shared by the batch: its counter lives in row 0
            li_next = plan.li_next
            plan = expand_plan(plan, batch)
            plan.li_next = li_next.expand(batch, -1)
        return plan

    def _call_li(self, batch, num_tokens, device):
        """This call's li buffer, made here for ``[batch, N]`` plans on ``device`` when ``begin_call``
        made none like it (user models)."""
        li_buf = self.li_now
        if li_buf is None or tuple(li_buf.shape) != (batch, num_tokens) or li_buf.device != device:
            li_buf = self.li_now = self._li_buffer(batch, num_tokens, device)
            self._block_plans = {}  # their li views are of the old buffer
        return li_buf

    def _block_entry(self, metric, mode, batch, received, slot):
        """The block path's entry for blocks like this one in this call: the arguments of
        ``build_plan``'s planner call checked once (``planning.block_planner``: the public
        planner's errors), the li view, whether the step's draws are ready (no per-block checks)."""
        cfg = self.config
        entry = _BlockEntry(cfg)
        if cfg.shards != 1:
            return entry  # slabs: the planners of build_plan
        self._ensure_generator(metric.device)
        b = metric.shape[0]
        li_buf = self._call_li(batch, metric.shape[1], metric.device)
        entry.li = li_buf if b == batch else li_buf[:b]
        entry.random_dst = cfg.random_dst and batch % 2 == 0
        plan_li = None if (mode != "ssm" and self.li_fresh) else entry.li
        draw = self._slot_draw(slot, metric) if entry.random_dst and (mode == "ssm" or plan_li is None) else None
        buf, key = self._draw_buffer, self._draw_key
        entry.draws_ready = (buf is not None and key is not None and key[:2] == (self.step, self.call)
                             and buf.shape[1] >= b and buf.device == metric.device
                             and all(s.draw is not None for s in self.slots))
        entry.planner = block_planner(mode, metric, self.plan_grid, self.removal, window=self.window, li=plan_li,
                                      a_s=cfg.a_s, a_d=cfg.a_d, received=received, random_dst=entry.random_dst,
                                      generator=self.generator, backend=cfg.backend, li_mode=cfg.merge_mode,
                                      dst_draw=draw, li_out=entry.li,
                                      work=self._work.setdefault(metric.device, {}))
        return entry

    def _block_plan(self, entry, slot, metric, mode, batch, received):
        """``build_plan`` on the block path (the checks were made by ``_block_entry``)."""
        li = entry.li
        plan_li = None if (mode != "ssm" and self.li_fresh) else li
        draw = None
        if entry.random_dst and (mode == "ssm" or plan_li is None):  # IDM with li: dsts from li
            draw = slot.draw if entry.draws_ready else self._slot_draw(slot, metric)
        planner = entry.planner
        if mode == "ssm":
            plan = planner.ssm(metric, plan_li, draw, li)
        else:
            plan = planner.idm(metric, plan_li, draw, li, received)
        self.li_fresh = False
        self._li_written[self.call] = True
        if metric.shape[0] != batch:  # a plan shared by the batch: its counter lives in row 0
            plan = planner.shared(plan, batch)
        return plan


class _BlockEntry:
    """``SDTMState._block_entry``: ``planner`` (None: the block goes ``build_plan``'s checked way),
    ``li`` (the li view of the plan's rows), ``random_dst``, ``draws_ready``, ``config``."""

    __slots__ = ("config", "planner", "li", "random_dst", "draws_ready")

    def __init__(self, config):
        self.config, self.planner, self.li, self.random_dst, self.draws_ready = config, None, None, False, False


def expand_plan(plan, batch: int):
    """A batch-1 plan repeated for ``batch`` rows (one plan shared by the whole batch)."""
    if plan.batch_size == batch:
        return plan

    def rep(t):
        return t.expand(batch, -1)  # a view: every kernel and reference op takes strides

    shared = MergePlan(rep(plan.row_of_token), rep(plan.members), rep(plan.row_start), rep(plan.rep_token),
                       rep(plan.blend), num_tokens=plan.num_tokens, num_rows=plan.num_rows, validate=False)
    shared.max_members, shared.li_mode = plan.max_members, plan.li_mode
    return shared
