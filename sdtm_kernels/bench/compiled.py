"""``--compile``: the runs of the main job again with the transformer ``torch.compile``d.

For each run (unpatched, then every SDTM preset) a fresh copy of the model (same seed, same
weights) is patched (SDTM runs) and compiled in place (``model.compile(backend=..., mode=...)``:
whole model, the SDTM hooks inside). Dynamo's caches and counters are reset before each run, so
every run's graphs and recompiles are its own. One generation is run untimed (it compiles); then
``repeats`` timed generations (per step the minimum over them, as in the eager runs). Reported per
run:

* ``total_s`` / ``step_ms_mean``: the timed generations (the eager numbers are in the main table);
* ``speedup_vs_compiled_baseline``: compiled unpatched total / this run's compiled total (SDTM's
  speedup when both sides are compiled), and ``speedup_vs_eager`` (this run compiled vs eager);
* ``compile_s``: first-generation extra time = the first generation's wall time - the mean timed
  generation (compile time, plus whatever else the first call costs); inductor's on-disk caches
  (FX graph / kernel caches, on by default) make it smaller on a second invocation;
* ``unique_graphs`` (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``), graph breaks
  (``counters["graph_break"]``), recompiles and their reasons (the guard failure dynamo reports,
  captured from ``torch._dynamo.convert_frame``), whether the recompile limit was hit (frames
  past it run eagerly), and graphs compiled during the timed generations (their timing then
  includes compiling);
* ``merged_token_counts``: the distinct ``(attn, mlp)`` image-token counts of the merged block
  calls of one generation (``SDTMState.stats``): each distinct shape is a shape a compiled block
  must handle (a recompile, or one dynamic-shape graph);
* ``rel_l2_vs_eager``: the final latent against the eager run's.

A compile or run error is reported in the run's ``error`` (with the traceback's last lines), never
hidden; the other runs go on. On CPU the compiled code is inductor's C++/OpenMP code: a CPU number,
labelled so. ``--cuda-graphs`` (CUDA only) compiles with ``mode="reduce-overhead"`` (CUDA graphs).
"""
import contextlib
import gc
import logging
import os
import re
import statistics
import time
import traceback

import torch

from .common import BenchError
from .models import BenchModel
from .timing import Progress, rel_l2, sample

MAX_REASONS = 8  # distinct recompile / graph-break reasons kept per run


def check_compile_args(args):
    """Validate the compile options of ``args`` (device already resolved); fills ``compile_mode``."""
    cuda_graphs = getattr(args, "cuda_graphs", False)
    if cuda_graphs:
        if torch.device(args.device).type != "cuda":
            raise BenchError("--cuda-graphs needs CUDA (mode='reduce-overhead' records CUDA graphs); on CPU "
                             "use --compile without it")
        if args.compile_backend != "inductor":
            raise BenchError("--cuda-graphs needs --compile-backend inductor (mode='reduce-overhead')")
        if args.compile_mode not in (None, "reduce-overhead"):
            raise BenchError(f"--cuda-graphs is mode='reduce-overhead'; it conflicts with --compile-mode "
                             f"{args.compile_mode}")
        args.compile = True
        args.compile_mode = "reduce-overhead"
    if getattr(args, "compile_mode", None) and not args.compile:
        raise BenchError("--compile-mode applies to --compile (pass both)")
    if getattr(args, "compile_mode", None) and args.compile_backend != "inductor":
        raise BenchError(f"--compile-mode is an inductor option; --compile-backend is {args.compile_backend}")
    if (args.compile or cuda_graphs) and getattr(args, "pipeline", None):
        raise BenchError("--compile times the random-weight model; it does not apply to --pipeline")


@contextlib.contextmanager
def dynamo_watch():
    """Recompiles (function, first guard failure) and recompile-limit warnings while active."""
    watch = {"recompiles": [], "limit": []}
    try:
        from torch._dynamo import convert_frame
    except ImportError:
        yield watch
        return
    original = getattr(convert_frame, "get_and_maybe_log_recompilation_reasons", None)

    def recorded(cache_entries, frame, *args, **kwargs):
        reasons = original(cache_entries, frame, *args, **kwargs)
        code = frame.f_code
        watch["recompiles"].append({
            "function": f"{code.co_name} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})",
            "reason": _short_guard(reasons[0]) if reasons else "unknown"})
        return reasons

    class LimitHandler(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if "hit config." in message:
                watch["limit"].append(message.splitlines()[0] + " " + " ".join(
                    line.strip() for line in message.splitlines()[1:3]))

    handler = LimitHandler(level=logging.WARNING)
    logger = logging.getLogger(convert_frame.__name__)
    if original is not None:
        convert_frame.get_and_maybe_log_recompilation_reasons = recorded
    else:
        watch["recompiles"] = None  # this torch has no hook for the reasons: counted as unknown
    logger.addHandler(handler)
    try:
        yield watch
    finally:
        logger.removeHandler(handler)
        if original is not None:
            convert_frame.get_and_maybe_log_recompilation_reasons = original


_MODULE_PATH = re.compile(r"(?:\.__dict__\['_modules'\]|\._modules)\['([^']+)'\]")


def _short_guard(reason):
    """A guard failure on one line, module paths shortened (``x.__dict__['_modules']['blocks']._modules['0']``
    -> ``x.blocks.0``)."""
    return _MODULE_PATH.sub(r".\1", " ".join(str(reason).split()))


def _top(items, limit=MAX_REASONS):
    """``[{"reason", "count"}]`` of the most frequent distinct strings in ``items``."""
    counts = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return [{"reason": reason[:400], "count": count} for reason, count in ranked]


def merged_token_counts(stats):
    """Distinct ``(attn, mlp)`` token counts of the merged block calls in ``stats`` (one generation)."""
    pairs = sorted({(rec["attn"], rec["mlp"]) for rec in stats if rec.get("mode") in ("ssm", "idm")})
    return {"distinct": len(pairs), "pairs": [list(p) for p in pairs],
            "attn": sorted({p[0] for p in pairs}), "mlp": sorted({p[1] for p in pairs}),
            "merged_block_calls": sum(1 for rec in stats if rec.get("mode") in ("ssm", "idm"))}


def _counters_snapshot():
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "graph_break_reasons": [str(r) for r in counters["graph_break"]],
            "graph_break_counts": dict(counters["graph_break"]),
            "frames_total": int(counters["frames"]["total"]), "frames_ok": int(counters["frames"]["ok"])}


def compile_label(args):
    device = torch.device(args.device)
    mode = args.compile_mode or "default"
    if device.type == "cuda":
        where = "CUDA"
    elif args.compile_backend == "inductor":
        where = "CPU (inductor's C++/OpenMP code: a CPU number, not a GPU one)"
    else:
        where = "CPU (a CPU number, not a GPU one)"
    return f"torch.compile backend={args.compile_backend} mode={mode} on {where}"


def _compiled_run(name, preset, backend, spec, steps, noise, args, repeats, progress):
    import torch._dynamo
    from torch._dynamo.utils import counters

    device = torch.device(args.device)
    run = {"name": name, "preset": preset}
    bm = state = None
    torch._dynamo.reset()
    counters.clear()
    with dynamo_watch() as watch:
        try:
            bm = BenchModel(spec, device, getattr(torch, args.dtype), batch=args.batch, seed=args.seed)
            if preset is not None:
                state = bm.patch(preset, backend, steps)
            kwargs = {"backend": args.compile_backend}
            if args.compile_mode:
                kwargs["mode"] = args.compile_mode
            bm.model.compile(**kwargs)
            if args.compile_mode == "reduce-overhead":  # CUDA graphs: each call is a new iteration
                forward = bm.forward

                def marked(latent, t, __forward=forward):
                    torch.compiler.cudagraph_mark_step_begin()
                    return __forward(latent, t)

                bm.forward = marked
            start = time.perf_counter()
            with torch.no_grad():
                _, first_times = sample(bm, noise, steps, progress, f"{name} (compile, untimed)")
            run["first_generation_s"] = time.perf_counter() - start
            warm = _counters_snapshot()
            if state is not None:
                run["merged_token_counts"] = merged_token_counts(list(state.stats))
            recompiles_warm = None if watch["recompiles"] is None else len(watch["recompiles"])
            totals, mins, final = [], None, None
            for rep in range(repeats):
                with torch.no_grad():
                    final, times = sample(bm, noise, steps, progress, f"{name} (compiled {rep + 1}/{repeats})")
                totals.append(sum(times))
                mins = list(times) if mins is None else [min(a, b) for a, b in zip(mins, times)]
            run.update(step_ms=[1e3 * t for t in mins], total_s=sum(mins), step_ms_mean=1e3 * sum(mins) / steps,
                       pass_s=totals, compile_s=run["first_generation_s"] - statistics.fmean(totals),
                       final=final.float().cpu())
            end = _counters_snapshot()
            run.update(unique_graphs=end["unique_graphs"], unique_graphs_after_first_generation=warm["unique_graphs"],
                       graphs_compiled_while_timed=end["unique_graphs"] - warm["unique_graphs"],
                       graph_breaks=end["graph_breaks"],
                       graph_break_reasons=_top([r for r, c in end["graph_break_counts"].items() for _ in range(c)]),
                       frames=end["frames_total"])
            if recompiles_warm is not None:
                run["recompiles_while_timed"] = len(watch["recompiles"]) - recompiles_warm
        except Exception as exc:  # noqa: BLE001 - reported in the run, the other runs go on
            tb = traceback.format_exc().strip().splitlines()
            run["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            run["traceback_tail"] = tb[-6:]
            try:
                snap = _counters_snapshot()
                run.update(unique_graphs=snap["unique_graphs"], graph_breaks=snap["graph_breaks"])
            except Exception:  # noqa: BLE001
                pass
        finally:
            if watch["recompiles"] is None:
                run["recompiles"] = None
                run["recompile_reasons"] = "not available in this torch version"
            else:
                run["recompiles"] = len(watch["recompiles"])
                run["recompile_reasons"] = _top(f"{r['function']}: {r['reason']}" for r in watch["recompiles"])
            run["recompile_limit_hit"] = list(dict.fromkeys(watch["limit"]))
            if bm is not None and state is not None:
                bm.unpatch()
            del bm
            torch._dynamo.reset()
            gc.collect()
    return run


def run_compiled(args, spec, steps, noise, configs, eager_runs, eager_finals, log=print):
    """The compiled runs (module docstring); returns ``result["compile"]``."""
    repeats = args.repeats if args.repeats is not None else (1 if torch.device(args.device).type == "cuda" else 2)
    label = compile_label(args)
    log(f"--compile: {label}; per run one untimed generation (compiles), then {repeats} timed")
    progress = Progress(len(configs) * (repeats + 1) * steps, enabled=not args.no_progress)
    runs = []
    for name, preset, backend in configs:
        run = _compiled_run(name, preset, backend, spec, steps, noise, args, repeats, progress)
        if "error" in run:
            log(f"--compile: {name} failed: {run['error']}")
        runs.append(run)
    progress.close()
    eager = {r["name"]: r for r in eager_runs}
    base = runs[0] if runs and "error" not in runs[0] else None
    for run in runs:
        final = run.pop("final", None)
        if "error" in run:
            continue
        ref = eager.get(run["name"])
        if ref is not None:
            run["eager_total_s"] = ref["total_s"]
            run["speedup_vs_eager"] = ref["total_s"] / run["total_s"]
            run["speedup_vs_eager_baseline"] = eager_runs[0]["total_s"] / run["total_s"]
        if base is not None:
            run["speedup_vs_compiled_baseline"] = base["total_s"] / run["total_s"]
        if final is not None and run["name"] in eager_finals:
            run["rel_l2_vs_eager"] = rel_l2(final, eager_finals[run["name"]])
    return {"label": label, "backend": args.compile_backend, "mode": args.compile_mode or "default",
            "device_type": torch.device(args.device).type, "repeats": repeats,
            "cuda_graphs": args.compile_mode == "reduce-overhead", "runs": runs}
