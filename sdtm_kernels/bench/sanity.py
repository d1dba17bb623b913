"""Checks that keep the bench job from printing impossible or unstable numbers.

A speedup above its FLOP bound, repeats that disagree, and a machine whose other work takes
our CPU time are the usual ways a benchmark on a shared machine lies. Each finding becomes a
warning in ``result["warnings"]``, printed loudly; ``--strict`` turns them into exit code 3.
"""
import os
import time

# A measured speedup may exceed the FLOP bound by this much (the FLOP model leaves out norms,
# modulation and element-wise work that merging also shrinks) before it counts as impossible.
FLOP_BOUND_MARGIN = 0.05
# Repeats of the same run whose schedule totals differ by more than this are unstable.
REPEAT_SPREAD_MARGIN = 0.10
# On CPU, the share of the wall time our process spent on its threads; below this, something
# else on the machine took the cores.
MIN_CPU_SHARE = 0.75


class CpuShare:
    """Process CPU time over (wall time x threads) for a section of the run (CPU runs)."""

    def __init__(self, threads):
        self.threads = max(1, int(threads))
        self.load_before = _load_average()
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()

    def finish(self):
        wall = time.perf_counter() - self._wall0
        cpu = time.process_time() - self._cpu0
        return {"threads": self.threads, "wall_s": wall, "cpu_s": cpu,
                "cpu_share": cpu / (wall * self.threads) if wall > 0 else None,
                "load_average_before": self.load_before, "load_average_after": _load_average(),
                "cpu_count": os.cpu_count()}


def _load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def repeat_spread(pass_totals):
    """(max - min) / min of a run's schedule totals over its repeats (None for one repeat)."""
    if len(pass_totals) < 2 or min(pass_totals) <= 0:
        return None
    return (max(pass_totals) - min(pass_totals)) / min(pass_totals)


def findings(result):
    """Warnings for a finished bench result (list of strings; empty when the numbers look sane)."""
    warnings = []
    for run in result.get("runs", []):
        bound, speedup = run.get("flop_bound_speedup"), run.get("speedup")
        if bound and speedup and speedup > bound * (1 + FLOP_BOUND_MARGIN):
            warnings.append(f"{run['name']}: measured speedup {speedup:.2f}x exceeds its FLOP bound {bound:.2f}x "
                            f"({100 * speedup / bound:.0f}% of the bound): the timings are not trustworthy "
                            "(a loaded machine, too few repeats, or too small a model)")
        spread = run.get("repeat_spread")
        if spread is not None and spread > REPEAT_SPREAD_MARGIN:
            warnings.append(f"{run['name']}: repeats disagree by {100 * spread:.0f}% (> "
                            f"{100 * REPEAT_SPREAD_MARGIN:.0f}%): the machine's speed changed during the run")
    for run in (result.get("compile") or {}).get("runs", []):
        if "error" in run:
            warnings.append(f"--compile: {run['name']} failed: {run['error']}")
        elif run.get("graphs_compiled_while_timed"):
            warnings.append(f"--compile: {run['name']}: {run['graphs_compiled_while_timed']} graphs were compiled "
                            "during the timed generations: its compiled time includes compiling")
    share = result.get("cpu_usage")
    if share and share.get("cpu_share") is not None and share["cpu_share"] < MIN_CPU_SHARE:
        warnings.append(f"the machine looks loaded: this process got {100 * share['cpu_share']:.0f}% of "
                        f"{share['threads']} thread(s) of CPU time over the run (1-min load average "
                        f"{share.get('load_average_before')} before, {share.get('load_average_after')} after); "
                        "rerun on a quiet machine or with fewer --threads")
    return warnings
