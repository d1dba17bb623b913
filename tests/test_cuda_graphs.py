"""CUDA graphs of merged steps equal eager (where CUDA exists; the CPU side of CUDA-graph readiness,
static buffers and no host synchronisation, is tested in test_compile_clean.py and
test_no_host_sync.py). Random dst draws are off so that eager and replay draw nothing."""
import pytest
import torch

pytest.importorskip("diffusers")

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.dit import get_state  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

STEPS = [999.0, 800.0, 600.0, 400.0]  # protected, SSM, SSM, protected (num_steps 4, switch 0.4 -> step 1)


def sd3_on_cuda():
    import diffusers

    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                            pos_embed_max_size=32).cuda().eval()
    inputs = dict(hidden_states=torch.randn(2, 4, 32, 32, device="cuda"),
                  encoder_hidden_states=torch.randn(2, 5, 16, device="cuda"),
                  pooled_projections=torch.randn(2, 8, device="cuda"))
    return model, inputs


def call(model, inputs, t):
    with torch.no_grad():
        return model(**inputs, timestep=torch.full((2,), t, device="cuda"), return_dict=False)[0]


def test_manual_capture_and_replay_of_a_merged_step_equals_eager():
    model, inputs = sd3_on_cuda()
    sk.apply_sdtm(model, num_steps=len(STEPS), random_dst=False, backend="triton")
    eager = [call(model, inputs, t) for t in STEPS[:3]]
    state = get_state(model)
    state.reset()
    call(model, inputs, STEPS[0])  # protected: the cache
    call(model, inputs, STEPS[1])  # the first SSM step writes li (warm-up of the kernels too)
    assert state.mode == "ssm"
    # capture step 2 (the hook's Python runs once, at capture; the kernels read the static li
    # buffer, holding step 1's counters, and step 0's cache), then replay it
    graph = torch.cuda.CUDAGraph()
    static_t = torch.full((2,), STEPS[2], device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        with torch.cuda.graph(graph):
            out = model(**inputs, timestep=static_t, return_dict=False)[0]
    torch.cuda.current_stream().wait_stream(stream)
    assert state.step == 2 and state.mode == "ssm"
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager[2], rtol=1e-4, atol=1e-4)


def test_reduce_overhead_generation_equals_eager():
    model, inputs = sd3_on_cuda()
    sk.apply_sdtm(model, num_steps=len(STEPS), random_dst=False, backend="triton")
    eager = [call(model, inputs, t).clone() for t in STEPS]
    model.compile(mode="reduce-overhead")
    try:
        for _ in range(2):  # warm-up and recording, then replays
            compiled = [call(model, inputs, t).clone() for t in STEPS]
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    finally:
        torch._dynamo.reset()
