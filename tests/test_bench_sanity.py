"""The bench job's sanity checks: impossible speedups, unstable repeats and a loaded machine
are reported loudly (and fail the run with --strict) instead of being printed as results."""
import json
import time

from sdtm_kernels import bench
from sdtm_kernels.bench import sanity
from sdtm_kernels.bench.command import EXIT_STRICT, default_threads

TINY = ["--device", "cpu", "--family", "dit", "--blocks", "1", "--width", "64", "--latent", "16", "--steps", "4",
        "--presets", "fast", "--no-progress", "--no-kernel-check"]


def _run(name="fast/reference", speedup=1.2, bound=1.4, spread=0.02):
    return {"name": name, "speedup": speedup, "flop_bound_speedup": bound, "repeat_spread": spread}


def test_speedup_above_the_flop_bound_is_flagged():
    ok = {"runs": [_run(speedup=1.0, bound=1.0), _run(speedup=1.30, bound=1.40)]}
    assert sanity.findings(ok) == []
    impossible = {"runs": [_run(speedup=1.0, bound=1.0), _run(speedup=3.20, bound=1.34)]}
    (warning,) = sanity.findings(impossible)
    assert "exceeds its FLOP bound" in warning and "239%" in warning


def test_repeats_that_disagree_are_flagged():
    (warning,) = sanity.findings({"runs": [_run(spread=0.25)]})
    assert "repeats disagree by 25%" in warning
    assert sanity.repeat_spread([1.0, 1.25]) == 0.25 and sanity.repeat_spread([1.0]) is None


def test_a_process_that_does_not_get_its_cpu_is_flagged():
    share = sanity.CpuShare(threads=1)
    time.sleep(0.3)  # wall time passes, this process uses no CPU: as if other work had the core
    usage = share.finish()
    assert usage["cpu_share"] < 0.5
    (warning,) = sanity.findings({"runs": [], "cpu_usage": usage})
    assert "looks loaded" in warning
    usage["cpu_share"] = 0.95  # a process that had its core
    assert sanity.findings({"runs": [], "cpu_usage": usage}) == []


def test_strict_turns_warnings_into_an_exit_code(tmp_path, monkeypatch):
    lines = []
    assert bench.main([*TINY, "--out", str(tmp_path / "a")], log=lines.append) == 0
    result = json.loads((tmp_path / "a" / "results.json").read_text())
    assert "warnings" in result and result["environment"]["torch_threads"] == default_threads()
    assert "cpu_usage" in result and result["runs"][1]["repeat_spread"] is not None
    printed = "\n".join(lines)
    assert "not a speed claim" in printed and "columns:" in printed and "FLOP-bound:" in printed
    md = (tmp_path / "a" / "results.md").read_text()
    assert "Columns:" in md and "not a speed claim" in md
    # Force a finding: every run looks impossible.
    monkeypatch.setattr("sdtm_kernels.bench.suite.findings", lambda result: ["forced for the test"])
    lines.clear()
    assert bench.main([*TINY, "--out", str(tmp_path / "b")], log=lines.append) == 0
    assert "WARNING: forced for the test" in "\n".join(lines)
    assert bench.main([*TINY, "--strict", "--out", str(tmp_path / "c")], log=lines.append) == EXIT_STRICT


def test_threads_option(tmp_path):
    assert bench.main([*TINY, "--threads", "1", "--out", str(tmp_path)], log=lambda line: None) == 0
    assert json.loads((tmp_path / "results.json").read_text())["environment"]["torch_threads"] == 1
    assert bench.main([*TINY, "--threads", "0", "--out", str(tmp_path)]) == 2
