"""The main job on a random-weight model: every run, timed, with FLOP bounds (``run_suite``)."""
import statistics
import time

import torch

from .common import GUIDANCE, VAE_FACTOR, BenchError
from .flops import default_spec, grid_text, make_spec, schedule_flops, tokens_per_step
from .models import BenchModel, have_diffusers
from .report import device_name
from .sanity import CpuShare, findings, repeat_spread
from .timing import BookkeepingTimer, Progress, rel_l2, sample, sample_steps

# -- the Triton interpreter check --------------------------------------------------------------
def kernel_check(seed=0, grid=(16, 16), channels=32, batch=2):
    """Triton kernels (interpreter on CPU) vs the reference on a small sample: plans (same
    size, share of tokens assigned the same row) and merge / unmerge of the same plan."""
    from .. import plan_idm, plan_ssm
    from ..backend import BackendUnavailableError

    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    metric = torch.randn(batch, n, channels, generator=gen)
    x = torch.randn(batch, n, channels, generator=gen)
    residual = torch.randn(batch, n, channels, generator=gen)
    gate = torch.randn(batch, channels, generator=gen)
    result = {"shape": [batch, n, channels], "grid": list(grid), "device": "cpu"}
    start = time.perf_counter()
    try:
        for name, builder in (("ssm", plan_ssm), ("idm", plan_idm)):
            n_remove = n // 2
            ref = builder(metric, grid, n_remove, backend="reference")
            tri = builder(metric, grid, n_remove, backend="triton")
            same = (ref.row_of_token == tri.row_of_token).float().mean().item() if ref.num_rows == tri.num_rows else 0.0
            merged_ref = ref.merge(x, backend="reference")
            merged_tri = ref.merge(x, backend="triton")
            un_ref = ref.unmerge(merged_ref, residual=residual, gate=gate, backend="reference")
            un_tri = ref.unmerge(merged_ref, residual=residual, gate=gate, backend="triton")
            result[f"plan_{name}"] = {"num_rows_reference": ref.num_rows, "num_rows_triton": tri.num_rows,
                                      "same_assignment_fraction": same}
            result[f"merge_{name}_max_abs_diff"] = float((merged_ref - merged_tri).abs().max())
            result[f"unmerge_{name}_max_abs_diff"] = float((un_ref - un_tri).abs().max())
    except BackendUnavailableError as exc:
        result["error"] = str(exc)
        return result
    result["max_abs_diff"] = max(v for k, v in result.items() if k.endswith("_max_abs_diff"))
    result["seconds"] = time.perf_counter() - start
    return result


# -- runs --------------------------------------------------------------------------------------
def resolved_backend(backend, device):
    from ..backend import resolve_backend

    return resolve_backend(backend, torch.device(device), "merge")


def stage_speedups(run, base_run):
    """``{mode: unpatched time / this run's time over the steps of that mode}`` (protected,
    structure, detail, skip): shows a stage that does not pay for itself."""
    steps_of = {}
    for row in run["tokens_per_step"]:
        steps_of.setdefault(row["mode"], []).append(row["step"])
    return {mode: sum(base_run["step_ms"][s] for s in steps) / sum(run["step_ms"][s] for s in steps)
            for mode, steps in steps_of.items() if sum(run["step_ms"][s] for s in steps) > 0}


def spec_from_args(args, device):
    """``(model spec, steps)`` of the bench options in ``args`` (defaults for ``device``)."""
    family = args.family or ("sd3" if have_diffusers() else "dit")
    if family != "dit" and not have_diffusers():
        raise BenchError(f"--family {family} needs diffusers (pip install diffusers); --family dit needs nothing")
    base = default_spec(family, device, quick=args.quick)
    if args.size is not None:
        if args.size % (VAE_FACTOR * base["patch"]):
            raise BenchError(f"--size {args.size} must be a multiple of {VAE_FACTOR * base['patch']} pixels")
        base["latent"] = args.size // VAE_FACTOR
    if args.latent is not None:
        base["latent"] = args.latent
    if args.blocks is not None:
        base["layers"] = args.blocks
    if args.width is not None:
        base["width"] = args.width
    if getattr(args, "frames", None) is not None:
        if "frames" not in base:
            raise BenchError(f"--frames is for video families (wan, hunyuan); {family} generates images")
        base["frames"] = args.frames
    return make_spec(**base), args.steps or base["steps"]


def run_suite(args, log=print):
    """Build the model and run every configuration; returns the result dict."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    spec, steps = spec_from_args(args, device)
    family = spec["family"]
    backends = [None] + (["reference"] if cuda and not args.no_reference else [])
    configs = [("unpatched", None, None)] + [(f"{p}/{resolved_backend(b, device)}", p, b)
                                             for p in args.presets for b in backends]

    single = spec["layers"] - spec["double_layers"]  # flux / flux2 / hunyuan: single-stream blocks after the double
    split = f" ({spec['double_layers']} double + {single} single)" if single else ""
    log(f"SDTM bench: {family} {spec['layers']} blocks{split}, C={spec['width']}, {spec['heads']} heads, "
        f"token grid {grid_text(spec)} -> N={spec['num_tokens']} image + {spec['text_len']} text "
        f"tokens, batch {2 * args.batch} (CFG), {steps} steps, {args.dtype}, on {device_name(device)}")
    bench_model = BenchModel(spec, device, dtype, batch=args.batch, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(args.batch, *spec["noise_shape"], generator=gen)
    noise = noise.to(device, dtype)

    warmup = args.warmup if args.warmup is not None else (1 if cuda else 0)
    repeats = args.repeats if args.repeats is not None else (1 if cuda else 2)
    instrumented_pass = cuda  # CPU: the timed sections are cheap, the main pass is instrumented
    n_sdtm = sum(1 for c in configs if c[1] is not None)
    passes = len(configs) * (repeats + warmup) + (n_sdtm if instrumented_pass else 0)
    progress = Progress(passes * steps, enabled=not args.no_progress)
    runs = {name: None for name, _, _ in configs}
    finals = {}
    # Interleaved (default on CPU): every configuration has its own copy of the model (same seed,
    # same weights) and the schedules advance one step each in turn, so that a slow phase of a
    # shared machine hits all of them alike. Repeats go round-robin too; each step's time is the
    # minimum over the repeats.
    interleave = (not cuda) if args.interleave is None else args.interleave
    models = {name: (BenchModel(spec, device, dtype, batch=args.batch, seed=args.seed) if interleave and i else
                     bench_model) for i, (name, _, _) in enumerate(configs)}
    with torch.no_grad():  # first call of each model: lazy initialisation outside the timings
        for bm in {id(m): m for m in models.values()}.values():
            bm.forward(torch.cat([noise, noise]), torch.full((bm.model_batch,), 999.0, device=device))

    def finish(entry, final, times):
        name, preset, bm, state, timer = entry[:5]
        run = runs[name]
        if run is None:
            run = runs[name] = {"name": name, "preset": preset, "backend": entry[5] or "auto",
                                "resolved_backend": None if preset is None else resolved_backend(entry[5], device),
                                "pass_s": [], "min_step_s": list(times)}
            finals[name] = final.float().cpu()
            if preset is None:
                run["flops"] = schedule_flops(spec, steps=steps) * bm.model_batch
                run["tokens_per_step"] = [{"step": s, "mode": "full", "attn": spec["num_tokens"],
                                           "mlp": spec["num_tokens"]} for s in range(steps)]
            else:
                stats = list(state.stats)
                run["flops"] = schedule_flops(spec, stats) * bm.model_batch
                run["tokens_per_step"] = tokens_per_step(stats, spec["num_tokens"])
        else:
            run["min_step_s"] = [min(a, b) for a, b in zip(run["min_step_s"], times)]
            run["rerun_rel_l2"] = max(run.get("rerun_rel_l2", 0.0), rel_l2(final.float().cpu(), finals[name]))
        run["pass_s"].append(sum(times))
        if preset is None:
            return
        if instrumented_pass and entry[6] == repeats - 1:
            timer.enabled = True
            timer.reset()
            _, inst_times = sample(bm, noise, steps, progress, name + " (bookkeeping pass)")
            pass_total = sum(inst_times)
        else:
            pass_total = sum(times)
        if instrumented_pass or run.get("bookkeeping_share") is None or pass_total < run["_bk_pass"]:
            run.update(_bk_pass=pass_total, bookkeeping_s=timer.total, bookkeeping_share=timer.total / pass_total,
                       bookkeeping={k: {"seconds": v, "calls": timer.calls[k]} for k, v in timer.seconds.items()})
        bm.unpatch()

    cpu_usage = None if cuda else CpuShare(torch.get_num_threads())
    for rep in range(repeats):
        active = []
        for name, preset, backend in configs:
            bm = models[name]
            timer = BookkeepingTimer(device, enabled=not instrumented_pass)
            state = None
            if preset is not None:
                state = bm.patch(preset, backend, steps)
                state.timer = timer
            for _ in range(warmup if rep == 0 else 0):
                sample(bm, noise, steps, progress, name + " (warm-up)")
            timer.reset()
            entry = (name, preset, bm, state, timer, backend, rep)
            if interleave:
                active.append((entry, sample_steps(bm, noise, steps), []))
            else:
                finish(entry, *sample(bm, noise, steps, progress, f"{name} ({rep + 1}/{repeats})"))
        for step in range(steps if interleave else 0):
            for entry, gen, times in active:
                times.append(next(gen))
                progress.update(label=f"step {step + 1}/{steps} {entry[0]} (repeat {rep + 1}/{repeats}, interleaved)")
        for entry, gen, times in active:
            try:
                next(gen)
            except StopIteration as stop:
                finish(entry, stop.value, times)
    runs = list(runs.values())
    for run in runs:
        run.pop("_bk_pass", None)
        run["repeat_spread"] = repeat_spread(run["pass_s"])
        times = run.pop("min_step_s")
        run["step_ms"] = [1e3 * t for t in times]
        run["total_s"] = sum(times)
        run["step_ms_median"] = 1e3 * statistics.median(times)
        run["step_ms_mean"] = 1e3 * run["total_s"] / len(times)  # what the speedup column divides
        run["tflops_achieved"] = run["flops"] / run["total_s"] / 1e12
        run["mean_tokens"] = statistics.fmean((r["attn"] + r["mlp"]) / 2 for r in run["tokens_per_step"])
        run.setdefault("bookkeeping_s", 0.0)
    progress.close()

    base_run = runs[0]
    for run in runs:
        run["speedup"] = base_run["total_s"] / run["total_s"]
        run["speedup_median_step"] = base_run["step_ms_median"] / run["step_ms_median"]
        run["flop_bound_speedup"] = base_run["flops"] / run["flops"]
        run["pct_of_flop_bound"] = 100.0 * run["speedup"] / run["flop_bound_speedup"]
        run["rel_l2_vs_unpatched"] = rel_l2(finals[run["name"]], finals[base_run["name"]])
        run["stage_speedups"] = stage_speedups(run, base_run)
    backend_diffs = []
    for preset in args.presets:
        default_name = f"{preset}/{resolved_backend(None, device)}"
        ref_name = f"{preset}/reference"
        if default_name != ref_name and default_name in finals and ref_name in finals:
            a, b = finals[default_name], finals[ref_name]
            backend_diffs.append({"preset": preset, "a": default_name, "b": ref_name, "rel_l2": rel_l2(a, b),
                                  "max_abs_diff": float((a - b).abs().max())})
    result = {"config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()}, "steps": steps,
                         "batch": args.batch, "model_batch": bench_model.model_batch, "dtype": args.dtype,
                         "device": str(device), "guidance": GUIDANCE, "warmup_schedules": warmup,
                         "presets": list(args.presets), "seed": args.seed, "repeats": repeats,
                         "interleaved": interleave,
                         "timing": "speedup = ratio of schedule totals; per step: minimum over the repeats "
                                   "(round-robin over the runs; interleaved: "
                                   "one step of each run in turn, each run on its own model copy); total = sum of "
                                   "those; CUDA: synchronised around every step",
                         "bookkeeping_timing": "separate instrumented pass" if instrumented_pass else "main pass"},
              "runs": runs, "backend_diffs": backend_diffs}
    if cpu_usage is not None:
        result["cpu_usage"] = cpu_usage.finish()
    if getattr(args, "compile", False):
        from .compiled import run_compiled

        del models  # the eager copies: the compiled runs build their own
        result["compile"] = run_compiled(args, spec, steps, noise, configs, runs, finals, log)
    result["warnings"] = findings(result)
    if not cuda and not args.no_kernel_check:
        log("checking the Triton kernels (interpreter) against the reference on a small sample ...")
        result["kernel_check"] = kernel_check(seed=args.seed)
    if cuda or not args.no_kernel_check:
        result["launches"] = launch_count(spec, bench_model, device, dtype, steps, args, log)
        if not getattr(args, "no_host_time", False):
            result["host_time"] = host_time(spec, device, dtype, log)
    return result


def host_time(spec, device, dtype, log):
    """SDTM's host time per merged block vs an unpatched block's (``sdtm_kernels.bench.hosttime``),
    on a tiny block of the model family (Triton backend; launches replayed on CPU)."""
    from .hosttime import merged_block_host_time

    log("measuring the host time SDTM adds per merged block (tiny block, triton backend) ...")
    try:
        return merged_block_host_time(family=spec["family"], device=device, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - informational; the timings above stand
        return {"error": f"{type(exc).__name__}: {exc}"}


def launch_count(spec, bench_model, device, dtype, steps, args, log):
    """Kernel launches SDTM adds per merged block on the Triton backend ("fast" preset's first
    SSM and IDM steps). On CPU they are counted in the interpreter on a 2-block, C=64 copy of
    the model family (a launch count does not depend on the sizes)."""
    from .launches import merged_block_launches

    model = bench_model
    if device.type != "cuda":
        video = len(spec["grid"]) == 3  # 2 frames of 8 x 8 tokens; images 16 x 16
        small = make_spec(spec["family"], layers=2, width=64, latent=spec["patch"] * (8 if video else 16),
                          patch=spec["patch"],
                          in_channels=spec["in_channels"], text_len=min(spec["text_len"], 8),
                          text_dim=spec["text_dim"], pooled_dim=spec["pooled_dim"],
                          frames=2 if video else None, ffn_dim=128)
        model = BenchModel(small, device, dtype, batch=args.batch, seed=args.seed)
    log("counting the kernel launches SDTM adds per merged block (triton backend) ...")
    try:
        report = merged_block_launches(model, steps)
    except Exception as exc:  # noqa: BLE001 - a count is informational; the timings above stand
        return {"error": f"{type(exc).__name__}: {exc}"}
    report["model"] = "the timed model" if model is bench_model else "a 2-block C=64 copy (interpreter)"
    return report
