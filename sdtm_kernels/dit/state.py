"""``SDTMState``: the per-model state shared by the patched blocks (SPEC 3.4, 3.5).

The wrapped transformer calls ``begin_call(timestep, grid)`` once per forward (diffusers models:
a forward pre-hook; user models: by hand) and ``end_call()`` after it. The parts of the state:

* ``steps.StepRules``: which step and call index a call is (the scheduler's steps inside a
  patched pipeline, timestep changes otherwise; new generations), the step's mode and ratio;
* ``buffers.CallBuffers``: the ``li`` buffers, the step's random dst draws and their generator,
  the caches (``BlockSlot``), the stacked rotary table;
* ``block_plans.BlockPlans``: ``build_plan`` and its eager block path;
* here: the call's decisions (``begin_call`` / ``end_call``), the slots, ``min_saving``'s FLOP
  rule, statistics and pickling.

Compile and CUDA graphs (docs/SEMANTICS.md, "Compiled models"). Every per-step decision is made
here, in ``begin_call``, outside the blocks: the step's mode, the (level-quantised) removal count
``removal`` and, per block, a ``BlockSlot`` (``block._sdtm_slot``) with the block's mode, its row
of the step's random dst draws, and its caches. A block reads only those values, which repeat
from step to step, so a compiled block or model sees a few distinct cases (one graph each) and
no growing Python state. ``li`` and the draws live in static buffers updated in place, the caches
become static buffers once a compiled call wrote them (``buffers``). Statistics of a compiled
block are collected by ``end_call``.

Slabs (``config.shards = k``, docs/PARALLEL.md): a call's grid is planned as ``k`` slabs cut along
its first axis (``plan_grid``), each with the same ``removal`` and the same row of dst draws, as
the ranks of a k-way context-parallel run plan theirs; under context parallelism the grid
``begin_call`` gets is already the rank's slab (``parallel.local_grid``).
"""
import math
from typing import Optional

import torch

from .._validation import check_int, read_call_flags
from ..reference import schedule as ref_schedule
from .block_plans import BlockPlans, expand_plan
from .buffers import DEFAULT_SEED, BlockSlot, CallBuffers
from .config import SDTMConfig
from .parallel import shard_grid
from .steps import StepRules, nearest_level, stage_levels, timestep_value

ATTENTION_SUBLAYERS = ("attn", "attn2", "cross")
__all__ = ["ATTENTION_SUBLAYERS", "DEFAULT_SEED", "BlockSlot", "SDTMState", "block_flops", "expand_plan",
           "nearest_level", "stage_levels", "timestep_value"]


class SDTMState(StepRules, CallBuffers, BlockPlans):
    """Step counter, ratio schedule, ``li`` counters, caches, generator and statistics.

    ``stats`` holds one dict per block call of the current generation:
    ``{"step", "call", "layer", "mode", "attn", "mlp", ...}`` where ``mode`` is
    ``"protected"`` (exact, cache refreshed), ``"layer"`` (protected layer), ``"exact"``
    (no step context), ``"skip"`` (``min_saving``), ``"ssm"`` or ``"idm"``, and ``attn`` /
    ``mlp`` are the numbers of image tokens each sub-layer saw. With ``keep_plans = True``
    (debugging, tests; eager mode) each record also holds the block's ``MergePlan`` under ``"plan"``.
    """

    keep_plans = False

    def __init__(self, config: SDTMConfig, num_steps: Optional[int] = None, num_layers: int = 0):
        self.config = config
        self.num_layers = num_layers
        self.num_steps = num_steps if num_steps is not None else config.num_steps
        self.request = None  # apply_sdtm: (preset, explicit options) this config was made from
        self.driver = None  # patched pipeline call: counts the scheduler's steps (see the module doc)
        # a pipeline's second transformer (Wan 2.2 transformer_2): its steps are the pipeline's own
        # scheduler-step indices, not counted from its first call
        self.global_steps = False
        self.slots = []  # BlockSlot per layer (patch.py gives block l the slot slots[l])
        self._warned = set()
        self._li_buffers = {}  # call index -> static int32 [B, N] li buffer (kept across generations)
        self._li_written = {}  # call index -> whether its buffer may hold non-zero counters
        self._draw_buffer = None  # static int64 [layers, B, G] buffer of the step's dst draws
        self.reset()

    def _slot_of(self, layer) -> BlockSlot:
        return layer if isinstance(layer, BlockSlot) else self.slot(layer)

    def slot(self, layer: int) -> BlockSlot:
        """The ``BlockSlot`` of ``layer`` (created on first use)."""
        while len(self.slots) <= layer:
            slot = BlockSlot(len(self.slots))
            self.slots.append(slot)
            if self.active:
                self._prepare_slot(slot)
        return self.slots[layer]

    # -- generations -----------------------------------------------------------------------
    def reset(self, num_steps: Optional[int] = None):
        """Start a new generation; optionally set a new step count."""
        if num_steps is not None:
            self.num_steps = check_int("num_steps", num_steps, minimum=1)
        self._reset_steps()
        self.grid = None
        self.text_len = None
        self.active = False
        self.mode = "exact"
        self.removal = 0
        self._savings = {}  # (mode, N, C) -> block_saving of this call
        self._reset_block_path()
        self._reset_buffers()
        self.generations = getattr(self, "generations", -1) + 1
        self.stats = []
        self.grid_cache = None  # patch.py: (key of the last Flux img_ids tensor, its grid)

    # -- calls -----------------------------------------------------------------------------
    def begin_call(self, timestep, grid, text_len: Optional[int] = None, batch: Optional[int] = None,
                   device=None):
        """Register one transformer call at ``timestep`` (tensor or number) on token grid ``grid``.

        With the call's ``batch`` and ``device`` (the diffusers hook passes them) the generator,
        the ``li`` buffer and this step's random dst draws are made here, outside the blocks: a
        compiled block never touches the generator and the draw is one launch per call."""
        if grid is not None:
            grid = tuple(int(g) for g in grid)  # (H, W) or (T, H, W)
            if grid[0] % self.config.shards:  # as a k-rank run whose slabs are not whole rows: run exactly
                self._warn_once("shards", f"SDTM: shards={self.config.shards} must divide the first axis of the "
                                f"token grid {grid} (every slab is planned on its own with the same merge count); "
                                "such calls run without merging")
                grid = None
        if self.active:  # the previous call was not closed (a user model without end_call)
            self.end_call()
        driven = self.driver is not None and not self._driver_off
        if driven and self.step < 0:  # a pipeline's first call: the scheduler steps it will run
            learned = self.driver.num_steps()
            if learned:
                self.num_steps = learned
        if self.num_steps is None:
            raise ValueError(
                "num_steps is unknown: pass num_steps= to apply_sdtm when patching a bare transformer "
                "(or call sdtm_kernels.dit.reset_sdtm(model, num_steps=...)), or patch the pipeline"
            )
        if timestep is None:
            timestep_value(timestep)  # the error
        if driven:
            self._begin_scheduler_step(timestep, self.driver)
        else:
            self._begin_timestep(timestep_value(timestep), timestep)
        self.grid = grid
        self.text_len = text_len
        self.active = True
        if device is None and isinstance(timestep, torch.Tensor):
            device = timestep.device
        self._prepare_call(batch, None if device is None else torch.device(device))

    def _prepare_call(self, batch, device):
        """The decisions of this call, made once for all blocks (see the module doc)."""
        read_call_flags()  # SDTM_DEBUG, once per call
        self._block_plans, self._savings = {}, {}
        self.mode = "exact" if self.grid is None else self.step_mode()
        num_tokens = 0 if self.grid is None else math.prod(self.grid)
        shard_tokens = num_tokens // self.config.shards  # each slab is planned with the same count
        self.removal = self.n_remove(shard_tokens) if self.mode in ("ssm", "idm") else 0
        self.li_fresh = self._li_fresh.get(self.call, True)
        self.li_now = None
        if batch is not None and device is not None and self.grid is not None:
            self.li_now = self._li_buffer(batch, num_tokens, device)
        for slot in self.slots:
            self._prepare_slot(slot)
        if device is not None:
            self._ensure_generator(device)
            if batch is not None and self.grid is not None and self._draws_needed(batch):
                self._draw_step(batch, device)

    def _prepare_slot(self, slot):
        mode = self.mode
        if mode in ("ssm", "idm") and self.layer_protected(slot.layer):
            mode = "layer"
        slot.mode = mode
        slot.cache = slot._caches.setdefault(self.call, {})
        slot.fresh = {}
        slot.traced = None
        if self._draw_buffer is not None and self._draw_key is not None:
            slot.draw = self._draw_buffer[min(slot.layer, self._draw_buffer.shape[0] - 1)]

    def end_call(self):
        """Close the call: adopt the caches stored by protected blocks and the statistics of
        compiled blocks (made in the graph, collected here, in layer order)."""
        self.active = False
        traced = []
        for slot in self.slots:
            if slot.fresh:
                self._adopt_fresh(slot)
            if slot.traced is not None:
                traced.append(dict(step=self.step, call=self.call, layer=slot.layer, **slot.traced))
                slot.traced = None
        self.stats.extend(traced)
        if self.grid is not None:
            self._li_fresh[self.call] = self.li_fresh

    # -- decisions -------------------------------------------------------------------------
    def block_saving(self, mode: str, num_tokens: int, channels: int) -> float:
        """Fraction of a block's FLOPs merging saves at this step (the rule of ``min_saving``):
        a generic DiT block, ``F(n) = 24 n C^2 + 4 n^2 C`` (projections, attention, MLP of ratio 4;
        prompt tokens left out); SSM runs the whole block on M rows, IDM only the MLP
        (``16 (N - M) C^2``). M follows from the call's ``removal`` (per slab with ``shards``), as
        the plan's."""
        key = (mode, num_tokens, channels, self.removal)
        saving = self._savings.get(key)
        if saving is None:  # once per call
            n, c = num_tokens, channels
            removed = self.config.shards * ref_schedule.tokens_removed(mode, self.removal, self.plan_grid, self.window)
            saved = block_flops(n, c) - block_flops(n - removed, c) if mode == "ssm" else 16 * removed * c * c
            saving = self._savings[key] = saved / block_flops(n, c) if n else 0.0
        return saving

    @property
    def plan_grid(self):
        """The grid one plan covers: the call's grid, or one of its ``config.shards`` slabs (the
        first axis cut into equal parts: what one rank holds under context parallelism)."""
        return shard_grid(self.grid, self.config.shards)

    @property
    def window(self):
        """The merge window for the call's grid: ``config.window`` ``(wh, ww)``, as ``(1, wh, ww)`` on
        a ``(T, H, W)`` grid (windows inside each frame) unless the config gives a 3-D window."""
        window = tuple(self.config.window)
        if self.grid is not None and len(self.grid) == 3 and len(window) == 2:
            return (1,) + window
        return window

    def layer_protected(self, layer: int) -> bool:
        f = self.config.protect_layers
        return bool(f) and (layer % f == 0 or layer == self.num_layers - 1)

    # -- pickling: the settings travel, the generation does not -------------------------------
    def __getstate__(self):
        return {"config": self.config, "num_layers": self.num_layers, "num_steps": self.num_steps,
                "request": self.request, "keep_plans": self.keep_plans, "_warned": set(self._warned),
                "slots": self.slots, "global_steps": self.global_steps}

    def __setstate__(self, values):
        keep_plans = values.pop("keep_plans", False)
        self.__dict__.update(values)
        if keep_plans != type(self).keep_plans:
            self.keep_plans = keep_plans
        self.driver = None
        self._li_buffers = {}
        self._li_written = {}
        self._draw_buffer = None
        self.reset()

    # -- statistics ------------------------------------------------------------------------
    def steps_stats(self, key: str = "attn"):
        """``{(step, layer): tokens}`` for the first call of each step."""
        return {(s["step"], s["layer"]): s[key] for s in self.stats if s["call"] == 0}


def block_flops(tokens: int, channels: int) -> int:
    """FLOPs of a generic DiT block on ``tokens`` image tokens (``min_saving``'s model): projections,
    attention and an MLP of ratio 4, ``24 n C^2 + 4 n^2 C``; the MLP alone is ``16 n C^2``."""
    return 24 * tokens * channels * channels + 4 * tokens * tokens * channels
