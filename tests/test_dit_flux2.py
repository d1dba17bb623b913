"""apply_sdtm on tiny random Flux.2 transformers (``Flux2Transformer2DModel``, no downloads):
exactness, merged counts per step, the grid from ``img_ids``, backends, reference-image tokens,
the Klein KV cache, attention masks and unknown processors. ``build_flux2`` is importable."""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
flux2_module = pytest.importorskip("diffusers.models.transformers.transformer_flux2")

import sdtm_kernels as sk  # noqa: E402
from reference import schedule as ref_schedule  # noqa: E402
from sdtm_kernels.bench.launches import count_launches, per_block_added  # noqa: E402
from sdtm_kernels.dit import flux2 as sdtm_flux2  # noqa: E402
from sdtm_kernels.dit import get_state, reset_sdtm  # noqa: E402

B, TEXT = 2, 5
H, W = 12, 8  # 96 generated tokens, 24 windows of 2x2: SSM and IDM both merge at ratio 0.6
N = H * W
TIMESTEPS = [1.0, 0.8, 0.6, 0.4, 0.2]
MERGING = dict(ratio=0.6, deviation=0.1, switch_step=2, protect_steps=3, num_steps=5)


def image_ids(height, width, t=0):
    """Flux.2 ``(t, h, w, l)`` ids of one image in raster order (``Flux2Pipeline._prepare_latent_ids``)."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(height), torch.arange(width), torch.arange(1))


def build_flux2(height=H, width=W, *, batch=B, text_len=TEXT, num_layers=1, num_single_layers=1, references=(),
                seed=0):
    """A tiny random ``Flux2Transformer2DModel`` (width 32, 2 heads, 4-axis rotary) and
    ``run(timesteps, **call_overrides) -> [output per timestep]`` on a ``height x width`` token grid.
    ``references``: ``(h, w)`` of reference images appended after the generated tokens with
    ``t = 10, 20, ...`` (``Flux2Pipeline``'s edit layout). ``run.inputs`` holds the call's arguments."""
    torch.manual_seed(seed)
    model = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=16,
        mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False).eval()
    ids = torch.cat([image_ids(height, width)] + [image_ids(h, w, 10 * (i + 1)) for i, (h, w) in enumerate(references)])
    inputs = dict(hidden_states=torch.randn(batch, ids.shape[0], 8),
                  encoder_hidden_states=torch.randn(batch, text_len, 16), img_ids=ids, txt_ids=torch.cartesian_prod(*(torch.arange(n) for n in (1, 1, 1, text_len))))

    def run(timesteps=TIMESTEPS, **overrides):
        arguments = {**inputs, **overrides}
        with torch.no_grad():
            return [model(timestep=torch.full((batch,), t), return_dict=False, **arguments)[0] for t in timesteps]

    run.inputs = inputs
    return model, run


def expected_rows(step, mode, num_tokens=N, grid=(H, W), config=MERGING):
    """Image rows a merging step keeps: the schedule's removal on the grid with 2x2 windows."""
    rho = ref_schedule.ratio_schedule(step, config["num_steps"], config["ratio"], config["deviation"])
    removal = math.floor(num_tokens * rho)
    return num_tokens - ref_schedule.tokens_removed(mode, removal, grid, (2, 2))


def check_schedule(stats, layers, num_tokens=N, grid=(H, W)):
    """Every record follows MERGING: protected steps 0 and 3, SSM 1-2, IDM 4 (both sub-layers)."""
    assert [(r["step"], r["layer"]) for r in stats] == [(s, l) for s in range(5) for l in range(layers)]
    for rec in stats:
        step = rec["step"]
        if step % 3 == 0:
            want = ("protected", num_tokens, num_tokens)
        elif step <= 2:
            want = ("ssm",) + (expected_rows(step, "ssm", num_tokens, grid),) * 2
        else:
            want = ("idm", num_tokens, expected_rows(step, "idm", num_tokens, grid))
        assert (rec["mode"], rec["attn"], rec["mlp"]) == want, rec
        assert want[2] < num_tokens or step % 3 == 0  # every merging step merges


def assert_equal_outputs(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("references", [(), ((4, 4), (2, 6))])
def test_exact_when_off_or_removed_and_schedule_when_merging(references):
    model, run = build_flux2(references=references)
    ref = run()
    sk.apply_sdtm(model, ratio=0.0, num_steps=5)
    assert_equal_outputs(run(), ref)  # ratio=0: bit for bit

    sk.apply_sdtm(model, **MERGING)
    state = get_state(model)
    state.keep_plans = True
    out = run()
    assert state.grid == (H, W)
    check_schedule(state.stats, layers=2)
    assert all(torch.isfinite(o).all() for o in out)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)  # protected step: the stock computation
    for step in (1, 2, 4):
        assert not torch.allclose(out[step][:, :N], ref[step][:, :N], atol=1e-4)
    for rec in state.stats:
        if rec.get("plan") is not None:  # one plan shared by the batch, over the generated tokens only
            assert rec["plan"].num_tokens == N and torch.equal(rec["plan"].row_of_token[0], rec["plan"].row_of_token[1])
    # double block: per sub-layer; single block: its whole gated output and the MLP half
    assert {(layer, name) for _, layer, name in state.cache} == {(0, "attn"), (0, "mlp"), (1, "parallel"), (1, "mlp")}
    assert all(tuple(v.shape) == (B, N, 32) for v in state.cache.values())  # generated tokens only

    sk.remove_sdtm(model)
    assert not any(hasattr(m, "_diffusers_hook") or hasattr(m, "_sdtm_state") for m in model.modules())
    assert_equal_outputs(run(), ref)


def test_rotary_rows_of_merged_tokens_and_references():
    """SSM step: the double block's attention sees [text, merged rows, reference tokens] with the
    rotary entries of [text, each row's representative token, the references]."""
    seen = []

    class Recording(flux2_module.Flux2AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            seen.append((hidden_states.shape[1], image_rotary_emb))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    model, run = build_flux2(num_single_layers=0, references=((2, 4),))
    model.transformer_blocks[0].attn.set_processor(Recording())
    sk.apply_sdtm(model, ratio=0.9, deviation=0.0, switch_step=1, num_steps=2, protect_steps=None)
    state = get_state(model)
    state.keep_plans = True
    run(TIMESTEPS[:1])
    plan = state.stats[0]["plan"]
    rows, (cos, sin) = seen[0]
    assert rows == plan.num_rows + 8 < N + 8
    full = [torch.cat([a, b]) for a, b in zip(model.pos_embed(run.inputs["txt_ids"]),
                                              model.pos_embed(run.inputs["img_ids"]))]
    order = torch.cat([torch.arange(TEXT), TEXT + plan.rep_token[0].long(), torch.arange(TEXT + N, TEXT + N + 8)])
    torch.testing.assert_close(cos, full[0][order], rtol=0, atol=0)
    torch.testing.assert_close(sin, full[1][order], rtol=0, atol=0)


def test_cache_blend_and_idm_single_block_split():
    """mcw < 1 blends the protected step's caches on SSM and IDM steps (single block: "attn" + "mlp")."""
    outs = {}
    for mcw in (1.0, 0.2):
        model, run = build_flux2(num_layers=0)
        sk.apply_sdtm(model, mcw=mcw, **MERGING)
        outs[mcw] = run()
    torch.testing.assert_close(outs[1.0][0], outs[0.2][0], rtol=0, atol=0)
    for step in (1, 4):
        assert not torch.allclose(outs[1.0][step], outs[0.2][step], atol=1e-4)


def test_grid_read_from_img_ids():
    model, run = build_flux2()
    config = dict(ratio=0.9, deviation=0.0, switch_step=1, num_steps=2, protect_steps=None)
    sk.apply_sdtm(model, **config)
    state = get_state(model)
    run(TIMESTEPS[:1])
    assert state.grid == (H, W) and state.stats[0]["attn"] == expected_rows(0, "ssm", config=config) < N
    small = dict(hidden_states=torch.randn(B, 4 * 16, 8), img_ids=image_ids(4, 16))  # another latent size
    reset_sdtm(model)
    run(TIMESTEPS[:1], **small)
    assert state.grid == (4, 16)
    assert state.stats[0]["attn"] == expected_rows(0, "ssm", 64, (4, 16), config) < 64

    ids = run.inputs["img_ids"]
    unreadable = {"shuffled": ids[torch.randperm(N, generator=torch.Generator().manual_seed(0))],
                  "varying l": ids + torch.tensor([0, 0, 0, 1]) * (torch.arange(N)[:, None] % 2),
                  "not a rectangle": torch.cat([ids[:-3], image_ids(1, 3, 10)])}
    for name, bad in unreadable.items():
        sk.remove_sdtm(model)
        want = run(TIMESTEPS[:2], img_ids=bad)
        sk.apply_sdtm(model, **config)
        with pytest.warns(RuntimeWarning, match="token grid"):
            got = run(TIMESTEPS[:2], img_ids=bad)
        state = get_state(model)
        assert state.grid is None and {r["mode"] for r in state.stats} == {"exact"}, name
        assert_equal_outputs(got, want)


def test_generated_tokens_after_references_run_exactly():
    """References before the generated image (no KV extract call): not the leading grid."""
    model, run = build_flux2(height=4, width=4)
    ids = torch.cat([image_ids(4, 4, 10), image_ids(4, 4)])
    hidden = torch.randn(B, 32, 8)
    want = run(TIMESTEPS[:2], img_ids=ids, hidden_states=hidden)
    sk.apply_sdtm(model, ratio=0.9, deviation=0.0, switch_step=1, num_steps=2, protect_steps=None)
    with pytest.warns(RuntimeWarning, match="token grid"):
        got = run(TIMESTEPS[:2], img_ids=ids, hidden_states=hidden)
    assert get_state(model).grid is None and {r["mode"] for r in get_state(model).stats} == {"exact"}
    assert_equal_outputs(got, want)


def test_triton_backend_matches_reference():
    outs, plans = {}, {}
    for backend in ("reference", "triton"):
        model, run = build_flux2(height=8, width=8, num_layers=1, num_single_layers=1)
        sk.apply_sdtm(model, ratio=0.8, deviation=0.0, switch_step=1, num_steps=3, protect_steps=None, backend=backend)
        state = get_state(model)
        state.keep_plans = True
        outs[backend] = run(TIMESTEPS[:3])
        plans[backend] = [r["plan"] for r in state.stats]
    assert [r["mode"] for r in state.stats] == ["ssm", "ssm", "ssm", "ssm", "idm", "idm"]
    for got, want in zip(plans["triton"], plans["reference"]):
        assert got.num_rows == want.num_rows < 64
        assert torch.equal(got.row_of_token, want.row_of_token) and torch.equal(got.rep_token, want.rep_token)
    for got, want in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def kv_processors(model):
    for block in model.transformer_blocks:
        block.attn.set_processor(flux2_module.Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(flux2_module.Flux2KVParallelSelfAttnProcessor())


def kv_generation(model, run, reference):
    """``Flux2KleinKVPipeline``'s calls: step 0 extracts the reference K/V ([ref, img] tokens),
    the next steps reuse the cache."""
    inputs = run.inputs
    with torch.no_grad():
        first, cache = model(hidden_states=torch.cat([reference, inputs["hidden_states"]], 1),
                             img_ids=torch.cat([image_ids(4, 4, 10), inputs["img_ids"]]),
                             encoder_hidden_states=inputs["encoder_hidden_states"], txt_ids=inputs["txt_ids"],
                             timestep=torch.full((B,), TIMESTEPS[0]), kv_cache_mode="extract",
                             num_ref_tokens=reference.shape[1], return_dict=False)
    return [first] + run(TIMESTEPS[1:], kv_cache=cache, kv_cache_mode="cached")


def test_kv_cache_extract_protected_and_cached_steps_merge():
    model, run = build_flux2()
    kv_processors(model)
    reference = torch.randn(B, 16, 8)
    want = kv_generation(model, run, reference)
    sk.apply_sdtm(model, ratio=0.0, num_steps=5)
    assert_equal_outputs(kv_generation(model, run, reference), want)

    sk.apply_sdtm(model, **MERGING)
    state = get_state(model)
    got = kv_generation(model, run, reference)
    check_schedule(state.stats, layers=2)  # extract: protected, generated tokens after the 16 references
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert all(torch.isfinite(o).all() for o in got) and not torch.allclose(got[1], want[1], atol=1e-4)

    # an extract call on a merging step: per-token modulation, so it runs exactly
    sk.apply_sdtm(model, protect_steps=None)
    got = kv_generation(model, run, reference)
    assert [r["mode"] for r in state.stats[:2]] == ["exact", "exact"] and state.stats[2]["mode"] == "ssm"
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


def test_attention_mask_and_unknown_processor_run_exactly():
    model, run = build_flux2(height=8, width=8)
    mask = torch.ones(B, 1, 1, TEXT + 64, dtype=torch.bool)
    mask[0, ..., 1] = False  # one prompt token hidden from the first sample
    masked = dict(joint_attention_kwargs={"attention_mask": mask})
    want = run(TIMESTEPS[:2], **masked)
    assert not torch.allclose(want[0][0], run(TIMESTEPS[:1])[0][0], atol=1e-4)  # the mask reaches attention
    sk.apply_sdtm(model, ratio=0.8, deviation=0.0, switch_step=1, num_steps=2, protect_steps=None)
    assert_equal_outputs(run(TIMESTEPS[:2], **masked), want)
    assert {r["mode"] for r in get_state(model).stats} == {"exact"}

    class OwnProcessor(flux2_module.Flux2ParallelSelfAttnProcessor):
        pass

    sk.remove_sdtm(model)
    model.single_transformer_blocks[0].attn.set_processor(OwnProcessor())
    want = run(TIMESTEPS[:2])
    sk.apply_sdtm(model, ratio=0.8, deviation=0.0, switch_step=0, num_steps=2, protect_steps=None)
    got = run(TIMESTEPS[:2])
    assert [r["mode"] for r in get_state(model).stats] == ["ssm", "exact", "idm", "exact"]  # double, single
    assert not torch.allclose(got[0], want[0], atol=1e-4)  # the double block merged


def test_single_block_two_stream_call_and_paper_options():
    model, _ = build_flux2(height=4, width=4)
    sk.apply_sdtm(model, num_steps=5)
    block = model.single_transformer_blocks[0]
    text, image, mod = torch.randn(B, TEXT, 32), torch.randn(B, 16, 32), torch.randn(B, 96)
    rotary = (torch.randn(TEXT + 16, 16), torch.randn(TEXT + 16, 16))
    with torch.no_grad():
        patched = block(image, text, mod, image_rotary_emb=rotary, split_hidden_states=True)
        stock = flux2_module.Flux2SingleTransformerBlock.forward(block, image, text, mod, image_rotary_emb=rotary,
                                                                 split_hidden_states=True)
    for a, b in zip(patched, stock):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for option in (dict(idm_score="attention"), dict(prompt_reweight=True)):
        with pytest.raises(ValueError, match="joint text-image attention"):
            sk.apply_sdtm(model, **option)
    assert sdtm_flux2.reference_prefix({"kv_cache_mode": "extract", "num_ref_tokens": 3}) == 3
    with pytest.raises(ValueError, match="num_ref_tokens"):
        sdtm_flux2.reference_prefix({"kv_cache_mode": "extract", "num_ref_tokens": -1})


# -- kernel launches SDTM adds per merged block (Triton backend, batch 2; the budget: 8) --------
# The text rows and the reference tokens pass through the merge and the unmerge. The per-call work falls
# into the double block (the first): the rotary stack, one join of the fixed parts of its gather buffer
# (text, references). Single block IDM, 8 = batch-mean metric 1 + plan 5 + merge 2 + unmerge 1 (which
# adds the gated attention half of ``to_out``) + one matmul more: the fused ``to_qkv_mlp_proj`` runs as two
# (q, k, v over every token, the MLP columns over the merged rows; the split ``to_out``'s two matmuls
# replace the stock join), minus the stock residual add the unmerge does.
LAUNCHES = {  # references: {block type: (SSM, IDM)}
    (): {"Flux2TransformerBlock": (7, 7), "Flux2SingleTransformerBlock": (5, 8)},
    ((4, 4),): {"Flux2TransformerBlock": (7, 7), "Flux2SingleTransformerBlock": (5, 8)},
}


@pytest.mark.parametrize("references", list(LAUNCHES))
def test_launches_added_per_merged_block(references):
    """Counted as ``benchmarks/launch_counts.py`` does: patched minus unpatched launches inside the blocks
    of a type, per block, at an SSM and an IDM step after a protected one (each type reruns the three)."""
    model, run = build_flux2(height=8, width=8, references=references)
    steps = TIMESTEPS[:3]
    by_type = {name: [m for m in model.modules() if type(m).__name__ == name] for name in LAUNCHES[references]}

    def count(t, blocks):
        return count_launches(run, [t], blocks=blocks)[2]

    stock = {name: [count(t, blocks) for t in steps[1:]] for name, blocks in by_type.items()}
    sk.apply_sdtm(model, ratio=0.8, deviation=0.0, switch_step=1, protect_steps=3, num_steps=3, backend="triton")
    for name, blocks in by_type.items():
        run(steps[:1])  # protected: the caches the merged steps blend
        added = [per_block_added(count(t, blocks), before, len(blocks)) for t, before in zip(steps[1:], stock[name])]
        modes = [{r["mode"] for r in get_state(model).stats if r["step"] == step} for step in range(3)]
        assert modes == [{"protected"}, {"ssm"}, {"idm"}]
        assert tuple(n for n, _ in added) == LAUNCHES[references][name], f"{name}: {[dict(ops) for _, ops in added]}"
        assert not any(op.startswith(("aten::item", "aten::equal")) for _, ops in added for op in ops)  # no host sync
