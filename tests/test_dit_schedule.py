"""Issue 10: the steps a patched pipeline really runs (img2img / inpainting ``strength``,
Heun-type schedulers), warnings for surprising bare-transformer step sequences, pickling of
patched models and pipelines, and settings (presets, explicit options, re-applying, ratio=0).

The pipelines here are tiny ``DiffusionPipeline`` subclasses whose ``__call__`` is the
denoising loop of diffusers 0.42.1's SD3 / Flux image-to-image pipelines (``get_timesteps``
copied verbatim): ``transformers`` is not a test dependency, and the real pipelines need it.
The tests at the end run the real pipelines when ``transformers`` is installed."""
import copy
import io
import pickle
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.dit import get_state, reset_sdtm  # noqa: E402
from sdtm_kernels.dit.config import make_config  # noqa: E402
from test_dit_diffusers import TIMESTEPS, L, N, build, expected_rows  # noqa: E402

RATIO, DEVIATION = 0.5, 0.1  # rho from 0.6 (first step) to 0.4 (last step)


class TinyImg2ImgPipeline(diffusers.DiffusionPipeline):
    """The calling pattern of ``StableDiffusion3Img2ImgPipeline.__call__`` (strength 1: the
    text-to-image pipeline): scheduler timesteps, ``get_timesteps(num_inference_steps,
    strength)``, ``_num_timesteps``, CFG by batch concatenation, one ``scheduler.step`` per
    model evaluation. ``step_scheduler=False``: a loop that never calls ``scheduler.step``."""

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def get_timesteps(self, num_inference_steps, strength, device):  # diffusers 0.42.1, verbatim
        # get the original timestep using init_timestep
        init_timestep = min(num_inference_steps * strength, num_inference_steps)

        t_start = int(max(num_inference_steps - init_timestep, 0))
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)

        return timesteps, num_inference_steps - t_start

    @torch.no_grad()
    def __call__(self, latents, prompt_embeds, pooled_prompt_embeds, num_inference_steps=50, strength=1.0,
                 guidance_scale=2.0, step_scheduler=True):
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength, latents.device)
        cfg = guidance_scale > 1
        if cfg:
            prompt_embeds = torch.cat([prompt_embeds] * 2)
            pooled_prompt_embeds = torch.cat([pooled_prompt_embeds] * 2)
        self._num_timesteps = len(timesteps)
        for t in timesteps:
            model_input = torch.cat([latents] * 2) if cfg else latents
            noise_pred = self.transformer(hidden_states=model_input, timestep=t.expand(model_input.shape[0]),
                                          encoder_hidden_states=prompt_embeds,
                                          pooled_projections=pooled_prompt_embeds, return_dict=False)[0]
            if cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (text - uncond)
            if step_scheduler:
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            else:
                latents = latents - 0.01 * noise_pred
        return latents


def tiny_pipeline(scheduler=None):
    transformer, _ = build("sd3", layers=1)
    scheduler = scheduler if scheduler is not None else diffusers.FlowMatchEulerDiscreteScheduler()
    return TinyImg2ImgPipeline(transformer, scheduler)


def inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(1, 4, L, L, generator=gen), prompt_embeds=torch.randn(1, 5, 16, generator=gen),
                pooled_prompt_embeds=torch.randn(1, 8, generator=gen))


def first_calls(state):
    return [(r["step"], r["mode"], r["mlp"]) for r in state.stats if r["call"] == 0 and r["layer"] == 0]


# -- 1. the steps a pipeline really runs ---------------------------------------------------------
def test_img2img_strength_schedules_the_steps_that_run():
    """strength 0.5 of 10 steps runs 5 steps: they are the schedule (structure, then detail,
    the last at ratio - deviation), not the first 5 of 10 (all structure steps before)."""
    pipe = tiny_pipeline()
    sk.apply_sdtm(pipe, ratio=RATIO, deviation=DEVIATION)  # released switch: 0.4 of the steps
    pipe(**inputs(), num_inference_steps=10, strength=0.5)
    state = get_state(pipe)
    assert state.num_steps == 5
    assert sk.ratio_schedule(4, 5, RATIO, DEVIATION) == pytest.approx(RATIO - DEVIATION)
    assert first_calls(state) == [
        (0, "protected", N),
        (1, "ssm", expected_rows(1, "ssm", 5, RATIO, DEVIATION)),
        (2, "ssm", expected_rows(2, "ssm", 5, RATIO, DEVIATION)),
        (3, "protected", N),
        (4, "idm", expected_rows(4, "idm", 5, RATIO, DEVIATION)),  # detail stage, ratio - deviation
    ]
    assert expected_rows(4, "idm", 5, RATIO, DEVIATION) != expected_rows(0, "idm", 5, RATIO, DEVIATION)
    assert "step" not in vars(pipe.scheduler)  # the step counter is removed after the call
    # the same pipeline at strength 1: all 10 steps, schedule over 10
    pipe(**inputs(), num_inference_steps=10)
    assert state.num_steps == 10 and [s for s, _, _ in first_calls(state)] == list(range(10))
    assert [m for _, m, _ in first_calls(state)][4:] == ["ssm", "idm", "protected", "idm", "idm", "protected"]


@pytest.mark.parametrize("scheduler_class", ["FlowMatchHeunDiscreteScheduler", "HeunDiscreteScheduler"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_heun_scheduler_counts_one_step_per_scheduler_step(scheduler_class, strength):
    """order-2 schedulers evaluate the model twice per step (the last step once): both
    evaluations are one SDTM step, with call indices 0 and 1 (each keeps its own cache)."""
    pipe = tiny_pipeline(getattr(diffusers, scheduler_class)())
    assert pipe.scheduler.order == 2
    sk.apply_sdtm(pipe, ratio=RATIO, deviation=DEVIATION)
    pipe(**inputs(), num_inference_steps=8, strength=strength, guidance_scale=1.0)
    state = get_state(pipe)
    steps = 8 if strength == 1.0 else 4
    assert state.num_steps == steps
    calls = [(r["step"], r["call"]) for r in state.stats]
    assert calls == [(s, c) for s in range(steps) for c in (0, 1)][:-1]
    modes = [r["mode"] for r in state.stats if r["call"] == 0]
    switch = int(0.4 * steps)
    assert modes == ["protected" if s % 3 == 0 else "ssm" if s <= switch else "idm" for s in range(steps)]
    assert "idm" in modes and [r["mode"] for r in state.stats if r["call"] == 1] == modes[:-1]
    assert {k[0] for k in state.cache} == {0, 1}  # one cache per evaluation of the step


def test_pipeline_without_scheduler_steps_falls_back_to_the_timestep_rule():
    pipe = tiny_pipeline()
    sk.apply_sdtm(pipe, ratio=RATIO, deviation=DEVIATION)
    pipe(**inputs(), num_inference_steps=4, step_scheduler=False)
    state = get_state(pipe)
    assert state.num_steps == 4
    assert [(r["step"], r["call"]) for r in state.stats] == [(s, 0) for s in range(4)]


def test_step_counter_is_removed_when_the_pipeline_raises():
    pipe = tiny_pipeline()
    sk.apply_sdtm(pipe)
    with pytest.raises(RuntimeError):  # latents with 3 channels for a 4-channel model
        pipe(**dict(inputs(), latents=torch.randn(1, 3, L, L)), num_inference_steps=2)
    assert "step" not in vars(pipe.scheduler) and get_state(pipe).driver is None


# -- 2. bare transformers: warn once on surprising step sequences ---------------------------------
def test_restart_without_reset_warns_once_and_starts_a_new_generation():
    model, run = build("dit", layers=1)
    sk.apply_sdtm(model, num_steps=5, ratio=RATIO, deviation=DEVIATION, switch_step=2)
    state = get_state(model)
    run(TIMESTEPS[:3])  # stopped after 3 of 5 steps
    with pytest.warns(RuntimeWarning, match="reset_sdtm") as record:
        run([900, 700])  # restarted at another timestep, without reset_sdtm
    assert len(record) == 1 and "turned back" in str(record[0].message)
    assert [r["step"] for r in state.stats] == [0, 1]  # a new generation: steps and cache restarted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run([950, 600])  # once: the same surprise again is quiet


def test_more_steps_than_num_steps_warns_once():
    model, run = build("dit", layers=1)
    sk.apply_sdtm(model, num_steps=3, ratio=RATIO, deviation=DEVIATION, switch_step=1)
    state = get_state(model)
    run(TIMESTEPS[:3])
    with pytest.warns(RuntimeWarning, match="reset_sdtm") as record:
        run(TIMESTEPS[3:5])  # steps 3 and 4 of a 3-step schedule
    assert len(record) == 1 and "num_steps=3" in str(record[0].message)
    assert [r["step"] for r in state.stats] == [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run([100, 50, 25])  # once


def test_expected_step_sequences_stay_quiet():
    model, run = build("dit", layers=1)
    sk.apply_sdtm(model, num_steps=3, ratio=RATIO, deviation=DEVIATION, switch_step=1)
    state = get_state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(TIMESTEPS[:3])
        run(TIMESTEPS[:3])  # the same first timestep: a new generation
        run([990, 700, 300])  # a complete generation, then a new one that starts high
        assert [r["step"] for r in state.stats] == [0, 1, 2]
        reset_sdtm(model, num_steps=2)
        run([500, 100])
        run([999, 999, 500, 500])  # split CFG: two calls per step (a new generation: turned back)
    assert [(r["step"], r["call"]) for r in state.stats] == [(0, 0), (0, 1), (1, 0), (1, 1)]


# -- 3. pickling -----------------------------------------------------------------------------------
def roundtrip(obj, how):
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)
    return copy.deepcopy(obj)


def patched_blocks(model):
    """(class, layer) of the blocks with an SDTM hook (HookRegistry name "sdtm"); classes unchanged."""
    return [(type(m), m._diffusers_hook.hooks["sdtm"].layer) for m in model.modules()
            if hasattr(m, "_sdtm_layer") and "sdtm" in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})]


def runner(name):
    """``run(model, timesteps)`` on fixed inputs of the tiny ``build(name)`` models."""
    gen = torch.Generator().manual_seed(2)
    enc, pooled = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 8, generator=gen)
    if name == "sd3":
        x = torch.randn(2, 4, L, L, generator=gen)
        extra = {}
        scale = 1.0
    else:  # flux: 16 x 16 tokens in raster order
        x = torch.randn(2, N, 16, generator=gen)
        ids = torch.zeros(16, 16, 3)
        ids[..., 1] = torch.arange(16)[:, None]
        ids[..., 2] = torch.arange(16)[None]
        extra = dict(img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3))
        scale = 1e-3

    def run(model, timesteps):
        with torch.no_grad():
            return [model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                          timestep=torch.full((2,), t * scale), return_dict=False, **extra)[0] for t in timesteps]

    return run


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_patched_model_pickles(name, how):
    model, _ = build(name)
    run = runner(name)
    sk.apply_sdtm(model, ratio=RATIO, deviation=DEVIATION, switch_step=1, num_steps=3)
    run(model, TIMESTEPS[:2])  # mid-generation: the copy starts a new one
    loaded = roundtrip(model, how)
    reset_sdtm(model)
    expected = run(model, TIMESTEPS[:3])
    assert patched_blocks(loaded) == patched_blocks(model) and patched_blocks(model)
    assert not any(cls.__name__.startswith("SDTM") for cls, _ in patched_blocks(loaded))
    state = get_state(loaded)
    assert state is not get_state(model) and state.config == get_state(model).config and state.step == -1
    assert all(m._sdtm_state is state for m in loaded.modules() if hasattr(m, "_sdtm_layer"))
    got = run(loaded, TIMESTEPS[:3])
    assert [r["mode"] for r in state.stats if r["layer"] == 0] == ["protected", "ssm", "idm"]
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    sk.remove_sdtm(loaded)
    assert not patched_blocks(loaded) and get_state(loaded) is None
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in vars(m) for m in loaded.modules())


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_patched_pipeline_pickles(how):
    pipe = tiny_pipeline()
    sk.apply_sdtm(pipe, preset="fast")
    expected = pipe(**inputs(), num_inference_steps=4)
    loaded = roundtrip(pipe, how)
    assert type(loaded) is type(pipe) and type(loaded)._sdtm_original_class is TinyImg2ImgPipeline
    assert get_state(loaded).config == get_state(pipe).config
    torch.testing.assert_close(loaded(**inputs(), num_inference_steps=4), expected, rtol=0, atol=1e-6)
    assert get_state(loaded).num_steps == 4 and len(get_state(loaded).stats) == 4
    sk.remove_sdtm(loaded)
    assert type(loaded) is TinyImg2ImgPipeline


# -- 4. settings -------------------------------------------------------------------------------------
def test_default_is_the_released_preset_and_reaches_the_detail_stage():
    pipe, released = tiny_pipeline(), tiny_pipeline()
    sk.apply_sdtm(pipe)
    sk.apply_sdtm(released, preset="released")
    assert get_state(pipe).config == get_state(released).config == make_config("released")
    pipe(**inputs(), num_inference_steps=20, guidance_scale=1.0)
    modes = [r["mode"] for r in get_state(pipe).stats]
    assert modes[8] == "ssm" and modes[10] == "idm" and modes[-1] == "idm"  # switch at 0.4 * 20 = step 8


def test_explicit_options_win_over_the_preset():
    model, _ = build("sd3", layers=1)
    sk.apply_sdtm(model, preset="fast", ratio=0.3, num_steps=5)  # 0.3 is the default value
    cfg = get_state(model).config
    assert (cfg.ratio, cfg.deviation, cfg.switch_step) == (0.3, 0.2, 0.4)
    sk.apply_sdtm(model, preset="fast", mcw=0.1, num_steps=5)
    assert get_state(model).config.ratio == 0.6


def test_reapplying_keeps_the_earlier_settings():
    pipe = tiny_pipeline()
    sk.apply_sdtm(pipe, preset="fast", merge_cross_attention=False)
    sk.apply_sdtm(pipe.transformer, num_steps=20)  # the README's PixArt example
    cfg = get_state(pipe).config
    assert (cfg.ratio, cfg.num_steps) == (0.6, 20) and cfg == make_config("fast", num_steps=20)
    sk.apply_sdtm(pipe, mcw=0.5)
    assert get_state(pipe).config == make_config("fast", num_steps=20, mcw=0.5)
    sk.apply_sdtm(pipe, preset="released")  # preset= again starts over from that preset
    assert get_state(pipe).config == make_config("released")
    sk.apply_sdtm(pipe, ratio=0)  # off ...
    assert (get_state(pipe).config.ratio, get_state(pipe).config.deviation) == (0.0, 0.0)
    sk.apply_sdtm(pipe, ratio=0.3)  # ... and on again: the preset's deviation comes back
    assert get_state(pipe).config == make_config("released")
    sk.remove_sdtm(pipe)
    sk.apply_sdtm(pipe)  # removed: a new patch starts from the defaults
    assert get_state(pipe).config == make_config("released")


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_ratio_zero_alone_turns_merging_off(name):
    model, run = build(name)
    ref = run()
    sk.apply_sdtm(model, ratio=0, num_steps=5, switch_step=2)
    cfg = get_state(model).config
    assert (cfg.ratio, cfg.deviation) == (0.0, 0.0)
    out = run()
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    stats = get_state(model).stats
    assert {r["mode"] for r in stats} >= {"ssm", "idm"} and all(r["attn"] == r["mlp"] == N for r in stats)


def test_bad_options_still_raise():
    model, _ = build("sd3", layers=1)
    with pytest.raises(ValueError, match="ratio"):
        sk.apply_sdtm(model, ratio=1.0, num_steps=5)
    with pytest.raises(ValueError, match="deviation"):
        sk.apply_sdtm(model, ratio=0, deviation=-0.1, num_steps=5)
    with pytest.raises(TypeError, match="mcw"):
        sk.apply_sdtm(model, mcw="high", num_steps=5)
    with pytest.raises(ValueError, match="preset"):
        sk.apply_sdtm(model, preset="turbo", num_steps=5)
    assert get_state(model) is None
    with pytest.raises(ValueError, match="num_steps"):
        sk.apply_sdtm(model)


# -- the real diffusers pipelines (they need transformers, which the tests do not install) ----------
def tiny_vae(latent_channels):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                   up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                                   latent_channels=latent_channels,
                                   norm_num_groups=8, layers_per_block=1, shift_factor=0.0,
                                   scaling_factor=1.0).eval()  # scale factor 1


def real_pipeline(kind):
    pytest.importorskip("transformers")
    family, task = kind.split("-")
    if family == "sd3":  # the SD3 inpainting pipeline wants 16 latent channels
        torch.manual_seed(0)
        transformer = diffusers.SD3Transformer2DModel(sample_size=L, patch_size=2, in_channels=16, num_layers=1,
                                                      attention_head_dim=8, num_attention_heads=2,
                                                      joint_attention_dim=16, caption_projection_dim=16,
                                                      pooled_projection_dim=8, out_channels=16,
                                                      pos_embed_max_size=32).eval()
    else:  # 4 latent channels, packed 2 x 2 into 16
        transformer, _ = build("flux")
    encoders = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if family == "sd3":
        encoders.update(text_encoder_3=None, tokenizer_3=None)
    name = {"sd3": "StableDiffusion3", "flux": "Flux"}[family] + {"img2img": "Img2ImgPipeline",
                                                                  "inpaint": "InpaintPipeline"}[task]
    pipe = getattr(diffusers, name)(transformer=transformer, vae=tiny_vae(16 if family == "sd3" else 4),
                                    scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), **encoders)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(3)
    call = dict(image=torch.rand(1, 3, L, L, generator=gen), height=L, width=L, output_type="latent",
                prompt_embeds=torch.randn(1, 5, 16, generator=gen),
                pooled_prompt_embeds=torch.randn(1, 8, generator=gen), generator=gen)
    if family == "sd3":
        call.update(guidance_scale=2.0, negative_prompt_embeds=torch.randn(1, 5, 16, generator=gen),
                    negative_pooled_prompt_embeds=torch.randn(1, 8, generator=gen))
    if task == "inpaint":
        mask = torch.zeros(1, 1, L, L)
        mask[..., : L // 2, :] = 1
        call.update(mask_image=mask)
    return pipe, call


@pytest.mark.parametrize("kind", ["sd3-img2img", "sd3-inpaint", "flux-img2img", "flux-inpaint"])
def test_real_img2img_and_inpaint_pipelines(kind):
    pipe, call = real_pipeline(kind)
    sk.apply_sdtm(pipe, ratio=RATIO, deviation=DEVIATION)
    pipe(**call, num_inference_steps=10, strength=0.5)
    state = get_state(pipe)
    assert state.num_steps == 5
    modes = [m for _, m, _ in first_calls(state)]
    assert modes == ["protected", "ssm", "ssm", "protected", "idm"]
    rows = expected_rows(4, "idm", 5, RATIO, DEVIATION)
    assert first_calls(state)[-1][2] == rows  # the last step at ratio - deviation
    assert "step" not in vars(pipe.scheduler)


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_real_pipeline_with_a_heun_scheduler(family):
    pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(3)
    if family == "sd3":
        transformer, _ = build("sd3", layers=1)
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, vae=tiny_vae(4), scheduler=diffusers.FlowMatchHeunDiscreteScheduler(),
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
            tokenizer_3=None)
        call = dict(prompt_embeds=torch.randn(1, 5, 16, generator=gen), guidance_scale=1.0,
                    pooled_prompt_embeds=torch.randn(1, 8, generator=gen))
    else:
        transformer, _ = build("pixart", layers=1)
        pipe = diffusers.PixArtSigmaPipeline(transformer=transformer, vae=tiny_vae(4), text_encoder=None,
                                             tokenizer=None, scheduler=diffusers.HeunDiscreteScheduler())
        call = dict(prompt_embeds=torch.randn(1, 5, 12, generator=gen), prompt_attention_mask=torch.ones(1, 5),
                    guidance_scale=1.0, use_resolution_binning=False)
    pipe.set_progress_bar_config(disable=True)
    sk.apply_sdtm(pipe, ratio=RATIO, deviation=DEVIATION)
    pipe(**call, num_inference_steps=4, height=L, width=L, output_type="latent", generator=gen)
    state = get_state(pipe)
    assert state.num_steps == 4
    assert [(r["step"], r["call"]) for r in state.stats] == [(s, c) for s in range(4) for c in (0, 1)][:-1]
