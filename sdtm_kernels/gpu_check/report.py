"""``gpu_check.json`` (everything) and ``gpu_check.md`` (the tables the README needs).

Both are rewritten after every step (JSON through a temporary file and a rename), so a run
that is killed keeps what it finished.
"""
import json
import math
import os


def write_json(result, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2, default=str)
    os.replace(tmp, path)


def _fmt(value, spec="{:.3g}"):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else spec.format(value)
    return str(value)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _correctness(res):
    rows = []
    for name, check in res.items():
        if not isinstance(check, dict):
            continue
        if "skipped" in check:
            rows.append([name, "skipped", check["skipped"]])
            continue
        if "error" in check:
            rows.append([name, False, check["error"]])
            continue
        for sub, value in check.items():
            if isinstance(value, dict) and "passed" in value:
                detail = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items() if k != "passed"
                                   and not isinstance(v, dict))
                if isinstance(value.get("differing_entries"), dict):
                    detail += "; differing " + ", ".join(f"{k} {v}" for k, v in value["differing_entries"].items())
                rows.append([f"{name}.{sub}", value["passed"], detail])
        if "passed" in check:
            rows.append([name, check["passed"], ", ".join(f"{k} {_fmt(v)}" for k, v in check.items()
                                                          if k != "passed" and not isinstance(v, dict))])
    lines = _table(["check", "passed", "details"], rows)
    return lines + ["", f"Failed checks: {', '.join(res.get('failed_checks', [])) or 'none'}"]


def _kernels(res):
    copy = res["copy_bandwidth"]
    lines = [f"Copy bandwidth (`Tensor.copy_` of {copy['copy_bytes'] / 2**20:.0f} MiB, read + written): "
             f"{copy['copy_gbps']:.0f} GB/s", ""]
    rows = []
    for r in res["rows"]:
        if "error" in r:
            rows.append([r["op"], r["provider"], r["shape"][1], "error: " + r["error"][:80]] + ["-"] * 6)
            continue
        rows.append([r["op"], r["provider"], r["shape"][1], _fmt(r["median_us"], "{:.1f}"),
                     f"{r['p20_us']:.1f}-{r['p80_us']:.1f}", _fmt(r["gbps"], "{:.0f}"),
                     _fmt(r["pct_of_copy_bandwidth"], "{:.0f}%"), _fmt(r.get("tflops"), "{:.1f}"),
                     _fmt(r.get("speedup_vs_reference"), "{:.2f}x"), _fmt(r["first_call_s"], "{:.2f}")])
    lines += _table(["op", "provider", "N", "median us", "p20-p80 us", "GB/s", "% copy", "TFLOP/s",
                     "vs reference", "first call s"], rows)
    if res.get("skipped_cases"):
        lines += ["", "Skipped: " + "; ".join(res["skipped_cases"])]
    return lines


def _blocks(res):
    lines = [f"{res['model']}; backend {res.get('backend')}; {res['iterations']} calls per run; preset "
             f"{res['preset']} at {res['schedule_steps']} steps (steps {res['step_of_kind']})", ""]
    rows = []
    for name, r in res["runs"].items():
        if "skipped" in r:
            rows.append([name, "skipped: " + r["skipped"]] + ["-"] * 10)
            continue
        rows.append([name, r.get("mode", "-"), _fmt(r["kernels_per_block"], "{:.1f}"),
                     _fmt(r["aten_ops_per_block"], "{:.0f}"), _fmt(r.get("added_kernels"), "{:+.1f}"),
                     _fmt(r["kernel_gpu_us_per_block"], "{:.0f}"), _fmt(r["device_us_per_block"], "{:.0f}"),
                     _fmt(r["host_us_per_block"], "{:.0f}"), _fmt(r.get("gpu_time_ratio"), "{:.2f}"),
                     _fmt(r.get("host_time_ratio"), "{:.2f}"), _fmt(r.get("speedup_device"), "{:.2f}x"),
                     f"{r.get('attn_tokens', '-')}/{r.get('mlp_tokens', '-')}"])
    return lines + _table(["run", "mode", "kernels", "aten ops", "added", "kernel GPU us", "device us", "host us",
                           "GPU ratio", "host ratio", "speedup", "attn/mlp tokens"], rows)


def _agreement(res):
    lines = [f"shape {res['shape']} {res['dtype']}, n_remove {res['n_remove']}; unexplained differing decisions: "
             f"{res['unexplained_differences']}", ""]
    rows = []
    for metric, stages in res["metrics"].items():
        for stage, r in stages.items():
            entries = ", ".join(f"{k} {v}" for k, v in r["plan_differing_entries"].items())
            for decision in ("selection", "matching"):
                if decision in r:
                    d = r[decision]
                    rows.append([metric, stage, decision, d["differing"], d["explained_by_rounding"],
                                 _fmt(d["smallest_margin_of_differing"]), _fmt(r["rounding_threshold"]), entries])
    return lines + _table(["metric", "plan", "decision", "differing", "explained", "smallest margin",
                           "rounding threshold", "differing plan entries"], rows)


def _end_to_end(res):
    return [f"Reproduce: `{res['reproduce']}`", "", res["table_md"].rstrip()]


def _compiled(res):
    rows = [[r["name"], _fmt(r.get("first_schedule_s"), "{:.1f}"), _fmt(r.get("total_s"), "{:.2f}"),
             _fmt(r.get("step_ms_median"), "{:.1f}"), _fmt(r.get("speedup"), "{:.2f}x"),
             _fmt(r.get("flop_bound_speedup"), "{:.2f}x"), _fmt(r.get("pct_of_flop_bound"), "{:.0f}%"),
             r.get("graphs_first_generation", "-"), r.get("new_graphs_second_generation", "-"), r.get("skipped", "")]
            for r in res["runs"]]
    return [res["model"] + "; " + res["timing"], ""] + _table(
        ["run", "compile + first s", "total s", "step ms", "speedup", "FLOP-bound", "% bound", "graphs gen 1",
         "new graphs gen 2", "note"], rows)


RENDERERS = {"correctness": _correctness, "kernel_timings": _kernels, "block_profile": _blocks,
             "plan_agreement": _agreement, "end_to_end": _end_to_end, "end_to_end_compiled": _compiled}


def markdown(result):
    env = result["environment"]
    lines = ["# sdtm_kernels gpu-check", "",
             f"{env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}, diffusers "
             f"{env.get('diffusers')}, Python {env.get('python')}; {env.get('date')}", "",
             f"Command: `{result['reproduce']}`"
             + (" (dry run: tiny sizes, not a measurement)" if result["dry_run"] else ""),
             "", f"Budget {result['budget_s']:.0f} s; wall so far {result.get('wall_s', 0):.1f} s; "
             f"{'finished' if result.get('finished') else 'NOT finished (killed or still running)'}", ""]
    cache = result.get("triton_cache", {})
    lines += [f"Triton cache: `{cache.get('dir')}` ({cache.get('source')}), entries at start "
              f"{cache.get('entries_at_start')}, now {cache.get('entries_now')}"
              + (f"; {cache['note']}" if cache.get("note") else ""), ""]
    overview = []
    for name, step in result["steps"].items():
        jit = step.get("jit") or {}
        overview.append([name, step["status"], _fmt(step.get("wall_s"), "{:.1f}"),
                         _fmt(step.get("device_s"), "{:.1f}"), jit.get("compile_calls", "-"),
                         jit.get("cache_misses", "-"), _fmt(jit.get("compile_s"), "{:.1f}"),
                         step.get("reason") or step.get("error") or ""])
    lines += _table(["step", "status", "wall s", "device s", "JIT compiles", "cache misses", "JIT s", "note"],
                    overview)
    for name, step in result["steps"].items():
        lines += ["", f"## {name}", ""]
        if step["status"] == "ok":
            try:
                lines += RENDERERS[name](step["result"])
            except Exception as exc:  # noqa: BLE001 - a rendering bug must not lose the JSON's numbers
                lines.append(f"(could not render: {type(exc).__name__}: {exc}; see gpu_check.json)")
        elif step["status"] == "error":
            lines += [f"Error: {step.get('error')}", "", "```", step.get("traceback_tail", ""), "```"]
        else:
            lines.append(f"{step['status']}: {step.get('reason', '')}")
    return "\n".join(lines) + "\n"


def write_markdown(result, path):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(markdown(result))
