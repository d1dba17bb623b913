"""``SDTMState``: the per-model state shared by the patched blocks (SPEC 3.4, 3.5).

Step rule. The wrapped transformer calls ``begin_call(timestep, grid)`` once per forward
(diffusers models: a forward pre-hook; user models: by hand). Two sources tell the steps:

* Inside a patched pipeline call (``state.driver`` set): the steps are the scheduler's steps.
  The driver counts the pipeline's ``scheduler.step`` calls (one per model evaluation), so the
  call made after ``e`` of them belongs to step ``e // scheduler.order`` (Heun-type schedulers,
  ``order = 2``: both evaluations of a step are one step, with call indices 0 and 1), and
  ``num_steps`` is the number of scheduler steps the pipeline really runs, learned at the
  generation's first call (``strength < 1`` img2img / inpainting: only the steps after
  ``t_start``; step 0 is the first step that runs).
* Otherwise (a bare transformer, or a pipeline whose timestep changes without a scheduler
  step): a timestep value that differs from the previous call's is a new step; the same value
  again (a second call for CFG or a guidance pass) is the same step with its own ``call``
  index, so every pass keeps its own cache and ``li``.

The state starts a new generation (step 0, empty cache, fresh ``li`` and generator) when
``reset()`` is called (the patched pipeline does it at every ``__call__``), when a new
timestep equals the first timestep of the current generation, when the timesteps turn back
(they went down and now go up, or the reverse: a generation stopped early and restarted; a
``RuntimeWarning`` is raised once) and when the step count would pass ``num_steps`` (also
warned once, unless the timesteps turned back: a complete generation followed by a new one).
Host reads: inside a patched pipeline call the step comes from the scheduler-step count, so
the timestep is not read at all when the scheduler stepped since the previous call; it is read
(one Python float, outside the blocks) only for a second call of the same step and for bare
transformers. Nothing inside a block reads tensor values.

Compile and CUDA graphs (docs/SEMANTICS.md, "Compiled models"). Every per-step decision is made
here, in ``begin_call``, outside the blocks: the step's mode, the (level-quantised) removal count
``removal`` and, per block, a ``BlockSlot`` (``block._sdtm_slot``) with the block's mode, its row
of the step's random dst draws, and its caches. A block reads only those values, which repeat
from step to step, so a compiled block or model sees a few distinct cases (one graph each) and
no growing Python state. ``li`` lives in one static ``[B, N]`` buffer per call index, updated in
place; the draws are made in place into a static buffer; the caches become static buffers (updated
in place by ``end_call``) once a compiled call wrote them. Statistics of a compiled block are
collected by ``end_call``.

Slabs (``config.shards = k``, docs/PARALLEL.md): a call's grid is planned as ``k`` slabs cut along
its first axis (``plan_grid``), each with the same ``removal`` and the same row of dst draws, as
the ranks of a k-way context-parallel run plan theirs; under context parallelism the grid
``begin_call`` gets is already the rank's slab (``parallel.local_grid``).
"""
import math
import operator
import warnings
from typing import Optional

import torch

from .._validation import check_int, read_call_flags
from ..plan import join_shards
from ..planning import block_planner, plan_idm, plan_idm_attention, plan_ssm, ratio_schedule
from ..reference import schedule as ref_schedule
from ..reference import windows as ref_windows
from .config import SDTMConfig
from .parallel import shard_grid, slab_rows

DEFAULT_SEED = 0
ATTENTION_SUBLAYERS = ("attn", "attn2", "cross")


class BlockSlot:
    """One patched block's view of the current call, written by ``SDTMState.begin_call``.

    ``mode``: the block's mode at this step before the block's own rule (``"protected"``,
    ``"layer"``, ``"ssm"``, ``"idm"``, or ``"exact"`` without a step context). ``draw``: this
    layer's row of the step's random dst draws (a view of a static buffer) or None. ``cache``:
    ``{sub-layer: gated output}`` of the last protected step of this call index. ``fresh``:
    what a protected step of the current call stored, adopted into ``cache`` by ``end_call``.
    ``traced``: the statistics record a compiled run of the block filled (collected by ``end_call``).
    """

    def __init__(self, layer: int):
        self.layer = layer
        self.mode = "exact"
        self.draw = None
        self.cache = {}
        self.fresh = {}
        self.traced = None
        self.plan = None  # keep_plans: the last plan (debugging)
        self._caches = {}  # call index -> cache (cleared at a new generation)
        self._static = {}  # (call index, sub-layer) -> static cache buffer (compiled calls; kept)

    def __getstate__(self):
        return {"layer": self.layer}

    def __setstate__(self, values):
        self.__init__(values["layer"])

    def __repr__(self):
        return f"BlockSlot(layer={self.layer}, mode={self.mode!r})"


class SDTMState:
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

    # -- generations and steps -------------------------------------------------------------
    def reset(self, num_steps: Optional[int] = None):
        """Start a new generation; optionally set a new step count."""
        if num_steps is not None:
            self.num_steps = check_int("num_steps", num_steps, minimum=1)
        self.step = -1
        self.call = 0
        self._first_ts = None  # (timestep as passed, its float or None until read)
        self._last_ts = None
        self.grid = None
        self.text_len = None
        self.active = False
        self.mode = "exact"
        self.removal = 0
        self.li_now = None  # this call's li buffer
        self._block_plans = {}  # the block path of this call: (mode, batch, shape, dtype, device, ...) -> entry
        self._savings = {}  # (mode, N, C) -> block_saving of this call
        self._work = {}  # device -> the block path's reused temporaries (per generation)
        self.li_fresh = True  # no block of this call index wrote li yet in this generation
        self._li_fresh = {}
        self._rotary = None
        self._draw_key = None
        self.generator = None
        self.generations = getattr(self, "generations", -1) + 1
        self.stats = []
        self.grid_cache = None  # patch.py: (key of the last Flux img_ids tensor, its grid)
        self._direction = None  # +1 / -1: whether the timesteps of this generation go up or down
        self._evals0 = 0  # driver: scheduler steps counted before this generation's first call
        self._entry_step = None  # global_steps: the step of this generation's first call
        self._last_evals = None
        self._driver_off = False
        self._levels = None  # (num_steps, config) -> per-stage ratio levels
        for slot in getattr(self, "slots", ()):
            slot._caches = {}
            slot.cache = {}

    @property
    def first_timestep(self):
        return _timestep_float(self, "_first_ts")

    @property
    def last_timestep(self):
        return _timestep_float(self, "_last_ts")

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

    def _li_buffer(self, batch, num_tokens, device):
        """This call index's static li buffer, zeroed at the start of a generation (zeros and
        "no li" give the same structure plans; the detail stage tells them apart by ``li_fresh``)."""
        buf = self._li_buffers.get(self.call)
        if buf is None or tuple(buf.shape) != (batch, num_tokens) or buf.device != device:
            buf = torch.zeros(batch, num_tokens, dtype=torch.int32, device=device)
            _mark_static(buf)
            self._li_buffers[self.call] = buf
            self._li_fresh[self.call] = self.li_fresh = True
        elif self.li_fresh and self._li_written.get(self.call):
            buf.zero_()
        self._li_written[self.call] = not self.li_fresh
        return buf

    def _ensure_generator(self, device):
        if self.generator is None or self.generator.device != device:
            cfg = self.config
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(DEFAULT_SEED if cfg.seed is None else cfg.seed)

    def _draws_needed(self, batch: int) -> bool:
        cfg = self.config
        if not (cfg.random_dst and batch % 2 == 0 and cfg.ratio != 0.0):
            return False
        # IDM takes its dsts from li when this pass has one
        return self.mode == "ssm" or (self.mode == "idm" and self.li_fresh)

    def _draw_step(self, batch: int, device):
        """One ``randint(K, (layers, batch, G))`` for every block of this call, drawn in place into a
        static buffer (row ``l``: layer ``l``; a plan shared by the batch takes its first row)."""
        window = self.window
        shape = (max(self.num_layers, len(self.slots), 1), batch, ref_windows.num_windows(self.plan_grid, window))
        key = (self.step, self.call, shape, device)
        if self._draw_key == key:
            return
        self._block_plans = {}  # their draws are checked against the buffer
        buf = self._draw_buffer
        if buf is None or tuple(buf.shape) != shape or buf.device != device:
            buf = torch.empty(shape, dtype=torch.int64, device=device)
            _mark_static(buf)
            self._draw_buffer = buf
        if self.generator.device == device:
            torch.randint(ref_windows.window_size(window), shape, generator=self.generator, device=device, out=buf)
        else:
            buf.copy_(torch.randint(ref_windows.window_size(window), shape, generator=self.generator,
                                    device=self.generator.device))
        self._draw_key = key
        for slot in self.slots:
            slot.draw = buf[min(slot.layer, shape[0] - 1)]

    def _begin_scheduler_step(self, timestep, driver):
        """Step = scheduler steps done in this generation // scheduler order (pipeline calls).
        The timestep is read on the host only for a second call with no scheduler step between."""
        evals = driver.evals
        if self.step < 0:
            self._evals0 = 0 if self.global_steps else evals
        step = (evals - self._evals0) // driver.order
        if self.step < 0:
            self._entry_step = step  # a second transformer's first step: protected (its first cache)
        if self.step >= 0 and step == self.step:
            if evals == self._last_evals and timestep_value(timestep) != self.last_timestep:
                # the timestep moved but the scheduler did not step: this pipeline does not call
                # scheduler.step once per evaluation, so count steps by timestep from here on
                self._driver_off = True
                self._begin_timestep(timestep_value(timestep), timestep)
                return
            self.call += 1
        else:
            if step >= self.num_steps:
                self._warn_once("pipeline", f"SDTM: the pipeline ran scheduler step {step} but the scheduler "
                                f"announced {self.num_steps} steps; the last steps reuse the final ratio")
            self.step = step
            self.call = 0
            if self._first_ts is None:
                self._first_ts = [timestep, None]
        self._last_ts = [timestep, None]
        self._last_evals = evals

    def _begin_timestep(self, value: float, timestep=None):
        """Step = a change of the timestep value (bare transformers)."""
        last = self.last_timestep
        if last is not None and value == last:
            self.call += 1
            self._last_ts = [timestep, value]
            return
        if self.step >= 0:
            turned = self._direction is not None and (value - last) * self._direction < 0
            if value == self.first_timestep:
                self.reset()
            elif self.step + 1 >= self.num_steps:
                if not turned:
                    self._warn_once("overrun", (
                        f"SDTM: step {self.step + 1} (timestep {value:g}) is past num_steps={self.num_steps}; "
                        "it was treated as the first step of a new generation (step counter, cache and li "
                        "restarted). Call sdtm_kernels.dit.reset_sdtm(model, num_steps=...) before each "
                        "generation with its real step count (or pass the right num_steps= to apply_sdtm)"))
                self.reset()
            elif turned:
                self._warn_once("restart", (
                    f"SDTM: timestep {value:g} after {last:g} at step {self.step} of "
                    f"{self.num_steps}: the timesteps turned back, so a generation was restarted without "
                    "reset_sdtm; SDTM started a new generation (step counter, cache and li restarted). "
                    "Call sdtm_kernels.dit.reset_sdtm(model, num_steps=...) before each generation"))
                self.reset()
        if self.step == 0 and self.first_timestep is not None:
            self._direction = 1.0 if value > self.first_timestep else -1.0
        self.step += 1
        self.call = 0
        if self.step == 0:
            self._first_ts = [timestep, value]
        self._last_ts = [timestep, value]

    def _warn_once(self, kind: str, message: str):
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def end_call(self):
        """Close the call: adopt the caches stored by protected blocks and the statistics of
        compiled blocks (made in the graph, collected here, in layer order)."""
        self.active = False
        traced = []
        for slot in self.slots:
            if slot.fresh:
                compiled = slot.traced is not None
                for name, value in slot.fresh.items():
                    if compiled:
                        value = slot._static[(self.call, name)] = _adopt(slot._static.get((self.call, name)), value)
                    slot.cache[name] = value
                slot.fresh = {}
            if slot.traced is not None:
                traced.append(dict(step=self.step, call=self.call, layer=slot.layer, **slot.traced))
                slot.traced = None
        self.stats.extend(traced)
        if self.grid is not None:
            self._li_fresh[self.call] = self.li_fresh

    # -- decisions -------------------------------------------------------------------------
    def step_mode(self) -> str:
        cfg = self.config
        if cfg.protect_steps and (self.step % cfg.protect_steps == 0
                                  or (self.global_steps and self.step == self._entry_step)):
            return "protected"
        return "ssm" if self.step <= cfg.switch_index(self.num_steps) else "idm"

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

    def step_ratio(self, step: int) -> float:
        """The fraction of image tokens removed at ``step``: the schedule (SPEC 3.1), quantised to
        ``config.ratio_levels`` levels per stage (docs/SEMANTICS.md, "Few shapes")."""
        cfg = self.config
        step = min(step, self.num_steps - 1)
        rho = ratio_schedule(step, self.num_steps, cfg.ratio, cfg.deviation)
        if not cfg.ratio_levels:
            return rho
        key = (self.num_steps, cfg)
        if self._levels is None or self._levels[0] != key:
            self._levels = (key, stage_levels(cfg, self.num_steps))
        levels = self._levels[1]["ssm" if step <= cfg.switch_index(self.num_steps) else "idm"]
        return nearest_level(rho, levels)

    def n_remove(self, num_tokens: int) -> int:
        if self.config.ratio == 0.0:  # merging off
            return 0
        return int(math.floor(num_tokens * self.step_ratio(max(self.step, 0))))

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

    def _slot_draw(self, slot, metric):
        """The block's random dst positions ``[b, G]`` (its row of the step's draw)."""
        if torch.compiler.is_compiling():  # begin_call drew them (a compiled model has the hook)
            return slot.draw[: metric.shape[0]]
        if slot.draw is None or slot.draw.shape[0] < metric.shape[0] or slot.draw.device != metric.device \
                or self._draw_key is None or self._draw_key[:2] != (self.step, self.call):
            self._draw_step(metric.shape[0], metric.device)  # not drawn in begin_call (user models)
        return slot.draw[: metric.shape[0]]

    def stacked_rotary(self, rotary):
        """``torch.stack(rotary)`` (Flux's ``(cos, sin)`` table), computed once per transformer call
        in eager mode and reused by every block of the call (the blocks receive the same tensors);
        a compiled model stacks in its graph (no identity checks there)."""
        if torch.compiler.is_compiling():
            return torch.stack(rotary)
        cached = self._rotary
        if cached is None or len(cached[0]) != len(rotary) or not all(map(operator.is_, cached[0], rotary)):
            self._rotary = cached = (tuple(rotary), torch.stack(rotary))
        return cached[1]

    def reset_li(self):
        """A protected layer: the next blocks start without li."""
        if self.li_now is not None and self._li_written.get(self.call):
            self.li_now.zero_()
            self._li_written[self.call] = False
        self.li_fresh = True

    # -- cache -----------------------------------------------------------------------------
    @property
    def cache(self) -> dict:
        """``{(call, layer, sub-layer): cached gated output}`` (a read-only view of the slots)."""
        return {(call, slot.layer, name): value for slot in self.slots
                for call, entries in slot._caches.items() for name, value in entries.items()}

    @property
    def li(self) -> dict:
        """``{call: li}`` of the call indices that have a counter in this generation (a view)."""
        return {call: buf for call, buf in self._li_buffers.items() if not self._li_fresh.get(call, True)}

    def get_cache(self, layer, name: str, like: torch.Tensor):
        slot = self._slot_of(layer)
        cache = slot.cache.get(name)
        if cache is None or cache.shape != like.shape or cache.dtype != like.dtype or cache.device != like.device:
            return None
        return cache

    def set_cache(self, layer, name: str, value: torch.Tensor):
        slot = self._slot_of(layer)
        slot.fresh[name] = value.detach()  # adopted by end_call (a fresh dict: nothing to guard on)

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


class _BlockEntry:
    """``SDTMState._block_entry``: ``planner`` (None: the block goes ``build_plan``'s checked way),
    ``li`` (the li view of the plan's rows), ``random_dst``, ``draws_ready``, ``config``."""

    __slots__ = ("config", "planner", "li", "random_dst", "draws_ready")

    def __init__(self, config):
        self.config, self.planner, self.li, self.random_dst, self.draws_ready = config, None, None, False, False


def block_flops(tokens: int, channels: int) -> int:
    """FLOPs of a generic DiT block on ``tokens`` image tokens (``min_saving``'s model): projections,
    attention and an MLP of ratio 4, ``24 n C^2 + 4 n^2 C``; the MLP alone is ``16 n C^2``."""
    return 24 * tokens * channels * channels + 4 * tokens * tokens * channels


def expand_plan(plan, batch: int):
    """A batch-1 plan repeated for ``batch`` rows (one plan shared by the whole batch)."""
    from ..plan import MergePlan

    if plan.batch_size == batch:
        return plan

    def rep(t):
        return t.expand(batch, -1)  # a view: every kernel and reference op takes strides

    shared = MergePlan(rep(plan.row_of_token), rep(plan.members), rep(plan.row_start), rep(plan.rep_token),
                       rep(plan.blend), num_tokens=plan.num_tokens, num_rows=plan.num_rows, validate=False)
    shared.max_members, shared.li_mode = plan.max_members, plan.li_mode
    return shared


def _mark_static(tensor):
    """A buffer updated in place at a fixed address (CUDA graphs need no copy of it)."""
    if torch.compiler.is_compiling():  # made inside a graph (a user model without batch/device)
        return
    try:
        torch._dynamo.mark_static_address(tensor)
    except Exception:  # noqa: BLE001 - an optional hint; a torch without it works the same
        pass


def _adopt(buffer, value):
    """The cache entry after a compiled protected step stored ``value`` (an output a CUDA graph
    may overwrite at its next replay): a copy into a static buffer, updated in place from then on."""
    if buffer is not None and buffer.shape == value.shape and buffer.dtype == value.dtype \
            and buffer.device == value.device and buffer.is_contiguous() and buffer is not value:
        return buffer.copy_(value)
    buffer = value.clone(memory_format=torch.contiguous_format)
    _mark_static(buffer)
    return buffer


def _timestep_float(state, name):
    """The float of a stored ``[timestep, value or None]`` (read on the host on first use)."""
    entry = getattr(state, name)
    if entry is None:
        return None
    if entry[1] is None:
        entry[1] = timestep_value(entry[0])
    return entry[1]


def stage_levels(config, num_steps: int) -> dict:
    """``{"ssm": levels, "idm": levels}``: ``config.ratio_levels`` evenly spaced removal fractions
    from the lowest to the highest scheduled fraction of the stage's merging (unprotected) steps
    (one level: their mean)."""
    count = config.ratio_levels
    switch = config.switch_index(num_steps)
    out = {}
    for stage in ("ssm", "idm"):
        steps = [s for s in range(num_steps) if (s <= switch) == (stage == "ssm")
                 and not (config.protect_steps and s % config.protect_steps == 0)]
        rhos = [ref_schedule.ratio_schedule(s, num_steps, config.ratio, config.deviation) for s in steps]
        if not rhos:
            out[stage] = ()
        elif count == 1 or max(rhos) == min(rhos):
            out[stage] = (sum(rhos) / len(rhos),) if count == 1 else (rhos[0],)
        else:
            low, high = min(rhos), max(rhos)
            out[stage] = tuple(low + (high - low) * j / (count - 1) for j in range(count))
    return out


def nearest_level(rho: float, levels) -> float:
    """The level closest to ``rho`` (a tie: the lower level, which merges less)."""
    if not levels:
        return rho
    return min(levels, key=lambda level: (abs(level - rho), level))


def timestep_value(timestep) -> float:
    """The timestep of a call as a Python float (one host read for a tensor): the first sample's
    (its largest per-token value for ``[B, tokens]`` timesteps)."""
    if timestep is None:
        raise ValueError("the transformer was called without a timestep; SDTM needs it to count steps")
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            raise ValueError("timestep is an empty tensor")
        if timestep.dim() >= 2:  # per-token timesteps (Wan 2.2 TI2V): conditioned frames hold 0, so the max
            return float(timestep[0].amax())
        return float(timestep.reshape(-1)[0])
    return float(timestep)
