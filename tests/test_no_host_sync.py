"""A patched pipeline's transformer calls read no tensor value on the host (no synchronisation with
the GPU): the step comes from the scheduler-step count, the timestep is not read, and nothing in
a block reads tensor values. Watched with a ``TorchFunctionMode`` over every transformer call; the
pipeline's own code (scheduler, CFG) is outside the watched region."""
import pytest
import torch

pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.dit import get_state  # noqa: E402

from helpers import HostReads  # noqa: E402
from test_dit_schedule import inputs, tiny_pipeline  # noqa: E402

def watch(module, reads):
    def start(mod, args, kwargs):
        reads.__enter__()

    def stop(mod, args, kwargs, output):
        reads.__exit__(None, None, None)

    return [module.register_forward_pre_hook(start, with_kwargs=True),
            module.register_forward_hook(stop, with_kwargs=True)]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_patched_pipeline_calls_read_nothing_on_the_host(backend):
    pipe = tiny_pipeline()
    sk.apply_sdtm(pipe, backend=backend)
    reads = HostReads()
    handles = watch(pipe.transformer, reads)
    try:
        pipe(**inputs(), num_inference_steps=6)
    finally:
        for handle in handles:
            handle.remove()
    modes = {r["mode"] for r in get_state(pipe).stats}
    assert {"protected", "ssm", "idm"} <= modes
    assert reads.seen == []


def test_the_watch_sees_a_timestep_read_of_a_bare_transformer():
    """The fallback for a bare transformer reads the timestep (once per call): the watch sees it."""
    pipe = tiny_pipeline()
    sk.apply_sdtm(pipe.transformer, num_steps=3)
    reads = HostReads()
    handles = watch(pipe.transformer, reads)
    x = inputs()
    try:
        with torch.no_grad():
            for t in (900.0, 500.0, 100.0):
                pipe.transformer(hidden_states=x["latents"], timestep=torch.full((1,), t),
                                 encoder_hidden_states=x["prompt_embeds"],
                                 pooled_projections=x["pooled_prompt_embeds"], return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    assert reads.seen
