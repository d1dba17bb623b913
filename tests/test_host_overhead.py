"""Host overhead of a merged block (issue 11 item 3), asserted on counts, not timings: the Python
calls SDTM adds to one merged SD3 block (``bench.hosttime.count_calls``: Triton launches replayed
and left out), no argument check, environment read, backend resolution or plan layout check per
block, plan contents checked only on request (debug), and the block path building the public
planners' plans."""
import dataclasses
import os

import pytest
import torch

pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels import _validation  # noqa: E402
from sdtm_kernels.bench import hosttime  # noqa: E402
from sdtm_kernels.bench.models import BenchModel  # noqa: E402
from sdtm_kernels.plan import MergePlan  # noqa: E402
from sdtm_kernels.planning import block_planner  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton kernels need CUDA or the interpreter")

# Python calls SDTM adds to one merged block (tiny SD3, C=32, 8x8 tokens, batch 2), measured 175
# (SSM) and 169 (IDM) with this code, 21 and 24 of them the launches' own count (3 each); the
# code before the block path made about 1,000 (every op re-checked its arguments).
ADDED_CALLS = {"ssm": 195, "idm": 190}
STEPS = 12


@pytest.fixture(scope="module")
def sd3_block():
    """``(caller of block 0, state, {kind: step})`` of a tiny patched SD3 (the host-time model)."""
    spec = hosttime.tiny_spec("sd3", grid=8, width=32)
    model = BenchModel(spec, "cpu", torch.float32, batch=1, seed=0)
    call = hosttime._block_caller(model)
    unpatched = hosttime.count_calls(call)
    state = model.patch("fast", "triton", STEPS)
    state.config = dataclasses.replace(state.config, min_saving=0.0)  # a FLOP rule: off at this size
    steps = hosttime._first_steps(state, STEPS)

    def at(kind):
        """Drive the state to the first ``kind`` step, one block call per step (real cache and li)."""
        state.reset(num_steps=STEPS)
        for step in range(steps[kind] + 1):
            state.begin_call(1000.0 * (1 - step / STEPS), spec["grid"], text_len=spec["text_len"],
                             batch=model.model_batch, device=torch.device("cpu"))
            with torch.no_grad():
                call()
        assert state.stats[-1]["mode"] == kind and state.stats[-1]["mlp"] < spec["num_tokens"]

    yield call, state, at, unpatched
    model.unpatch()


@pytest.mark.parametrize("kind", ["ssm", "idm"])
def test_python_calls_added_per_merged_block(sd3_block, kind):
    call, state, at, unpatched = sd3_block
    at(kind)
    merged = hosttime.count_calls(call, detailed=True)
    assert state.stats[-1]["mode"] == kind
    added = merged.calls - unpatched.calls
    assert 0 < added <= ADDED_CALLS[kind], f"{kind}: SDTM adds {added} Python calls per merged block"
    names = list(merged.by_function)
    once_per_call = [n for n in names if not n.endswith("(call_debug)") and any(part in n for part in (
        "_validation.py", "backend.py", "(_check_layout)", "(__post_init__)", "(_ensure_generator)",
        "(_block_entry)", "planning.py", "ops/apply.py", "(resolve_backend)"))]
    assert not once_per_call, f"argument checks / backend resolution per block: {once_per_call}"
    assert not [n for n in names if "<frozen os>" in n or "environ" in n], "environment read per block"
    assert not [n for n in names if "triton/runtime/jit.py" in n or "triton/language" in n], \
        "a triton constexpr function (cdiv, next_power_of_2) or launch proxy called on the host per block"
    # the only call of the debug flag is the block path's own (no env read inside it)
    assert merged.by_function.get(next((n for n in names if n.endswith("(call_debug)")), ""), 0) == 1


def test_plan_contents_checked_only_in_debug_mode(sd3_block, monkeypatch):
    call, state, at, _ = sd3_block
    checks = []
    real_check = MergePlan.check
    monkeypatch.setattr(MergePlan, "check", lambda self: checks.append(self) or real_check(self))
    monkeypatch.delenv("SDTM_DEBUG", raising=False)
    _validation.set_debug(None)
    at("ssm")
    with torch.no_grad():
        call()
    assert not checks  # CPU tensors, debug off: the kernels' layout is trusted
    try:
        _validation.set_debug(True)  # takes effect at once
        with torch.no_grad():
            call()
        assert len(checks) == 1
        _validation.set_debug(None)
        monkeypatch.setenv("SDTM_DEBUG", "1")  # the environment is read once per transformer call
        with torch.no_grad():
            call()
        assert len(checks) == 1
        at("ssm")  # begin_call reads it
        count = len(checks)
        with torch.no_grad():
            call()
        assert len(checks) == count + 1
    finally:
        _validation.set_debug(None)


def _metric_li_draw(seed=0):
    gen = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, 64, 16, generator=gen)
    li = torch.randint(0, 4, (2, 64), generator=gen, dtype=torch.int32)
    draw = torch.randint(0, 4, (2, 16), generator=gen)
    return metric, li, draw


@pytest.mark.parametrize("kind", ["ssm", "idm", "idm_attention"])
@pytest.mark.parametrize("with_li", [True, False])
def test_block_planner_builds_the_public_planners_plan(kind, with_li):
    metric, li, draw = _metric_li_draw()
    received = torch.rand(2, 64, generator=torch.Generator().manual_seed(1)) if kind == "idm_attention" else None
    plan_li = li if with_li else None
    common = dict(window=(2, 2), li=plan_li, random_dst=True, backend="triton", li_mode="mean", dst_draw=draw)
    if kind == "ssm":
        want = sk.plan_ssm(metric, (8, 8), 48, a_s=0.05, li_out=li.clone(), **common)
    elif received is None:
        want = sk.plan_idm(metric, (8, 8), 48, li_out=li.clone(), **common)
    else:
        want = sk.plan_idm_attention(metric, (8, 8), 48, received, a_d=0.05, li_out=li.clone(), **common)
    li_out = li.clone()
    planner = block_planner("ssm" if kind == "ssm" else "idm", metric, (8, 8), 48, a_s=0.05, a_d=0.05,
                            received=received, li_out=li_out, work={}, **common)
    build_li = li_out if with_li else None  # the state passes its buffer, updated in place
    if kind == "ssm":
        got = planner.ssm(metric, build_li, draw, li_out)
    else:
        got = planner.idm(metric, build_li, draw, li_out, received)
    for name in ("row_of_token", "members", "row_start", "rep_token", "blend", "li_next"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert (got.num_tokens, got.num_rows, got.max_members, got.li_mode) == \
        (want.num_tokens, want.num_rows, want.max_members, want.li_mode)
    got.check()
    x = torch.randn(2, 64, 8)
    y = torch.randn(2, got.num_rows, 8)
    gate, cache = torch.randn(2, 8), torch.randn(2, 64, 8)
    assert got._fast is not None and want._fast is None  # only the block path's plans skip the checks
    torch.testing.assert_close(got.merge(x, backend="triton"), want.merge(x, backend="triton"))
    torch.testing.assert_close(got.unmerge(y, residual=x, gate=gate, cache=cache, mcw=0.3, gate_first=True,
                                           backend="triton"),
                               want.unmerge(y, residual=x, gate=gate, cache=cache, mcw=0.3, gate_first=True,
                                            backend="triton"))


def test_block_planner_makes_the_public_checks():
    metric, li, draw = _metric_li_draw()
    with pytest.raises(ValueError, match="grid"):
        block_planner("ssm", metric, (8, 4), 48, li_out=li, backend="triton")
    with pytest.raises(TypeError, match="li_out"):
        block_planner("idm", metric, (8, 8), 48, li_out=li.long(), backend="triton")
    with pytest.raises(ValueError, match="dst_draw"):
        block_planner("idm", metric, (8, 8), 48, dst_draw=draw[:1], backend="triton")
    assert block_planner("ssm", metric, (8, 8), 48, backend="reference") is None  # the public planner runs


def test_block_path_plans_take_the_checked_way_for_other_inputs():
    """A block plan's merge / unmerge launch directly only for plain inputs of the plan's shapes:
    other inputs get the public errors, and inputs that need a gradient the registered ops."""
    metric, li, draw = _metric_li_draw()
    planner = block_planner("ssm", metric, (8, 8), 48, li_out=li, dst_draw=draw, random_dst=True, backend="triton")
    plan = planner.ssm(metric, li, draw, li)
    with pytest.raises(ValueError, match="x must have shape"):
        plan.merge(torch.randn(2, 63, 8), backend="triton")
    with pytest.raises(ValueError, match="mcw"):
        plan.unmerge(torch.randn(2, plan.num_rows, 8), residual=torch.randn(2, 64, 8), mcw=1.5, backend="triton")
    with pytest.raises(TypeError, match="residual"):
        plan.unmerge(torch.randn(2, plan.num_rows, 8), residual=torch.randn(2, 64, 8, dtype=torch.float64),
                     backend="triton")
    x = torch.randn(2, 64, 8, requires_grad=True)
    plan.merge(x, backend="triton").sum().backward()  # the autograd op (sdtm::merge)
    assert plan.num_rows < 64 and torch.allclose(x.grad.sum(), torch.tensor(2 * 8.0 * plan.num_rows))  # B * C per row
    same = plan.merge(x.detach(), backend="reference")  # another backend than the plan's: the checked way
    torch.testing.assert_close(same, plan.merge(x.detach(), backend="triton"))
