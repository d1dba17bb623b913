"""Whole-model ``torch.compile`` of a patched transformer: the only graph breaks are the
transformer hook's per-call bookkeeping (``begin_call`` / ``end_call``, kept in Python on
purpose); the generator and the random dst draws live there too, so no block breaks on them.

Not yet delivered (see the notes of issue 12): the blocks still guard on the step's Python
state (step index, caches, ``li``), so a long schedule recompiles per step.
"""
import pytest
import torch

pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from test_dit_diffusers import TIMESTEPS, build  # noqa: E402


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_only_the_call_hooks_break_the_graph(name):
    model, run = build(name, layers=2)
    steps = TIMESTEPS[:3]  # protected, structure, detail
    sk.apply_sdtm(model, ratio=0.5, deviation=0.1, switch_step=1, protect_steps=3, num_steps=len(steps),
                  backend="triton")
    eager = run(steps)
    torch._dynamo.reset()
    counters.clear()
    model.compile(backend="eager")
    try:
        compiled = run(steps)
        breaks = [str(reason) for reason in counters["graph_break"]]
        assert len(breaks) <= 2, breaks
        assert all("SDTMTransformerHook" in reason for reason in breaks), breaks
        assert not any("Generator" in reason or "Opaque" in reason for reason in breaks)
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
