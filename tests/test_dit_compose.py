"""Issue 14: SDTM as diffusers hooks, composed with diffusers' other accelerations on tiny random
models (CPU): cache hooks (First Block Cache, TaylorSeer, MagCache), regional and whole-model
``torch.compile``, group offloading and model CPU offload, PEFT LoRA, ControlNet residuals and
the attention dispatcher. Each combination is checked in both orders of application where the
order matters, and both methods are asserted to be active (SDTM: token counts per step from
``get_state(model).stats``; the other method: skipped blocks, onload calls, changed outputs).
Combinations that cannot work raise ``SDTMError`` naming both."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("diffusers.hooks")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.dit import get_state, reset_sdtm  # noqa: E402
from sdtm_kernels.dit.hooks import SDTMError  # noqa: E402
from test_dit_diffusers import N, build, expected_rows  # noqa: E402

B = 2
STEPS = 5
TIMESTEPS = [999, 800, 600, 400, 200]
OPTIONS = dict(ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3, num_steps=STEPS)
# steps 0 and 3 protected (N tokens), 1-2 SSM (attention and MLP merged), 4 IDM (MLP merged)
SCHEDULE = [("protected", N, N), ("ssm",) + (expected_rows(1, "ssm", STEPS, 0.5, 0.1),) * 2,
            ("ssm",) + (expected_rows(2, "ssm", STEPS, 0.5, 0.1),) * 2, ("protected", N, N),
            ("idm", N, expected_rows(4, "idm", STEPS, 0.5, 0.1))]


def hooks_api(*names):
    """``diffusers.hooks`` members (the test is skipped on a diffusers without them)."""
    import diffusers.hooks

    missing = [name for name in names if not hasattr(diffusers.hooks, name)]
    if missing:
        pytest.skip(f"diffusers {diffusers.__version__} has no diffusers.hooks.{', '.join(missing)}")
    return [getattr(diffusers.hooks, name) for name in names]


def needs_method(name):
    if not hasattr(diffusers.ModelMixin, name):
        pytest.skip(f"diffusers {diffusers.__version__} has no ModelMixin.{name}")


def inputs(name):
    gen = torch.Generator().manual_seed(5)
    enc, pooled = torch.randn(B, 5, 16, generator=gen), torch.randn(B, 8, generator=gen)
    if name == "flux":
        ids = torch.zeros(16, 16, 3)
        ids[..., 1] = torch.arange(16)[:, None]
        ids[..., 2] = torch.arange(16)[None]
        return dict(hidden_states=torch.randn(B, N, 16, generator=gen), encoder_hidden_states=enc,
                    pooled_projections=pooled, img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3))
    return dict(hidden_states=torch.randn(B, 4, 32, 32, generator=gen), encoder_hidden_states=enc,
                pooled_projections=pooled)


def runner(name, context=None, **extra):
    """``run(fn, timesteps)``: calls ``fn`` (a model, compiled or not) on fixed inputs; with
    ``context`` (a CacheMixin model) inside ``model.cache_context("cond")`` like the pipelines."""
    kwargs = dict(inputs(name), **extra)
    scale = 1e-3 if name == "flux" else 1.0

    def run(fn, timesteps=TIMESTEPS):
        outs = []
        with torch.no_grad():
            for t in timesteps:
                call = dict(kwargs, timestep=torch.full((B,), t * scale), return_dict=False)
                if context is not None:
                    with context.cache_context("cond"):
                        outs.append(fn(**call)[0])
                else:
                    outs.append(fn(**call)[0])
        return outs

    return run


def records(model, layer=0):
    return [(r["mode"], r["attn"], r["mlp"]) for r in get_state(model).stats if r["layer"] == layer]


def by_step(model):
    steps = {}
    for r in get_state(model).stats:
        steps.setdefault(r["step"], []).append(r)
    return steps


def same(a, b, atol=0.0):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=atol)


def hook_names(module):
    return list(getattr(getattr(module, "_diffusers_hook", None), "_hook_order", []))


def sdtm_only(name, layers=2, timesteps=TIMESTEPS):
    model, _ = build(name, layers)
    sk.apply_sdtm(model, **OPTIONS)
    return runner(name)(model, timesteps), records(model)


# -- caches ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["sdtm_first", "cache_first"])
def test_first_block_cache_flux(order):
    FirstBlockCacheConfig, = hooks_api("FirstBlockCacheConfig")
    model, _ = build("flux", 4)
    config = FirstBlockCacheConfig(threshold=0.5)
    if order == "sdtm_first":
        sk.apply_sdtm(model, **OPTIONS)
        model.enable_cache(config)
    else:
        model.enable_cache(config)
        sk.apply_sdtm(model, **OPTIONS)
    assert [type(b) for b in model.transformer_blocks] == [diffusers.models.transformers.transformer_flux
                                                           .FluxTransformerBlock] * 2  # class unchanged
    assert hook_names(model.transformer_blocks[0]) == ["sdtm", "fbc_leader_block_hook"]  # SDTM innermost
    outs = runner("flux", context=model)(model)
    assert all(torch.isfinite(o).all() for o in outs)
    assert records(model) == SCHEDULE  # the head block always runs: SDTM's schedule
    blocks = {step: len(recs) for step, recs in by_step(model).items()}
    assert blocks[0] == 4 and min(blocks.values()) == 1  # FBC skipped the other blocks on some steps
    sk.remove_sdtm(model)
    assert hook_names(model.transformer_blocks[0]) == ["fbc_leader_block_hook"]
    model._reset_stateful_cache()  # FBC's state of the SDTM generation
    reference, _ = build("flux", 4)
    reference.enable_cache(config)
    same(runner("flux", context=reference)(reference), runner("flux", context=model)(model))  # FBC still works


@pytest.mark.parametrize("order", ["sdtm_first", "cache_first"])
def test_taylorseer_lite_flux(order):
    TaylorSeerCacheConfig, = hooks_api("TaylorSeerCacheConfig")
    model, _ = build("flux", 2)
    config = TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, use_lite_mode=True,
                                   taylor_factors_dtype=torch.float32)
    if order == "sdtm_first":
        sk.apply_sdtm(model, **OPTIONS)
        model.enable_cache(config)
    else:
        model.enable_cache(config)
        sk.apply_sdtm(model, **OPTIONS)
    outs = runner("flux", context=model)(model)
    assert all(torch.isfinite(o).all() for o in outs)
    steps = by_step(model)
    assert sorted(steps) == [0, 2, 4]  # TaylorSeer predicted steps 1 and 3 (blocks skipped)
    assert records(model) == [SCHEDULE[0], SCHEDULE[2], SCHEDULE[4]]  # SDTM merged the steps that ran


@pytest.mark.parametrize("order", ["sdtm_first", "cache_first"])
def test_taylorseer_on_attention_outputs_raises(order):
    """TaylorSeer's default mode caches the attention modules' outputs: under SDTM their token
    count changes every step, so the combination raises (at apply_sdtm, or at the first call)."""
    TaylorSeerCacheConfig, = hooks_api("TaylorSeerCacheConfig")
    model, _ = build("flux", 2)
    config = TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1)
    if order == "cache_first":
        model.enable_cache(config)
        with pytest.raises(SDTMError, match="taylorseer_cache.*SDTM|SDTM.*taylorseer_cache"):
            sk.apply_sdtm(model, **OPTIONS)
        assert get_state(model) is None and hook_names(model.transformer_blocks[0]) == []  # nothing left
    else:
        sk.apply_sdtm(model, **OPTIONS)
        model.enable_cache(config)
        with pytest.raises(SDTMError, match="taylorseer_cache"):
            runner("flux", context=model)(model)
        assert not get_state(model).active


@pytest.mark.parametrize("order", ["sdtm_first", "cache_first"])
def test_mag_cache_sd3(order):
    MagCacheConfig, apply_mag_cache = hooks_api("MagCacheConfig", "apply_mag_cache")
    model, _ = build("sd3", 2)
    config = MagCacheConfig(num_inference_steps=STEPS, mag_ratios=torch.ones(STEPS), threshold=0.5,
                            retention_ratio=0.2)
    if order == "sdtm_first":
        sk.apply_sdtm(model, **OPTIONS)
        apply_mag_cache(model, config)
    else:
        apply_mag_cache(model, config)
        sk.apply_sdtm(model, **OPTIONS)
    outs = runner("sd3")(model)
    assert all(torch.isfinite(o).all() for o in outs)
    assert sorted(by_step(model)) == [0, 4]  # MagCache skipped steps 1-3 (max_skip_steps=3)
    assert records(model) == [SCHEDULE[0], SCHEDULE[4]] and records(model, 1) == [SCHEDULE[0], SCHEDULE[4]]


def test_pipeline_starts_cache_hooks_with_sdtm_on_models_without_cache_mixin():
    """SD3 has no CacheMixin, so its pipelines never reset cache hooks: a patched pipeline does it
    at the start of each call, so MagCache and SDTM start every generation together."""
    MagCacheConfig, apply_mag_cache = hooks_api("MagCacheConfig", "apply_mag_cache")
    from test_dit_schedule import inputs as pipe_inputs
    from test_dit_schedule import tiny_pipeline

    pipe = tiny_pipeline()
    apply_mag_cache(pipe.transformer, MagCacheConfig(num_inference_steps=8, mag_ratios=torch.ones(8),
                                                     threshold=0.5, retention_ratio=0.2))
    sk.apply_sdtm(pipe, ratio=0.5, deviation=0.1)
    first = pipe(**pipe_inputs(), num_inference_steps=4, guidance_scale=1.0)
    steps = sorted({r["step"] for r in get_state(pipe).stats})
    second = pipe(**pipe_inputs(), num_inference_steps=4, guidance_scale=1.0)
    assert sorted({r["step"] for r in get_state(pipe).stats}) == steps == [0, 1]  # MagCache skipped steps 2-3
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_reset_stateful_cache_starts_a_new_generation():
    """diffusers' ``_reset_stateful_cache()`` (``pipe.maybe_free_model_hooks()`` after every call)
    resets SDTM too: the next call starts a new generation; the last one's statistics stay."""
    run = runner("flux")
    model, _ = build("flux", 2)
    sk.apply_sdtm(model, **OPTIONS)
    run(model, TIMESTEPS[:2])
    model._reset_stateful_cache()
    assert [r["step"] for r in get_state(model).stats] == [0, 0, 1, 1]  # still readable
    later = run(model, TIMESTEPS[2:4])  # without the reset: steps 2 and 3
    assert [r["step"] for r in get_state(model).stats] == [0, 0, 1, 1] and records(model) == SCHEDULE[:2]
    fresh, _ = build("flux", 2)
    sk.apply_sdtm(fresh, **OPTIONS)
    same(run(fresh, TIMESTEPS[2:4]), later)


# -- compile ---------------------------------------------------------------------------------------
# one merged step (SSM at step 0, no protected step) keeps the eager-backend traces short
COMPILE_OPTIONS = dict(OPTIONS, protect_steps=None)
COMPILE_RECORD = [("ssm",) + (expected_rows(0, "ssm", STEPS, 0.5, 0.1),) * 2]


def sdtm_compile_reference(name, layers):
    model, _ = build(name, layers)
    sk.apply_sdtm(model, **COMPILE_OPTIONS)
    return runner(name)(model, TIMESTEPS[:1])


@pytest.mark.parametrize("order", ["sdtm_first", "compile_first"])
def test_compile_repeated_blocks_flux(order):
    needs_method("compile_repeated_blocks")
    torch._dynamo.reset()
    expected = sdtm_compile_reference("flux", 2)
    model, _ = build("flux", 2)
    if order == "compile_first":
        model.compile_repeated_blocks(backend="eager")
        sk.apply_sdtm(model, **COMPILE_OPTIONS)
    else:
        sk.apply_sdtm(model, **COMPILE_OPTIONS)
        model.compile_repeated_blocks(backend="eager")  # finds the blocks by class name
    assert all(b._compiled_call_impl is not None for b in [*model.transformer_blocks, *model.single_transformer_blocks])
    same(expected, runner("flux")(model, TIMESTEPS[:1]), atol=1e-5)
    assert records(model) == records(model, 1) == COMPILE_RECORD


@pytest.mark.parametrize("order", ["sdtm_first", "compile_first"])
def test_whole_model_compile(order):
    torch._dynamo.reset()
    expected = sdtm_compile_reference("sd3", 1)
    model, _ = build("sd3", 1)
    if order == "compile_first":
        compiled = torch.compile(model, backend="eager")
        sk.apply_sdtm(compiled, **COMPILE_OPTIONS)  # patches the module under the OptimizedModule
        assert get_state(compiled) is get_state(model)
    else:
        sk.apply_sdtm(model, **COMPILE_OPTIONS)
        compiled = torch.compile(model, backend="eager")
    same(expected, runner("sd3")(compiled, TIMESTEPS[:1]), atol=1e-5)
    assert records(model) == COMPILE_RECORD


# -- offloading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["sdtm_first", "offload_first"])
@pytest.mark.parametrize("kind", ["block_level", "leaf_level"])
def test_group_offload(order, kind, monkeypatch):
    from diffusers.hooks import group_offloading

    onloads = []
    onload = group_offloading.ModuleGroup.onload_
    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_", lambda self: onloads.append(1) or onload(self))
    expected, _ = sdtm_only("flux")
    model, _ = build("flux", 2)
    offload = dict(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=kind)
    if kind == "block_level":
        offload["num_blocks_per_group"] = 1
    if order == "offload_first":
        model.enable_group_offload(**offload)
        sk.apply_sdtm(model, **OPTIONS)
    else:
        sk.apply_sdtm(model, **OPTIONS)
        model.enable_group_offload(**offload)
    if kind == "block_level":
        assert hook_names(model.transformer_blocks[0]) == ["sdtm", "group_offloading"]
    same(expected, runner("flux")(model))
    assert onloads and records(model) == SCHEDULE  # both ran: the groups were onloaded, SDTM merged


@pytest.mark.parametrize("order", ["sdtm_first", "offload_first"])
def test_model_cpu_offload_keeps_sdtm_across_calls(order):
    """``enable_model_cpu_offload`` (accelerate) removes and re-adds its hooks after every pipeline
    call; SDTM sits beneath them, so the second call still merges. On CPU: ``device="cpu"``."""
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    from test_dit_schedule import tiny_vae

    transformer, _ = build("flux", 2)
    pipe = diffusers.FluxPipeline(transformer=transformer, vae=tiny_vae(4),
                                  scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    if order == "sdtm_first":
        sk.apply_sdtm(pipe, ratio=0.5, deviation=0.1)
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe.enable_model_cpu_offload(device="cpu")
        sk.apply_sdtm(pipe, ratio=0.5, deviation=0.1)
    gen = torch.Generator().manual_seed(3)
    call = dict(prompt_embeds=torch.randn(1, 5, 16, generator=gen),
                pooled_prompt_embeds=torch.randn(1, 8, generator=gen), height=32, width=32, output_type="latent",
                num_inference_steps=4)
    outs = []
    for _ in range(2):
        outs.append(pipe(**call, generator=torch.Generator().manual_seed(0)).images)
        assert getattr(transformer, "_hf_hook", None) is not None
        assert [m for m, _, _ in records(transformer)] == ["protected", "ssm", "idm", "protected"]
        assert records(transformer)[1][1] < N
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    sk.remove_sdtm(pipe)
    assert type(pipe) is diffusers.FluxPipeline and get_state(transformer) is None
    assert not hasattr(transformer, "_diffusers_hook") and transformer._hf_hook is not None  # accelerate stays
    pipe(**call)


# -- LoRA ------------------------------------------------------------------------------------------
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out", "proj_mlp"]


def add_lora(model, seed=1):
    from peft import LoraConfig

    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))


@pytest.mark.parametrize("order", ["lora_first", "sdtm_first"])
def test_lora_unfused_and_fused(order):
    """A LoRA adapter (PEFT) on every linear layer, Flux single blocks' ``proj_out`` included
    (SDTM splits it into its attention and MLP halves: the adapter's delta must be in both)."""
    pytest.importorskip("peft")
    run = runner("flux")
    plain, _ = sdtm_only("flux")
    model, _ = build("flux", 2)
    if order == "lora_first":
        add_lora(model)
        sk.apply_sdtm(model, **OPTIONS)
    else:
        sk.apply_sdtm(model, **OPTIONS)
        add_lora(model)
    unfused = run(model)
    assert records(model) == SCHEDULE
    assert not torch.allclose(unfused[4], plain[4], atol=1e-3)  # the adapter is active
    model.fuse_lora()
    reset_sdtm(model)
    same(unfused, run(model), atol=1e-5)  # fused weights: the same model, every step (IDM included)
    assert records(model) == SCHEDULE


def test_load_lora_adapter_after_apply():
    pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    source, _ = build("flux", 2)
    add_lora(source)
    weights = get_peft_model_state_dict(source)
    sk.apply_sdtm(source, **OPTIONS)
    expected = runner("flux")(source)
    model, _ = build("flux", 2)
    sk.apply_sdtm(model, **OPTIONS)
    model.load_lora_adapter(weights, prefix=None, adapter_name="style")
    same(expected, runner("flux")(model), atol=1e-5)
    assert records(model) == SCHEDULE


# -- ControlNet ------------------------------------------------------------------------------------
def _randomize(*modules):
    torch.manual_seed(7)
    for module in modules:
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.1)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_controlnet_residuals(name):
    """ControlNet block residuals are added between blocks at full length: SDTM blocks return full
    length, so they compose (zero residuals: bit-identical to no ControlNet)."""
    torch.manual_seed(0)
    if name == "sd3":
        controlnet = diffusers.SD3ControlNetModel(sample_size=32, patch_size=2, in_channels=4, num_layers=1,
                                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                  caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                                  pos_embed_max_size=32).eval()
        _randomize(controlnet.controlnet_blocks)
    else:
        controlnet = diffusers.FluxControlNetModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                                   pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)).eval()
        _randomize(controlnet.controlnet_blocks, controlnet.controlnet_single_blocks)
    model, _ = build(name, 2)
    sk.apply_sdtm(model, **OPTIONS)
    args = inputs(name)
    cond = torch.randn_like(args["hidden_states"])
    scale = 1e-3 if name == "flux" else 1.0

    def run(residuals):
        reset_sdtm(model)
        outs = []
        with torch.no_grad():
            for t in TIMESTEPS:
                timestep = torch.full((B,), t * scale)
                res = controlnet(controlnet_cond=cond, timestep=timestep, return_dict=False, **args)
                if residuals == "zero":
                    res = tuple(None if r is None else [torch.zeros_like(x) for x in r] for r in res)
                extra = {}
                if residuals is not None:
                    if name == "sd3":
                        extra = dict(block_controlnet_hidden_states=res[0])
                    else:
                        extra = dict(controlnet_block_samples=res[0], controlnet_single_block_samples=res[1])
                outs.append(model(timestep=timestep, return_dict=False, **args, **extra)[0])
        return outs

    with_controlnet = run("real")
    assert records(model) == SCHEDULE and records(model, 1) == SCHEDULE
    none, zero = run(None), run("zero")
    same(none, zero)
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(with_controlnet, none))


# -- attention dispatcher --------------------------------------------------------------------------
def test_attention_backend_native_and_stock_processors():
    needs_method("set_attention_backend")
    model, _ = build("flux", 2)
    processors = {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")}
    model.set_attention_backend("native")
    sk.apply_sdtm(model, **OPTIONS)
    assert {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")} == processors
    runner("flux")(model)
    assert records(model) == SCHEDULE
    sk.apply_sdtm(model, prompt_reweight=True)  # SDTM's own joint attention is plain SDPA: "native" is fine
    runner("flux")(model)
    assert records(model) == SCHEDULE


@pytest.mark.parametrize("order", ["backend_first", "sdtm_first"])
def test_own_attention_with_another_backend_raises(order):
    needs_method("set_attention_backend")
    model, _ = build("flux", 2)
    if order == "backend_first":
        model.set_attention_backend("_native_math")
        with pytest.raises(SDTMError, match="set_attention_backend"):
            sk.apply_sdtm(model, prompt_reweight=True, **OPTIONS)
        sk.apply_sdtm(model, **OPTIONS)  # the default path runs the stock processors and their backend
        runner("flux")(model)
        assert records(model) == SCHEDULE
    else:
        sk.apply_sdtm(model, idm_score="attention", **OPTIONS)
        model.set_attention_backend("_native_math")
        with pytest.raises(SDTMError, match="set_attention_backend"):
            runner("flux")(model)


def test_context_parallel_hooks_raise():
    from diffusers.hooks import HookRegistry, ModelHook

    model, _ = build("flux", 2)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(ModelHook(), "cp_input---")
    with pytest.raises(SDTMError, match="context parallelism"):
        sk.apply_sdtm(model, **OPTIONS)


# -- hooks bookkeeping -----------------------------------------------------------------------------
def test_forward_replaced_by_an_unknown_wrapper_raises():
    model, _ = build("sd3", 1)
    block = model.transformer_blocks[0]
    block.forward = lambda *args, **kwargs: None
    with pytest.raises(SDTMError, match="JointTransformerBlock"):
        sk.apply_sdtm(model, **OPTIONS)
    assert get_state(model) is None and not any(hasattr(m, "_diffusers_hook") for m in model.modules())


def test_signature_of_hooked_forwards():
    import inspect

    model, _ = build("sd3", 1)
    before = inspect.signature(model.transformer_blocks[0].forward)
    sk.apply_sdtm(model, **OPTIONS)
    assert inspect.signature(model.transformer_blocks[0].forward) == before
    assert "timestep" in inspect.signature(model.forward).parameters
