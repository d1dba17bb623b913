"""The step rule of ``SDTMState`` (SPEC 3.4): which step a transformer call belongs to, and the
step's mode and removal fraction.

The wrapped transformer calls ``begin_call(timestep, grid)`` once per forward (diffusers models:
a forward pre-hook; user models: by hand). Two sources tell the steps:

* Inside a patched pipeline call (``state.driver`` set): the steps are the scheduler's steps.
  The driver counts the pipeline's ``scheduler.step`` calls (one per model evaluation), so the
  call made after ``e`` of them belongs to step ``e // scheduler.order`` (Heun-type schedulers,
  ``order = 2``: both evaluations of a step are one step, with call indices 0 and 1), and
  ``num_steps`` is the number of scheduler steps the pipeline really runs, learned at the
  generation's first call (``strength < 1`` img2img / inpainting: only the steps after
  ``t_start``; step 0 is the first step that runs). A pipeline's second transformer
  (``global_steps``, Wan 2.2 ``transformer_2``) takes the pipeline's own scheduler-step indices.
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
"""
import math
import warnings

import torch

from ..planning import ratio_schedule
from ..reference import schedule as ref_schedule


class StepRules:
    """``SDTMState``'s step counter and per-step decisions (the module doc). Its attributes:
    ``step``, ``call``, ``num_steps``, ``driver``, ``global_steps`` and the counter's own
    (``_reset_steps``)."""

    def _reset_steps(self):
        """The step counter of a new generation (``SDTMState.reset``)."""
        self.step = -1
        self.call = 0
        self._first_ts = None  # (timestep as passed, its float or None until read)
        self._last_ts = None
        self._direction = None  # +1 / -1: whether the timesteps of this generation go up or down
        self._evals0 = 0  # driver: scheduler steps counted before this generation's first call
        self._entry_step = None  # global_steps: the step of this generation's first call
        self._last_evals = None
        self._driver_off = False
        self._levels = None  # (num_steps, config) -> per-stage ratio levels

    @property
    def first_timestep(self):
        return _timestep_float(self, "_first_ts")

    @property
    def last_timestep(self):
        return _timestep_float(self, "_last_ts")

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

    # -- the step's decisions --------------------------------------------------------------
    def step_mode(self) -> str:
        cfg = self.config
        if cfg.protect_steps and (self.step % cfg.protect_steps == 0
                                  or (self.global_steps and self.step == self._entry_step)):
            return "protected"
        return "ssm" if self.step <= cfg.switch_index(self.num_steps) else "idm"

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


def _timestep_float(state, name):
    """The float of a stored ``[timestep, value or None]`` (read on the host on first use)."""
    entry = getattr(state, name)
    if entry is None:
        return None
    if entry[1] is None:
        entry[1] = timestep_value(entry[0])
    return entry[1]
