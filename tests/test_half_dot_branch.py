"""The fp16/bf16 tensor-core branch of the match and attention kernels (``DOT_FP32=False``).

A GPU feeds fp16/bf16 tiles to ``tl.dot`` as they are; the interpreter normally upcasts them
first (``csrc_triton.scores.dot_operands_fp32``), so without a GPU that branch would only be
compiled (tests/aot_compile.py), never executed. ``SDTM_INTERPRET_HALF_DOT=1`` makes the
interpreter execute it. fp16/bf16 products are exact in the fp32 accumulator, so +-1 tokens
give exact results and random tokens agree with the reference to fp32 rounding. The
interpreter computes bf16 ``tl.dot`` on the raw storage bits, so the fixture widens bf16 tiles
exactly before its matmul (on a GPU nothing is patched).
"""
import pytest
import torch

from helpers import random_tokens, score_atol, sign_tokens
from sdtm_kernels import ops
from sdtm_kernels.reference import attention as ref_attention
from sdtm_kernels.reference import similarity as ref

HALF = [torch.float16, torch.bfloat16]


def _exact_bf16_dot(monkeypatch):
    """The interpreter's ``create_dot`` runs ``np.matmul`` on bf16's uint16 storage (wrong
    values; triton 3.6 and 3.9). Widen bf16 tiles to fp32 first: exact, like the tensor cores'
    bf16 products, so the kernel's own code of the branch is what the test checks."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, widen(a), widen(b), d, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.fixture
def half_dot(monkeypatch, device):
    monkeypatch.setenv("SDTM_INTERPRET_HALF_DOT", "1")
    if device == "cpu":
        _exact_bf16_dot(monkeypatch)
    from sdtm_kernels.csrc_triton.scores import dot_operands_fp32

    assert dot_operands_fp32(torch.bfloat16, interpret=True) is False  # the branch is really taken
    assert dot_operands_fp32(torch.float32, interpret=True) is True


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_match_half_dot_exact_on_sign_tokens(device, half_dot, dtype):
    x = sign_tokens(2, 96, 64, device, seed=3).to(dtype)
    cand = torch.arange(24, 96, device=device).expand(2, -1)
    dst = torch.arange(0, 24, device=device).expand(2, -1)
    best, match = ops.bipartite_match(x, cand, dst, backend="triton")
    want_best, want_match = ref.bipartite_match(x, cand, dst)
    assert torch.equal(best, want_best) and torch.equal(match, want_match)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_match_half_dot_random_tokens(device, half_dot, dtype):
    x = random_tokens(2, 150, 80, dtype, device, seed=4)
    cand = torch.arange(40, 150, device=device).expand(2, -1)
    dst = torch.arange(0, 40, device=device).expand(2, -1)
    best, match = ops.bipartite_match(x, cand, dst, backend="triton")
    want_best, want_match = ref.bipartite_match(x, cand, dst)
    torch.testing.assert_close(best, want_best, rtol=1e-5, atol=score_atol(80))
    unit = ref.normalize_tokens(x, torch.float64)
    sims = unit[:, 40:] @ unit[:, :40].transpose(1, 2)
    top2 = sims.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(match[clear], want_match[clear])


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_attention_received_half_dot(device, half_dot, dtype):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 21, 32, generator=gen).to(device, dtype)
    k = torch.randn(2, 3, 70, 32, generator=gen).to(device, dtype)
    out = ops.attention_received(q, k, key_slice=(6, 70), backend="triton")
    exact = ref_attention.attention_received(q, k, (6, 70))  # float64 softmax of the same values
    torch.testing.assert_close(out, exact, rtol=2e-5, atol=1e-7)
