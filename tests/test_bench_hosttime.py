"""Host time per merged block (``sdtm_kernels.bench.hosttime``): the measurement runs and its
fields are sane; the record / replay of Triton launches gives the kernels' outputs back. No
timing is asserted (a shared machine's times are not a test)."""
import math
import os

import pytest
import torch

from sdtm_kernels.bench import hosttime
from sdtm_kernels.bench.models import have_diffusers

needs_interpreter = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton kernels need CUDA or the interpreter")


@needs_interpreter
def test_record_and_replay_of_triton_launches():
    if torch.cuda.is_available():
        pytest.skip("replay is the CPU (interpreter) path")
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)

    @triton.jit
    def times_two(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0, mask=mask)

    x = torch.arange(8, dtype=torch.float32)
    clock = hosttime.TritonLaunches()
    with clock.active():
        clock.mode = "record"
        clock.start_call()
        y = torch.zeros(8)
        add_one[(1,)](x, y, 8, BLOCK=8)
        torch.testing.assert_close(y, x + 1)
        clock.mode = "replay"
        for _ in range(2):
            clock.start_call()
            y2 = torch.zeros(8)
            add_one[(1,)](x, y2, 8, BLOCK=8)  # not run: the recorded output is copied back
            torch.testing.assert_close(y2, x + 1)
        assert clock.launches == 3 and clock.seconds > 0
        clock.start_call()
        with pytest.raises(RuntimeError, match="replay"):
            times_two[(1,)](x, y2, 8, BLOCK=8)  # not the launch the recorded call made
    from triton.runtime import interpreter, jit  # the launchers are restored

    assert "run" in interpreter.InterpretedFunction.__dict__
    assert interpreter.InterpretedFunction.run.__qualname__.startswith("InterpretedFunction")
    assert jit.JITFunction.run.__qualname__.startswith("JITFunction")


@needs_interpreter
def test_merged_block_host_time_fields():
    family = "sd3" if have_diffusers() else "dit"
    report = hosttime.merged_block_host_time(family=family, iterations=3, warmup=1)
    base = report["unpatched"]
    assert base["host_us"] > 0 and base["triton_launches"] == 0 and base["iterations"] == 3
    assert report["target_share"] == pytest.approx(0.20)
    assert {"ssm", "idm"} <= set(report)
    n = 64  # the 8x8 token grid of the tiny block
    assert report["model"].startswith(f"{family} block 0") and f"N={n}" in report["model"]
    for kind in ("ssm", "idm"):
        entry = report[kind]
        assert entry["mode"] == kind and entry["merged"] is True
        assert entry["mlp_tokens"] < n and (entry["attn_tokens"] < n if kind == "ssm" else entry["attn_tokens"] == n)
        assert entry["host_us"] > 0 and entry["wall_us"] > 0 and entry["in_launches_us"] >= 0
        assert entry["triton_launches"] > 0  # SDTM's GPU path: the Triton kernels
        if not torch.cuda.is_available():  # replayed launches, each charged a GPU launch's host cost
            assert entry["launch_charge_us"] == pytest.approx(entry["triton_launches"] * hosttime.TRITON_LAUNCH_US)
        assert entry["added_us"] == pytest.approx(entry["host_us"] - base["host_us"])
        assert entry["added_share"] == pytest.approx(entry["added_us"] / base["host_us"])
    assert report["added_share"] == max(report["ssm"]["added_share"], report["idm"]["added_share"])
    assert report["met"] is (report["added_share"] <= 0.20)
    assert math.isfinite(report["compute_residue_us"]) and len(report["unpatched_host_us_runs"]) == 2
    assert "median" in report["method"]


def test_host_time_line_and_error():
    from sdtm_kernels.bench.report import host_time_lines

    entry = {"added_us": 50.0, "added_share": 0.1}
    host = {"model": "m", "backend": "triton", "triton_launch_us": 12.0, "unpatched": {"host_us": 500.0},
            "ssm": entry, "idm": dict(entry, added_us=150.0, added_share=0.3), "target_share": 0.2, "met": False,
            "compute_residue_us": 10.0}
    (line,) = host_time_lines(host)
    assert "unpatched block 500 us" in line and "SSM +50 us (10%)" in line and "IDM +150 us (30%)" in line
    assert "NOT met" in line
    assert host_time_lines({"error": "RuntimeError: x"}) == ["host time per merged block not measured: RuntimeError: x"]
    assert host_time_lines(None) == []
