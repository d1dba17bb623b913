"""``SDTMState``: the per-model state shared by the patched blocks (SPEC 3.4, 3.5).

Step rule. The wrapped transformer calls ``begin_call(timestep, grid)`` once per forward
(diffusers models: a forward pre-hook; user models: by hand). A timestep value that differs
from the previous call's is a new step; the same value again (a second call for CFG or a
guidance pass) is the same step and gets its own ``call`` index, so every pass keeps its own
cache and ``li``. The state starts a new generation (step 0, empty cache, fresh ``li`` and
generator) when ``reset()`` is called (the patched pipeline does it at every ``__call__``),
when a new timestep equals the first timestep of the current generation, and when the step
count would pass ``num_steps``. Reading the timestep is one host read (a Python float) per
transformer call, outside the blocks; nothing inside a block reads tensor values.
"""
import math
from typing import Optional

import torch

from .._validation import check_int
from ..planning import plan_idm, plan_idm_attention, plan_ssm, ratio_schedule
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
        self.generator = None
        self.generations = getattr(self, "generations", -1) + 1
        self.stats = []

    def begin_call(self, timestep, grid, text_len: Optional[int] = None):
        """Register one transformer call at ``timestep`` (tensor or number) on token grid ``grid``."""
        if self.num_steps is None:
            raise ValueError(
                "num_steps is unknown: pass num_steps= to apply_sdtm when patching a bare transformer "
                "(or call sdtm_kernels.dit.reset_sdtm(model, num_steps=...)), or patch the pipeline"
            )
        value = timestep_value(timestep)
        if self.last_timestep is not None and value == self.last_timestep:
            self.call += 1
        else:
            if self.step >= 0 and (value == self.first_timestep or self.step + 1 >= self.num_steps):
                self.reset()
            self.step += 1
            self.call = 0
            if self.step == 0:
                self.first_timestep = value
        self.last_timestep = value
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.text_len = text_len
        self.active = True

    def end_call(self):
        self.active = False

    # -- decisions -------------------------------------------------------------------------
    def step_mode(self) -> str:
        cfg = self.config
        if cfg.protect_steps and self.step % cfg.protect_steps == 0:
            return "protected"
        return "ssm" if self.step <= cfg.switch_index(self.num_steps) else "idm"

    def layer_protected(self, layer: int) -> bool:
        f = self.config.protect_layers
        return bool(f) and (layer % f == 0 or layer == self.num_layers - 1)

    def n_remove(self, num_tokens: int) -> int:
        cfg = self.config
        step = min(self.step, self.num_steps - 1)
        rho = ratio_schedule(step, self.num_steps, cfg.ratio, cfg.deviation)
        return int(math.floor(num_tokens * rho))

    def build_plan(self, metric: torch.Tensor, mode: str, batch: int, received=None):
        """Plan for one block from its attention-input ``metric`` ``[b, N, C]`` (b = batch, or
        1 for a plan shared by the batch); updates ``li``. ``received [b, N]`` (IDM with
        ``idm_score="attention"``): attention each image token receives from the prompt."""
        cfg = self.config
        if self.generator is None or self.generator.device != metric.device:
            self.generator = torch.Generator(device=metric.device)
            self.generator.manual_seed(DEFAULT_SEED if cfg.seed is None else cfg.seed)
        li = self.li.get(self.call)
        if li is not None and tuple(li.shape) != (batch, metric.shape[1]):
            li = None
        plan_li = None if li is None else li[: metric.shape[0]]
        random_dst = cfg.random_dst and batch % 2 == 0
        n_remove = self.n_remove(metric.shape[1])
        if mode == "ssm":
            plan = plan_ssm(metric, self.grid, n_remove, window=cfg.window, li=plan_li, random_dst=random_dst,
                            generator=self.generator, backend=cfg.backend, a_s=cfg.a_s)
        elif received is not None:
            plan = plan_idm_attention(metric, self.grid, n_remove, received, a_d=cfg.a_d, window=cfg.window,
                                      li=plan_li, random_dst=random_dst, generator=self.generator,
                                      backend=cfg.backend)
        else:
            plan = plan_idm(metric, self.grid, n_remove, window=cfg.window, li=plan_li, random_dst=random_dst,
                            generator=self.generator, backend=cfg.backend)
        if metric.shape[0] != batch:  # a plan shared by the batch
            plan = expand_plan(plan, batch)
        self.li[self.call] = plan.update_li(li, cfg.merge_mode)
        return plan

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
        return t.expand(batch, -1).contiguous()

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
