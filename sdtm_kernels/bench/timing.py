"""Progress bar, the bookkeeping timer and the timed sampler (see ``sdtm_kernels.bench``)."""
import contextlib
import sys
import time
from collections import defaultdict

import torch

from ..dit.state import SDTMState
from .common import GUIDANCE

# -- progress bar ------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr: ``[#####-----] 12/36 label 3.1s``."""

    def __init__(self, total, stream=None, width=28, enabled=True):
        self.total, self.done, self.width = max(int(total), 1), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.start = time.perf_counter()
        self.label = ""
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_pct = -1

    def update(self, n=1, label=None):
        self.done = min(self.total, self.done + n)
        if label is not None:
            self.label = label
        if not self.enabled:
            return
        pct = int(100 * self.done / self.total)
        if not self._tty and pct // 10 == self._last_pct // 10 and self.done < self.total:
            return  # a log file gets one line per 10%
        self._last_pct = pct
        filled = int(self.width * self.done / self.total)
        line = (f"[{'#' * filled}{'-' * (self.width - filled)}] {self.done}/{self.total} {self.label} "
                f"{time.perf_counter() - self.start:.1f}s")
        self.stream.write(("\r" + line + "\033[K") if self._tty else line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()


# -- bookkeeping timer -------------------------------------------------------------------------
class BookkeepingTimer:
    """Seconds spent in SDTM plan builds, merges and unmerges (see the module docstring)."""

    def __init__(self, device, enabled=True):
        self.cuda = torch.device(device).type == "cuda"
        self.enabled = enabled
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)

    @contextlib.contextmanager
    def section(self, name):
        if not self.enabled:
            yield
            return
        with torch.profiler.record_function(f"sdtm::{name}"):
            if self.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                yield
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

    def reset(self):
        self.seconds.clear()
        self.calls.clear()

    @property
    def total(self):
        return sum(self.seconds.values())


class _TimedPlan:
    """A ``MergePlan`` whose ``merge`` / ``unmerge`` run inside the timer's sections."""

    def __init__(self, plan, timer):
        self._plan = plan
        self._timer = timer

    def __getattr__(self, name):
        return getattr(self._plan, name)

    def merge(self, *args, **kwargs):
        with self._timer.section("merge"):
            return self._plan.merge(*args, **kwargs)

    def unmerge(self, *args, **kwargs):
        with self._timer.section("unmerge"):
            return self._plan.unmerge(*args, **kwargs)


class TimedSDTMState(SDTMState):
    """``SDTMState`` that times plan builds and the plans' merges / unmerges when ``timer`` is set."""

    timer = None

    def build_plan(self, *args, **kwargs):
        timer = self.timer
        if timer is None or not timer.enabled:
            return super().build_plan(*args, **kwargs)
        with timer.section("plan"):
            plan = super().build_plan(*args, **kwargs)
        return _TimedPlan(plan, timer)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sample_steps(bench_model, noise, steps):
    """Euler flow-matching schedule with CFG, one step per ``next()``: yields each step's
    seconds and returns the final latent (``StopIteration.value``)."""
    device = bench_model.device
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = noise.clone()
    for i in range(steps):
        with torch.no_grad():
            _sync(device)
            start = time.perf_counter()
            # float32 timesteps: in bf16 two steps could round to the same value (= the same SDTM step)
            t = torch.full((bench_model.model_batch,), 1000.0 * sigmas[i], device=device, dtype=torch.float32)
            v = bench_model.forward(torch.cat([x, x]), t)
            v_uncond, v_cond = v.chunk(2)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_uncond + GUIDANCE * (v_cond - v_uncond))
            _sync(device)
        yield time.perf_counter() - start
    return x


def sample(bench_model, noise, steps, progress=None, label=""):
    """The whole schedule at once; returns the final latent and per-step seconds."""
    gen = sample_steps(bench_model, noise, steps)
    times = []
    while True:
        try:
            times.append(next(gen))
        except StopIteration as stop:
            return stop.value, times
        if progress is not None:
            progress.update(label=label)


def rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
