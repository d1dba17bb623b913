"""Render benchmark results (JSON) into a markdown table for the README, and a plot.

Reads either kind of result file:

* pytest-benchmark JSON (``pytest benchmarks --benchmark-json out.json``): one row per case
  with the keys ``benchmarks/common.record`` puts in ``extra_info`` (op, provider, shape,
  dtype, device, median/p20/p80 ms, GB/s, % of copy bandwidth, TFLOP/s, CUDA-graph replay).
* the main job's ``results.json`` (``python -m sdtm_kernels bench``): its run table.

Usage::

    python benchmarks/render.py out.json [more.json ...] [--out table.md] [--plot plot.png]

The plot needs matplotlib (``pip install ".[bench]"``); without it ``--plot`` prints a note
and the markdown is still written.
"""
import argparse
import json
import os
import sys


def load(path):
    """The parsed JSON of ``path`` and its kind: ``"pytest-benchmark"`` or ``"sdtm-bench"``."""
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    return doc, kind_of(doc, path)


def kind_of(doc, path="<json>"):
    if isinstance(doc, dict) and isinstance(doc.get("benchmarks"), list):
        return "pytest-benchmark"
    if isinstance(doc, dict) and isinstance(doc.get("runs"), list) and "config" in doc:
        return "sdtm-bench"
    raise ValueError(f"{path}: neither a pytest-benchmark JSON (no 'benchmarks' list) nor an sdtm bench "
                     "results.json (no 'runs' and 'config')")


def case_rows(doc):
    """One dict per pytest-benchmark case: extra_info, with the wall-clock stats as a fallback."""
    rows = []
    for bench in doc["benchmarks"]:
        info = dict(bench.get("extra_info") or {})
        stats = bench.get("stats") or {}
        if "median_ms" not in info and "median" in stats:
            info["median_ms"] = stats["median"] * 1e3
        info.setdefault("op", bench.get("name", "?"))
        info.setdefault("provider", (bench.get("params") or {}).get("provider", "-"))
        info["name"] = bench.get("fullname") or bench.get("name")
        rows.append(info)
    return rows


CASE_KEYS = ("op", "provider", "mode", "shape", "dtype")  # what tells two cases apart


def case_key(row):
    """The key of a case: op, provider, mode (structure / detail / full), shape and dtype. The
    device is not part of it, so results from two machines can be compared."""
    return " ".join(str(row.get(k)) for k in CASE_KEYS if row.get(k) not in (None, ""))


def machine_of(doc, kind=None):
    """A short description of the machine a result file comes from."""
    kind = kind or kind_of(doc)
    if kind == "sdtm-bench":
        env = doc.get("environment") or {}
        return str(env.get("device") or doc.get("config", {}).get("device", "?"))
    machine = doc.get("machine_info") or {}
    devices = sorted({str(r["device"]) for r in case_rows(doc) if r.get("device")})
    cpu = (machine.get("cpu") or {}).get("brand_raw") if isinstance(machine.get("cpu"), dict) else None
    return "; ".join(x for x in (", ".join(devices), cpu, machine.get("node")) if x) or "?"


def with_speedups(rows):
    """Speedup of every case against the unpatched case of the same op, shape and dtype, from
    the medians in the same file (so the column always agrees with the medians beside it)."""
    base = {(r.get("op"), str(r.get("shape")), r.get("dtype")): r["median_ms"] for r in rows
            if r.get("provider") == "unpatched" and r.get("median_ms")}
    for row in rows:
        ref = base.get((row.get("op"), str(row.get("shape")), row.get("dtype")))
        if ref is not None and row.get("median_ms"):
            row["speedup"] = ref / row["median_ms"]
    return rows


def _fmt(value, spec):
    if value is None or value == "":
        return "-"
    if isinstance(value, float) and value != value:  # nan
        return "-"
    return spec.format(value)


CASE_COLUMNS = (
    ("op", "op", "{}"), ("provider", "provider", "{}"), ("mode", "mode", "{}"), ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("median ms", "median_ms", "{:.3f}"), ("p20 ms", "p20_ms", "{:.3f}"), ("p80 ms", "p80_ms", "{:.3f}"),
    ("graph ms", "graph_median_ms", "{:.3f}"), ("GB/s", "gbps", "{:.1f}"),
    ("% copy BW", "pct_of_copy_bandwidth", "{:.0f}%"), ("TFLOP/s", "tflops", "{:.2f}"),
    ("speedup", "speedup", "{:.2f}x"),
)


def render_cases(doc):
    rows = sorted(with_speedups(case_rows(doc)),
                  key=lambda r: (str(r.get("op")), str(r.get("shape")), str(r.get("provider")), str(r.get("mode"))))
    columns = [c for c in CASE_COLUMNS if any(r.get(c[1]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---" if f == "{}" else "---:" for _, _, f in columns) + "|"]
    for row in rows:
        cells = [_fmt(row.get(key), spec) for _, key, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    machine = doc.get("machine_info") or {}
    devices = sorted({str(r["device"]) for r in rows if r.get("device")})
    note = f"device: {', '.join(devices) or machine.get('sdtm_device', '?')}"
    if machine.get("sdtm_device_properties"):
        props = machine["sdtm_device_properties"]
        note += "; " + ", ".join(f"{k} {v}" for k, v in props.items())
    if rows and rows[0].get("torch"):
        note += f"; torch {rows[0]['torch']}"
    if doc.get("datetime"):
        note += f"; {doc['datetime']}"
    return "\n".join(lines) + "\n\n" + note + "\n"


def render(doc, kind=None):
    """Markdown for one result document."""
    kind = kind or kind_of(doc)
    if kind == "pytest-benchmark":
        return render_cases(doc)
    from sdtm_kernels.bench import markdown_table

    return markdown_table(doc)


def plot(docs, path):
    """Median ms per case, one panel per op (log axis: ops differ by orders of magnitude), or
    step ms per run (sdtm bench). Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = {}
    for doc, kind in docs:
        if kind == "pytest-benchmark":
            for row in case_rows(doc):
                label = " ".join(str(row.get(k)) for k in ("provider", "mode", "shape", "dtype") if row.get(k))
                panels.setdefault(str(row.get("op")), []).append((label, row.get("median_ms") or 0.0))
        else:
            title = f"main job: {doc['config'].get('family')} on {machine_of(doc, kind)}"
            panels[title] = [(run["name"], run.get("step_ms_mean", run["step_ms_median"])) for run in doc["runs"]]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(9, sum(0.28 * len(v) + 1.2 for v in panels.values())),
                             gridspec_kw={"height_ratios": [len(v) + 2 for v in panels.values()]})
    for ax, (title, bars) in zip(axes[:, 0], panels.items()):
        labels, values = zip(*bars)
        ax.barh(range(len(bars)), values)
        ax.set_yticks(range(len(bars)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("median ms (log)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="result JSON files")
    parser.add_argument("--out", help="write the markdown here (default: stdout)")
    parser.add_argument("--plot", help="also write a PNG plot here (needs matplotlib)")
    args = parser.parse_args(argv)
    docs, parts = [], []
    for path in args.files:
        try:
            doc, kind = load(path)
        except (OSError, ValueError) as exc:
            print(f"render: {exc}", file=sys.stderr)
            return 2
        docs.append((doc, kind))
        parts.append(f"### {os.path.basename(path)}\n\n{render(doc, kind)}")
    text = "\n".join(parts)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    if args.plot and not plot(docs, args.plot):
        print("render: matplotlib is not installed; no plot written (pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package
    raise SystemExit(main())
