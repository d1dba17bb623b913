"""SDTM on tiny random Qwen-Image transformers (no downloads): Qwen-Image, the edit models'
reference images with ``zero_cond_t`` / ``modulate_index`` (Edit-2511), Qwen-Image-Layered and
padded text masks. A generated image of 8x16 tokens (N = 128) so that SSM and IDM both merge.

``build_qwen(...)`` is meant for other test files too (launch counts, compile, benchmarks)."""
import math
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.dit import get_state, reset_sdtm  # noqa: E402
from sdtm_kernels.dit import qwen_image  # noqa: E402
from sdtm_kernels.reference import schedule as ref_schedule  # noqa: E402

from helpers import host_reads_in  # noqa: E402

TIMESTEPS = [999, 800, 600, 400, 200]
GRID = (8, 16)  # tokens of the generated image: N = 128
WIDTH = 32  # 2 heads of 16 (rotary axes 4 + 6 + 6)
CONDITION = (4, 4)  # Qwen-Image-Layered's condition image (tokens)


def build_qwen(layers=2, grid=GRID, frames=1, batch=2, text_len=5, references=(), zero_cond_t=False,
               layered=0, mask=False, seed=0):
    """A tiny random ``QwenImageTransformer2DModel`` (width 32, 2 heads, packed latent channels 16)
    and ``run(timesteps=TIMESTEPS, **overrides)``: the outputs of one call per timestep (no grad;
    ``overrides`` replace transformer arguments). ``run.inputs`` holds the arguments.

    ``grid``: ``(h, w)`` tokens of the generated image, with ``frames`` frames. ``references``:
    ``(h, w)`` of reference images appended after it (edit models). ``zero_cond_t``: Edit-2511's
    second modulation half for the reference tokens. ``layered``: that many generated layers of
    Qwen-Image-Layered (``use_layer3d_rope``, ``use_additional_t_cond``) and a 4x4 condition image
    last. ``mask``: a text mask with the last sample's last two prompt tokens padded."""
    torch.manual_seed(seed)
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t,
        use_additional_t_cond=bool(layered), use_layer3d_rope=bool(layered)).eval()
    height, width = grid
    if layered:
        shapes = [(1, height, width)] * layered + [(1, *CONDITION)]
    else:
        shapes = [(frames, height, width)] + [(1, h, w) for h, w in references]
    tokens = sum(math.prod(s) for s in shapes)
    inputs = dict(hidden_states=torch.randn(batch, tokens, 16), encoder_hidden_states=torch.randn(batch, text_len, 16),
                  img_shapes=[list(shapes)] * batch)
    if mask:
        text_mask = torch.ones(batch, text_len, dtype=torch.bool)
        text_mask[-1, -2:] = False
        inputs["encoder_hidden_states_mask"] = text_mask
    if layered:
        inputs["additional_t_cond"] = torch.zeros(batch, dtype=torch.long)

    def run(timesteps=TIMESTEPS, **overrides):
        arguments = {**inputs, **overrides}
        size = arguments["hidden_states"].shape[0]
        with torch.no_grad():
            return [model(**arguments, timestep=torch.full((size,), t / 1000), return_dict=False)[0]
                    for t in timesteps]

    run.inputs = inputs
    return model, run


def expected_rows(step, mode, num_steps, ratio, deviation, grid):
    """Rows of the generated image after merging at ``step`` (the reference rules, default window)."""
    window = (1, 2, 2) if len(grid) == 3 else (2, 2)
    num_tokens = math.prod(grid)
    rho = ref_schedule.ratio_schedule(step, num_steps, ratio, deviation)
    requested = ref_schedule.tokens_requested(num_tokens, rho)
    return num_tokens - ref_schedule.tokens_removed(mode, requested, grid, window)


def sdtm_hooked(model):
    return [m for m in model.modules() if "sdtm" in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})]


CASES = {
    "plain": dict(),
    "edit_zero_cond": dict(references=[(4, 6)], zero_cond_t=True),  # Edit-2511: per-token modulation
    "layered": dict(layered=2, grid=(8, 8)),  # two generated layers: a (2, 8, 8) grid
    "text_mask": dict(mask=True, references=[(4, 4)]),
}
CASE_GRIDS = {"plain": GRID, "edit_zero_cond": GRID, "layered": (2, 8, 8), "text_mask": GRID}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_merged_counts_and_remove(case):
    model, run = build_qwen(**CASES[case])
    grid, batch = CASE_GRIDS[case], 2
    num_tokens = math.prod(grid)
    ref = run()

    sk.apply_sdtm(model, ratio=0.0, num_steps=5)
    assert sdtm_hooked(model) == [model, *model.transformer_blocks]
    assert all(torch.equal(a, b) for a, b in zip(ref, run()))  # ratio 0: bit for bit

    sk.apply_sdtm(model, ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3, num_steps=5, ratio_levels=None)
    state = get_state(model)
    state.keep_plans = True
    out = run()
    assert state.grid == grid
    assert all(torch.isfinite(o).all() for o in out)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[3], ref[3])  # protected steps: diffusers' computation
    assert not torch.allclose(out[1], ref[1], atol=1e-4) and not torch.allclose(out[4], ref[4], atol=1e-4)
    assert [(r["step"], r["layer"]) for r in state.stats] == [(s, layer) for s in range(5) for layer in range(2)]
    for record in state.stats:
        step = record["step"]
        if step % 3 == 0:
            assert (record["mode"], record["attn"], record["mlp"]) == ("protected", num_tokens, num_tokens)
            continue
        mode = "ssm" if step <= 2 else "idm"
        rows = expected_rows(step, mode, 5, 0.5, 0.1, grid)
        assert rows < num_tokens  # both stages merge
        assert (record["mode"], record["attn"], record["mlp"]) == (mode, rows if mode == "ssm" else num_tokens, rows)
        plan = record["plan"]
        assert plan.num_tokens == num_tokens  # the generated image's tokens only
        assert torch.equal(plan.row_of_token[0], plan.row_of_token[1])  # one plan shared by the batch
    # caches: the gated outputs of the generated image's tokens, per layer and sub-layer
    assert {(layer, name) for (_, layer, name) in state.cache} == {(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")}
    assert all(tuple(v.shape) == (batch, num_tokens, WIDTH) for v in state.cache.values())

    sk.remove_sdtm(model)
    assert not sdtm_hooked(model) and not any(hasattr(m, "_sdtm_state") for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(ref, run()))


def test_grid_from_img_shapes_and_unreadable_calls_run_exactly():
    model, run = build_qwen(layers=1)
    sk.apply_sdtm(model, ratio=0.5, deviation=0.0, switch_step=1, protect_steps=None, num_steps=2, ratio_levels=None)
    state = get_state(model)
    for grid in ((8, 16), (16, 8), (2, 4, 8)):  # the latent size and frame count of each call
        shapes = [(grid[0], *grid[1:]) if len(grid) == 3 else (1, *grid)]
        reset_sdtm(model)
        run(TIMESTEPS[:1], hidden_states=torch.randn(2, math.prod(grid), 16), img_shapes=[shapes] * 2)
        assert state.grid == grid
        assert [r["attn"] for r in state.stats] == [expected_rows(0, "ssm", 2, 0.5, 0.0, grid)]

    # samples with different shapes: diffusers lays out every sample as the first; SDTM runs exactly
    sk.remove_sdtm(model)
    mixed = [[(1, 8, 16)], [(1, 16, 8)]]
    ref = run(TIMESTEPS[:1], img_shapes=mixed)
    sk.apply_sdtm(model, ratio=0.5, deviation=0.0, switch_step=1, protect_steps=None, num_steps=2)
    with pytest.warns(RuntimeWarning, match="img_shapes differ"):
        out = run(TIMESTEPS[:1], img_shapes=mixed)
    state = get_state(model)
    assert state.grid is None and [r["mode"] for r in state.stats] == ["exact"]
    assert torch.equal(out[0], ref[0])


class _State:
    def __init__(self):
        self.warnings = []

    def _warn_once(self, kind, message):
        self.warnings.append(message)


@pytest.mark.parametrize("img_shapes, tokens, config, grid", [
    ((1, 8, 16), 128, {}, (8, 16)),  # one shape for the whole batch
    ([(1, 8, 16), (1, 8, 16)], 128, {}, (8, 16)),  # one shape per sample
    ([[(1, 8, 16), (1, 4, 6)]] * 2, 152, {}, (8, 16)),  # edit: the generated image is the first entry
    ([[(3, 4, 8)]] * 2, 96, {}, (3, 4, 8)),
    ([[(1, 8, 8)] * 3 + [(1, 4, 4)]] * 2, 208, {"use_layer3d_rope": True}, (3, 8, 8)),  # Layered: 3 layers
    ([[(1, 8, 8)] * 3 + [(1, 4, 4)]] * 2, 208, {"use_layer3d_rope": True, "zero_cond_t": True}, (8, 8)),
    ([[(1, 8, 8), (1, 4, 4), (1, 8, 8), (1, 4, 4)]], 160, {"use_layer3d_rope": True}, (8, 8)),
    ([[(1, 8, 8), (1, 8, 8)]], 128, {}, (8, 8)),  # a same-size reference image is not a frame
])
def test_token_grid_reads_img_shapes(img_shapes, tokens, config, grid):
    state = _State()
    model = types.SimpleNamespace(config=types.SimpleNamespace(**config))
    arguments = {"img_shapes": img_shapes, "hidden_states": torch.zeros(2, tokens, 4)}
    assert qwen_image.token_grid(state, model, arguments) == grid and not state.warnings


@pytest.mark.parametrize("img_shapes, tokens, reason", [
    (None, 128, "no img_shapes"),
    ([], 128, "empty"),
    ([[(1, 8)]], 128, "triple"),
    ([[(1, 8, 0)]], 0, "triple"),
    ([[(1, 8, 16.0)]], 128, "triple"),
    ("1816", 128, "triple"),
    ([[]], 128, "without image shapes"),
    ([[(1, 8, 16)], [(1, 8, 16), (1, 4, 4)]], 128, "differ"),
    ([[(1, 8, 16)]], 130, "describe 128"),
])
def test_token_grid_unreadable(img_shapes, tokens, reason):
    state = _State()
    arguments = {"img_shapes": img_shapes, "hidden_states": torch.zeros(2, tokens, 4)}
    assert qwen_image.token_grid(state, types.SimpleNamespace(config=None), arguments) is None
    assert len(state.warnings) == 1 and reason in state.warnings[0] and "without merging" in state.warnings[0]


def test_triton_backend_matches_reference():
    outs, plans = {}, {}
    for backend in ("reference", "triton"):
        model, run = build_qwen(layers=1, references=[(4, 4)], zero_cond_t=True)
        sk.apply_sdtm(model, ratio=0.5, deviation=0.1, switch_step=1, num_steps=3, backend=backend, seed=1)
        get_state(model).keep_plans = True
        outs[backend] = run(TIMESTEPS[:3])
        plans[backend] = [r["plan"] for r in get_state(model).stats]
    assert [p is None for p in plans["triton"]] == [True, False, False]  # protected, SSM, IDM
    for a, b in zip(plans["reference"][1:], plans["triton"][1:]):
        assert a.num_rows == b.num_rows and torch.equal(a.row_of_token, b.row_of_token)
    for a, b in zip(outs["reference"], outs["triton"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def _record_attention(block, records):
    def hook(module, args, kwargs):
        records.append({k: kwargs[k] for k in ("hidden_states", "encoder_hidden_states", "image_rotary_emb")})

    return block.attn.register_forward_pre_hook(hook, with_kwargs=True)


def test_merged_attention_inputs_keep_reference_rows_exact():
    """SSM step, first block (same input as diffusers): the attention sees the merged rows of the
    generated image, then the reference rows and their rotary frequencies exactly as diffusers'."""
    model, run = build_qwen(layers=1, references=[(4, 6)], zero_cond_t=True)
    stock, patched = [], []
    handle = _record_attention(model.transformer_blocks[0], stock)
    run(TIMESTEPS[:1])
    sk.apply_sdtm(model, ratio=0.5, deviation=0.0, switch_step=1, protect_steps=None, num_steps=2)
    state = get_state(model)
    state.keep_plans = True
    handle.remove()
    handle = _record_attention(model.transformer_blocks[0], patched)
    run(TIMESTEPS[:1])
    handle.remove()
    plan, num_tokens = state.stats[0]["plan"], math.prod(GRID)
    rows = plan.num_rows
    (want, got), = zip(stock, patched)
    assert state.stats[0]["mode"] == "ssm" and rows < num_tokens
    assert got["hidden_states"].shape[1] == rows + 24
    assert torch.equal(got["hidden_states"][:, rows:], want["hidden_states"][:, num_tokens:])  # reference rows
    torch.testing.assert_close(got["hidden_states"][:, :rows], plan.merge(want["hidden_states"][:, :num_tokens]),
                               rtol=0, atol=0)
    assert torch.equal(got["encoder_hidden_states"], want["encoder_hidden_states"])
    (img_got, txt_got), (img_want, txt_want) = got["image_rotary_emb"], want["image_rotary_emb"]
    assert torch.equal(img_got[:rows], img_want[plan.rep_token[0].long()])
    assert torch.equal(img_got[rows:], img_want[num_tokens:]) and torch.equal(txt_got, txt_want)


def test_text_mask_reaches_the_merged_attention():
    """Padded prompt tokens are masked in every merged block: their values do not change the image."""
    model, run = build_qwen(mask=True)
    sk.apply_sdtm(model, ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3, num_steps=5)
    masked = run()
    assert {r["mode"] for r in get_state(model).stats} == {"protected", "ssm", "idm"}
    text = run.inputs["encoder_hidden_states"].clone()
    text[-1, -2:] = 100.0  # padded positions
    other_padding = run(encoder_hidden_states=text)
    for a, b in zip(masked, other_padding):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    unmasked = run(encoder_hidden_states=text, encoder_hidden_states_mask=None)
    assert not torch.allclose(unmasked[1][-1], masked[1][-1], atol=1e-3)  # the mask matters


@pytest.mark.parametrize("option", [dict(idm_score="attention"), dict(prompt_reweight=True)])
def test_paper_options_raise(option):
    model, _ = build_qwen(layers=1)
    with pytest.raises(ValueError, match="joint text-image attention"):
        sk.apply_sdtm(model, num_steps=5, **option)
    assert get_state(model) is None and not sdtm_hooked(model)


def test_unknown_rotary_format_raises_on_a_merging_step():
    model, run = build_qwen(layers=1)
    sk.apply_sdtm(model, ratio=0.5, deviation=0.0, switch_step=1, protect_steps=None, num_steps=2)

    def real_tables(module, args, kwargs):  # Flux-style (cos, sin) over text + image tokens
        kwargs["image_rotary_emb"] = (torch.ones(133, 16), torch.zeros(133, 16))
        return args, kwargs

    model.transformer_blocks[0].register_forward_pre_hook(real_tables, with_kwargs=True)
    with pytest.raises(RuntimeError, match="Qwen-Image rotary embeddings"):
        run(TIMESTEPS[:1])


def test_block_forwards_read_nothing_on_the_host():
    model, run = build_qwen(references=[(4, 4)], zero_cond_t=True, mask=True)
    sk.apply_sdtm(model, ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3, num_steps=5, backend="reference")
    seen = host_reads_in(model.transformer_blocks, run)
    assert {r["mode"] for r in get_state(model).stats} == {"protected", "ssm", "idm"}
    assert seen == []


def test_blocks_with_another_attention_processor_are_not_patched():
    model, _ = build_qwen(layers=1)

    class OtherProcessor:  # e.g. a third-party processor that may depend on the sequence it sees
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
            return hidden_states, encoder_hidden_states

    model.transformer_blocks[0].attn.set_processor(OtherProcessor())
    with pytest.raises(TypeError, match="no block SDTM supports"):
        sk.apply_sdtm(model, num_steps=5)
