"""apply_sdtm under ``torch.autocast`` (issue 10, item 2.3) on tiny random diffusers models with
fp32 weights: DiT, PixArt, SD3 (and SD3.5 dual attention), Flux. CPU autocast (bf16) shows what
CUDA autocast does: sub-layer outputs become bf16 while some gates (PixArt's ``scale_shift_table``)
stay fp32, so the stock residual stream is fp32 in PixArt and bf16 elsewhere.

Checked across protected, SSM and IDM steps: the patched model runs, every block returns the
dtypes the unpatched block returns at the same step, outputs are finite, merged sub-layers find
their cache, and with merging off the output is bit-identical to the unpatched model's, with
and without autocast."""
import contextlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.dit import apply_sdtm, block_context, get_state, remove_sdtm, run_merged  # noqa: E402
from sdtm_kernels.dit import SDTMConfig, SDTMState  # noqa: E402

from test_dit_diffusers import build as build_model  # noqa: E402

B = 2  # the models of test_dit_diffusers: batch 2, 16x16 tokens
N = 256
TIMESTEPS = [999, 800, 600, 400, 200]
FAMILIES = ["dit", "pixart", "sd3", "sd35", "flux"]
# protect_steps=3, switch_step=2 over 5 steps: protected, SSM, SSM, protected, IDM.
MERGING = dict(ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3, num_steps=5)
MODES = ["protected", "ssm", "ssm", "protected", "idm"]


def build(name):
    """The tiny model of ``test_dit_diffusers`` with per-block output dtypes recorded."""
    model, call_steps = build_model(name, layers=2)
    blocks = [m for m in model.modules() if type(m).__name__.endswith("Block")]
    record = []

    def hook(module, args, output):
        outputs = output if isinstance(output, tuple) else (output,)
        record.append((blocks.index(module), tuple(None if o is None else o.dtype for o in outputs)))

    for block in blocks:  # instance hooks survive apply_sdtm's class swap
        block.register_forward_hook(hook)

    def run(autocast=True):
        """Per step: (model output, [(block, output dtypes)] in call order)."""
        results = []
        region = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.no_grad(), region:
            for t in TIMESTEPS:
                record.clear()
                (out,) = call_steps([t])
                results.append((out, list(record)))
        return results

    return model, run


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_steps_keep_stock_dtypes_under_autocast(name):
    model, run = build(name)
    ref = run()
    if name == "pixart":  # the case of the issue: fp32 gates keep an fp32 residual stream
        assert ref[0][1][0][1] == (torch.float32,)
    apply_sdtm(model, **MERGING)
    state = get_state(model)
    misses = []
    get_cache = state.get_cache

    def recording_get_cache(layer, sublayer, like):
        cache = get_cache(layer, sublayer, like)
        if cache is None:
            misses.append((state.step, layer, sublayer))
        return cache

    state.get_cache = recording_get_cache
    out = run()  # (a) runs (PixArt raised TypeError at the IDM step)
    stats = state.stats
    layers = len(ref[0][1])
    assert [r["mode"] for r in stats] == [m for m in MODES for _ in range(layers)]
    for rec in stats:  # merging did happen where it should
        if rec["mode"] == "ssm":
            assert rec["attn"] < N and rec["mlp"] < N
        elif rec["mode"] == "idm":
            assert rec["attn"] == N and rec["mlp"] < N
    for step, ((o, dtypes), (r, ref_dtypes)) in enumerate(zip(out, ref)):
        assert dtypes == ref_dtypes, f"step {step} ({MODES[step]}): block output dtypes differ"  # (b)
        assert o.dtype == r.dtype and o.shape == r.shape
        assert torch.isfinite(o).all()  # (d)
        if MODES[step] == "protected":
            assert torch.equal(o, r)
    # every merged sub-layer blended with the cache of the protected step before it (PixArt's
    # first attention used to miss its fp32 cache against the bf16 residual)
    assert misses == []
    remove_sdtm(model)
    for (o, dtypes), (r, ref_dtypes) in zip(run(), ref):
        assert torch.equal(o, r) and dtypes == ref_dtypes


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "fp32"])
@pytest.mark.parametrize("name", FAMILIES)
def test_no_merging_is_bit_identical(name, autocast):
    model, run = build(name)
    ref = run(autocast)
    # merging off on SSM / IDM steps (identity plans) and, separately, every step protected
    for options in (dict(ratio=0.0, deviation=0.0, switch_step=2, protect_steps=None, num_steps=5),
                    dict(ratio=0.5, deviation=0.1, switch_step=2, protect_steps=1, num_steps=5)):
        apply_sdtm(model, **options)
        out = run(autocast)
        modes = {r["mode"] for r in get_state(model).stats}
        assert modes == ({"ssm", "idm"} if options["protect_steps"] is None else {"protected"})
        for step, ((o, dtypes), (r, ref_dtypes)) in enumerate(zip(out, ref)):
            assert dtypes == ref_dtypes
            assert torch.equal(o, r), f"{options}: step {step} differs by {(o.float() - r.float()).abs().max()}"
    remove_sdtm(model)


def test_run_merged_returns_the_stock_dtype():
    torch.manual_seed(0)
    grid, channels = (16, 16), 8
    plan = sk.plan_ssm(torch.randn(B, N, channels), grid, 128)
    inp = torch.randn(B, N, channels, dtype=torch.bfloat16)
    gate = torch.randn(B, channels)  # fp32 gate, bf16 sub-layer output
    for residual_dtype in (torch.bfloat16, torch.float32):
        residual = torch.randn(B, N, channels, dtype=residual_dtype)
        cache = torch.randn(B, N, channels)  # a cached fp32 gate * value
        for c in (None, cache):
            out = run_merged(plan, lambda h: h * 2, inp, residual, gate=gate, cache=c, mcw=0.1)
            assert out.dtype == (residual + gate[:, None] * inp).dtype == torch.float32
        # tokens left alone by the plan (singleton rows) get the stock expression's value
        plain = run_merged(plan, lambda h: h, inp, residual, gate=gate)
        counts = plan.row_start[:, 1:] - plan.row_start[:, :-1]
        alone = counts.gather(1, plan.row_of_token.long()) == 1
        assert alone.any() and not alone.all()
        stock = residual + gate[:, None] * inp
        torch.testing.assert_close(plain[alone], stock[alone], rtol=0, atol=0)


def test_plans_do_not_depend_on_autocast():
    torch.manual_seed(1)
    metric = torch.randn(B, N, 64)
    plans = {}
    for autocast in (False, True):
        state = SDTMState(SDTMConfig(ratio=0.5, deviation=0.0, switch_step=0, protect_steps=None, backend="reference"),
                          num_steps=4)
        state.begin_call(999, (16, 16))
        state.begin_call(800, (16, 16))  # step 1: IDM (ranks candidates by cosine similarity)
        region = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with region:
            ctx = block_context(state, 0, metric)
        assert ctx.mode == "idm" and ctx.plan.num_rows < N
        plans[autocast] = ctx.plan
    for name in ("row_of_token", "members", "row_start", "rep_token", "blend"):
        assert torch.equal(getattr(plans[True], name), getattr(plans[False], name)), name
