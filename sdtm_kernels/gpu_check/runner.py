"""Options, environment set-up (interpreter, Triton cache), the budget and the step loop."""
import argparse
import gc
import json
import os
import shlex
import sys
import tarfile
import tempfile
import traceback

import torch

DEFAULT_OUT = "gpu_check_out"
STEP_NAMES = ("correctness", "kernel_timings", "block_profile", "plan_agreement", "end_to_end",
              "end_to_end_compiled")
# CUDA: 8 minutes minus start-up (imports, model builds) and one recompile the compiled step may
# still be in when its deadline passes
DEFAULT_BUDGET_S = {"cuda": 400.0, "dry": 110.0}


def add_arguments(parser):
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU (Triton interpreter): checks that every step runs")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock seconds for all steps (default 400 on CUDA, 110 dry); a step whose "
                             "estimate no longer fits is skipped and recorded as skipped")
    parser.add_argument("--only", nargs="+", choices=STEP_NAMES, default=None, help="run only these steps")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="the torch.compile end-to-end step (default: on CUDA, off in the dry run)")
    parser.add_argument("--triton-cache", metavar="DIR_OR_TGZ", default=None,
                        help="use this Triton cache (a folder, or a .tar.gz made by --save-triton-cache, "
                             "unpacked to a temporary folder); sets TRITON_CACHE_DIR")
    parser.add_argument("--save-triton-cache", metavar="TGZ", default=None,
                        help="write the Triton cache as one .tar.gz after every step that compiled kernels "
                             "(carry it to the next GPU session with --triton-cache)")
    return parser


def relocate_cache_groups(cache_dir):
    """Point every ``__grp__*.json`` of a Triton cache at its own folder: Triton stores absolute
    paths there, and an entry whose paths do not exist is a miss. Returns the files rewritten."""
    rewritten = 0
    for entry in os.scandir(cache_dir):
        if not entry.is_dir():
            continue
        for name in os.listdir(entry.path):
            if not (name.startswith("__grp__") and name.endswith(".json")):
                continue
            path = os.path.join(entry.path, name)
            with open(path, encoding="utf-8") as fh:
                group = json.load(fh)
            children = group.get("child_paths") or {}
            moved = {k: os.path.join(entry.path, os.path.basename(v)) for k, v in children.items()}
            if moved != children:
                with open(path, "w", encoding="utf-8") as fh:
                    json.dump({**group, "child_paths": moved}, fh)
                rewritten += 1
    return rewritten


def _use_triton_cache(path):
    """Point TRITON_CACHE_DIR at ``path`` (must run before triton is imported); returns its source."""
    if path is None:
        return "TRITON_CACHE_DIR" if os.environ.get("TRITON_CACHE_DIR") else "triton default"
    if os.path.isfile(path):
        target = tempfile.mkdtemp(prefix="sdtm_triton_cache_")
        with tarfile.open(path, "r:*") as tar:
            tar.extractall(target)
        relocate_cache_groups(target)
        os.environ["TRITON_CACHE_DIR"] = target
        return f"unpacked from {path}"
    os.makedirs(path, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = os.path.abspath(path)
    return f"folder {path}"


def save_triton_cache(cache_dir, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(cache_dir, arcname=".")
    os.replace(tmp, path)
    return os.path.getsize(path)


def _log(message):
    print(message, file=sys.stderr, flush=True)


def _steps(sizes, device, budget, log):
    """(name, callable(deadline)) in run order; the cheap checks first, the long job last."""
    from .agreement import plan_agreement
    from .blocks import block_profile
    from .correctness import correctness
    from .end_to_end import end_to_end, end_to_end_compiled
    from .kernels import kernel_timings

    def e2e(deadline):
        # short of time: drop the backend="reference" runs (half of the schedules)
        tight = budget.remaining() < 2 * sizes.estimates_s["end_to_end"]
        return end_to_end(sizes, device, deadline, log, no_reference=tight)

    return (
        ("correctness", lambda d: correctness(sizes, device, d)),
        ("kernel_timings", lambda d: kernel_timings(sizes, device, d)),
        ("block_profile", lambda d: block_profile(sizes, device, d)),
        ("plan_agreement", lambda d: plan_agreement(sizes, device, d)),
        ("end_to_end", e2e),
        ("end_to_end_compiled", lambda d: end_to_end_compiled(sizes, device, d, log)),
    )


def _skip_reason(name, args, cuda, remaining, estimate):
    if args.only is not None and name not in args.only:
        return "not selected (--only)"
    if name == "end_to_end_compiled" and not (args.compile if args.compile is not None else cuda):
        return ("off in the dry run: inductor's compile time dominates on a CPU (--compile runs it)" if not cuda
                else "--no-compile")
    if remaining < estimate:
        return f"budget: {remaining:.0f} s left, this step needs about {estimate:.0f} s"
    return None


def run_args(args, argv=None):
    """Run the check with parsed ``args``; returns the exit code (1 if a step failed)."""
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    cache_source = _use_triton_cache(args.triton_cache)

    from .. import bench
    from . import report
    from .sizes import DRY, FULL
    from .timing import Budget, JitCounter, StepClock, count_cache_entries

    device = torch.device("cuda" if cuda else "cpu")
    sizes = FULL if cuda else DRY
    budget = Budget(args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S["cuda" if cuda else "dry"])
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = os.path.join(args.out, "gpu_check.json"), os.path.join(args.out, "gpu_check.md")
    argv = sys.argv[1:] if argv is None else list(argv)
    jit = JitCounter().install()
    result = {
        "tool": "python -m sdtm_kernels gpu-check", "dry_run": not cuda, "command": shlex.join(sys.argv),
        "reproduce": shlex.join(["python", "-m", "sdtm_kernels", "gpu-check", *argv]),
        "environment": bench.environment(device), "budget_s": budget.seconds,
        "sizes": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(sizes).items()},
        "triton_cache": {"dir": jit.dir, "source": cache_source, "entries_at_start": count_cache_entries(jit.dir),
                         "compile_wrapped_in": jit.patched, "note": jit.note},
        "steps": {name: {"status": "pending"} for name in STEP_NAMES}, "finished": False,
    }

    def save():
        result["wall_s"] = budget.elapsed()
        result["triton_cache"]["entries_now"] = count_cache_entries(jit.dir)
        report.write_json(result, json_path)
        report.write_markdown(result, md_path)

    def save_cache():
        if not (args.save_triton_cache and jit.dir and os.path.isdir(jit.dir)):
            return
        try:
            result["triton_cache"]["saved_bytes"] = save_triton_cache(jit.dir, args.save_triton_cache)
            result["triton_cache"]["saved_to"] = args.save_triton_cache
        except OSError as exc:
            result["triton_cache"]["save_error"] = str(exc)

    save()
    _log(f"gpu-check on {result['environment']['device']}{' (dry run)' if not cuda else ''}, budget "
         f"{budget.seconds:.0f} s, writing {json_path}")
    steps = _steps(sizes, device, budget, _log)
    for index, (name, fn) in enumerate(steps):
        later = sum(sizes.estimates_s[n] for n, _ in steps[index + 1:] if n != "end_to_end_compiled")
        remaining, estimate = budget.remaining(), sizes.estimates_s[name]
        reason = _skip_reason(name, args, cuda, remaining, estimate)
        if reason is not None:
            result["steps"][name] = {"status": "skipped", "reason": reason}
            save()
            continue
        record = result["steps"][name] = {"status": "running", "started_after_s": round(budget.elapsed(), 1)}
        save()  # a kill during this step leaves "running" in the JSON
        _log(f"gpu-check: {name} ({remaining:.0f} s of the budget left) ...")
        before = jit.snapshot()
        with StepClock(device) as clock:
            try:
                record["result"] = fn(budget.deadline(max(estimate, remaining - later)))
                record["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - one failing step must not lose the others
                record.update(status="error", error=f"{type(exc).__name__}: {exc}"[:1000],
                              traceback_tail=traceback.format_exc()[-3000:])
        record.update(wall_s=round(clock.wall_s, 3), device_s=clock.device_s, jit=jit.delta(before))
        _log(f"gpu-check: {name} {record['status']} in {clock.wall_s:.1f} s"
             + (f": {record['error']}" if record["status"] == "error" else ""))
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if record["jit"]["cache_misses"]:
            save_cache()
        save()
    if "saved_bytes" not in result["triton_cache"]:
        save_cache()
    result["finished"] = True
    save()
    failed = [n for n, s in result["steps"].items() if s["status"] == "error"]
    failed += (result["steps"]["correctness"].get("result") or {}).get("failed_checks", [])
    _log(f"gpu-check: done in {budget.elapsed():.1f} s; wrote {json_path} and {md_path}"
         + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv=None):
    parser = add_arguments(argparse.ArgumentParser(prog="python -m sdtm_kernels gpu-check"))
    return run_args(parser.parse_args(argv), argv)
