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
outside the blocks. Flux does not yet (9 / 10): its shared plan adds the batch mean of the metric,
the rotary table gather (cat + index_select) and, in single blocks, the joins of text and image
rows; ``BUDGET["flux"]`` keeps it from growing.
"""
import pytest

pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.bench.launches import count_launches, per_block_added, total  # noqa: E402
from sdtm_kernels.dit import get_state  # noqa: E402

from test_dit_diffusers import TIMESTEPS, build  # noqa: E402

BUDGET = {"sd3": 8, "flux": 10}  # flux: a regression guard, not yet the budget (module docstring)
STEPS = TIMESTEPS[:4]  # protected (cache written), SSM with the cache, IDM with the cache, protected
PER_CALL = 2  # outside the blocks: the pre-hook's timestep read (a host scalar) and the step's dst draw


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Block")]


def _per_step_counts(run, blocks):
    return [count_launches(run, [t], blocks=blocks)[1:] for t in STEPS]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_launches_added_per_merged_block(name):
    model, run = build(name, layers=2)
    blocks = _blocks(model)
    unpatched = _per_step_counts(run, blocks)
    sk.apply_sdtm(model, ratio=0.5, deviation=0.1, switch_step=1, protect_steps=3, num_steps=len(STEPS),
                  backend="triton")
    patched = _per_step_counts(run, blocks)
    by_step = {}
    for rec in get_state(model).stats:
        by_step.setdefault(rec["step"], []).append(rec["mode"])
    assert by_step[0] == by_step[3] == ["protected"] * len(by_step[0])
    assert set(by_step[1]) == {"ssm"} and set(by_step[2]) == {"idm"}
    if name == "sd3":  # protected steps add nothing inside the blocks (the cache is the block's output)
        assert total(patched[3][1]) == total(unpatched[3][1])
    for step in (1, 2):
        (all_p, block_p), (all_u, block_u) = patched[step], unpatched[step]
        added, ops = per_block_added(block_p, block_u, len(by_step[step]))
        assert added <= BUDGET[name], f"{name} {by_step[step][0]}: {added:.1f} launches per merged block: {dict(ops)}"
        assert not any(op.startswith(("aten::item", "aten::equal")) for op in ops)  # no host synchronisation
        assert total(all_p) - total(block_p) - (total(all_u) - total(block_u)) <= PER_CALL
