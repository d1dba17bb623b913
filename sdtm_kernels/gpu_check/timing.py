"""Timers, the copy-bandwidth roofline, the time budget and the Triton JIT cache counter.

CUDA: CUDA events (L2 flushed before each timed call); CPU: ``time.perf_counter``. These are
self-contained on purpose: ``benchmarks/common.py`` is not part of the installed package.
"""
import os
import statistics
import time

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than the L2 of any current GPU


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device):
    if is_cuda(device):
        torch.cuda.synchronize(device)


class Budget:
    """Wall-clock seconds left for the whole check; ``deadline(s)`` caps one step's share."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def deadline(self, share: float) -> float:
        """A perf_counter value: ``share`` seconds from now, never past the whole budget."""
        now = time.perf_counter()
        return min(now + share, self.start + self.seconds)


class StepClock:
    """Wall time of one step, plus the device time between its start and end on CUDA."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.events = None

    def __enter__(self):
        if is_cuda(self.device):
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self.t0
        self.device_s = None
        if self.events is not None:
            try:
                self.events[1].record()
                self.events[1].synchronize()
                self.device_s = self.events[0].elapsed_time(self.events[1]) * 1e-3
            except RuntimeError:  # a step that broke the CUDA context keeps its wall time
                pass
        return False


_flush = {}


def flush_l2(device):
    if not is_cuda(device):
        return
    key = torch.device(device)
    if key not in _flush:
        _flush[key] = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=key)
    _flush[key].zero_()


def measure(fn, device, warmup=3, reps=20, flush=True, deadline=None):
    """Per-call times of ``fn()`` in microseconds: ``{"median_us", "p20_us", "p80_us", "min_us",
    "reps", "first_call_s"}``. ``first_call_s`` is the first warm-up call (JIT compile included).
    Stops early at ``deadline`` (a perf_counter value) once at least 3 calls were timed."""
    device = torch.device(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first_call_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    sync(device)
    times = []
    for i in range(reps):
        if deadline is not None and i >= 3 and time.perf_counter() > deadline:
            break
        if is_cuda(device):
            if flush:
                flush_l2(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    times.sort()

    def pct(q):
        return times[min(len(times) - 1, int(q * len(times)))]

    return {"median_us": statistics.median(times), "p20_us": pct(0.2), "p80_us": pct(0.8), "min_us": times[0],
            "reps": len(times), "first_call_s": first_call_s}


def copy_bandwidth_gbps(device, nbytes):
    """Measured ``Tensor.copy_`` bandwidth (bytes read + written per second / 1e9) of ``nbytes``."""
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    out = torch.empty_like(x)
    timing = measure(lambda: out.copy_(x), device, warmup=3, reps=10)
    return {"copy_gbps": 2 * nbytes / (timing["median_us"] * 1e-6) / 1e9, "copy_bytes": int(nbytes),
            "copy_median_us": timing["median_us"]}


# -- Triton JIT cache ----------------------------------------------------------------------------
def triton_cache_dir():
    """The directory Triton caches compiled kernels in (``TRITON_CACHE_DIR`` or its default)."""
    try:
        from triton import knobs

        return knobs.cache.dir
    except (ImportError, AttributeError):
        home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
        return os.environ.get("TRITON_CACHE_DIR") or os.path.join(home, ".triton", "cache")


def count_cache_entries(path, since=None):
    """Cache entries (one folder per compiled kernel variant or launcher stub) under ``path``;
    with ``since`` (a ``time.time()``), only those with a file written since then."""
    if not path or not os.path.isdir(path):
        return 0
    count = 0
    for entry in os.scandir(path):
        if not entry.is_dir():
            continue
        if since is None or any(f.stat().st_mtime >= since for f in os.scandir(entry.path) if f.is_file()):
            count += 1
    return count


class JitCounter:
    """Counts and times the package's Triton compiles by wrapping ``triton.compile`` (a
    ``JITFunction`` looks it up when it first launches on a device, then calls it once per new
    variant; a disk-cache hit returns in milliseconds). Cache folders written during a step are
    its misses (a miss rewrites its folder even when the folder came with a carried cache;
    Triton's launcher stubs add folders of their own), so ``cache_hits = calls - misses`` is
    approximate. Only kernels of ``sdtm_kernels.csrc_triton`` are counted (not inductor's)."""

    PACKAGE = "csrc_triton"

    def __init__(self):
        self.calls = 0
        self.seconds = 0.0
        self.note = None
        self.dir = None
        self.patched = []

    def install(self):
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            self.note = "Triton interpreter: no JIT compilation"
            return self
        try:
            import triton.compiler
            import triton.compiler.compiler
            import triton.runtime.jit
        except ImportError as exc:
            self.note = f"triton not importable: {exc}"
            return self
        self.dir = triton_cache_dir()
        original = triton.compiler.compile
        wrapped = self._wrap(original)
        # the package attribute is what JITFunction.create_binder imports (triton 3.x); older
        # versions bound it at import time in triton.runtime.jit
        for module in (triton.compiler, triton.compiler.compiler, triton.runtime.jit):
            if getattr(module, "compile", None) is original:
                module.compile = wrapped
                self.patched.append(module.__name__)
        return self

    def _wrap(self, compile_fn):
        def counted(src, *args, **kwargs):
            ours = self.PACKAGE in str(getattr(getattr(src, "fn", None), "__module__", ""))
            start = time.perf_counter()
            try:
                return compile_fn(src, *args, **kwargs)
            finally:
                if ours:
                    self.calls += 1
                    self.seconds += time.perf_counter() - start
        return counted

    def snapshot(self):
        return {"compile_calls": self.calls, "compile_s": round(self.seconds, 3), "time": time.time()}

    def delta(self, before):
        """Per-step JIT record since ``before``: calls, seconds, misses (cache folders written) and
        hits (the rest of the calls)."""
        calls = self.calls - before["compile_calls"]
        misses = count_cache_entries(self.dir, since=before["time"])
        return {"compile_calls": calls, "compile_s": round(self.seconds - before["compile_s"], 3),
                "cache_misses": misses, "cache_hits": max(calls - misses, 0)}
