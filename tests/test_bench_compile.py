"""``python -m sdtm_kernels bench --compile``: the compiled runs and their report (graphs,
recompiles, compile time, merged token counts), failures reported, the option errors. A tiny
model and dynamo's ``eager`` backend keep it fast; no timing is asserted."""
import json

import pytest

from sdtm_kernels import bench
from sdtm_kernels.bench.compiled import merged_token_counts
from sdtm_kernels.bench.report import compile_summary_lines, compile_table

TINY = ["--device", "cpu", "--blocks", "2", "--width", "64", "--latent", "16", "--steps", "4", "--repeats", "1",
        "--no-progress", "--presets", "fast", "--no-kernel-check"]


def _run(tmp_path, *extra, code=0):
    out = tmp_path / "out"
    lines = []
    assert bench.main([*TINY, "--out", str(out), *extra], log=lines.append) == code
    with open(out / "results.json", encoding="utf-8") as fh:
        return json.load(fh), (out / "results.md").read_text(), "\n".join(lines)


def test_compile_path_reports_its_fields(tmp_path):
    family = "sd3" if bench.have_diffusers() else "dit"
    result, md, printed = _run(tmp_path, "--family", family, "--compile", "--compile-backend", "eager")
    comp = result["compile"]
    assert comp["backend"] == "eager" and comp["mode"] == "default" and comp["device_type"] == "cpu"
    assert "CPU" in comp["label"] and comp["cuda_graphs"] is False and comp["repeats"] == 1
    names = [r["name"] for r in comp["runs"]]
    assert names == [r["name"] for r in result["runs"]] == ["unpatched", "fast/reference"]
    for run in comp["runs"]:
        assert "error" not in run, run
        assert run["total_s"] > 0 and len(run["step_ms"]) == 4 and run["first_generation_s"] > 0
        assert isinstance(run["compile_s"], float) and run["unique_graphs"] >= 1
        assert isinstance(run["graph_breaks"], int) and isinstance(run["recompiles"], int)
        assert isinstance(run["recompile_reasons"], list) and len(run["recompile_reasons"]) <= run["recompiles"]
        assert all(r["count"] >= 1 and r["reason"] for r in run["recompile_reasons"])
        assert run["speedup_vs_eager"] > 0 and run["speedup_vs_compiled_baseline"] > 0
        assert run["rel_l2_vs_eager"] < 1e-4  # the eager backend runs the same ops
    base, fast = comp["runs"]
    assert base["speedup_vs_compiled_baseline"] == pytest.approx(1.0) and "merged_token_counts" not in base
    tokens = fast["merged_token_counts"]
    assert tokens["distinct"] == len(tokens["pairs"]) >= 1 and tokens["merged_block_calls"] >= tokens["distinct"]
    n = result["config"]["num_tokens"]
    assert all(a <= n and m < n for a, m in tokens["pairs"])
    assert "compiled run" in printed and "over the compiled baseline" in printed and "recompiles" in printed
    assert "Compiled (torch.compile backend=eager" in md and "--compile:" in md  # table and its method note


def test_compile_failure_is_reported_not_hidden(tmp_path):
    result, md, printed = _run(tmp_path, "--family", "dit", "--compile", "--compile-backend", "no_such_backend")
    runs = result["compile"]["runs"]
    assert [r["name"] for r in runs] == ["unpatched", "fast/reference"]
    assert all("error" in r and r["traceback_tail"] for r in runs)
    assert "FAILED" in printed and "FAILED" in md
    assert any("--compile: unpatched failed" in w for w in result["warnings"])
    assert result["runs"][1]["speedup"] > 0  # the eager runs stand


def test_compile_option_errors(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert bench.main([*TINY, "--cuda-graphs", "--out", out]) == 2
    assert "--cuda-graphs needs CUDA" in capsys.readouterr().err
    assert bench.main([*TINY, "--compile-mode", "max-autotune", "--out", out]) == 2
    assert "--compile-mode applies to --compile" in capsys.readouterr().err
    assert bench.main([*TINY, "--compile", "--compile-backend", "eager", "--compile-mode", "max-autotune",
                       "--out", out]) == 2
    assert "inductor option" in capsys.readouterr().err
    assert bench.main(["--pipeline", str(tmp_path), "--compile", "--out", out]) == 2
    assert "does not apply to --pipeline" in capsys.readouterr().err


def test_merged_token_counts_and_failed_rows():
    stats = [{"mode": "protected", "attn": 64, "mlp": 64}, {"mode": "ssm", "attn": 16, "mlp": 16},
             {"mode": "ssm", "attn": 16, "mlp": 16}, {"mode": "idm", "attn": 64, "mlp": 32}]
    counts = merged_token_counts(stats)
    assert counts == {"distinct": 2, "pairs": [[16, 16], [64, 32]], "attn": [16, 64], "mlp": [16, 32],
                      "merged_block_calls": 3}
    comp = {"label": "L", "runs": [{"name": "unpatched", "error": "RuntimeError: boom"}]}
    assert "unpatched FAILED: RuntimeError: boom" in compile_table({"compile": comp})
    assert compile_summary_lines(comp) == ["--compile (L):", "  unpatched: compile/run FAILED: RuntimeError: boom"]
