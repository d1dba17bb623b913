"""``python -m sdtm_kernels gpu-check --dry-run``: every step runs (or is skipped with a reason)
at tiny sizes on the CPU, and the JSON / markdown reports are written. The real run needs a GPU
(README, "GPU check")."""
import json
import os
import shutil
import tarfile

import pytest

from sdtm_kernels import cli
from sdtm_kernels.gpu_check import STEP_NAMES, runner


def _load(out):
    with open(os.path.join(out, "gpu_check.json"), encoding="utf-8") as fh:
        return json.load(fh)


def test_dry_run_runs_every_step(tmp_path):
    out = str(tmp_path / "check")
    assert cli.main(["gpu-check", "--dry-run", "--out", out]) == 0
    result = _load(out)
    assert result["finished"] and result["dry_run"]
    assert result["reproduce"] == f"python -m sdtm_kernels gpu-check --dry-run --out {out}"
    for key in ("device", "torch", "triton", "diffusers", "date"):
        assert key in result["environment"]
    assert list(result["steps"]) == list(STEP_NAMES)
    for name, step in result["steps"].items():
        assert step["status"] in ("ok", "skipped"), (name, step.get("error"), step.get("traceback_tail"))
        if step["status"] == "skipped":
            assert step["reason"], name
        else:
            assert step["wall_s"] > 0 and "jit" in step
    steps = result["steps"]
    assert steps["end_to_end_compiled"]["status"] == "skipped"  # off on a CPU unless --compile
    correctness = steps["correctness"]["result"]
    assert correctness["failed_checks"] == []
    assert "CUDA" in correctness["cuda_graph"]["skipped"]
    assert {r["provider"] for r in steps["kernel_timings"]["result"]["rows"]} == {"triton", "reference"}
    assert set(steps["block_profile"]["result"]["runs"]) == {"unpatched", "protected", "ssm", "idm"}
    assert steps["plan_agreement"]["result"]["unexplained_differences"] == 0
    assert [r["name"] for r in steps["end_to_end"]["result"]["summary"]][0] == "unpatched"
    with open(os.path.join(out, "gpu_check.md"), encoding="utf-8") as fh:
        markdown = fh.read()
    for name in STEP_NAMES:
        assert f"## {name}" in markdown


def test_budget_and_only_skip_with_reasons(tmp_path):
    out = str(tmp_path / "none")
    assert runner.main(["--dry-run", "--out", out, "--budget-s", "0"]) == 0
    steps = _load(out)["steps"]
    assert all(s["status"] == "skipped" and s["reason"] for s in steps.values())
    assert "budget" in steps["correctness"]["reason"]
    out = str(tmp_path / "only")
    assert runner.main(["--dry-run", "--out", out, "--only", "plan_agreement"]) == 0
    steps = _load(out)["steps"]
    assert steps["plan_agreement"]["status"] == "ok"
    assert steps["correctness"]["reason"] == "not selected (--only)"


def test_triton_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "unused"))  # restored after the test
    cache = tmp_path / "cache"
    (cache / "abc123").mkdir(parents=True)
    (cache / "abc123" / "kernel.json").write_text("{}")
    # Triton's group file names its members by absolute path: unpacked elsewhere, they must follow
    group = {"child_paths": {"kernel.json": str(cache / "abc123" / "kernel.json")}}
    (cache / "abc123" / "__grp__kernel.json").write_text(json.dumps(group))
    archive = str(tmp_path / "out" / "triton_cache.tar.gz")
    assert runner.save_triton_cache(str(cache), archive) > 0
    with tarfile.open(archive) as tar:
        assert any(name.endswith("abc123/kernel.json") for name in tar.getnames())
    assert runner._use_triton_cache(archive).startswith("unpacked from")
    unpacked = os.environ["TRITON_CACHE_DIR"]
    assert os.path.isfile(os.path.join(unpacked, "abc123", "kernel.json"))
    with open(os.path.join(unpacked, "abc123", "__grp__kernel.json"), encoding="utf-8") as fh:
        assert json.load(fh)["child_paths"] == {"kernel.json": os.path.join(unpacked, "abc123", "kernel.json")}
    shutil.rmtree(unpacked)
    assert runner._use_triton_cache(str(cache)) == f"folder {cache}"
    assert os.environ["TRITON_CACHE_DIR"] == str(cache)


@pytest.mark.parametrize("steps,kinds", [(28, {"protected": 0, "ssm": 1, "idm": 13}),
                                         (6, {"protected": 0, "ssm": 1, "idm": 4})])
def test_step_of_kind(steps, kinds):
    from sdtm_kernels.gpu_check.blocks import step_of_kind

    assert step_of_kind(steps) == kinds
