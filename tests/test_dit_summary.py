"""``sdtm_kernels.summary``: what is patched, other hooks, settings, the last generation's tokens
per step and stage, the FLOP estimate and warnings (tiny random diffusers models, CPU)."""
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.dit import Summary, get_state  # noqa: E402
from test_dit_compose import OPTIONS, SCHEDULE, hooks_api, runner  # noqa: E402
from test_dit_diffusers import N, build  # noqa: E402


def test_unpatched_model():
    model, _ = build("sd3", 1)
    result = sk.summary(model)
    assert isinstance(result, Summary) and result.patched == {} and result.steps == []
    assert result.warnings == ["not patched with apply_sdtm"]
    assert "not patched" in str(result)


def test_flux_with_first_block_cache():
    FirstBlockCacheConfig, = hooks_api("FirstBlockCacheConfig")
    model, _ = build("flux", 4)
    sk.apply_sdtm(model, **OPTIONS)
    before = sk.summary(model)
    assert before.patched == {"FluxTransformerBlock": 2, "FluxSingleTransformerBlock": 2}
    assert before.warnings == ["no generation has run since apply_sdtm / the last reset"]
    model.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    runner("flux", context=model)(model)
    result = sk.summary(model)
    assert result.other_hooks == {"fbc_leader_block_hook": 1, "fbc_block_hook": 3}
    assert result.settings["ratio"] == 0.5 and result.num_steps == 5 and result.grid == (16, 16)
    assert result.text_len == 5
    assert [(row["step"], row["mode"], row["attn"], row["mlp"]) for row in result.steps][1:3] == [
        (1, "ssm", SCHEDULE[1][1], SCHEDULE[1][2]), (2, "ssm", SCHEDULE[2][1], SCHEDULE[2][2])]
    assert result.steps[0]["blocks"] == 4 and min(row["blocks"] for row in result.steps) == 1
    assert set(result.stages) == {"protected", "ssm", "idm"}
    assert result.stages["protected"] == {"steps": 2, "attn": 1.0, "mlp": 1.0}
    assert result.stages["ssm"]["attn"] < 1 and result.stages["idm"]["attn"] == 1.0 > result.stages["idm"]["mlp"]
    assert 0 < result.flop_saving < 1 and result.tokens["mlp"] < result.tokens["attn"] <= 1
    assert result.warnings == [] and any("skipped" in note for note in result.notes)
    text = str(result)
    for piece in ("4 blocks patched", "2 FluxTransformerBlock", "fbc_block_hook x3", "ratio=0.5", "stage ssm",
                  "estimated block FLOPs saved", "note:"):
        assert piece in text, piece
    assert sk.summary(model).as_dict()["steps"] == result.steps


def test_pipeline_and_other_accelerations_are_listed():
    pytest.importorskip("peft")
    from peft import LoraConfig
    from test_dit_schedule import inputs, tiny_pipeline

    pipe = tiny_pipeline()
    pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)
    sk.apply_sdtm(pipe, ratio=0.5, deviation=0.1)
    pipe(**inputs(), num_inference_steps=10, guidance_scale=1.0)
    result = sk.summary(pipe)
    assert result.patched == {"JointTransformerBlock": 1} and result.other_hooks == {"group_offloading": 2}
    assert any("PEFT adapters ['default']" in line for line in result.other)
    assert [row["mode"] for row in result.steps] == ["protected", "ssm", "ssm", "protected", "ssm", "idm",
                                                     "protected", "idm", "idm", "protected"]
    assert result.warnings == [] and result.flop_saving > 0.1


def test_warnings():
    model, _ = build("dit", 1)
    run = runner_dit(model)
    sk.apply_sdtm(model, ratio=0, num_steps=3)
    run([999, 500, 1])
    assert any("merged any token (ratio=0)" in w for w in sk.summary(model).warnings)
    sk.apply_sdtm(model, ratio=0.5, protect_layers=1)  # every layer protected: no stage ever runs
    run([999, 500, 1])
    warnings = sk.summary(model).warnings
    assert any("structure stage (SSM) never ran" in w for w in warnings)
    assert any("detail stage (IDM) never ran" in w for w in warnings)


def test_unreadable_grid_warns():
    model, _ = build("flux", 2)
    sk.apply_sdtm(model, **OPTIONS)
    shuffled = runner("flux", img_ids=torch.zeros(N, 3))  # ids on no raster grid
    with pytest.warns(RuntimeWarning, match="token grid"):
        shuffled(model, [999])
    result = sk.summary(model)
    assert any("no readable token grid" in w for w in result.warnings)
    assert any("ran exactly" in w for w in result.warnings) and get_state(model).grid is None


def test_lost_hook_is_reported():
    model, _ = build("sd3", 1)
    sk.apply_sdtm(model, **OPTIONS)
    block = model.transformer_blocks[0]
    block.forward = block.forward.__wrapped__  # something replaced the block's forward after apply_sdtm
    runner("sd3")(model, [999])
    warnings = sk.summary(model).warnings
    assert any("no longer in their forward chain" in w for w in warnings)
    assert any("no patched block ran under SDTM" in w for w in warnings)


def runner_dit(model):
    x, labels = torch.randn(2, 4, 32, 32), torch.tensor([1, 2])

    def run(timesteps):
        with torch.no_grad():
            for t in timesteps:
                model(x, timestep=torch.full((2,), t, dtype=torch.long), class_labels=labels, return_dict=False)

    return run


def test_summary_export_is_lazy():
    code = ("import sys, sdtm_kernels as sk\n"
            "assert 'sdtm_kernels.dit' not in sys.modules\n"
            "print(callable(sk.summary), 'diffusers' in sys.modules, 'triton' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=__file__.rsplit("/tests/", 1)[0])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "False"]
