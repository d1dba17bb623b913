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
Reading the timestep is one host read (a Python float) per transformer call, outside the
blocks; nothing inside a block reads tensor values.
"""
import math
import warnings
from typing import Optional

import torch

from .._validation import check_int
from ..planning import plan_idm, plan_idm_attention, plan_ssm, ratio_schedule
from ..reference import schedule as ref_schedule
from .config import SDTMConfig

DEFAULT_SEED = 0
ATTENTION_SUBLAYERS = ("attn", "attn2", "cross")


class SDTMState:
    """Step counter, ratio schedule, ``li`` counters, caches, generator and statistics.

    ``stats`` holds one dict per block call of the current generation:
    ``{"step", "call", "layer", "mode", "attn", "mlp", ...}`` where ``mode`` is
    ``"protected"`` (exact, cache refreshed), ``"layer"`` (protected layer), ``"exact"``
    (no step context), ``"ssm"`` or ``"idm"``, and ``attn`` / ``mlp`` are the numbers of
    image tokens each sub-layer saw. With ``keep_plans = True`` (debugging, tests) each
    record also holds the block's ``MergePlan`` under ``"plan"``.
    """

    keep_plans = False

    def __init__(self, config: SDTMConfig, num_steps: Optional[int] = None, num_layers: int = 0):
        self.config = config
        self.num_layers = num_layers
        self.num_steps = num_steps if num_steps is not None else config.num_steps
        self.request = None  # apply_sdtm: (preset, explicit options) this config was made from
        self.driver = None  # patched pipeline call: counts the scheduler's steps (see the module doc)
        self._warned = set()
        self.reset()

    # -- generations and steps -------------------------------------------------------------
    def reset(self, num_steps: Optional[int] = None):
        """Start a new generation; optionally set a new step count."""
        if num_steps is not None:
            self.num_steps = check_int("num_steps", num_steps, minimum=1)
        self.step = -1
        self.call = 0
        self.first_timestep = None
        self.last_timestep = None
        self.grid = None
        self.text_len = None
        self.active = False
        self.li = {}
        self.cache = {}
        self._rotary = None
        self._draws = None
        self.generator = None
        self.generations = getattr(self, "generations", -1) + 1
        self.stats = []
        self.grid_cache = None  # patch.py: (key of the last Flux img_ids tensor, its grid)
        self._direction = None  # +1 / -1: whether the timesteps of this generation go up or down
        self._evals0 = 0  # driver: scheduler steps counted before this generation's first call
        self._last_evals = None
        self._driver_off = False

    def begin_call(self, timestep, grid, text_len: Optional[int] = None, batch: Optional[int] = None,
                   device=None):
        """Register one transformer call at ``timestep`` (tensor or number) on token grid ``grid``.

        With the call's ``batch`` and ``device`` (the diffusers hook passes them) the generator and
        this step's random dst draws are made here, outside the blocks: a compiled block then
        never touches the generator (a graph break) and the draw is one launch per call."""
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
        value = timestep_value(timestep)
        if driven:
            self._begin_scheduler_step(value, self.driver)
        else:
            self._begin_timestep(value)
        self.last_timestep = value
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.text_len = text_len
        self.active = True
        if device is None and isinstance(timestep, torch.Tensor):
            device = timestep.device
        if device is not None:
            self._ensure_generator(torch.device(device))
            if batch is not None and self.grid is not None and self._draws_needed(batch):
                self._draw_step(batch, torch.device(device))

    def _ensure_generator(self, device):
        if self.generator is None or self.generator.device != device:
            cfg = self.config
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(DEFAULT_SEED if cfg.seed is None else cfg.seed)

    def _draws_needed(self, batch: int) -> bool:
        cfg = self.config
        if not (cfg.random_dst and batch % 2 == 0 and cfg.ratio != 0.0):
            return False
        mode = self.step_mode()
        # IDM takes its dsts from li when this pass has one (the first IDM block after a reset draws lazily)
        return mode == "ssm" or (mode == "idm" and self.li.get(self.call) is None)

    def _draw_step(self, batch: int, device):
        """One ``randint(K, (layers, batch, G))`` for every block of this call (row ``l``: layer ``l``;
        a plan shared by the batch takes its first row)."""
        height, width = self.grid
        window = self.config.window
        shape = (max(self.num_layers, 1), batch, (height // window[0]) * (width // window[1]))
        key = (self.step, self.call, shape, device)
        if self._draws is None or self._draws[0] != key:
            draws = torch.randint(window[0] * window[1], shape, generator=self.generator,
                                  device=self.generator.device)
            self._draws = (key, draws.to(device))

    def _begin_scheduler_step(self, value: float, driver):
        """Step = scheduler steps done in this generation // scheduler order (pipeline calls)."""
        evals = driver.evals
        if self.step < 0:
            self._evals0 = evals
        step = (evals - self._evals0) // driver.order
        if self.step >= 0 and step == self.step:
            if value != self.last_timestep and evals == self._last_evals:
                # the timestep moved but the scheduler did not step: this pipeline does not call
                # scheduler.step once per evaluation, so count steps by timestep from here on
                self._driver_off = True
                self._begin_timestep(value)
                return
            self.call += 1
        else:
            if step >= self.num_steps:
                self._warn_once("pipeline", f"SDTM: the pipeline ran scheduler step {step} but the scheduler "
                                f"announced {self.num_steps} steps; the last steps reuse the final ratio")
            self.step = step
            self.call = 0
            if self.first_timestep is None:
                self.first_timestep = value
        self._last_evals = evals

    def _begin_timestep(self, value: float):
        """Step = a change of the timestep value (bare transformers)."""
        if self.last_timestep is not None and value == self.last_timestep:
            self.call += 1
            return
        if self.step >= 0:
            turned = self._direction is not None and (value - self.last_timestep) * self._direction < 0
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
                    f"SDTM: timestep {value:g} after {self.last_timestep:g} at step {self.step} of "
                    f"{self.num_steps}: the timesteps turned back, so a generation was restarted without "
                    "reset_sdtm; SDTM started a new generation (step counter, cache and li restarted). "
                    "Call sdtm_kernels.dit.reset_sdtm(model, num_steps=...) before each generation"))
                self.reset()
        if self.step == 0 and self.first_timestep is not None:
            self._direction = 1.0 if value > self.first_timestep else -1.0
        self.step += 1
        self.call = 0
        if self.step == 0:
            self.first_timestep = value

    def _warn_once(self, kind: str, message: str):
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def end_call(self):
        self.active = False

    # -- decisions -------------------------------------------------------------------------
    def step_mode(self) -> str:
        cfg = self.config
        if cfg.protect_steps and self.step % cfg.protect_steps == 0:
            return "protected"
        return "ssm" if self.step <= cfg.switch_index(self.num_steps) else "idm"

    def block_saving(self, mode: str, num_tokens: int, channels: int) -> float:
        """Fraction of a block's FLOPs merging saves at this step (the rule of ``min_saving``):
        a generic DiT block, ``F(n) = 24 n C^2 + 4 n^2 C`` (projections, attention, MLP of ratio 4;
        prompt tokens left out); SSM runs the whole block on M rows, IDM only the MLP
        (``16 (N - M) C^2``). M follows from the schedule, as the plan's."""
        cfg = self.config
        n, c = num_tokens, channels
        height, width = self.grid
        window_size = cfg.window[0] * cfg.window[1]
        num_windows = (height // cfg.window[0]) * (width // cfg.window[1])
        n_remove = self.n_remove(n)
        if mode == "ssm":
            removed = (window_size - 1) * ref_schedule.ssm_windows_to_merge(n_remove, window_size, num_windows)
        else:
            removed = ref_schedule.idm_tokens_to_merge(n_remove, n - num_windows)

        def flops(tokens):
            return 24 * tokens * c * c + 4 * tokens * tokens * c

        saved = flops(n) - flops(n - removed) if mode == "ssm" else 16 * removed * c * c
        return saved / flops(n) if n else 0.0

    def layer_protected(self, layer: int) -> bool:
        f = self.config.protect_layers
        return bool(f) and (layer % f == 0 or layer == self.num_layers - 1)

    def n_remove(self, num_tokens: int) -> int:
        cfg = self.config
        if cfg.ratio == 0.0:  # merging off
            return 0
        step = min(self.step, self.num_steps - 1)
        rho = ratio_schedule(step, self.num_steps, cfg.ratio, cfg.deviation)
        return int(math.floor(num_tokens * rho))

    def build_plan(self, metric: torch.Tensor, mode: str, batch: int, received=None, layer: int = 0):
        """Plan for one block from its attention-input ``metric`` ``[b, N, C]`` (b = batch, or
        1 for a plan shared by the batch); updates ``li``. ``received [b, N]`` (IDM with
        ``idm_score="attention"``): attention each image token receives from the prompt."""
        cfg = self.config
        self._ensure_generator(metric.device)  # made by begin_call when the caller gives the device
        li = self.li.get(self.call)
        if li is not None and tuple(li.shape) != (batch, metric.shape[1]):
            li = None
        plan_li = None if li is None else li[: metric.shape[0]]
        random_dst = cfg.random_dst and batch % 2 == 0
        n_remove = self.n_remove(metric.shape[1])
        needs_draw = random_dst and (mode == "ssm" or plan_li is None)  # IDM with li: dsts from li
        draw = self._step_draws(metric, layer) if needs_draw else None
        common = dict(window=cfg.window, li=plan_li, random_dst=random_dst, generator=self.generator,
                      backend=cfg.backend, li_mode=cfg.merge_mode, dst_draw=draw)
        if mode == "ssm":
            plan = plan_ssm(metric, self.grid, n_remove, a_s=cfg.a_s, **common)
        elif received is not None:
            plan = plan_idm_attention(metric, self.grid, n_remove, received, a_d=cfg.a_d, **common)
        else:
            plan = plan_idm(metric, self.grid, n_remove, **common)
        li_next = plan.li_next  # built with the plan (one kernel on the Triton backend)
        if metric.shape[0] != batch:  # a plan shared by the batch: every row has the same counter
            plan = expand_plan(plan, batch)
            li_next = li_next.expand(batch, -1)
        self.li[self.call] = li_next
        return plan

    def _step_draws(self, metric, layer: int):
        """Layer ``layer``'s random dst positions ``[b, G]``: one ``randint(K, (layers, b, G))`` draw
        per step and call, row ``layer`` for that layer (one launch per step instead of one per
        block; the planners take the first columns they need)."""
        key = self._draws[0] if self._draws is not None else None
        if key is None or key[:2] != (self.step, self.call) or key[3] != metric.device \
                or key[2][1] < metric.shape[0]:
            self._draw_step(metric.shape[0], metric.device)  # not drawn in begin_call (user models)
        draws = self._draws[1]
        return draws[min(layer, draws.shape[0] - 1), : metric.shape[0]]

    def stacked_rotary(self, rotary):
        """``torch.stack(rotary)`` (Flux's ``(cos, sin)`` table), computed once per transformer call
        and reused by every block of the call (the blocks receive the same tensors)."""
        key = (self.step, self.call, tuple(id(t) for t in rotary))
        if self._rotary is None or self._rotary[0] != key:
            self._rotary = (key, torch.stack(rotary))
        return self._rotary[1]

    def reset_li(self):
        self.li.pop(self.call, None)

    # -- cache -----------------------------------------------------------------------------
    def get_cache(self, layer: int, name: str, like: torch.Tensor):
        cache = self.cache.get((self.call, layer, name))
        if cache is None or cache.shape != like.shape or cache.dtype != like.dtype or cache.device != like.device:
            return None
        return cache

    def set_cache(self, layer: int, name: str, value: torch.Tensor):
        self.cache[(self.call, layer, name)] = value.detach()

    # -- pickling: the settings travel, the generation does not -------------------------------
    def __getstate__(self):
        return {"config": self.config, "num_layers": self.num_layers, "num_steps": self.num_steps,
                "request": self.request, "keep_plans": self.keep_plans, "_warned": set(self._warned)}

    def __setstate__(self, values):
        keep_plans = values.pop("keep_plans", False)
        self.__dict__.update(values)
        if keep_plans != type(self).keep_plans:
            self.keep_plans = keep_plans
        self.driver = None
        self.reset()

    # -- statistics ------------------------------------------------------------------------
    def steps_stats(self, key: str = "attn"):
        """``{(step, layer): tokens}`` for the first call of each step."""
        return {(s["step"], s["layer"]): s[key] for s in self.stats if s["call"] == 0}


def expand_plan(plan, batch: int):
    """A batch-1 plan repeated for ``batch`` rows (one plan shared by the whole batch)."""
    from ..plan import MergePlan

    if plan.batch_size == batch:
        return plan

    def rep(t):
        return t.expand(batch, -1)  # a view: every kernel and reference op takes strides

    return MergePlan(rep(plan.row_of_token), rep(plan.members), rep(plan.row_start), rep(plan.rep_token),
                     rep(plan.blend), num_tokens=plan.num_tokens, num_rows=plan.num_rows, validate=False)


def timestep_value(timestep) -> float:
    """The timestep of a call as a Python float (one host read for a tensor)."""
    if timestep is None:
        raise ValueError("the transformer was called without a timestep; SDTM needs it to count steps")
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            raise ValueError("timestep is an empty tensor")
        return float(timestep.reshape(-1)[0])
    return float(timestep)
