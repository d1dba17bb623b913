"""apply_sdtm on tiny random diffusers models (no downloads): DiT, PixArt, SD3, SD3.5 (dual
attention), Flux. Token grids of 16x16 (N=256) so that SSM and IDM both merge."""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.dit import get_state, reset_sdtm  # noqa: E402
from sdtm_kernels.dit import flux as flux_mod  # noqa: E402

B, L = 2, 32  # latent 32x32, patch 2 -> 16x16 tokens
N = 256
TIMESTEPS = [999, 800, 600, 400, 200]


def build(name, layers=2):
    torch.manual_seed(0)
    if name == "dit":
        model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                out_channels=4, num_layers=layers, sample_size=L, patch_size=2,
                                                num_embeds_ada_norm=10)
        x, labels = torch.randn(B, 4, L, L), torch.tensor([1, 2])

        def call(t):
            return model(x, timestep=torch.full((B,), t, dtype=torch.long), class_labels=labels, return_dict=False)[0]
    elif name == "pixart":
        model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                   out_channels=8, num_layers=layers, sample_size=L, patch_size=2,
                                                   cross_attention_dim=16, caption_channels=12,
                                                   use_additional_conditions=False)
        x, enc = torch.randn(B, 4, L, L), torch.randn(B, 5, 12)

        def call(t):
            return model(x, encoder_hidden_states=enc, timestep=torch.full((B,), t, dtype=torch.long),
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    elif name in ("sd3", "sd35"):
        extra = dict(dual_attention_layers=(0, 1), qk_norm="rms_norm") if name == "sd35" else {}
        model = diffusers.SD3Transformer2DModel(sample_size=L, patch_size=2, in_channels=4, num_layers=layers,
                                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                                pos_embed_max_size=32, **extra)
        x, enc, pooled = torch.randn(B, 4, L, L), torch.randn(B, 5, 16), torch.randn(B, 8)

        def call(t):
            return model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                         timestep=torch.full((B,), float(t)), return_dict=False)[0]
    elif name == "flux":
        model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers // 2 or 1,
                                                 num_single_layers=layers // 2 or 1, attention_head_dim=16,
                                                 num_attention_heads=2, joint_attention_dim=16,
                                                 pooled_projection_dim=8, axes_dims_rope=(4, 6, 6))
        h = w = 16
        x, enc, pooled = torch.randn(B, h * w, 16), torch.randn(B, 5, 16), torch.randn(B, 8)
        img_ids = torch.zeros(h, w, 3)
        img_ids[..., 1] = torch.arange(h)[:, None]
        img_ids[..., 2] = torch.arange(w)[None]
        img_ids, txt_ids = img_ids.reshape(-1, 3), torch.zeros(5, 3)

        def call(t):
            return model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                         timestep=torch.full((B,), t / 1000), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
    else:
        raise ValueError(name)
    model.eval()

    def run(timesteps=TIMESTEPS):
        with torch.no_grad():
            return [call(t) for t in timesteps]

    return model, run


def expected_rows(step, stage, num_steps, ratio, deviation):
    r_req = math.floor(N * sk.ratio_schedule(step, num_steps, ratio, deviation))
    if stage == "ssm":
        return N - 3 * min(r_req // 48 * 16, 64)
    return N - min(N - 64, r_req) // 16 * 16


def block_classes(model):
    return [type(m) for m in model.modules() if type(m).__name__.endswith("Block")]


def sdtm_hooked(model):
    """The modules that carry an SDTM hook (diffusers HookRegistry name "sdtm")."""
    return [m for m in model.modules() if "sdtm" in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})]


@pytest.mark.parametrize("name", ["dit", "pixart", "sd3", "sd35", "flux"])
def test_model_family(name):
    model, run = build(name)
    original_classes = block_classes(model)
    ref = run()

    sk.apply_sdtm(model, ratio=0.0, deviation=0.0, switch_step=1, num_steps=5)
    assert block_classes(model) == original_classes  # hooks, no class swap
    assert sdtm_hooked(model) == [model] + [m for m in model.modules() if type(m).__name__.endswith("Block")]
    for a, b in zip(ref, run()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)

    sk.apply_sdtm(model, ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3, num_steps=5)
    state = get_state(model)
    state.keep_plans = True
    out = run()
    assert all(torch.isfinite(o).all() for o in out)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-6)  # protected step
    assert not torch.allclose(out[1], ref[1], atol=1e-4)
    assert not torch.allclose(out[4], ref[4], atol=1e-4)
    layers = len(original_classes)
    assert [(r["step"], r["layer"]) for r in state.stats] == [(s, l) for s in range(5) for l in range(layers)]
    for rec in state.stats:
        step = rec["step"]
        if step % 3 == 0:
            assert (rec["mode"], rec["attn"], rec["mlp"]) == ("protected", N, N)
        elif step <= 2:
            m = expected_rows(step, "ssm", 5, 0.5, 0.1)
            assert (rec["mode"], rec["attn"], rec["mlp"]) == ("ssm", m, m)
        else:
            m = expected_rows(step, "idm", 5, 0.5, 0.1)
            assert (rec["mode"], rec["attn"], rec["mlp"]) == ("idm", N, m)
        if name == "sd35" and rec["layer"] < 2:  # dual-attention blocks: attn2 follows attn
            assert rec["attn2"] == rec["attn"]
        if name == "pixart":  # cross-attention not merged by default
            assert rec["cross"] == N
        if name == "flux" and rec.get("plan") is not None:  # one plan shared by the batch
            rows = rec["plan"].row_of_token
            assert torch.equal(rows[0], rows[1])
    assert state.cache and all(v.shape[1] == N for v in state.cache.values())

    sk.remove_sdtm(model)
    assert block_classes(model) == original_classes and not sdtm_hooked(model)
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in vars(m) or hasattr(m, "_sdtm_state")
                   for m in model.modules())  # no hook, forward or attribute left behind
    for a, b in zip(ref, run()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_pixart_merge_cross_attention():
    model, run = build("pixart", layers=1)
    sk.apply_sdtm(model, ratio=0.5, deviation=0.0, switch_step=1, num_steps=3, merge_cross_attention=True)
    run(TIMESTEPS[:3])
    stats = get_state(model).stats
    assert [(r["mode"], r["cross"]) for r in stats] == [("protected", N), ("ssm", r1 := stats[1]["attn"]), ("idm", N)]
    assert r1 < N


def test_cache_and_mcw():
    outs = {}
    for mcw in (1.0, 0.1):
        model, run = build("sd3")
        sk.apply_sdtm(model, ratio=0.5, deviation=0.0, switch_step=1, num_steps=5, mcw=mcw)
        outs[mcw] = run(TIMESTEPS[:3])
        state = get_state(model)
        keys = {(layer, name) for (_, layer, name) in state.cache}
        assert keys == {(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")}
        assert all(tuple(v.shape) == (B, N, 16) for v in state.cache.values())
    torch.testing.assert_close(outs[1.0][0], outs[0.1][0], rtol=0, atol=0)  # protected step
    assert not torch.allclose(outs[1.0][1], outs[0.1][1], atol=1e-4)  # SSM step blends with the cache
    assert not torch.allclose(outs[1.0][2], outs[0.1][2], atol=1e-4)  # IDM step blends with the cache


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_triton_backend_matches_reference(name):
    outs = {}
    for backend in ("reference", "triton"):
        model, run = build(name, layers=1 if name == "sd3" else 2)
        sk.apply_sdtm(model, ratio=0.5, deviation=0.1, switch_step=1, num_steps=3, backend=backend, seed=1)
        outs[backend] = run(TIMESTEPS[:3])
    for a, b in zip(outs["reference"], outs["triton"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


class FakePipeline:
    """The calling pattern of a diffusers pipeline: split CFG (two transformer calls per step)."""

    def __init__(self, transformer, call):
        self.transformer = transformer
        self._call = call

    def __call__(self, prompt, num_inference_steps=50, guidance_scale=5.0):
        outs = []
        with torch.no_grad():
            for t in torch.linspace(999, 0, num_inference_steps).round().tolist():
                uncond, cond = self._call(t), self._call(t)
                outs.append(uncond + guidance_scale * (cond - uncond))
        return outs


def test_pipeline_steps_from_positional_and_keyword_call():
    model, _ = build("sd3", layers=1)
    x, enc, pooled = torch.randn(1, 4, L, L), torch.randn(1, 5, 16), torch.randn(1, 8)

    def call(t):
        return model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                     timestep=torch.tensor([t]), return_dict=False)[0]

    pipe = FakePipeline(model, call)
    assert sk.apply_sdtm(pipe, ratio=0.5, deviation=0.0, switch_step=0.5) is pipe
    first = pipe("a cat", 4)  # positional num_inference_steps
    state = get_state(pipe)
    assert state.num_steps == 4
    assert [(r["step"], r["call"]) for r in state.stats] == [(s, c) for s in range(4) for c in (0, 1)]
    assert [r["mode"] for r in state.stats if r["call"] == 0] == ["protected", "ssm", "ssm", "protected"]
    second = pipe("a cat", num_inference_steps=4)  # state (cache, li, generator) reset per call
    for a, b in zip(first, second):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    pipe(prompt="a cat", num_inference_steps=6)
    assert state.num_steps == 6 and max(r["step"] for r in state.stats) == 5
    assert [r["mode"] for r in state.stats if r["call"] == 0][4:] == ["idm", "idm"]
    sk.remove_sdtm(pipe)
    sk.remove_sdtm(pipe)
    assert type(pipe) is FakePipeline and get_state(pipe) is None


def test_bare_transformer_needs_num_steps_and_reset():
    model, run = build("dit", layers=1)
    with pytest.raises(ValueError, match="num_steps"):
        sk.apply_sdtm(model)
    sk.apply_sdtm(model, num_steps=3, ratio=0.5, deviation=0.0, switch_step=0)
    run(TIMESTEPS[:3])
    assert [r["mode"] for r in get_state(model).stats] == ["protected", "idm", "idm"]
    reset_sdtm(model, num_steps=2)
    run(TIMESTEPS[:2])
    assert [r["step"] for r in get_state(model).stats] == [0, 1]


def test_unsupported_models_raise_type_error():
    with pytest.raises(TypeError, match="no block SDTM supports"):
        sk.apply_sdtm(torch.nn.Sequential(torch.nn.Linear(4, 4)), num_steps=10)
    layer_norm_model = torch.nn.ModuleList([diffusers.models.attention.BasicTransformerBlock(8, 2, 4)])
    with pytest.raises(TypeError, match="no block SDTM supports"):
        sk.apply_sdtm(layer_norm_model, num_steps=10)
    with pytest.raises(TypeError, match="pipeline"):
        sk.apply_sdtm(object(), num_steps=10)


def test_patch_twice_and_remove_twice_are_harmless():
    model, run = build("sd3")
    ref = run(TIMESTEPS[:3])
    sk.apply_sdtm(model, ratio=0.3, deviation=0.0, num_steps=3)
    sk.apply_sdtm(model, ratio=0.5, deviation=0.0, num_steps=3, switch_step=1)  # reconfigures
    assert get_state(model).config.ratio == 0.5
    assert all(m._diffusers_hook._hook_order == ["sdtm"] for m in sdtm_hooked(model))  # one hook each
    assert len(sdtm_hooked(model)) == 1 + len(block_classes(model))
    twice = run(TIMESTEPS[:3])
    model2, run2 = build("sd3")
    sk.apply_sdtm(model2, ratio=0.5, deviation=0.0, num_steps=3, switch_step=1)
    for a, b in zip(run2(TIMESTEPS[:3]), twice):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    sk.remove_sdtm(model)
    sk.remove_sdtm(model)
    assert not sdtm_hooked(model) and not hasattr(model, "_diffusers_hook")
    for a, b in zip(ref, run(TIMESTEPS[:3])):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_flux_single_block_old_signature_matches_new():
    model, _ = build("flux")
    sk.apply_sdtm(model, num_steps=5)
    block = model.single_transformer_blocks[0]
    text, image, temb = torch.randn(B, 5, 32), torch.randn(B, N, 32), torch.randn(B, 32)
    rotary = (torch.randn(5 + N, 16), torch.randn(5 + N, 16))
    with torch.no_grad():
        new_text, new_image = block(image, text, temb, image_rotary_emb=rotary)
        joint = flux_mod.single_forward_joint(block, torch.cat([text, image], 1), temb, image_rotary_emb=rotary)
    torch.testing.assert_close(joint, torch.cat([new_text, new_image], 1), rtol=0, atol=0)


def test_patched_model_under_torch_compile():
    model, run = build("sd3", layers=1)
    sk.apply_sdtm(model, ratio=0.5, deviation=0.0, switch_step=1, num_steps=3)
    eager = run(TIMESTEPS[:3])
    reset_sdtm(model)
    model.compile(backend="eager")  # compiles the hooked forward; the transformer hook runs eagerly inside
    compiled = run(TIMESTEPS[:3])
    assert [r["mode"] for r in get_state(model).stats] == ["protected", "ssm", "idm"]
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_flux_grid_from_img_ids_non_square_and_unknown_layout():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                             pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)).eval()
    h, w = 8, 32  # not square
    x, enc, pooled = torch.randn(B, h * w, 16), torch.randn(B, 5, 16), torch.randn(B, 8)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None]
    ids = ids.reshape(-1, 3)

    def call(t, img_ids):
        with torch.no_grad():
            return model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                         timestep=torch.full((B,), t / 1000), img_ids=img_ids, txt_ids=torch.zeros(5, 3),
                         return_dict=False)[0]

    shuffled = ids[torch.randperm(h * w)]
    ref = call(800, shuffled)
    sk.apply_sdtm(model, ratio=0.5, deviation=0.0, switch_step=1, num_steps=2, protect_steps=None)
    call(999, ids)
    state = get_state(model)
    assert state.grid == (h, w)
    assert [r["attn"] for r in state.stats] == [expected_rows(0, "ssm", 2, 0.5, 0.0)] * 2
    with pytest.warns(RuntimeWarning, match="token grid"):
        out = call(800, shuffled)  # ids not in raster order: no merging, exact output
    assert state.grid is None and [r["mode"] for r in state.stats[-2:]] == ["exact", "exact"]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_unknown_model_lists_the_families_and_the_generic_path():
    """A model without any block SDTM knows: a TypeError naming every supported family and the
    generic path (describe_block / SDTMBlockWrapper)."""
    from sdtm_kernels.dit.patch import SUPPORTED_FAMILIES

    model = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                  block_out_channels=(8, 8), norm_num_groups=4,
                                  down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(TypeError) as error:
        sk.apply_sdtm(model, num_steps=4)
    message = str(error.value)
    assert message.startswith("UNet2DModel has no block SDTM supports")
    for family, classes in SUPPORTED_FAMILIES:
        assert family in message and classes in message
    assert "describe_block" in message and "SDTMBlockWrapper" in message
    assert get_state(model) is None  # nothing was patched
