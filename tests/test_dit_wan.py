"""apply_sdtm on tiny random Wan transformers (no downloads): Wan 2.1 T2V, I2V (image-context keys),
Wan 2.2 TI2V (per-token modulation; text-to-video and first-frame-conditioned timesteps) and VACE.
Latents [2, 4, 2, 16, 16] with patch (1, 2, 2): a (2, 8, 8) token grid, N = 128, so that SSM
and IDM both merge with the default per-frame (1, 2, 2) windows."""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.dit import get_state, patch, reset_sdtm  # noqa: E402
from sdtm_kernels.dit import wan  # noqa: E402
from sdtm_kernels.reference import schedule as ref_schedule  # noqa: E402

B, FRAMES, SIZE = 2, 2, 16
GRID = (FRAMES, SIZE // 2, SIZE // 2)
N = math.prod(GRID)
WINDOW = (1, 2, 2)
TIMESTEPS = [999.0, 749.0, 500.0, 250.0, 0.0]  # CountingScheduler's 5 steps
TEXT_DIM, HEADS, HEAD_DIM = 16, 2, 12  # inner width 24; rotary split 4 + 4 + 4
I2V_TEXT_LEN = 512  # WanAttnProcessor takes the last 512 context tokens as the prompt (hard-coded)
KINDS = ("t2v", "i2v", "ti2v", "ti2v-image")


def ti2v_timestep(t, grid, batch, image_frame=False):
    """Wan 2.2 TI2V's per-token timestep ``[B, N]``: ``t`` everywhere, or 0 on the first latent
    frame's tokens when it holds the conditioning image (``WanImageToVideoPipeline``)."""
    per_token = torch.full(grid, float(t))
    if image_frame:
        per_token[0] = 0.0
    return per_token.flatten().unsqueeze(0).expand(batch, -1)


def build_wan(kind="t2v", layers=2, frames=FRAMES, height=SIZE, width=SIZE, batch=B, dtype=torch.float32,
              patch_size=(1, 2, 2), seed=0):
    """A tiny random ``WanTransformer3DModel`` (or ``WanVACETransformer3DModel`` for ``"vace"``) and
    ``run(timesteps) -> [output per timestep]`` (no grad). ``kind``: ``"t2v"`` (Wan 2.1),
    ``"i2v"`` (Wan 2.1 I2V: ``image_dim`` / ``added_kv_proj_dim``, ``encoder_hidden_states_image``),
    ``"ti2v"`` (Wan 2.2 TI2V text-to-video: per-token timesteps ``[B, N]``, all equal),
    ``"ti2v-image"`` (TI2V with the first frame conditioned: its tokens at timestep 0; a bare
    transformer counts steps by the largest per-token timestep), ``"vace"``.
    ``run.call(t)`` is one call, ``run.grid`` the token grid."""
    torch.manual_seed(seed)
    config = dict(patch_size=patch_size, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                  out_channels=4, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=layers, rope_max_seq_len=32)
    text_len, extra = 7, {}
    if kind == "i2v":
        config.update(image_dim=8, added_kv_proj_dim=HEADS * HEAD_DIM)
        text_len, extra["encoder_hidden_states_image"] = I2V_TEXT_LEN, torch.randn(batch, 4, 8)
    if kind == "vace":
        config.update(vace_layers=[0], vace_in_channels=4)
        model = diffusers.WanVACETransformer3DModel(**config)
        extra["control_hidden_states"] = torch.randn(batch, 4, frames, height, width)
    elif kind in KINDS:
        model = diffusers.WanTransformer3DModel(**config)
    else:
        raise ValueError(kind)
    if dtype != torch.float32:  # what from_pretrained(torch_dtype=...) does: these modules stay fp32
        keep = set(model._keep_in_fp32_modules)
        for name, param in model.named_parameters():
            if not keep.intersection(name.split(".")):
                param.data = param.data.to(dtype)
    model.eval()
    x = torch.randn(batch, 4, frames, height, width, dtype=dtype)
    enc = torch.randn(batch, text_len, TEXT_DIM, dtype=dtype)
    extra = {k: v.to(dtype) for k, v in extra.items()}
    grid = patch.latent_grid(x, patch_size)

    def timestep(t):
        if kind.startswith("ti2v"):
            return ti2v_timestep(t, grid, batch, image_frame=kind == "ti2v-image")
        return torch.full((batch,), float(t))

    def call(t):
        with torch.no_grad():
            return model(x, timestep=timestep(t), encoder_hidden_states=enc, return_dict=False, **extra)[0]

    def run(timesteps=TIMESTEPS):
        return [call(t) for t in timesteps]

    run.call, run.grid = call, grid
    return model, run


class CountingScheduler:
    """What the SDTM pipeline driver reads: ``timesteps``, ``order`` and ``step`` (a no-op here)."""

    order = 1

    def __init__(self):
        self.timesteps = []

    def set_timesteps(self, num_inference_steps):
        self.timesteps = torch.linspace(999, 0, num_inference_steps).round()

    def step(self, *args, **kwargs):
        return None


class FakeWanPipeline:
    """A Wan pipeline's loop: one transformer call and one scheduler step per timestep."""

    def __init__(self, transformer, call):
        self.transformer = transformer
        self.scheduler = CountingScheduler()
        self._call = call

    def __call__(self, num_inference_steps=5):
        self.scheduler.set_timesteps(num_inference_steps)
        outs = []
        for t in self.scheduler.timesteps.tolist():
            outs.append(self._call(t))
            self.scheduler.step()
        return outs


def wan_blocks(model):
    return [m for m in model.modules() if type(m).__name__ == "WanTransformerBlock"]


def sdtm_hooked(model):
    return [m for m in model.modules() if "sdtm" in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})]


def expected_rows(step, stage, grid, num_steps=5, ratio=0.5, deviation=0.1):
    n = math.prod(grid)
    n_remove = math.floor(n * sk.ratio_schedule(step, num_steps, ratio, deviation))
    return n - ref_schedule.tokens_removed(stage, n_remove, grid, WINDOW)


def check_counts(stats, layers, grid, cross_merged=False, num_steps=5, switch=2):
    n = math.prod(grid)
    assert [(r["step"], r["layer"]) for r in stats] == [(s, l) for s in range(num_steps) for l in range(layers)]
    for rec in stats:
        step = rec["step"]
        if step % 3 == 0:
            assert (rec["mode"], rec["attn"], rec["cross"], rec["mlp"]) == ("protected", n, n, n)
        elif step <= switch:
            m = expected_rows(step, "ssm", grid, num_steps)
            assert m < n
            assert (rec["mode"], rec["attn"], rec["cross"], rec["mlp"]) == ("ssm", m, m if cross_merged else n, m)
        else:
            m = expected_rows(step, "idm", grid, num_steps)
            assert m < n
            assert (rec["mode"], rec["attn"], rec["cross"], rec["mlp"]) == ("idm", n, n, m)


MERGING = dict(ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3, ratio_levels=0)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_merged_counts_and_remove(kind):
    model, run = build_wan(kind)
    ref = run()
    pipe = FakeWanPipeline(model, run.call)  # the pipeline counts the steps (TI2V-image: timestep[0] is 0)

    sk.apply_sdtm(pipe, ratio=0.0)
    assert sdtm_hooked(model) == [model] + wan_blocks(model)
    for a, b in zip(ref, pipe(5)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)

    sk.apply_sdtm(pipe, **MERGING)
    state = get_state(pipe)
    out = pipe(5)
    assert state.grid == GRID
    assert all(torch.isfinite(o).all() for o in out)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)  # protected step
    assert not torch.allclose(out[1], ref[1], atol=1e-4) and not torch.allclose(out[4], ref[4], atol=1e-4)
    check_counts(state.stats, 2, GRID)
    assert {(layer, name) for (_, layer, name) in state.cache} == {(l, s) for l in (0, 1) for s in ("attn", "mlp")}
    assert all(tuple(v.shape) == (B, N, HEADS * HEAD_DIM) and v.dtype == torch.float32
               for v in state.cache.values())

    sk.remove_sdtm(pipe)
    assert not sdtm_hooked(model) and type(pipe) is FakeWanPipeline
    for a, b in zip(ref, run(TIMESTEPS[:2])):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["t2v", "ti2v"])
def test_bf16_bare_transformer_exact_and_merged(kind):
    """bf16 weights with diffusers' fp32 modules (modulation, norms, rotary); a bare transformer
    counts steps by timestep (TI2V text-to-video: every token at the step's timestep)."""
    model, run = build_wan(kind, layers=1, dtype=torch.bfloat16)
    ref = run(TIMESTEPS[:3])
    sk.apply_sdtm(model, ratio=0.0, num_steps=3)
    for a, b in zip(ref, run(TIMESTEPS[:3])):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    sk.apply_sdtm(model, ratio=0.5, deviation=0.1, switch_step=1, num_steps=3)
    out = run(TIMESTEPS[:3])
    assert [r["mode"] for r in get_state(model).stats] == ["protected", "ssm", "idm"]
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in out)


def test_bare_ti2v_with_an_image_frame_counts_steps():
    """Per-token timesteps whose first frame is 0 at every step (the conditioning image): a bare
    transformer still counts one step per call (the largest per-token value changes)."""
    model, run = build_wan("ti2v-image", layers=1)
    sk.apply_sdtm(model, ratio=0.5, deviation=0.1, switch_step=1, num_steps=3)
    run(TIMESTEPS[:3])
    assert [(r["step"], r["mode"]) for r in get_state(model).stats] == [(0, "protected"), (1, "ssm"), (2, "idm")]
    report = sk.summary(model)  # token shares over the 3-D grid (T x H x W tokens)
    assert not any("no step merged" in w for w in report.warnings) and 0 < report.flop_saving < 1


def test_grid_from_latent_frames_and_sizes(monkeypatch):
    model, run = build_wan("t2v", layers=1)
    sk.apply_sdtm(model, num_steps=5, **MERGING)
    state = get_state(model)
    run()
    assert state.grid == GRID
    check_counts(state.stats, 1, GRID)
    x, enc = torch.randn(B, 4, 1, 16, 24), torch.randn(B, 7, TEXT_DIM)  # one frame, not square
    reset_sdtm(model)
    with torch.no_grad():
        for t in TIMESTEPS:
            model(x, timestep=torch.full((B,), float(t)), encoder_hidden_states=enc)
    assert state.grid == (1, 8, 12)
    check_counts(state.stats, 1, (1, 8, 12))

    stub = type("Stub", (), {"config": type("Config", (), {"patch_size": (2, 2, 2)})()})()
    assert wan.token_grid(None, stub, {"hidden_states": torch.empty(1, 4, 4, 16, 8)}) == (2, 8, 4)
    assert wan.token_grid(None, stub, {"hidden_states": torch.empty(1, 4, 16, 8)}) is None  # not a video latent
    assert wan.token_grid(None, stub, {}) is None

    # a call whose grid is unknown runs exactly (with a one-time warning)
    _, ref_run = build_wan("t2v", layers=1)
    ref = ref_run(TIMESTEPS[:3])
    monkeypatch.setitem(patch._GRID_READERS, type(model), lambda state, model, arguments: None)
    reset_sdtm(model, num_steps=3)
    with pytest.warns(RuntimeWarning, match="cannot read the image token grid"):
        out = run(TIMESTEPS[:3])
    assert {r["mode"] for r in state.stats} == {"exact"}
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_triton_backend_matches_reference():
    outs, plans = {}, {}
    for backend in ("reference", "triton"):
        model, run = build_wan("t2v", layers=1)
        sk.apply_sdtm(model, ratio=0.5, deviation=0.1, switch_step=1, num_steps=3, backend=backend, seed=1)
        state = get_state(model)
        state.keep_plans = True
        outs[backend] = run(TIMESTEPS[:3])
        plans[backend] = [r["plan"] for r in state.stats]
    assert [p is None for p in plans["triton"]] == [True, False, False]
    for a, b in zip(plans["reference"][1:], plans["triton"][1:]):
        assert torch.equal(a.row_of_token, b.row_of_token) and torch.equal(a.rep_token, b.rep_token)
    for a, b in zip(outs["reference"], outs["triton"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_merge_cross_attention(kind):
    model, run = build_wan(kind)
    sk.apply_sdtm(model, num_steps=5, **MERGING)
    plain = run()
    sk.apply_sdtm(model, merge_cross_attention=True)
    state = get_state(model)
    out = run()
    check_counts(state.stats, 2, GRID, cross_merged=True)
    assert all(torch.isfinite(o).all() for o in out)
    torch.testing.assert_close(out[3], plain[3], rtol=0, atol=0)  # protected step
    assert not torch.allclose(out[1], plain[1], atol=1e-5)  # the query side of attn2 merged
    assert "cross" in {name for (_, _, name) in state.cache}


def _drive_block(model, block, temb, rotary, x, enc, timesteps):
    """The patched block alone, inside calls opened by hand on the model's state."""
    state = get_state(model)
    reset_sdtm(model, num_steps=len(timesteps))
    outs = []
    with torch.no_grad():
        for t in timesteps:
            state.begin_call(float(t), GRID, batch=B, device=x.device)
            outs.append(block(x, enc, temb, rotary))
            state.end_call()
    return outs


def test_per_token_modulation_matches_the_fused_epilogue():
    """TI2V gates ``[B, N, C]`` take the explicit unmerge / gate / blend path; with the same gate on
    every token it must give what the fused ``[B, C]`` epilogue gives (caches and mcw blend included)."""
    model, run = build_wan("t2v", layers=1)
    sk.apply_sdtm(model, ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3, num_steps=5, mcw=0.1,
                  ratio_levels=0)
    block = model.blocks[0]
    torch.manual_seed(1)
    x, enc = torch.randn(B, N, HEADS * HEAD_DIM), torch.randn(B, 7, HEADS * HEAD_DIM)
    temb = torch.randn(B, 6, HEADS * HEAD_DIM)
    rotary = model.rope(torch.empty(B, 4, FRAMES, SIZE, SIZE))
    fused = _drive_block(model, block, temb, rotary, x, enc, TIMESTEPS)
    modes = [r["mode"] for r in get_state(model).stats]
    per_token = _drive_block(model, block, temb[:, None].expand(B, N, 6, -1), rotary, x, enc, TIMESTEPS)
    assert modes == [r["mode"] for r in get_state(model).stats] == ["protected", "ssm", "ssm", "protected", "idm"]
    for a, b in zip(fused, per_token):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

    # per-token gates really are per token: zero gates on the second frame leave its tokens at the
    # residual stream after attention and FFN, whatever rows they were merged into; the first
    # frame's tokens (non-zero gates) move
    gated, second = temb[:, None].repeat(1, N, 1, 1), slice(N // FRAMES, N)
    gated[:, second, 2] = -block.scale_shift_table[0, 2]  # gate_msa = 0
    gated[:, second, 5] = -block.scale_shift_table[0, 5]  # c_gate_msa = 0
    out = _drive_block(model, block, gated, rotary, x, enc, TIMESTEPS[:2])[1]
    assert get_state(model).stats[1]["mode"] == "ssm" and get_state(model).stats[1]["attn"] < N
    with torch.no_grad():
        unmoved = x + block.attn2(block.norm2(x), enc, None, None)
    torch.testing.assert_close(out[:, second], unmoved[:, second], rtol=1e-5, atol=1e-5)
    assert (out[:, : N // FRAMES] - unmoved[:, : N // FRAMES]).abs().amax(-1).gt(1e-3).all()

    with pytest.raises(RuntimeError, match="rotary embeddings"):  # a table of another form
        flat = tuple(t[0] for t in rotary)  # [N, 1, D]: broadcasts on exact steps, not gathered
        _drive_block(model, block, temb, flat, x, enc, TIMESTEPS[:2])


def test_rotary_entries_gathered_per_sample():
    """Per-sample plans: each merged row of sample b takes the (cos, sin) entry of its own
    representative token (the table is [1, N, 1, D], broadcast over the batch)."""
    from sdtm_kernels.dit.config import make_config
    from sdtm_kernels.dit.core import block_context
    from sdtm_kernels.dit.state import SDTMState

    model, _ = build_wan("t2v", layers=1)
    rotary = model.rope(torch.empty(B, 4, FRAMES, SIZE, SIZE))
    state = SDTMState(make_config(num_steps=5, **MERGING), num_layers=1)
    torch.manual_seed(2)
    metric = torch.randn(B, N, 24)
    for t in TIMESTEPS[:2]:  # protected, then SSM
        state.begin_call(t, GRID, batch=B, device=metric.device)
        ctx = block_context(state, 0, metric)
        if ctx.mode == "ssm":
            cos, sin = wan.gather_rotary(ctx, "attn", rotary)
        state.end_call()
    rep = ctx.plan.rep_token.long()
    assert ctx.plan.num_rows < N and not torch.equal(rep[0], rep[1])  # the two samples merge differently
    assert cos.shape == sin.shape == (B, ctx.plan.num_rows, 1, rotary[0].shape[-1])
    for b in range(B):
        assert torch.equal(cos[b], rotary[0][0, rep[b]]) and torch.equal(sin[b], rotary[1][0, rep[b]])


def test_vace_main_blocks_merge():
    model, run = build_wan("vace")
    ref = run()
    sk.apply_sdtm(model, ratio=0.0, num_steps=5)
    assert sdtm_hooked(model) == [model] + wan_blocks(model) and len(wan_blocks(model)) == 2  # VACE blocks: stock
    for a, b in zip(ref, run()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    sk.apply_sdtm(model, **MERGING)
    out = run()
    check_counts(get_state(model).stats, 2, GRID)
    assert all(torch.isfinite(o).all() for o in out)


def test_unsupported_options_and_processors():
    model, run = build_wan("t2v")
    for option in (dict(idm_score="attention"), dict(prompt_reweight=True)):
        with pytest.raises(ValueError, match="joint text-image attention"):
            sk.apply_sdtm(model, num_steps=5, **option)

    class OtherProcessor:  # a processor SDTM does not know: that block is left stock
        def __call__(self, attn, *args, **kwargs):
            return diffusers.models.transformers.transformer_wan.WanAttnProcessor()(attn, *args, **kwargs)

    model.blocks[1].attn1.set_processor(OtherProcessor())
    ref = run()
    sk.apply_sdtm(model, num_steps=5, **MERGING)
    assert sdtm_hooked(model) == [model, model.blocks[0]]
    run()
    assert {r["layer"] for r in get_state(model).stats} == {0}
    sk.remove_sdtm(model)
    model.blocks[0].attn2.set_processor(OtherProcessor())
    with pytest.raises(TypeError, match="no block SDTM supports"):
        sk.apply_sdtm(model, num_steps=5)
    for a, b in zip(ref, run()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


class FakeWan22Pipeline(FakeWanPipeline):
    """Wan 2.2 A14B's loop: ``transformer`` for the high-noise steps, ``transformer_2`` after the
    boundary (``WanPipeline``'s ``boundary_ratio``)."""

    def __init__(self, transformer, call, transformer_2, call_2, boundary):
        super().__init__(transformer, call)
        self.transformer_2, self._call_2, self.boundary = transformer_2, call_2, boundary

    def __call__(self, num_inference_steps=5):
        self.scheduler.set_timesteps(num_inference_steps)
        outs = []
        for step, t in enumerate(self.scheduler.timesteps.tolist()):
            outs.append((self._call if step < self.boundary else self._call_2)(t))
            self.scheduler.step()
        return outs


def test_wan22_second_expert_is_patched_with_the_pipeline_steps():
    high, run_high = build_wan("t2v", layers=1, seed=0)
    low, run_low = build_wan("t2v", layers=1, seed=1)
    pipe = FakeWan22Pipeline(high, run_high.call, low, run_low.call, boundary=2)
    ref = pipe(num_inference_steps=5)
    sk.apply_sdtm(pipe, ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3)
    assert sdtm_hooked(low) and sdtm_hooked(high)
    out = pipe(num_inference_steps=5)
    high_stats, low_stats = get_state(high).stats, get_state(low).stats
    assert [(r["step"], r["mode"]) for r in high_stats] == [(0, "protected"), (1, "ssm")]
    # the second expert counts the pipeline's steps (2, 3, 4), not from its own first call, and its
    # first step is protected (it has no cache of its own yet)
    assert [(r["step"], r["mode"]) for r in low_stats] == [(2, "protected"), (3, "protected"), (4, "idm")]
    assert get_state(low) is not get_state(high)  # own caches and li
    report = sk.dit.summary(pipe)  # both experts, each with its own steps
    assert [row["step"] for row in report.steps] == [0, 1]
    assert len(report.experts) == 1 and [row["step"] for row in report.experts[0].steps] == [2, 3, 4]
    assert "transformer_2:" in str(report)
    reset_sdtm(pipe, num_steps=5)  # a new generation for both experts
    assert get_state(low).stats == [] and get_state(high).stats == []
    out = pipe(num_inference_steps=5)
    assert all(torch.isfinite(o).all() for o in out)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)  # protected step
    sk.remove_sdtm(pipe)
    assert not sdtm_hooked(low) and not sdtm_hooked(high)
    for a, b in zip(ref, pipe(num_inference_steps=5)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_wan22_apply_is_all_or_nothing():
    """A second expert SDTM cannot patch leaves the whole pipeline unpatched (not half of it)."""
    high, run_high = build_wan("t2v", layers=1, seed=0)
    pipe = FakeWan22Pipeline(high, run_high.call, torch.nn.Linear(4, 4), run_high.call, boundary=2)
    with pytest.raises(TypeError, match="no block SDTM supports"):
        sk.apply_sdtm(pipe, ratio=0.5)
    assert not sdtm_hooked(high) and get_state(high) is None
    assert type(pipe) is FakeWan22Pipeline  # the pipeline's class is not swapped either


def test_wan22_pipeline_with_only_the_second_expert():
    """``transformer=None`` (Wan 2.2 loaded with its low-noise expert only): that expert is the one
    patched, counting the pipeline's steps."""
    low, run_low = build_wan("t2v", layers=1, seed=1)
    pipe = FakeWan22Pipeline(None, None, low, run_low.call, boundary=0)
    ref = pipe(num_inference_steps=4)
    sk.apply_sdtm(pipe, ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3)
    assert sdtm_hooked(low) and get_state(pipe) is get_state(low)
    out = pipe(num_inference_steps=4)
    assert [(r["step"], r["mode"]) for r in get_state(low).stats] == [
        (0, "protected"), (1, "ssm"), (2, "ssm"), (3, "protected")]
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    sk.remove_sdtm(pipe)
    assert not sdtm_hooked(low)


def test_wan22_pipeline_whose_second_expert_is_the_first():
    """``transformer_2 is transformer`` (one module loaded for both stages): patched once, one state."""
    model, run = build_wan("t2v", layers=1, seed=0)
    pipe = FakeWan22Pipeline(model, run.call, model, run.call, boundary=2)
    sk.apply_sdtm(pipe, ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3)
    pipe(num_inference_steps=5)
    assert [r["step"] for r in get_state(model).stats] == [0, 1, 2, 3, 4]
    assert sk.dit.summary(pipe).experts == []
    sk.remove_sdtm(pipe)
    assert not sdtm_hooked(model)
