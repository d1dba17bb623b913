"""The paper's options on tiny random SD3 / Flux models (SPEC 7): ``idm_score="attention"``
(inattentiveness-driven IDM) and ``prompt_reweight`` (proportional attention + prompt weight)."""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels import ops  # noqa: E402
from sdtm_kernels.dit import SDTMBlockWrapper, SDTMConfig, SDTMState, get_state  # noqa: E402
from sdtm_kernels.dit.core import BlockContext  # noqa: E402
from sdtm_kernels.dit.joint_attention import JointAttention, prompt_key_bias  # noqa: E402
from sdtm_kernels.reference import attention as ref_attention  # noqa: E402
from test_dit_diffusers import N, build  # noqa: E402

SCHEDULE = dict(ratio=0.5, deviation=0.1, switch_step=2, protect_steps=3, num_steps=5)  # P S S P I
TEXT = 5  # prompt tokens of the tiny models


def joint_blocks(model):
    return [m for m in model.modules() if type(m).__name__.endswith("TransformerBlock")
            and "Single" not in type(m).__name__]


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("option", [dict(idm_score="attention", a_d=0.05),
                                    dict(prompt_reweight=True, a_p=(0.5, 2.0))], ids=["attention", "reweight"])
def test_option_runs_and_changes_the_merged_steps(name, option):
    model, run = build(name)
    ref = run()
    sk.apply_sdtm(model, **SCHEDULE)
    default = run()
    sk.apply_sdtm(model, **SCHEDULE, **option)
    state = get_state(model)
    state.keep_plans = True
    out = run()
    assert all(torch.isfinite(o).all() for o in out)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-6)  # protected steps stay exact
    torch.testing.assert_close(out[3], default[3], rtol=0, atol=1e-6)
    assert not torch.allclose(out[4], default[4], atol=1e-4)  # the IDM step
    if "prompt_reweight" in option:
        assert not torch.allclose(out[1], default[1], atol=1e-4)  # SSM steps: merged keys and a_p
    else:
        torch.testing.assert_close(out[1], default[1], rtol=0, atol=1e-6)  # SSM steps untouched
    idm = [r for r in state.stats if r["mode"] == "idm"]
    assert idm and all(("received" in r) == ("idm_score" in option) for r in idm)
    for r in idm:
        assert (r["attn"], r["mlp"]) == (N, r["plan"].num_rows)
        if "received" in r:
            assert r["received"].shape == (1 if name == "flux" else 2, N)  # Flux: one plan for the batch


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
def test_ratio_zero_with_unit_prompt_weight_is_the_unpatched_model(name):
    """log(1) = 0 on the prompt keys and no merged keys (log(size 1) = 0): exactly the stock output."""
    model, run = build(name)
    ref = run()
    sk.apply_sdtm(model, ratio=0.0, deviation=0.0, switch_step=2, protect_steps=3, num_steps=5,
                  prompt_reweight=True, a_p=1.0, idm_score="attention")
    for a, b in zip(ref, run()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # the prompt weight acts on its own: a_p != 1 changes the merging steps, not the protected ones
    sk.apply_sdtm(model, ratio=0.0, deviation=0.0, switch_step=2, protect_steps=3, num_steps=5,
                  prompt_reweight=True, a_p=(3.0, 0.3))
    out = run()
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-6)
    assert not torch.allclose(out[1], ref[1], atol=1e-4)
    assert not torch.allclose(out[4], ref[4], atol=1e-4)


@pytest.mark.parametrize("name", ["dit", "pixart"])
@pytest.mark.parametrize("option", [dict(idm_score="attention"), dict(prompt_reweight=True)], ids=str)
def test_families_without_joint_attention_raise(name, option):
    model, _ = build(name, layers=1)
    with pytest.raises(ValueError, match="joint text-image attention"):
        sk.apply_sdtm(model, num_steps=5, **option)
    assert get_state(model) is None  # nothing patched


def test_generic_wrapper_refuses_the_joint_attention_options():
    block = torch.nn.Module()
    block.attn, block.mlp = torch.nn.Identity(), torch.nn.Identity()
    block.norm1, block.norm2 = torch.nn.Identity(), torch.nn.Identity()
    state = SDTMState(SDTMConfig(idm_score="attention", num_steps=5))
    with pytest.raises(ValueError, match="joint text-image attention"):
        SDTMBlockWrapper(block, state, 0, modulation=lambda blk, c: (c,) * 6)


@pytest.mark.parametrize("options,error,match", [
    (dict(idm_score="inattention"), ValueError, "idm_score must be one of"),
    (dict(a_d="0.1"), TypeError, "a_d must be a real number"),
    (dict(prompt_reweight=1), TypeError, "prompt_reweight must be a bool"),
    (dict(a_p=0.0), ValueError, "a_p must be > 0"),
    (dict(a_p=(1.0, -2.0)), ValueError, "a_p must be > 0"),
    (dict(a_p=(1.0, 2.0, 3.0)), TypeError, "a_p must be a float or a pair"),
    (dict(a_p=(1.0, float("nan"))), ValueError, r"a_p\[1\] must be finite"),
])
def test_config_validation(options, error, match):
    with pytest.raises(error, match=match):
        SDTMConfig(**options)
    assert SDTMConfig(a_p=2.0).a_p == (2.0, 2.0)
    assert SDTMConfig(a_p=[0.5, 2]).a_p == (0.5, 2.0)


def _attn_inputs(model, module):
    """The keyword inputs of ``module``'s first call in an unpatched run."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)) if not seen else None,
                                              with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("name,which", [("sd3", 0), ("sd3", 1), ("sd35", 0), ("flux", "double"),
                                        ("flux", "single")])
def test_own_joint_attention_matches_the_stock_processor(name, which):
    """JointAttention(...).output() without a bias is the stock diffusers processor's computation."""
    model, run = build(name)
    if name == "flux":
        blocks = model.transformer_blocks if which == "double" else model.single_transformer_blocks
        block = blocks[0]
    else:
        block = model.transformer_blocks[which]
    seen, handle = _attn_inputs(model, block.attn)
    run([999])
    handle.remove()
    inputs = seen[0]
    with torch.no_grad():
        stock = block.attn(**inputs)
        kind = "flux" if name == "flux" else "sd3"
        own = JointAttention(block.attn, kind, inputs["hidden_states"], inputs.get("encoder_hidden_states"),
                             inputs.get("image_rotary_emb"), text_len=TEXT).output()
    stock = stock if isinstance(stock, tuple) else (stock,)
    own = own if isinstance(own, tuple) else (own,)
    for a, b in zip(stock, own):
        if a is None:
            continue
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _heads(x, heads):
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_statistic_is_attention_received_of_the_blocks_queries_and_keys(name):
    """The ``received`` the IDM plan used equals ops.attention_received on the block's own prompt
    queries and joint keys, rebuilt here from the projections' outputs (captured by hooks)."""
    model, run = build(name)
    sk.apply_sdtm(model, **SCHEDULE, idm_score="attention")
    state = get_state(model)
    state.keep_plans = True
    block = joint_blocks(model)[0]
    attn = block.attn
    captured = {}

    def keep(key):
        def hook(module, args, output):
            if state.step == 4:
                captured[key] = output
        return hook

    if name == "sd3":  # no q/k norms in the tiny SD3: the linear outputs are q and k
        names = ("to_k", "add_q_proj", "add_k_proj")
        assert attn.norm_q is None and attn.norm_added_k is None
    else:  # Flux: RMS-normed per head, then rotary on [text, image]
        names = ("norm_k", "norm_added_q", "norm_added_k")
        block.register_forward_pre_hook(
            lambda m, a, kw: captured.__setitem__("rotary", kw["image_rotary_emb"]) if state.step == 4 else None,
            with_kwargs=True)
    handles = [getattr(attn, n).register_forward_hook(keep(n)) for n in names]
    run()
    for h in handles:
        h.remove()
    record = next(r for r in state.stats if r["step"] == 4 and r["layer"] == 0)
    assert record["mode"] == "idm"
    if name == "sd3":
        q_text = _heads(captured["add_q_proj"], attn.heads)
        k_all = torch.cat([_heads(captured["to_k"], attn.heads), _heads(captured["add_k_proj"], attn.heads)], 2)
        key_slice = (0, N)
    else:
        from diffusers.models.embeddings import apply_rotary_emb

        rotary = captured["rotary"]
        q_all = torch.cat([captured["norm_added_q"], torch.zeros_like(captured["norm_k"])], 2)
        k_all = torch.cat([captured["norm_added_k"], captured["norm_k"]], 2)
        q_text = apply_rotary_emb(q_all, rotary)[:, :, :TEXT]
        k_all = apply_rotary_emb(k_all, rotary)
        key_slice = (TEXT, TEXT + N)
    expected = ops.attention_received(q_text, k_all, key_slice=key_slice, backend="reference")
    if name == "flux":
        expected = expected.mean(dim=0, keepdim=True)  # one plan shared by the batch
    torch.testing.assert_close(record["received"], expected, rtol=1e-5, atol=1e-8)
    exact = ref_attention.attention_received(q_text, k_all, key_slice)
    exact = exact.mean(0, keepdim=True) if name == "flux" else exact
    torch.testing.assert_close(record["received"], exact, rtol=1e-4, atol=1e-7)
    # and the plan ranks the candidates by P_x built from it
    assert record["plan"].num_rows < N


def test_prompt_key_bias_values():
    state = SDTMState(SDTMConfig(prompt_reweight=True, a_p=(2.0, 3.0), num_steps=5))
    metric = torch.randn(2, 64, 8)
    plan = sk.plan_ssm(metric, (8, 8), 48)
    counts = (plan.row_start[:, 1:] - plan.row_start[:, :-1]).float()
    assert counts.max() > 1
    ssm = BlockContext(state, 0, "ssm", plan, num_tokens=64)
    bias = prompt_key_bias(ssm, 3, plan.num_rows, 2, True, metric.device, torch.float32)
    assert bias.shape == (2, 1, 1, plan.num_rows + 3)
    torch.testing.assert_close(bias[:, 0, 0, :plan.num_rows], counts.log())
    torch.testing.assert_close(bias[:, 0, 0, plan.num_rows:], torch.full((2, 3), math.log(2.0)))
    idm = BlockContext(state, 0, "idm", sk.plan_idm(metric, (8, 8), 32), num_tokens=64)
    bias = prompt_key_bias(idm, 3, 64, 2, False, metric.device, torch.float32)  # attention unmerged
    torch.testing.assert_close(bias[:, 0, 0, :3], torch.full((2, 3), math.log(3.0)))
    assert torch.equal(bias[:, 0, 0, 3:], torch.zeros(2, 64))
    assert prompt_key_bias(BlockContext(state, 0, "protected", num_tokens=64), 3, 64, 2, True, "cpu",
                           torch.float32) is None
    state.config = state.config.replace(prompt_reweight=False)
    assert prompt_key_bias(ssm, 3, plan.num_rows, 2, True, "cpu", torch.float32) is None


def test_triton_backend_gives_the_reference_plans():
    """End to end on SD3 with the kernels (interpreter on CPU): the same plans as the reference."""
    model, run = build("sd3")
    plans = {}
    for backend in ("reference", "triton"):
        sk.apply_sdtm(model, **SCHEDULE, idm_score="attention", prompt_reweight=True, a_p=(0.7, 1.5),
                      backend=backend)
        state = get_state(model)
        state.keep_plans = True
        out = run()
        plans[backend] = (out, [(r["plan"], r.get("received")) for r in state.stats if r["mode"] == "idm"])
    (out_ref, ref_plans), (out_tri, tri_plans) = plans["reference"], plans["triton"]
    assert ref_plans
    for (p_ref, rec_ref), (p_tri, rec_tri) in zip(ref_plans, tri_plans):
        torch.testing.assert_close(rec_tri, rec_ref, rtol=1e-4, atol=1e-7)
        assert torch.equal(p_tri.row_of_token, p_ref.row_of_token)
        assert torch.equal(p_tri.members, p_ref.members)
    for a, b in zip(out_ref, out_tri):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
