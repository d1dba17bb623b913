"""Environment, console and markdown tables, the plot and the output files of the bench job."""
import datetime
import importlib.metadata
import json
import os
import platform

import torch

from .plot import plot

# -- reporting ---------------------------------------------------------------------------------
def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device):
    from .. import __version__

    info = {"device": device_name(device), "device_type": torch.device(device).type,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": _version("triton"), "diffusers": _version("diffusers"),
            "sdtm_kernels": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", memory_gb=props.total_memory / 2**30)
    return info


COLUMNS = (("run", "name", "{}"), ("total s", "total_s", "{:.2f}"), ("ms/step", "step_ms_mean", "{:.1f}"),
           ("speedup", "speedup", "{:.2f}x"), ("FLOP-bound", "flop_bound_speedup", "{:.2f}x"),
           ("% bound", "pct_of_flop_bound", "{:.0f}%"), ("spread", "repeat_spread", "{:.0%}"),
           ("tokens/step", "mean_tokens", "{:.0f}"), ("bookkeeping", "bookkeeping_share", "{:.1%}"),
           ("rel.L2 vs unpatched", "rel_l2_vs_unpatched", "{:.4f}"))

LEGEND = {
    "run": "unpatched, or SDTM preset/backend (released: ratio 0.3+/-0.2, faithful to the release; fast: "
           "ratio 0.6+/-0.2, about twice the tokens removed for a larger image change)",
    "total s": "the whole schedule: sum over steps of each step's minimum over the repeats",
    "ms/step": "total s / steps (the mean step; the median is in results.json as step_ms_median)",
    "speedup": "unpatched total s / this run's total s",
    "FLOP-bound": "unpatched FLOPs / this run's FLOPs: the speedup if time were proportional to FLOPs",
    "% bound": "speedup / FLOP-bound (SPEC 8 asks for >= 95%; above ~105% the timing is not trustworthy)",
    "spread": "(max - min) / min of the schedule totals over the repeats (stability of the timing)",
    "tokens/step": "image tokens the attention and MLP sub-layers saw, mean over steps and blocks",
    "bookkeeping": "share of the time in SDTM's plan builds, merges and unmerges",
    "rel.L2 vs unpatched": "relative L2 difference of the final latent against the unpatched run",
}
def _cell(run, key, fmt):
    value = run.get(key)
    return "-" if value is None else fmt.format(value)


def text_table(result):
    rows = [[h for h, _, _ in COLUMNS]] + [[_cell(r, k, f) for _, k, f in COLUMNS] for r in result["runs"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def summary_lines(result):
    cfg, env = result["config"], result.get("environment", {})
    if "pipeline" in cfg:
        return [f"pipeline {cfg['pipeline']} ({cfg['family']}), {cfg['size']}px, {cfg['steps']} steps, "
                f"{cfg['dtype']}; {env.get('device', cfg['device'])}, torch {env.get('torch')}; images: "
                + ", ".join(result.get("images", []))]
    lines = [f"{cfg['family']} {cfg['layers']} blocks, C={cfg['width']}, N={cfg['num_tokens']} image + "
             f"{cfg['text_len']} text tokens, batch {cfg['model_batch']}, {cfg['steps']} steps, {cfg['dtype']}; "
             f"{env.get('device', cfg['device'])}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"diffusers {env.get('diffusers')}"]
    stages = [f"{run['name']}: " + ", ".join(f"{mode} {value:.2f}x" for mode, value in run["stage_speedups"].items())
              for run in result.get("runs", []) if run.get("preset") and run.get("stage_speedups")]
    if stages:
        lines.append("step speedup per stage (unpatched time / run time over that stage's steps): " + "; ".join(stages))
    for diff in result.get("backend_diffs", []):
        lines.append(f"backends {diff['a']} vs {diff['b']}: rel.L2 {diff['rel_l2']:.2e}, "
                     f"max abs {diff['max_abs_diff']:.2e}")
    check = result.get("kernel_check")
    if check:
        if "error" in check:
            lines.append(f"Triton kernel check not run: {check['error']}")
        else:
            lines.append(f"Triton kernels (interpreter) vs reference on {check['shape']}: max abs diff "
                         f"{check['max_abs_diff']:.2e} (merge/unmerge), same plan assignment "
                         f"{check['plan_ssm']['same_assignment_fraction']:.0%} SSM / "
                         f"{check['plan_idm']['same_assignment_fraction']:.0%} IDM")
    launches = result.get("launches")
    if launches and "error" not in launches:
        stages = ", ".join(f"{mode.upper()} {launches[mode]['per_block']:.1f}" for mode in ("ssm", "idm")
                           if mode in launches)
        lines.append(f"kernel launches SDTM adds per merged block ({launches['backend']} backend, counted on "
                     f"{launches['model']}): {stages} (budget 8)")
    elif launches:
        lines.append(f"launch count not run: {launches['error']}")
    lines.extend(host_time_lines(result.get("host_time")))
    lines.extend(compile_summary_lines(result.get("compile")))
    return lines


def host_time_lines(host):
    """The host time per merged block (``hosttime.py``) in one line, or why it is missing."""
    if not host:
        return []
    if "error" in host:
        return [f"host time per merged block not measured: {host['error']}"]
    base = host["unpatched"]["host_us"]
    parts = [f"{kind.upper()} +{host[kind]['added_us']:.0f} us ({100 * host[kind]['added_share']:.0f}%)"
             for kind in ("ssm", "idm") if kind in host]
    verdict = "met" if host.get("met") else "NOT met"
    charge = (f"; Triton launches replayed, {host['triton_launch_us']:g} us charged each"
              if host.get("triton_launch_us") is not None else "")
    return [f"host time per merged block ({host['model']}, {host['backend']} backend{charge}): unpatched block "
            f"{base:.0f} us; SDTM adds " + ", ".join(parts) + f"; target <= {100 * host['target_share']:.0f}% of "
            f"the unpatched block: {verdict} (compute left in the numbers ~{host['compute_residue_us']:.0f} us, "
            "see measurements)"]


def compile_summary_lines(comp):
    """``--compile``: one line per compiled run and SDTM's speedup over the compiled baseline."""
    if not comp:
        return []
    lines = [f"--compile ({comp['label']}):"]
    for run in comp["runs"]:
        if "error" in run:
            lines.append(f"  {run['name']}: compile/run FAILED: {run['error']}")
            continue
        speed = run.get("speedup_vs_compiled_baseline")
        tokens = run.get("merged_token_counts")
        reasons = run.get("recompile_reasons") or []
        first = f"; first: {reasons[0]['reason'][:160]}" if isinstance(reasons, list) and reasons else ""
        limit = "; recompile limit HIT (frames past it run eagerly)" if run.get("recompile_limit_hit") else ""
        lines.append(
            f"  {run['name']}: {run['total_s']:.2f} s compiled vs {run.get('eager_total_s', float('nan')):.2f} s eager "
            f"({run.get('speedup_vs_eager', float('nan')):.2f}x); "
            + (f"{speed:.2f}x over the compiled baseline; " if speed is not None and run.get("preset") else "")
            + f"compile {run['compile_s']:.1f} s; {run['unique_graphs']} graphs, {run['graph_breaks']} graph breaks, "
            f"{run['recompiles'] if run['recompiles'] is not None else '?'} recompiles"
            + (f" ({run['graphs_compiled_while_timed']} graphs compiled during the timed generations)"
               if run.get("graphs_compiled_while_timed") else "")
            + (f"; {tokens['distinct']} distinct merged token counts (attn, mlp) per generation" if tokens else "")
            + (f"; rel.L2 vs eager {run['rel_l2_vs_eager']:.1e}" if run.get("rel_l2_vs_eager") is not None else "")
            + limit + first)
    return lines


COMPILE_COLUMNS = (("compiled run", "name", "{}"), ("total s", "total_s", "{:.2f}"),
                   ("ms/step", "step_ms_mean", "{:.1f}"), ("vs compiled unpatched", "speedup_vs_compiled_baseline",
                                                          "{:.2f}x"),
                   ("vs eager", "speedup_vs_eager", "{:.2f}x"), ("compile s", "compile_s", "{:.1f}"),
                   ("graphs", "unique_graphs", "{}"), ("recompiles", "recompiles", "{}"),
                   ("breaks", "graph_breaks", "{}"), ("token counts", "_distinct", "{}"),
                   ("rel.L2 vs eager", "rel_l2_vs_eager", "{:.1e}"))


def _compile_rows(comp):
    rows = []
    for run in comp["runs"]:
        run = dict(run, _distinct=(run.get("merged_token_counts") or {}).get("distinct"))
        if "error" in run:
            rows.append([run["name"], "FAILED"] + ["-"] * (len(COMPILE_COLUMNS) - 2))
        else:
            rows.append([_cell(run, k, f) for _, k, f in COMPILE_COLUMNS])
    return rows


def compile_table(result):
    """The compiled runs as a console table (``--compile``)."""
    comp = result["compile"]
    rows = [[h for h, _, _ in COMPILE_COLUMNS]] + _compile_rows(comp)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COMPILE_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    errors = [f"  {run['name']} FAILED: {run['error']}" for run in comp["runs"] if "error" in run]
    return "\n".join([comp["label"] + ":", *lines, *errors])


def _compile_markdown(comp):
    head = "| " + " | ".join(h for h, _, _ in COMPILE_COLUMNS) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COMPILE_COLUMNS))) + "|"
    body = ["| " + " | ".join(row) + " |" for row in _compile_rows(comp)]
    return ["", f"Compiled ({comp['label']}):", "", head, sep, *body]


def notes(result):
    """What the numbers are and are not, and what to run next."""
    cfg = result["config"]
    lines = []
    if cfg.get("device", "cpu").startswith("cpu"):
        lines.append("CPU: reference backend, not a speed claim (SDTM's point is GPU speed; on a GPU the default "
                     "backend runs the Triton kernels).")
        if any(str(r.get("resolved_backend")) == "triton" for r in result.get("runs", [])):
            lines.append("Triton runs on CPU execute in the Triton interpreter: their timings measure the "
                         "interpreter, not the kernels.")
    if "pipeline" not in cfg:
        lines.append("Next: on a GPU, `python -m sdtm_kernels bench` runs SD3-medium at 1024x1024 (or "
                     "`python -m sdtm_kernels gpu-check --out DIR` for every GPU number at once); "
                     "`--pipeline ID_OR_FOLDER` times a real diffusers pipeline.")
    return lines


def legend_lines():
    return [f"{name}: {text}" for name, text in LEGEND.items()]


METHODS = {
    "host time per merged block": (
        "one block of the model family at tiny sizes (C=32, 8x8 tokens per frame, 2 frames for video, batch 2, "
        "1 thread; compute small next to the dispatch) called on its own many times, unpatched and merged by "
        "SDTM (triton backend, first SSM and IDM step), median call; SDTM's host time = merged block - "
        "unpatched block, target <= 20% of the unpatched block. On a GPU kernels run asynchronously, so this "
        "wall time is the host time. On CPU "
        "the Triton interpreter runs the kernels in Python, which is not host time and slows the host code after "
        "it (caches, garbage collector): each launch is run once in the interpreter and replayed in the timed "
        "calls (its saved outputs copied back), the time inside a launch is subtracted and a real Triton "
        "launch's host cost (12 us, JITFunction.run on recent GPUs) charged instead. Compute still left: the "
        "unpatched block minus the same block at a quarter of the tokens; merged blocks compute on fewer rows, "
        "so the added time is understated by up to that much (sdtm_kernels/bench/hosttime.py)"),
    "--compile": (
        "each run on a fresh model copy (same weights), patched, then model.compile(backend, mode) (whole model, "
        "SDTM hooks inside); dynamo reset before each run; one untimed generation compiles, then the timed "
        "generations (per step the minimum). compile s = first generation - mean timed generation; graphs = "
        "counters['stats']['unique_graphs']; recompiles with dynamo's guard-failure reasons (results.json); "
        "token counts = distinct (attn, mlp) merged token counts of one generation (state.stats): each is a "
        "shape a compiled block must handle. On CPU inductor emits C++/OpenMP code: a CPU number"),
}


def method_lines(result):
    """How the extra measurements of ``result`` (host time, --compile) were made."""
    keys = [key for key, field in (("host time per merged block", "host_time"), ("--compile", "compile"))
            if result.get(field)]
    return [f"{key}: {METHODS[key]}" for key in keys]


def warning_lines(result):
    return [f"WARNING: {w}" for w in result.get("warnings", [])]


def markdown_table(result):
    """The runs of a bench result as a markdown table plus its configuration, notes and legend."""
    head = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    body = ["| " + " | ".join(_cell(r, k, f) for _, k, f in COLUMNS) + " |" for r in result["runs"]]
    extra = [f"**{line}**" for line in warning_lines(result)] + notes(result)
    compiled = _compile_markdown(result["compile"]) if result.get("compile") else []
    legend = ["", "Columns:", ""] + [f"- {line}" for line in legend_lines()]
    methods = method_lines(result)
    if methods:
        legend += ["", "Measurements:", ""] + [f"- {line}" for line in methods]
    return "\n".join([head, sep, *body, *compiled, "", *summary_lines(result), "", *extra, *legend]) + "\n"


def write_outputs(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md")}
    with open(paths["json"], "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    with open(paths["markdown"], "w", encoding="utf-8") as fh:
        fh.write(markdown_table(result))
    png = os.path.join(out_dir, "results.png")
    if plot(result, png):
        paths["plot"] = png
    else:
        paths["plot"] = "(no results.png: matplotlib is missing; pip install 'sdtm_kernels[bench]')"
    return paths
