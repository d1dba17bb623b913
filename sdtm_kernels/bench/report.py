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
    return lines


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


def warning_lines(result):
    return [f"WARNING: {w}" for w in result.get("warnings", [])]


def markdown_table(result):
    """The runs of a bench result as a markdown table plus its configuration, notes and legend."""
    head = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    body = ["| " + " | ".join(_cell(r, k, f) for _, k, f in COLUMNS) + " |" for r in result["runs"]]
    extra = [f"**{line}**" for line in warning_lines(result)] + notes(result)
    legend = ["", "Columns:", ""] + [f"- {line}" for line in legend_lines()]
    return "\n".join([head, sep, *body, "", *summary_lines(result), "", *extra, *legend]) + "\n"


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
