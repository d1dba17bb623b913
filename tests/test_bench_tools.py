"""benchmarks/render.py, benchmarks/compare.py and the benchmark machine info."""
import copy
import importlib.util
import json
import os
import sys

import pytest

from sdtm_kernels import bench

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name):
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)  # compare.py imports render as a sibling
    spec = importlib.util.spec_from_file_location(f"sdtm_bench_{name}", os.path.join(BENCH_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load("render")
compare = _load("compare")


def _case(op, provider, median_ms, shape=(1, 64, 32), **extra):
    info = {"op": op, "provider": provider, "shape": list(shape), "dtype": "float32", "device": "cpu (test)",
            "torch": "x", "median_ms": median_ms, "p20_ms": median_ms * 0.9, "p80_ms": median_ms * 1.1,
            "gbps": 1.5, "pct_of_copy_bandwidth": 12.0, **extra}
    return {"name": f"test_bench[{op}-{provider}]", "fullname": f"bench.py::test_bench[{op}-{provider}]",
            "params": {"provider": provider}, "stats": {"median": median_ms / 1e3}, "extra_info": info}


def _pytest_benchmark_doc(scale=1.0):
    return {"machine_info": {"sdtm_device": "cpu (test)"}, "datetime": "2026-01-01T00:00:00",
            "benchmarks": [_case("merge", "triton", 2.0 * scale), _case("merge", "reference", 4.0),
                           _case("unmerge", "triton", 1.0, tflops=0.5)]}


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    """A real (tiny) main-job result."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--device", "cpu", "--family", "dit", "--blocks", "1", "--width", "32", "--latent", "32", "--steps",
            "3", "--repeats", "1", "--presets", "fast", "--no-kernel-check", "--no-progress", "--out", str(out)]
    assert bench.main(argv, log=lambda *a: None) == 0
    return str(out / "results.json")


def _write(tmp_path, name, doc):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_render_pytest_benchmark(tmp_path, capsys):
    path = _write(tmp_path, "cases.json", _pytest_benchmark_doc())
    assert render.main([path]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| op | provider | shape | dtype | median ms")
    assert "TFLOP/s" in lines[0] and "graph ms" not in lines[0]  # only columns some case has
    assert len(lines) == 2 + 3
    assert "| merge | reference | [1, 64, 32] | float32 | 4.000 |" in out
    assert "| 0.50 |" in out  # the unmerge TFLOP/s
    assert "device: cpu (test)" in out


def test_render_bench_result_and_plot(tmp_path, bench_result, capsys):
    md = tmp_path / "table.md"
    png = tmp_path / "plot.png"
    assert render.main([bench_result, "--out", str(md), "--plot", str(png)]) == 0
    text = md.read_text()
    assert "| run | total s |" in text and "| unpatched |" in text and "| fast/reference |" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists() and "matplotlib is not installed" in capsys.readouterr().err
    else:
        assert png.stat().st_size > 0


def test_render_rejects_unknown_json(tmp_path, capsys):
    path = _write(tmp_path, "other.json", {"hello": 1})
    assert render.main([path]) == 2
    assert "neither a pytest-benchmark JSON" in capsys.readouterr().err


def test_compare_flags_regressions(tmp_path, capsys):
    base = _write(tmp_path, "base.json", _pytest_benchmark_doc())
    slower = _pytest_benchmark_doc(scale=1.2)  # merge/triton 20% slower
    slower["benchmarks"].append(_case("plan_ssm", "triton", 3.0))
    cand = _write(tmp_path, "cand.json", slower)
    assert compare.main([base, cand, "--threshold", "10"]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("merge triton"))
    assert "+20.0%" in row and row.endswith("regression")
    assert "only in candidate" in out and "1 regression(s)" in out
    assert compare.main([base, cand, "--threshold", "25"]) == 0
    assert compare.main([base, base]) == 0
    faster = _write(tmp_path, "fast.json", _pytest_benchmark_doc(scale=0.5))
    assert compare.main([base, faster]) == 0
    assert "improvement" in capsys.readouterr().out


def test_compare_bench_results(tmp_path, bench_result, capsys):
    with open(bench_result, encoding="utf-8") as fh:
        doc = json.load(fh)
    assert compare.main([bench_result, bench_result]) == 0
    worse = copy.deepcopy(doc)
    worse["runs"][1]["step_ms_median"] *= 1.5
    path = _write(tmp_path, "worse.json", worse)
    assert compare.main([bench_result, path, "--threshold", "10"]) == 1
    assert "fast/reference" in capsys.readouterr().out
    cases = _write(tmp_path, "cases.json", _pytest_benchmark_doc())
    assert compare.main([bench_result, cases]) == 2  # different kinds
    assert "is sdtm-bench but" in capsys.readouterr().err


def test_compare_rows():
    rows = compare.compare({"a": 1.0, "b": 2.0}, {"a": 1.05, "c": 1.0}, threshold=10)
    assert rows == [("a", 1.0, 1.05, pytest.approx(5.0), "ok"), ("b", 2.0, None, None, "only in baseline"),
                    ("c", None, 1.0, None, "only in candidate")]


def test_machine_info_hook():
    conftest = _load("conftest")
    info = {}
    conftest.pytest_benchmark_update_machine_info(None, info)
    assert info["sdtm_device"] == conftest.device_name(conftest.DEVICE)
    props = info["sdtm_device_properties"]
    assert props["name"] and ("cpu_count" in props or "multi_processor_count" in props)
    assert info["sdtm_versions"]["torch"]


def test_measure_graph_off_cuda():
    common = _load("common")
    if common.ON_CUDA:
        import torch

        x = torch.ones(1024, device="cuda")
        timing = common.measure_graph(lambda: x.mul_(1.0), reps=3)
        assert timing["graph_median_ms"] > 0
    else:
        assert common.measure_graph(lambda: None, device="cpu") == {}


def test_structure_and_detail_cases_keep_their_own_keys(tmp_path, capsys):
    doc = {"machine_info": {"sdtm_device": "cpu (test)"},
           "benchmarks": [_case("block:tiny", "unpatched", 10.0, mode="full"),
                          _case("block:tiny", "sdtm-triton", 8.0, mode="ssm"),
                          _case("block:tiny", "sdtm-triton", 9.5, mode="idm")]}
    keys = compare.timings(doc, "pytest-benchmark")
    assert len(keys) == 3 and any("ssm" in k for k in keys) and any("idm" in k for k in keys)
    rendered = render.render(doc)
    assert rendered.count("| sdtm-triton |") == 2 and "| ssm |" in rendered and "| idm |" in rendered
    # The speedup column is computed from the medians beside it (10 / 8, 10 / 9.5), whatever a
    # separately measured baseline stored in extra_info said.
    doc["benchmarks"][1]["extra_info"]["speedup"] = 0.23
    rendered = render.render(doc)
    assert "1.25x" in rendered and "1.05x" in rendered and "0.23x" not in rendered


def test_compare_says_when_machines_differ(tmp_path, capsys):
    a = _pytest_benchmark_doc()
    b = copy.deepcopy(a)
    for case in b["benchmarks"]:
        case["extra_info"]["device"] = "NVIDIA H100 (test)"
    assert compare.main([_write(tmp_path, "a.json", a), _write(tmp_path, "b.json", b)]) == 0
    assert "different machines" in capsys.readouterr().out
    assert compare.main([_write(tmp_path, "a.json", a), _write(tmp_path, "c.json", a)]) == 0
    assert "different machines" not in capsys.readouterr().out
