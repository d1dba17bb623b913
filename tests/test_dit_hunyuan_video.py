"""SDTM on tiny random HunyuanVideo transformers (no downloads): text-to-video
(``HunyuanVideoTransformer3DModel``), image-to-video ``token_replace`` blocks, and Framepack
(the same blocks with history latents before the noisy ones). Grids of 2x8x8 tokens."""
import math
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.models.transformers import transformer_hunyuan_video as diffusers_hv  # noqa: E402

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.bench.launches import count_launches, per_block_added  # noqa: E402
from sdtm_kernels.dit import get_state  # noqa: E402
from sdtm_kernels.dit import hunyuan_video as hv  # noqa: E402
from sdtm_kernels.dit.config import make_config  # noqa: E402
from sdtm_kernels.dit.core import block_context  # noqa: E402
from helpers import host_reads_in  # noqa: E402
from sdtm_kernels.dit.state import SDTMState  # noqa: E402
from sdtm_kernels.reference import schedule as ref_schedule  # noqa: E402

B, TEXT, C = 2, 5, 16
TIMESTEPS = [999, 800, 600, 400, 200]
MERGING = dict(ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3, num_steps=5, ratio_levels=0)
_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
             pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))


def build_hunyuan(kind="t2v", layers=1, single_layers=1, seed=0, **config):
    """A tiny random HunyuanVideo transformer and ``run(timesteps, frames=None, height=16, width=16,
    prompt_mask=None)`` -> its outputs (batch 2, 5 prompt tokens, latent patch 2: a 16x16 latent is
    8x8 tokens per frame). ``kind``: ``"t2v"``, ``"token_replace"`` (the image-to-video blocks;
    the first latent frame is the conditioning image and never merges) or ``"framepack"``
    (history latents of 84 tokens before the noisy ones). ``frames`` default: 2 merged frames
    (3 latent frames for ``"token_replace"``). ``config`` overrides the tiny config."""
    torch.manual_seed(seed)
    options = dict(_TINY, num_layers=layers, num_single_layers=single_layers, **config)
    if kind == "framepack":
        from diffusers.models.transformers.transformer_hunyuan_video_framepack import (
            HunyuanVideoFramepackTransformer3DModel)

        model = HunyuanVideoFramepackTransformer3DModel(has_image_proj=True, image_proj_dim=8,
                                                        has_clean_x_embedder=True, **options)
    elif kind in ("t2v", "token_replace"):
        condition = "token_replace" if kind == "token_replace" else options.pop("image_condition_type", None)
        model = diffusers.HunyuanVideoTransformer3DModel(image_condition_type=condition, **options)
    else:
        raise ValueError(f"kind must be 't2v', 'token_replace' or 'framepack', got {kind!r}")
    model.eval()

    def run(timesteps=TIMESTEPS, frames=None, height=16, width=16, prompt_mask=None):
        frames = frames or 2 + (kind == "token_replace")
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(B, options["in_channels"], frames, height, width, generator=gen)
        enc, pooled = torch.randn(B, TEXT, 16, generator=gen), torch.randn(B, 8, generator=gen)
        mask = torch.ones(B, TEXT, dtype=torch.long) if prompt_mask is None else prompt_mask
        extra = {}
        if kind == "framepack":
            extra = dict(image_embeds=torch.randn(B, 3, 8, generator=gen), indices_latents=torch.arange(1, 1 + frames),
                         latents_clean=torch.randn(B, 4, 1, height, width, generator=gen),
                         indices_latents_clean=torch.arange(0, 1),
                         latents_history_2x=torch.randn(B, 4, 2, height, width, generator=gen),
                         indices_latents_history_2x=torch.arange(0, 2),
                         latents_history_4x=torch.randn(B, 4, 4, height, width, generator=gen),
                         indices_latents_history_4x=torch.arange(0, 4))
        with torch.no_grad():
            return [model(x, torch.full((B,), float(t)), enc[:, :mask.shape[1]], mask, pooled,
                          guidance=torch.full((B,), 1000.0), return_dict=False, **extra)[0] for t in timesteps]

    return model, run


def grid_of(kind, height=16, width=16):
    return (2, height // 2, width // 2)  # the default frames of build_hunyuan


def expected_counts(step, grid, window=(1, 2, 2)):
    """(mode, attention rows, MLP rows) of a step under MERGING (SPEC 3.1-3.5, exact schedule)."""
    n = math.prod(grid)
    if step % MERGING["protect_steps"] == 0:
        return "protected", n, n
    mode = "ssm" if step <= MERGING["switch_step"] else "idm"
    rho = sk.ratio_schedule(step, MERGING["num_steps"], MERGING["ratio"], MERGING["deviation"])
    rows = n - ref_schedule.tokens_removed(mode, ref_schedule.tokens_requested(n, rho), grid, window)
    assert rows < n  # both stages merge on this grid
    return mode, (rows if mode == "ssm" else n), rows


def sdtm_hooked(model):
    return [m for m in model.modules() if "sdtm" in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})]


@pytest.mark.parametrize("kind", ["t2v", "token_replace", "framepack"])
def test_exact_when_not_merging_counts_per_step_and_remove(kind):
    model, run = build_hunyuan(kind)
    ref = run()
    sk.apply_sdtm(model, ratio=0.0, num_steps=5)
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    assert sdtm_hooked(model) == [model] + blocks
    for a, b in zip(ref, run()):
        assert torch.equal(a, b)

    sk.apply_sdtm(model, **MERGING)
    state = get_state(model)
    state.keep_plans = True
    out = run()
    grid = grid_of(kind)
    assert state.grid == grid
    assert all(torch.isfinite(o).all() for o in out)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[3], ref[3])  # protected steps: diffusers' bits
    for step in (1, 2, 4):  # SSM, SSM, IDM
        assert not torch.allclose(out[step], ref[step], atol=1e-4)
    assert [(r["step"], r["layer"]) for r in state.stats] == [(s, layer) for s in range(5) for layer in (0, 1)]
    for record in state.stats:
        assert (record["mode"], record["attn"], record["mlp"]) == expected_counts(record["step"], grid)
        if record["plan"] is not None:  # one plan shared by the batch (the rotary table has no batch axis)
            assert torch.equal(record["plan"].row_of_token[0], record["plan"].row_of_token[1])
    # caches cover the grid tokens only: the prefix (first frame / history) is never merged
    assert state.cache and all(tuple(v.shape) == (B, math.prod(grid), C) for v in state.cache.values())

    sk.remove_sdtm(model)
    assert not sdtm_hooked(model) and not any(hasattr(m, "_sdtm_state") for m in model.modules())
    for a, b in zip(ref, run()):
        assert torch.equal(a, b)


def test_grid_from_the_latent_and_unreadable_grids_run_exactly():
    model, run = build_hunyuan("t2v")
    sk.apply_sdtm(model, **MERGING)
    state = get_state(model)
    for frames, height, width in ((2, 16, 16), (3, 16, 24)):
        run(TIMESTEPS[:2], frames=frames, height=height, width=width)
        grid = (frames, height // 2, width // 2)
        assert state.grid == grid
        assert [r["attn"] for r in state.stats[-2:]] == [expected_counts(1, grid)[1]] * 2

    # latent_concat image-to-video: the image latent joins the channels, the grid is the same
    model, run = build_hunyuan("t2v", image_condition_type="latent_concat", in_channels=8)
    sk.apply_sdtm(model, **MERGING)
    run(TIMESTEPS[:2])
    assert get_state(model).grid == (2, 8, 8)
    assert [r["attn"] for r in get_state(model).stats[-2:]] == [expected_counts(1, (2, 8, 8))[1]] * 2

    # token_replace: a one-frame call has no frame to merge (only the conditioning image)
    model, run = build_hunyuan("token_replace")
    ref = run(TIMESTEPS[:2], frames=1)
    sk.apply_sdtm(model, **dict(MERGING, protect_steps=None))
    with pytest.warns(RuntimeWarning, match="token grid"):
        out = run(TIMESTEPS[:2], frames=1)
    assert get_state(model).grid is None and {r["mode"] for r in get_state(model).stats} == {"exact"}
    assert all(torch.equal(a, b) for a, b in zip(ref, out))

    # patch_size_t and shapes the reader refuses
    config = types.SimpleNamespace(patch_size=2, patch_size_t=2, image_condition_type=None)
    model_t = types.SimpleNamespace(config=config)
    assert hv.token_grid(None, model_t, {"hidden_states": torch.empty(1, 4, 5, 8, 12)}) == (2, 4, 6)
    assert hv.token_grid(None, model_t, {"hidden_states": torch.empty(1, 4, 8, 12)}) is None
    assert hv.token_grid(None, model_t, {"hidden_states": torch.empty(1, 4, 1, 8, 12)}) is None  # 0 frames
    assert hv.token_grid(None, model_t, {}) is None


def test_triton_backend_matches_reference():
    outs, plans = {}, {}
    for backend in ("reference", "triton"):  # one frame of 8x8 tokens: the interpreter is slow
        model, run = build_hunyuan("t2v")
        sk.apply_sdtm(model, backend=backend, seed=1, ratio=0.8, deviation=0.0, switch_step=0, protect_steps=None,
                      num_steps=2, ratio_levels=0)
        get_state(model).keep_plans = True
        outs[backend] = run(TIMESTEPS[:2], frames=1)  # one SSM step, one IDM step
        plans[backend] = [r["plan"] for r in get_state(model).stats]
    assert [r["mode"] for r in get_state(model).stats] == ["ssm", "ssm", "idm", "idm"]
    for a, b in zip(plans["reference"], plans["triton"]):
        assert a.num_rows == b.num_rows < a.num_tokens
        for name in ("row_of_token", "members", "row_start", "rep_token", "blend"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    for a, b in zip(outs["reference"], outs["triton"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_padded_prompt_tokens_stay_masked_on_merged_steps():
    """The transformer masks padded prompt keys; on merged steps the mask is rebuilt for the
    merged length, so padding changes nothing: equal to the prompt without its padding."""
    model, run = build_hunyuan("t2v")
    sk.apply_sdtm(model, **dict(MERGING, protect_steps=None, switch_step=1))
    padded_mask = torch.tensor([[1, 1, 1, 0, 0]] * B)
    padded = run(TIMESTEPS[1:4], prompt_mask=padded_mask)
    modes = [r["mode"] for r in get_state(model).stats]
    short = run(TIMESTEPS[1:4], prompt_mask=torch.ones(B, 3, dtype=torch.long))
    assert "ssm" in modes and "idm" in modes
    for a, b in zip(short, padded):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["token_replace", "framepack"])
def test_patched_blocks_read_no_tensor_value_on_the_host(kind):
    model, run = build_hunyuan(kind)
    sk.apply_sdtm(model, **MERGING)
    seen = host_reads_in(list(model.transformer_blocks) + list(model.single_transformer_blocks), run)
    assert {r["mode"] for r in get_state(model).stats} == {"protected", "ssm", "idm"}
    assert seen == []


# -- kernel launches SDTM adds per merged block (Triton backend, batch 2; the budget: 8) --------
# Per-call work falls into the double block (the first): the rotary stack, the mask buffer's fixed
# entries, on SSM steps a dense copy of the patch embedding's channel-major stream (t2v: 6 in later blocks).
LAUNCHES = {  # kind: {block type: (SSM, IDM)}
    "t2v": {"HunyuanVideoTransformerBlock": (9, 7), "HunyuanVideoSingleTransformerBlock": (6, 7)},
    "token_replace": {"HunyuanVideoTokenReplaceTransformerBlock": (6, 5),
                      "HunyuanVideoTokenReplaceSingleTransformerBlock": (5, 8)},
}


@pytest.mark.parametrize("kind", list(LAUNCHES))
def test_launches_added_per_merged_block(kind):
    """As ``benchmarks/launch_counts.py`` counts: patched minus unpatched, per block of a type, at an SSM
    and an IDM step after a protected one (each type reruns the three)."""
    model, run = build_hunyuan(kind)
    frames, steps = 1 + (kind == "token_replace"), TIMESTEPS[:3]  # one merged 8x8 frame: the interpreter is slow
    by_type = {name: [m for m in model.modules() if type(m).__name__ == name] for name in LAUNCHES[kind]}

    def count(t, blocks):
        return count_launches(run, [t], blocks=blocks, frames=frames)[2]

    stock = {name: [count(t, blocks) for t in steps[1:]] for name, blocks in by_type.items()}
    sk.apply_sdtm(model, ratio=0.8, deviation=0.0, switch_step=1, protect_steps=3, num_steps=3, ratio_levels=0,
                  backend="triton")
    for name, blocks in by_type.items():
        run(steps[:1], frames=frames)  # protected: the caches the merged steps blend
        added = [per_block_added(count(t, blocks), before, len(blocks)) for t, before in zip(steps[1:], stock[name])]
        modes = [{r["mode"] for r in get_state(model).stats if r["step"] == step} for step in range(3)]
        assert modes == [{"protected"}, {"ssm"}, {"idm"}]
        assert tuple(n for n, _ in added) == LAUNCHES[kind][name], f"{name}: {[dict(ops) for _, ops in added]}"
        assert not any(op.startswith(("aten::item", "aten::equal")) for _, ops in added for op in ops)  # no host sync


# -- one block, one merged step, against a composition written out here --------------------------
BLOCK_GRID = (2, 8, 8)  # 128 tokens: both stages merge at ratio 0.5


def _segment_mean(x, rows, num_rows):
    sums = torch.zeros(x.shape[0], num_rows, x.shape[2]).index_add_(1, rows, x)
    return sums / torch.bincount(rows, minlength=num_rows)[None, :, None]


def _drive_block(block, forward, args, grid, steps, grad=False):
    """Run ``forward(block, *args)`` at ``steps`` SSM / IDM steps; returns the outputs and plans.
    ``grad``: autograd on (the mask and rotary gathers then join parts instead of filling a buffer)."""
    config = make_config(ratio=0.5, deviation=0.0, switch_step=0, protect_steps=None, num_steps=2, ratio_levels=0,
                         backend="reference")
    state = SDTMState(config, num_layers=1)
    state.keep_plans = True
    block._sdtm_state, block._sdtm_slot = state, state.slot(0)
    results = []
    for step in range(steps):
        state.begin_call(float(TIMESTEPS[step]), grid, batch=B, device="cpu")
        with torch.set_grad_enabled(grad):
            out = forward(block, *args)
        state.end_call()
        results.append((out, state.stats[-1]))
    return results


def _block_inputs(prefix, grid):
    n = prefix + math.prod(grid)
    gen = torch.Generator().manual_seed(3)
    # channel-major, as the patch embedding leaves the stream (``flatten(2).transpose(1, 2)``)
    x = torch.randn(B, C, n, generator=gen).transpose(1, 2)
    enc, temb = torch.randn(B, TEXT, C, generator=gen), torch.randn(B, C)
    rotary = (torch.randn(n, 8, generator=gen), torch.randn(n, 8, generator=gen))
    mask = torch.rand(B, 1, 1, n + TEXT, generator=gen) > 0.2  # some image and prompt keys masked
    mask[..., -TEXT] = True  # every query keeps a key
    return x, enc, temb, mask, rotary


def _merged_parts(plan, prefix, mask, rotary):
    rep = plan.rep_token[0].long()
    keys = torch.cat([torch.arange(prefix), rep + prefix, torch.arange(prefix + plan.num_tokens, mask.shape[-1])])
    return mask[..., keys], (rotary[0][keys[:prefix + plan.num_rows]], rotary[1][keys[:prefix + plan.num_rows]])


def _joined(head_gate, gate, prefix, length):
    """``[B, length, C]`` gates: ``head_gate`` on the first ``prefix`` rows (the token-replace first frame)."""
    return torch.cat([head_gate[:, None].expand(-1, prefix, -1), gate[:, None].expand(-1, length - prefix, -1)], 1)


def _run_block(single, token_replace, prefix, grad):
    """A tiny block on ``[prefix, BLOCK_GRID tokens]`` run at an SSM and an IDM step: its inputs, the
    token-replace embedding (or None), the block, and ``[(output, record)]`` per step."""
    inputs = _block_inputs(prefix, BLOCK_GRID)
    first_emb = torch.randn(B, C, generator=torch.Generator().manual_seed(4)) if token_replace else None
    kind = ("TokenReplace" if token_replace else "") + ("Single" if single else "")
    block = getattr(diffusers_hv, f"HunyuanVideo{kind}TransformerBlock")(2, 8, 2.0).eval()
    forward = getattr(hv, ("token_replace_" if token_replace else "") + ("single" if single else "double") + "_forward")
    results = _drive_block(block, forward, inputs + ((first_emb, prefix) if token_replace else ()), BLOCK_GRID, 2,
                           grad)
    assert [record["mode"] for _, record in results] == ["ssm", "idm"]
    assert all(record["plan"].num_rows < record["plan"].num_tokens for _, record in results)
    return inputs, first_emb, block, results


# (prefix, autograd on, token_replace): the prefix is Framepack's history (the image gate) or, with
# token_replace, the first frame (its own modulation and gate)
BLOCK_CASES = [(0, False, False), (4, False, False), (4, True, False), (4, False, True), (4, True, True)]


@pytest.mark.parametrize("prefix,grad,token_replace", BLOCK_CASES)
def test_double_block_ssm_and_idm_steps_equal_the_written_out_composition(prefix, grad, token_replace):
    (x, enc, temb, mask, rotary), first_emb, block, results = _run_block(False, token_replace, prefix, grad)
    for (image, text), record in results:
        plan = record["plan"]
        rows, merged_mask, merged_rotary = plan.row_of_token[0].long(), *_merged_parts(plan, prefix, mask, rotary)

        def merge(t):
            return torch.cat([t[:, :prefix], _segment_mean(t[:, prefix:], rows, plan.num_rows)], 1)

        def unmerge(t):
            return torch.cat([t[:, :prefix], t[:, prefix:][:, rows]], 1)

        with torch.no_grad():
            norm, *mod = block.norm1(x, temb, first_emb, prefix) if token_replace else block.norm1(x, emb=temb)
            gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:4]
            first_gate_msa, first_shift_mlp, first_scale_mlp, first_gate_mlp = mod[4:] or mod  # token replace
            norm_text, c_gate_msa, c_shift, c_scale, c_gate_mlp = block.norm1_context(enc, emb=temb)
            if record["mode"] == "ssm":  # the image rows of the joint attention merged
                attn, text_attn = block.attn(merge(norm), norm_text, attention_mask=merged_mask,
                                             image_rotary_emb=merged_rotary)
                attn = unmerge(attn)
            else:
                attn, text_attn = block.attn(norm, norm_text, attention_mask=mask, image_rotary_emb=rotary)
            want = x + attn * _joined(first_gate_msa, gate_msa, prefix, x.shape[1])
            want_text = enc + text_attn * c_gate_msa[:, None]
            normed = block.norm2(want)
            mlp_in = torch.cat([normed[:, :prefix] * (1 + first_scale_mlp[:, None]) + first_shift_mlp[:, None],
                                normed[:, prefix:] * (1 + scale_mlp[:, None]) + shift_mlp[:, None]], 1)
            want = want + unmerge(block.ff(merge(mlp_in))) * _joined(first_gate_mlp, gate_mlp, prefix, x.shape[1])
            text_in = block.norm2_context(want_text) * (1 + c_scale[:, None]) + c_shift[:, None]
            want_text = want_text + block.ff_context(text_in) * c_gate_mlp[:, None]
        torch.testing.assert_close(image, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text, want_text, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix,grad,token_replace", BLOCK_CASES)
def test_single_block_ssm_and_idm_steps_equal_the_written_out_composition(prefix, grad, token_replace):
    (x, enc, temb, mask, rotary), first_emb, block, results = _run_block(True, token_replace, prefix, grad)
    end = x.shape[1]
    joint = torch.cat([x, enc], 1)
    for (image, text), record in results:
        plan = record["plan"]
        rows, merged_mask, merged_rotary = plan.row_of_token[0].long(), *_merged_parts(plan, prefix, mask, rotary)
        head = prefix + plan.num_rows
        with torch.no_grad():
            norm, gate, *first = block.norm(joint, temb, first_emb, prefix) if token_replace else block.norm(joint, temb)
            first_gate = first[0] if first else gate
            merged = torch.cat([norm[:, :prefix], _segment_mean(norm[:, prefix:end], rows, plan.num_rows),
                                norm[:, end:]], 1)
            mlp = block.act_mlp(block.proj_mlp(merged))
            if record["mode"] == "ssm":  # both branches merged
                attn = torch.cat(block.attn(merged[:, :head], merged[:, head:], attention_mask=merged_mask,
                                            image_rotary_emb=merged_rotary), 1)
                out = block.proj_out(torch.cat([attn, mlp], 2))
                full = torch.cat([out[:, :prefix], out[:, prefix:head][:, rows], out[:, head:]], 1)
            else:  # IDM: attention at full length, the MLP half of proj_out merged
                assert (record["attn"], record["mlp"]) == (plan.num_tokens, plan.num_rows)
                attn = torch.cat(block.attn(norm[:, :end], norm[:, end:], attention_mask=mask,
                                            image_rotary_emb=rotary), 1)
                weight = block.proj_out.weight
                mlp_out = mlp @ weight[:, C:].T
                mlp_full = torch.cat([mlp_out[:, :prefix], mlp_out[:, prefix:head][:, rows], mlp_out[:, head:]], 1)
                full = attn @ weight[:, :C].T + block.proj_out.bias + mlp_full
            want = joint + _joined(first_gate, gate, prefix, joint.shape[1]) * full
        torch.testing.assert_close(torch.cat([image, text], 1), want, rtol=1e-5, atol=1e-5)


# -- what the family does not do, and inputs it refuses -------------------------------------------
@pytest.mark.parametrize("option", [dict(idm_score="attention"), dict(prompt_reweight=True)])
def test_paper_options_need_sdtm_joint_attention(option):
    model, _ = build_hunyuan("t2v")
    with pytest.raises(ValueError, match="joint text-image attention"):
        sk.apply_sdtm(model, num_steps=5, **option)
    assert not sdtm_hooked(model)


def test_blocks_with_another_attention_processor_are_left_unpatched():
    model, run = build_hunyuan("t2v")
    stock = type(model.transformer_blocks[0].attn.processor)

    class Custom:  # e.g. a user's processor that may depend on the sequence it sees
        def __call__(self, *args, **kwargs):
            return stock()(*args, **kwargs)

    model.transformer_blocks[0].attn.set_processor(Custom())
    sk.apply_sdtm(model, **MERGING)
    assert sdtm_hooked(model) == [model, model.single_transformer_blocks[0]]
    run(TIMESTEPS[:2])
    assert [r["mode"] for r in get_state(model).stats] == ["protected", "ssm"]


def test_bad_rotary_tables_and_masks_raise_on_merged_steps():
    grid = BLOCK_GRID
    state = SDTMState(make_config(ratio=0.5, deviation=0.0, switch_step=0, protect_steps=None, num_steps=2,
                                  ratio_levels=0), num_layers=1)
    state.begin_call(999.0, grid, batch=B, device="cpu")
    ctx = block_context(state, 0, torch.randn(B, 128, C), shared=True)
    assert ctx.merges("attn")
    with pytest.raises(ValueError, match="image_rotary_emb"):
        hv.gather_rotary(ctx, "attn", (torch.randn(128 + TEXT, 8), torch.randn(128 + TEXT, 8)))  # prompt rows too
    with pytest.raises(ValueError, match="image_rotary_emb"):
        hv.gather_rotary(ctx, "attn", torch.randn(128, 8))
    with pytest.raises(ValueError, match="attention_mask"):
        hv.merged_attention_mask(ctx, "attn", torch.ones(B, 128 + TEXT, dtype=torch.bool), 0, TEXT)
    with pytest.raises(ValueError, match="attention_mask"):
        hv.merged_attention_mask(ctx, "attn", torch.ones(B, 1, 128 + TEXT, 128 + TEXT, dtype=torch.bool), 0, TEXT)
    block = diffusers_hv.HunyuanVideoTokenReplaceTransformerBlock(2, 8, 2.0)
    with pytest.raises(TypeError, match="num_tokens"):
        hv.token_replace_double_forward(block, torch.randn(B, 128, C), torch.randn(B, TEXT, C), torch.randn(B, C))
    state.end_call()
