"""Step 5: the main job (``python -m sdtm_kernels bench``) on random-weight SD3-medium at 1024^2,
28 steps: unpatched and the SDTM presets, eager through ``bench.run_suite``; then, when the
budget allows, the same schedule with ``torch.compile``d model forwards (unpatched and one
preset; the SDTM hooks stay outside the compiled forward, as ``tests/test_dit_diffusers.py``
does), timed after one compiling warm-up schedule.
"""
import argparse
import shlex
import statistics
import time

import torch

from .. import bench


def bench_args(sizes, device, no_reference=False):
    """The ``bench`` options of this check, parsed by bench's own parser and checked like it does."""
    argv = ["--device", str(device), "--dtype", sizes.model_dtype, "--no-progress", *sizes.e2e_args]
    if no_reference:
        argv.append("--no-reference")
    args = bench.add_arguments(argparse.ArgumentParser()).parse_args(argv)
    bench._check_args(args)
    return argv, args


def end_to_end(sizes, device, deadline, log, no_reference=False):
    argv, args = bench_args(sizes, device, no_reference)
    result = bench.run_suite(args, log)
    result["environment"] = bench.environment(args.device)
    runs = [{k: run.get(k) for k in ("name", "total_s", "step_ms_median", "speedup", "flop_bound_speedup",
                                     "pct_of_flop_bound", "mean_tokens", "bookkeeping_share", "rel_l2_vs_unpatched")}
            for run in result["runs"]]
    return {"reproduce": shlex.join(["python", "-m", "sdtm_kernels", "bench", *argv]), "summary": runs,
            "table_md": bench.markdown_table(result), "bench_result": result}


def _spec(args, device):
    """The model spec ``run_suite`` builds from ``args`` (same defaults and overrides)."""
    return bench.spec_from_args(args, device)


def _unique_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _schedule_until(bm, noise, steps, deadline):
    """Per-step seconds of one schedule, or None when the deadline passes first (checked between
    steps: a recompile of the patched model can take a minute)."""
    times = []
    for seconds in bench.sample_steps(bm, noise, steps):
        times.append(seconds)
        if time.perf_counter() > deadline and len(times) < steps:
            return None
    return times


def _compiled_run(bm, noise, steps, preset, spec, deadline):
    state = bm.patch(preset, None, steps) if preset is not None else None
    run = {"name": f"{preset or 'unpatched'}/compiled", "preset": preset}
    torch._dynamo.reset()
    bm.model.forward = torch.compile(bm.model.forward)  # instance attribute: module hooks stay outside
    try:
        graphs = _unique_graphs()
        start = time.perf_counter()
        done = _schedule_until(bm, noise, steps, deadline)  # first generation: compiles, recompiles
        run["first_schedule_s"] = time.perf_counter() - start
        run["graphs_first_generation"] = _unique_graphs() - graphs
        if done is None:
            run["skipped"] = "step budget spent during the compiling schedule"
            return run
        graphs = _unique_graphs()
        times = _schedule_until(bm, noise, steps, deadline)
        run["new_graphs_second_generation"] = _unique_graphs() - graphs  # SPEC 8: should be 0
        if times is None:
            run["skipped"] = "step budget spent during the timed schedule"
            return run
        run.update(total_s=sum(times), step_ms_median=1e3 * statistics.median(times),
                   step_ms=[1e3 * t for t in times])
        stats = None if state is None else list(state.stats)
        run["flops"] = bench.schedule_flops(spec, stats, steps=steps) * bm.model_batch
        if stats is not None:
            run["mean_tokens"] = statistics.fmean((r["attn"] + r["mlp"]) / 2
                                                  for r in bench.tokens_per_step(stats, spec["num_tokens"]))
        return run
    finally:
        del bm.model.forward
        bm.unpatch()


def end_to_end_compiled(sizes, device, deadline, log):
    _, args = bench_args(sizes, device, no_reference=True)
    spec, steps = _spec(args, device)
    dtype = getattr(torch, args.dtype)
    bm = bench.BenchModel(spec, device, dtype, batch=args.batch, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same noise as run_suite
    noise = torch.randn(args.batch, *spec["noise_shape"], generator=gen)
    noise = noise.to(device, dtype)
    runs = []
    for preset in (None, *sizes.e2e_compiled_presets):
        if time.perf_counter() > deadline:
            runs.append({"name": f"{preset or 'unpatched'}/compiled", "skipped": "step budget spent"})
            continue
        log(f"gpu-check: torch.compile schedule, {preset or 'unpatched'} ...")
        runs.append(_compiled_run(bm, noise, steps, preset, spec, deadline))
    base = runs[0]
    for run in runs:
        if "total_s" in run and "total_s" in base:
            run["speedup"] = base["total_s"] / run["total_s"]
            run["flop_bound_speedup"] = base["flops"] / run["flops"]
            run["pct_of_flop_bound"] = 100.0 * run["speedup"] / run["flop_bound_speedup"]
    return {"model": f"{spec['family']} {spec['layers']} blocks, C={spec['width']}, N={spec['num_tokens']}, "
                     f"{steps} steps, {args.dtype}", "runs": runs,
            "timing": "one compiling schedule (not timed), then one timed schedule; CUDA: synchronised per step"}
