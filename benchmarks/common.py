"""Shared benchmark helpers: device timer, CUDA-graph replay timer, L2 flush, copy-bandwidth
roofline, device properties, extra_info.

Import from a bench file as ``from common import ...`` (benchmarks/conftest.py puts this
folder on ``sys.path``). On CUDA the timer uses CUDA events and flushes L2 before every
timed call; on CPU (Triton interpreter) it uses ``time.perf_counter`` and tiny shapes.
"""
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    # Same rule as tests/conftest.py: the interpreter must be on before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
# Reference under torch.compile is a GPU comparison: on CPU inductor's compile time dominates.
PROVIDERS = ("triton", "reference") + (("reference_compiled",) if ON_CUDA else ())
L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2

_flush_buffers = {}
_copy_bandwidth = {}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def flush_l2(device=DEVICE):
    """Evict the L2 cache by writing a 256 MB buffer (no-op on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    buf = _flush_buffers.get(device)
    if buf is None:
        buf = _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    buf.zero_()


def measure(fn, device=DEVICE, warmup=3, reps=20, flush=True):
    """Time ``fn()``; returns ``{"median_ms", "p20_ms", "p80_ms", "min_ms"}``.

    CUDA: one event pair per call, L2 flushed before each (outside the events).
    CPU: wall clock around each call.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            if flush:
                flush_l2(device)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()

    def pct(q):
        return times[min(len(times) - 1, int(q * len(times)))]

    return {"median_ms": statistics.median(times), "p20_ms": pct(0.2), "p80_ms": pct(0.8), "min_ms": times[0]}


def measure_graph(fn, device=DEVICE, warmup=3, reps=20):
    """CUDA-graph replay time of ``fn`` (captured once, replayed per timed call, L2 flushed
    between replays): ``{"graph_median_ms", "graph_p20_ms", "graph_p80_ms", "graph_min_ms"}``.
    Off CUDA: ``{}``. A function that cannot be captured (a host sync, a data-dependent size)
    gives ``{"graph_error": "<why>"}`` instead; the eager timing stands."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs advises
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 - any capture failure is reported, not raised
        try:
            torch.cuda.synchronize(device)
        except RuntimeError:
            pass
        return {"graph_error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    timing = measure(graph.replay, device=device, warmup=warmup, reps=reps)
    return {f"graph_{key}": value for key, value in timing.items()}


def device_properties(device=DEVICE):
    """Device facts for the machine info: name, SMs, memory, capability (CUDA) or cores (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"name": props.name, "multi_processor_count": props.multi_processor_count,
                "total_memory_gb": round(props.total_memory / 2**30, 2), "capability": f"{props.major}.{props.minor}",
                "cuda": torch.version.cuda, "l2_cache_mb": round(getattr(props, "L2_cache_size", 0) / 2**20, 1)}
    return {"name": device_name(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}


def device_timer(device=DEVICE, **kwargs):
    """A ``pytest-benchmark`` compatible timer factory: ``benchmark.pedantic`` still uses
    the wall clock, so bench files call :func:`measure` for the device time and record it."""
    return lambda fn: measure(fn, device=device, **kwargs)


def copy_bandwidth_gbps(device=DEVICE, nbytes=None):
    """Measured device copy bandwidth (GB/s, bytes read + written) for
    ``torch.empty_like(x).copy_(x)``: the roofline merge/unmerge are compared against."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 512 * 1024 * 1024 if device.type == "cuda" else 16 * 1024 * 1024
    key = (device, nbytes)
    if key not in _copy_bandwidth:
        x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
        out = torch.empty_like(x)
        t = measure(lambda: out.copy_(x), device=device, warmup=3, reps=10)
        _copy_bandwidth[key] = 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9
        del x, out
    return _copy_bandwidth[key]


def peak_memory_reset(device=DEVICE):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device=DEVICE):
    """Peak allocated bytes since :func:`peak_memory_reset` (0 on CPU, not tracked there)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return 0


def device_name(device=DEVICE):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (Triton interpreter)"


def record(benchmark, *, op, provider, shape, dtype, bytes_moved, timing, device=DEVICE, peak_bytes=0,
           flops=None, **extra):
    """Fill ``benchmark.extra_info`` with the keys every bench file reports (STYLE 13-15)."""
    seconds = timing["median_ms"] * 1e-3
    gbps = bytes_moved / seconds / 1e9 if seconds > 0 else float("nan")
    copy_gbps = copy_bandwidth_gbps(device)
    info = {
        "op": op,
        "provider": provider,
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "device": device_name(device),
        "torch": torch.__version__,
        "bytes_moved": int(bytes_moved),
        "gbps": gbps,
        "copy_gbps": copy_gbps,
        "pct_of_copy_bandwidth": 100.0 * gbps / copy_gbps,
        "peak_memory_bytes": int(peak_bytes),
        **timing,
    }
    if flops is not None:
        info["tflops"] = flops / seconds / 1e12 if seconds > 0 else float("nan")
    info.update(extra)
    benchmark.extra_info.update(info)
    return info
