"""Compare two benchmark result files and flag regressions.

Both files must be of the same kind: pytest-benchmark JSON (cases keyed by op, provider,
shape, dtype and device from ``extra_info``, compared on ``median_ms``) or the main job's
``results.json`` (runs keyed by name, compared on the median step time ``step_ms_median``).
Cases are keyed by op, provider, mode (structure / detail), shape and dtype, so structure and
detail cases of the same op stay apart; a note says when the files come from different machines.
A case is a regression when the candidate is slower than the baseline by more than
``--threshold`` percent. Cases present in only one file are listed, not flagged.

Usage::

    python benchmarks/compare.py baseline.json candidate.json [--threshold 10]

Exit code: 0 no regression, 1 at least one regression, 2 unreadable or mismatched files.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from render import case_key, case_rows, load, machine_of  # noqa: E402


def timings(doc, kind):
    """``{key: milliseconds}`` of one result document (lower is better)."""
    out = {}
    if kind == "pytest-benchmark":
        for row in case_rows(doc):
            key = row["name"] if row.get("op") == row.get("name") else case_key(row)
            if key in out:
                raise ValueError(f"two cases share the key {key!r}: the file holds cases this script cannot tell apart")
            if row.get("median_ms") is not None:
                out[key] = float(row["median_ms"])
    else:
        for run in doc["runs"]:
            out[run["name"]] = float(run["step_ms_median"])
    return out


def compare(base, cand, threshold):
    """Rows ``(key, base_ms, cand_ms, change_pct, status)``; status is ``regression``,
    ``improvement``, ``ok``, ``only in baseline`` or ``only in candidate``."""
    rows = []
    for key in sorted(set(base) | set(cand)):
        if key not in cand:
            rows.append((key, base[key], None, None, "only in baseline"))
            continue
        if key not in base:
            rows.append((key, None, cand[key], None, "only in candidate"))
            continue
        change = 100.0 * (cand[key] - base[key]) / base[key] if base[key] > 0 else 0.0
        status = "regression" if change > threshold else "improvement" if change < -threshold else "ok"
        rows.append((key, base[key], cand[key], change, status))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline")
    parser.add_argument("candidate")
    parser.add_argument("--threshold", type=float, default=10.0, help="percent slower that counts (default 10)")
    args = parser.parse_args(argv)
    if args.threshold < 0:
        parser.error("--threshold must be >= 0")
    try:
        (base_doc, base_kind), (cand_doc, cand_kind) = load(args.baseline), load(args.candidate)
    except (OSError, ValueError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    if base_kind != cand_kind:
        print(f"compare: {args.baseline} is {base_kind} but {args.candidate} is {cand_kind}", file=sys.stderr)
        return 2
    try:
        rows = compare(timings(base_doc, base_kind), timings(cand_doc, cand_kind), args.threshold)
    except ValueError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    base_machine, cand_machine = machine_of(base_doc, base_kind), machine_of(cand_doc, cand_kind)
    if base_machine != cand_machine:
        print(f"note: the files come from different machines ({base_machine} vs {cand_machine}): a difference "
              "may be the machine's, not the code's")
    width = max([len(r[0]) for r in rows] + [4])
    print(f"{'case'.ljust(width)}  {'base ms':>10}  {'new ms':>10}  {'change':>8}  status")
    for key, b, c, change, status in rows:
        print(f"{key.ljust(width)}  {'-' if b is None else f'{b:10.3f}':>10}  {'-' if c is None else f'{c:10.3f}':>10}"
              f"  {'-' if change is None else f'{change:+7.1f}%':>8}  {status}")
    regressions = [r for r in rows if r[4] == "regression"]
    print(f"{len(regressions)} regression(s) over {args.threshold:g}% in {sum(r[3] is not None for r in rows)} "
          "compared case(s)")
    return 1 if regressions else 0


if __name__ == "__main__":
    raise SystemExit(main())
