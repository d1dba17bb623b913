"""Kernel launches SDTM adds to a merged block, on the Triton backend.

Counted as a GPU would launch them (``sdtm_kernels.bench.launches``): every outermost compute op
at any depth, custom ops included, plus every Triton launch, inside the blocks' calls; the
patched step minus the unpatched step, divided by the blocks that merged. Counting is
deterministic, so this is a test, not a timing. The kernels run in the Triton interpreter on CPU.

Budget (issue: at most 8 per merged structure-stage and detail-stage block, merges and
unmerges included): SD3 holds it (SSM 3: scores, top-k, plan build (the next li written in place
into the state's static buffer), 2 merges and 2 unmerges that replace the stock residual adds and
gate multiplies; IDM 6: lists, row norms, match, top-k, plan build, 1 merge of 2 launches (the
chunk pass that spreads long rows over many programs; SSM rows are at most one window, so SSM
merges skip it), 1 unmerge). The random dst positions of a whole step are one draw per call,
outside the blocks. Flux, counted per block type: double blocks 5 (SSM; the batch mean of the
shared-plan metric, only with batch > 1, and the rotary gather, one launch into a per-call buffer
that holds the text entries) and 7 (IDM); single blocks 5 (SSM) and 7 (IDM): the text rows of the
joint sequence pass through the merge and the unmerge (``prefix``: no join, no separate text
epilogue), SSM steps blend one cache of the whole gated output, and on IDM steps the unmerge adds
the gated attention half of ``proj_out`` (``addend``) in its launch. ``BUDGET`` holds each type to
the budget.
"""
import pytest

pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.bench.launches import count_launches, per_block_added, total  # noqa: E402
from sdtm_kernels.dit import get_state  # noqa: E402

from test_dit_diffusers import TIMESTEPS, build  # noqa: E402

# (family, block type) -> (SSM, IDM) launches added per merged block: the budget of 8
BUDGET = {("sd3", "JointTransformerBlock"): (8, 8), ("flux", "FluxTransformerBlock"): (8, 8),
          ("flux", "FluxSingleTransformerBlock"): (8, 8)}
STEPS = TIMESTEPS[:4]  # protected (cache written), SSM with the cache, IDM with the cache, protected
PER_CALL = 2  # outside the blocks: the pre-hook's timestep read (a host scalar) and the step's dst draw


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Block")]


def _per_step_counts(run, blocks):
    return [count_launches(run, [t], blocks=blocks)[1:] for t in STEPS]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_launches_added_per_merged_block(name):
    model, run = build(name, layers=2)
    by_type = {}
    for block in _blocks(model):
        by_type.setdefault(type(block).__name__, []).append(block)
    unpatched = {kind: _per_step_counts(run, blocks) for kind, blocks in by_type.items()}
    sk.apply_sdtm(model, ratio=0.5, deviation=0.1, switch_step=1, protect_steps=3, num_steps=len(STEPS),
                  backend="triton")
    patched = {kind: _per_step_counts(run, blocks) for kind, blocks in by_type.items()}
    by_step = {}
    for rec in get_state(model).stats:
        by_step.setdefault(rec["step"], []).append(rec["mode"])
    steps_seen = len(by_step[0])
    assert by_step[0] == by_step[3] == ["protected"] * steps_seen
    assert set(by_step[1]) == {"ssm"} and set(by_step[2]) == {"idm"}
    for kind, blocks in by_type.items():
        budget = BUDGET[name, kind]
        if name == "sd3":  # protected steps add nothing inside the blocks (the cache is the block's output)
            assert total(patched[kind][3][1]) == total(unpatched[kind][3][1])
        for step, limit in zip((1, 2), budget):
            added, ops = per_block_added(patched[kind][step][1], unpatched[kind][step][1], len(blocks))
            mode = by_step[step][0]
            assert added <= limit, f"{name} {kind} {mode}: {added:.1f} launches per merged block: {dict(ops)}"
            assert not any(op.startswith(("aten::item", "aten::equal")) for op in ops)  # no host synchronisation
    for step in (1, 2):  # outside every block: only the per-call work
        def outside(counts):
            whole = total(next(iter(counts.values()))[step][0])
            return whole - sum(total(per_kind[step][1]) for per_kind in counts.values())
        assert outside(patched) - outside(unpatched) <= PER_CALL
