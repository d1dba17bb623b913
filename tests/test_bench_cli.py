"""``python -m sdtm_kernels bench``: the main job at a tiny size, its FLOP model, its errors."""
import argparse
import functools
import io
import json
import math
import os

import pytest
import torch

from sdtm_kernels import bench, cli
from sdtm_kernels.bench import suite

TINY = ["--device", "cpu", "--blocks", "2", "--width", "64", "--latent", "32", "--steps", "6", "--repeats", "1",
        "--no-progress"]


_kernel_check_once = functools.lru_cache(maxsize=None)(suite.kernel_check)


@pytest.fixture(autouse=True)
def _one_kernel_check(monkeypatch):
    """The Triton interpreter check of the main job does not depend on the model family (plans
    and merges of a fixed random sample per seed): it runs once for the file, its result reused."""
    monkeypatch.setattr(suite, "kernel_check", _kernel_check_once)


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    lines = []
    code = bench.main([*TINY, "--out", str(out), *extra], log=lines.append)
    assert code == 0
    with open(out / "results.json", encoding="utf-8") as fh:
        result = json.load(fh)
    return result, out, "\n".join(lines)


def _check_result(result, out, printed, family):
    cfg = result["config"]
    assert cfg["family"] == family and cfg["layers"] == 2 and cfg["width"] == 64 and cfg["steps"] == 6
    n = cfg["num_tokens"]
    assert n == 16 * 16
    env = result["environment"]
    for key in ("device", "torch", "triton", "diffusers", "date"):
        assert key in env
    assert env["torch"] == torch.__version__
    assert result["argv"][:4] == ["--device", "cpu", "--blocks", "2"] and "bench" in result["reproduce"]
    names = [r["name"] for r in result["runs"]]
    assert names == ["unpatched", "released/reference", "fast/reference"]  # CPU: default backend = reference
    base = result["runs"][0]
    assert base["speedup"] == pytest.approx(1.0) and base["flop_bound_speedup"] == pytest.approx(1.0)
    assert all(t["attn"] == n and t["mlp"] == n for t in base["tokens_per_step"])
    for run in result["runs"]:
        assert run["speedup"] > 0 and run["total_s"] > 0 and len(run["step_ms"]) == 6
        assert run["step_ms_median"] == pytest.approx(sorted(run["step_ms"])[2] / 2 + sorted(run["step_ms"])[3] / 2)
    for run in result["runs"][1:]:
        assert run["flop_bound_speedup"] > 1.0  # tokens were merged on some steps
        ssm = [t for t in run["tokens_per_step"] if t["mode"] == "ssm"]
        idm = [t for t in run["tokens_per_step"] if t["mode"] == "idm"]
        assert ssm and idm
        assert all(t["attn"] < n and t["mlp"] < n for t in ssm)  # SSM: attention and MLP merge
        assert all(t["attn"] == n and t["mlp"] < n for t in idm)  # IDM: only the MLP merges
        assert all(t["attn"] == n == t["mlp"] for t in run["tokens_per_step"] if t["mode"] == "protected")
        assert 0 < run["bookkeeping_share"] < 1
        assert run["bookkeeping"]["plan"]["calls"] > 0 and run["bookkeeping"]["merge"]["calls"] > 0
        assert 0 < run["rel_l2_vs_unpatched"] < 0.5
        assert {"ssm", "idm", "protected"} <= set(run["stage_speedups"]) and min(run["stage_speedups"].values()) > 0
    fast, released = result["runs"][2], result["runs"][1]
    assert fast["mean_tokens"] < released["mean_tokens"] < base["mean_tokens"]
    assert fast["flop_bound_speedup"] > released["flop_bound_speedup"]
    md = (out / "results.md").read_text()
    assert "| run |" in md and "released/reference" in md
    assert "speedup" in printed and "fast/reference" in printed and "wall time" in printed
    check = result["kernel_check"]
    if os.environ.get("TRITON_INTERPRET") != "1":  # a GPU machine: CPU tensors cannot run the kernels
        assert "TRITON_INTERPRET" in check["error"]
        return
    assert "error" not in check, check
    assert check["max_abs_diff"] < 1e-5
    launches = result["launches"]  # the main job prints the launch count per merged block
    assert launches["backend"] == "triton" and 0 < launches["ssm"]["per_block"] <= 8
    assert 0 < launches["idm"]["per_block"] <= 8 and "launches SDTM adds per merged block" in printed
    host = result["host_time"]  # and SDTM's host time per merged block vs an unpatched block (no timing asserted)
    assert "error" not in host, host
    assert host["unpatched"]["host_us"] > 0 and host["ssm"]["merged"] and host["idm"]["merged"]
    assert isinstance(host["met"], bool) and host["target_share"] == pytest.approx(0.2)
    assert "host time per merged block" in printed and "target <= 20%" in printed
    assert "host time per merged block" in md and "Measurements:" in md
    assert check["plan_ssm"]["num_rows_triton"] == check["plan_ssm"]["num_rows_reference"]
    assert check["plan_idm"]["num_rows_triton"] == check["plan_idm"]["num_rows_reference"]


def test_bench_main_job(tmp_path):
    family = "sd3" if bench.have_diffusers() else "dit"
    result, out, printed = _run(tmp_path)
    _check_result(result, out, printed, family)


def test_bench_own_dit_without_diffusers(tmp_path):
    """The package's own DiT (the model used when diffusers is absent), through the generic wrapper."""
    result, out, printed = _run(tmp_path, "--family", "dit", "--presets", "fast", "--no-kernel-check")
    assert [r["name"] for r in result["runs"]] == ["unpatched", "fast/reference"]
    assert result["config"]["text_len"] == 0 and result["config"]["family"] == "dit"  # pooled condition only
    run = result["runs"][1]
    assert run["flop_bound_speedup"] > 1.0 and 0 < run["rel_l2_vs_unpatched"] < 0.5
    assert "kernel_check" not in result
    # Interleaved steps on model copies (the CPU default) give the same schedule as one model
    # running the schedules one after the other.
    assert result["config"]["interleaved"] is True
    (tmp_path / "seq").mkdir()
    seq, _, _ = _run(tmp_path / "seq", "--family", "dit", "--presets", "fast", "--no-kernel-check", "--no-interleave")
    assert seq["config"]["interleaved"] is False
    assert seq["runs"][1]["rel_l2_vs_unpatched"] == pytest.approx(run["rel_l2_vs_unpatched"], rel=1e-5)
    assert seq["runs"][1]["tokens_per_step"] == run["tokens_per_step"]


# every family's merged blocks keep within 8 added launches on average (per block type: README status)
WITHIN_LAUNCH_BUDGET = ("wan", "hunyuan", "qwen", "flux", "flux2")


@pytest.mark.parametrize("family,grid", [("wan", [2, 8, 8]), ("hunyuan", [2, 8, 8]), ("qwen", [8, 8]),
                                         ("flux", [8, 8]), ("flux2", [8, 8])])
def test_bench_more_families(tmp_path, family, grid):
    """``--family wan / hunyuan`` (a 3-D token grid, frames x H x W), ``qwen``, ``flux`` and
    ``flux2`` (latents packed 2 x 2 into tokens; Flux: double then single blocks) through the whole
    main job; for Flux.1 / Flux.2 with the host time per merged block."""
    pytest.importorskip("diffusers")
    frames = ["--frames", "2"] if len(grid) == 3 else []
    flux = family in ("flux", "flux2")
    result, _, printed = _run(tmp_path, "--family", family, *frames, "--latent", "16", "--presets", "fast",
                              *([] if flux else ["--no-host-time"]))
    cfg = result["config"]
    assert cfg["family"] == family and cfg["grid"] == grid and cfg["num_tokens"] == math.prod(grid)
    run = result["runs"][1]
    assert run["flop_bound_speedup"] > 1.0 and 0 < run["rel_l2_vs_unpatched"] < 0.5
    ssm = [t for t in run["tokens_per_step"] if t["mode"] == "ssm"]
    assert ssm and all(t["attn"] < cfg["num_tokens"] for t in ssm)
    assert f"token grid {'x'.join(map(str, grid))}" in printed
    if family in ("hunyuan", "flux", "flux2"):  # --blocks 2: one double-stream block, one single-stream block
        assert cfg["double_layers"] == 1 and f"{family} 2 blocks (1 double + 1 single)" in printed
    if os.environ.get("TRITON_INTERPRET") == "1":
        launches = result["launches"]
        assert 0 < launches["ssm"]["per_block"] and 0 < launches["idm"]["per_block"]
        if family in WITHIN_LAUNCH_BUDGET:
            assert launches["ssm"]["per_block"] <= 8 and launches["idm"]["per_block"] <= 8, launches
        if flux:
            host = result["host_time"]
            assert "error" not in host, host
            assert host["unpatched"]["host_us"] > 0 and host["ssm"]["merged"] and host["idm"]["merged"]
    with pytest.raises(bench.BenchError, match="--frames is for video"):
        bench.spec_from_args(argparse.Namespace(family="sd3", quick=True, size=None, latent=None, blocks=None,
                                                width=None, frames=2), "cpu")


def test_cli_dispatch_and_errors(tmp_path, capsys):
    missing = tmp_path / "no_such_pipeline"
    assert cli.main(["bench", "--pipeline", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert bench.main(["--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert "--steps must be >= 2" in capsys.readouterr().err
    assert bench.main(["--size", "1000", "--out", str(tmp_path / "o")]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--presets", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err


def _spec(family="sd3", layers=2, n_side=8, width=32, text_len=4):
    return bench.make_spec(family, layers=layers, width=width, latent=2 * n_side, text_len=text_len, text_dim=16,
                           in_channels=4)


def test_flop_model_by_hand():
    c, t, n = 32, 4, 64
    spec = _spec()
    # SD3 block 0 (not the last): projections, joint attention, both MLPs.
    expected = 6 * (n + t) * c * c + 2 * n * c * c + 2 * t * c * c + 4 * (n + t) ** 2 * c + 16 * n * c * c \
        + 16 * t * c * c
    assert bench.block_flops(spec, 0) == expected
    # The last block (context_pre_only) has no text out-projection and no text MLP.
    assert bench.block_flops(spec, 1) == expected - 2 * t * c * c - 16 * t * c * c
    # Merged: fewer tokens, fewer FLOPs; attention is quadratic in the joint length.
    merged = bench.block_flops(spec, 0, attn=32, mlp=32)
    assert merged == 6 * 36 * c * c + 2 * 32 * c * c + 2 * t * c * c + 4 * 36 ** 2 * c + 16 * 32 * c * c \
        + 16 * t * c * c
    dit = _spec("dit")
    assert bench.block_flops(dit, 0, attn=10, mlp=20) == 8 * 10 * c * c + 4 * 100 * c + 16 * 20 * c * c
    pixart = _spec("pixart")
    assert bench.block_flops(pixart, 0, cross=n) - bench.block_flops(dit, 0) == 4 * n * c * c + 4 * t * c * c \
        + 4 * n * t * c


@pytest.mark.parametrize("family,name", [("flux", "flux.1-dev"), ("flux2", "flux.2-dev"), ("hunyuan", "hunyuanvideo")])
def test_cuda_default_sizes_match_the_families_table(family, name):
    """The main job's CUDA size of Flux.1-dev / Flux.2-dev / HunyuanVideo is the model of
    ``bench.families`` (double + single blocks, C, MLP size and kind, tokens, steps), and its FLOP
    model gives that table's block FLOPs, merged or not."""
    from sdtm_kernels.bench import families

    table_family, blocks, c, ffn, mats, grid, text, steps, _ = families.FAMILIES[name]
    assert table_family == family
    spec = bench.make_spec(**bench.default_spec(family, "cuda"))
    assert (spec["double_layers"], spec["layers"] - spec["double_layers"]) == (blocks[0][1], blocks[1][1])
    assert (spec["width"], spec["ffn_dim"], list(spec["grid"]), spec["text_len"]) == (c, ffn, list(grid), text)
    assert bench.default_spec(family, "cuda")["steps"] == steps
    n = spec["num_tokens"]
    for rows in (n, n // 2):  # unmerged, and half the image rows in attention and MLP
        got = sum(bench.block_flops(spec, layer, attn=rows, mlp=rows) for layer in range(spec["layers"]))
        assert got == sum(count * families.block_flops(k, rows, rows, n, text, c, ffn, mats) for k, count in blocks)
    quick = bench.make_spec(**bench.default_spec(family, "cuda", quick=True))
    assert quick["layers"] < spec["layers"] and quick["num_tokens"] < n and quick["double_layers"] >= 1
    tiny = bench.make_spec(**bench.default_spec(family, "cpu", quick=True))
    assert tiny["layers"] == 2 and tiny["width"] == 128 and tiny["num_tokens"] <= 256


def test_schedule_flops_and_tokens_per_step():
    spec = _spec()
    n = spec["num_tokens"]
    stats = [{"step": s, "call": 0, "layer": layer, "mode": mode, "attn": a, "mlp": m}
             for s, mode, a, m in ((0, "protected", n, n), (1, "ssm", n // 2, n // 2), (2, "idm", n, n // 4))
             for layer in range(2)]
    full = bench.schedule_flops(spec, steps=3)
    merged = bench.schedule_flops(spec, stats)
    assert full == 3 * (bench.block_flops(spec, 0) + bench.block_flops(spec, 1) + bench.call_overhead_flops(spec))
    assert merged < full
    assert bench.schedule_flops(spec, stats[:2]) == bench.schedule_flops(spec, steps=1)
    rows = bench.tokens_per_step(stats, n)
    assert [(r["step"], r["mode"], r["attn"], r["mlp"]) for r in rows] == [
        (0, "protected", n, n), (1, "ssm", n // 2, n // 2), (2, "idm", n, n // 4)]


def test_progress_bar_and_timer():
    stream = io.StringIO()
    bar = bench.Progress(4, stream=stream, width=8)
    for _ in range(4):
        bar.update(label="x")
    bar.close()
    text = stream.getvalue()
    assert "[########] 4/4 x" in text and text.count("\n") <= 4
    timer = bench.BookkeepingTimer("cpu")
    with timer.section("plan"):
        sum(range(10000))
    assert timer.calls["plan"] == 1 and timer.seconds["plan"] > 0 and timer.total == timer.seconds["plan"]
    off = bench.BookkeepingTimer("cpu", enabled=False)
    with off.section("plan"):
        pass
    assert off.total == 0 and not off.calls


def test_side_by_side_images():
    from PIL import Image

    a = Image.new("RGB", (8, 6), (10, 20, 30))
    b = Image.new("RGB", (8, 6), (12, 20, 30))
    out = bench.side_by_side(a, b, gain=4.0)
    assert out.size == (24, 6)
    assert out.getpixel((20, 3)) == (8, 0, 0)  # |12 - 10| * 4 in the difference panel
    assert out.getpixel((10, 3)) == (12, 20, 30)


def test_rel_l2():
    x = torch.ones(10)
    assert bench.rel_l2(x, x) == 0.0
    assert math.isclose(bench.rel_l2(2 * x, x), 1.0, rel_tol=1e-6)


class _TinyFlowPipeline:
    """A pipeline-shaped object around a real tiny SD3 transformer: CFG Euler loop, per-step
    callback, PIL output (the diffusers pipelines need text encoders, absent here)."""

    def __init__(self, transformer):
        self.transformer = transformer

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps=4, height=256, width=256, generator=None,
                 callback_on_step_end=None):
        from types import SimpleNamespace

        from PIL import Image

        x = torch.randn(1, 4, height // 8, width // 8, generator=generator)
        enc = torch.randn(2, 5, 16, generator=generator)
        pooled = torch.randn(2, 8, generator=generator)
        sigmas = torch.linspace(1, 0, num_inference_steps + 1).tolist()
        for i in range(num_inference_steps):
            v = self.transformer(hidden_states=torch.cat([x, x]), encoder_hidden_states=enc, pooled_projections=pooled,
                                 timestep=torch.full((2,), 1000 * sigmas[i]), return_dict=False)[0]
            v = v[:1] + 4.0 * (v[1:] - v[:1])
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, sigmas[i], {})
        pixels = ((x[0, :3].clamp(-3, 3) + 3) / 6 * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        return SimpleNamespace(images=[Image.fromarray(pixels)])


def test_pipeline_mode_with_a_tiny_pipeline(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    import argparse

    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=32).eval()
    pipe = _TinyFlowPipeline(transformer)
    args = bench.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--device", "cpu", "--pipeline", "tiny", "--size", "256", "--steps", "6", "--no-progress",
         "--out", str(tmp_path)])
    bench._check_args(args)
    result = bench.run_pipeline(args, log=lambda *a: None, pipe=pipe)
    assert [r["name"] for r in result["runs"]] == ["unpatched", "released", "fast"]
    for run in result["runs"]:
        assert run["speedup"] > 0 and len(run["step_ms"]) == 6
    for run in result["runs"][1:]:
        assert run["flop_bound_speedup"] > 1.0
        ssm = [t for t in run["tokens_per_step"] if t["mode"] == "ssm"]
        assert ssm and all(t["attn"] < 256 for t in ssm)
    assert type(pipe) is _TinyFlowPipeline and not hasattr(transformer, "_sdtm_state")  # removed again
    from PIL import Image

    for path in result["images"]:
        with Image.open(path) as image:
            assert image.size == (3 * 32, 32)
    md = bench.markdown_table({**result, "environment": bench.environment("cpu")})
    assert "pipeline tiny" in md and "| fast |" in md
