"""ops.attention_received (Triton two-pass kernel vs explicit softmax) and the paper's IDM plan
(plan_idm_attention, Triton vs reference). Small shapes: the kernels run in the interpreter on CPU."""
import math

import pytest
import torch

import sdtm_kernels as sk
from helpers import random_tokens
from sdtm_kernels import ops
from sdtm_kernels.ops import _attention_library as lib
from sdtm_kernels.reference import attention as ref
from sdtm_kernels.reference import plans as ref_plans

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, Tq, Tk, D, key_slice): odd sizes, not multiples of 16, B=1 and odd B, H>1.
SHAPES = [
    (1, 1, 7, 33, 8, (0, 33)),
    (3, 2, 5, 41, 24, (5, 41)),
    (2, 3, 19, 70, 64, (0, 64)),
    (1, 2, 1, 17, 16, (16, 17)),
    (2, 2, 77, 23, 40, (3, 20)),
]


def qk(batch, heads, tq, tk, dim, dtype, device, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tq, dim, generator=gen) * scale
    k = torch.randn(batch, heads, tk, dim, generator=gen) * scale
    return q.to(device, dtype), k.to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-{s[5][0]}:{s[5][1]}")
def test_kernel_matches_explicit_softmax(device, dtype, shape):
    batch, heads, tq, tk, dim, key_slice = shape
    q, k = qk(batch, heads, tq, tk, dim, dtype, device, seed=tq + tk)
    out = ops.attention_received(q, k, key_slice=key_slice, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (batch, key_slice[1] - key_slice[0])
    exact = ref.attention_received(q, k, key_slice)  # float64 softmax of the same (rounded) inputs
    # The kernel computes in fp32 from the stored values: fp32-level error for every input dtype,
    # and at most twice PyTorch's own error when it computes in the input dtype.
    torch.testing.assert_close(out, exact, rtol=2e-5, atol=1e-7)
    if dtype != torch.float32:
        logits = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(dim))
        torch_native = torch.softmax(logits, dim=-1).mean(dim=(1, 2)).float()[:, key_slice[0]:key_slice[1]]
        assert (out - exact).abs().max() <= 2 * (torch_native - exact).abs().max() + 1e-7
    reference = ops.attention_received(q, k, key_slice=key_slice, backend="reference")
    torch.testing.assert_close(reference, exact, rtol=2e-5, atol=1e-7)


def test_full_slice_sums_to_one_and_scale(device):
    """Each softmax row sums to 1, so the mean over heads and queries does too; ``scale`` is used."""
    q, k = qk(2, 3, 9, 37, 16, torch.float32, device, seed=3)
    out = ops.attention_received(q, k, key_slice=(0, 37), backend="triton")
    torch.testing.assert_close(out.sum(dim=1), torch.ones(2, device=device), rtol=0, atol=1e-5)
    scaled = ops.attention_received(q, k, key_slice=(0, 37), scale=0.9, backend="triton")
    torch.testing.assert_close(scaled, ref.attention_received(q, k, (0, 37), scale=0.9), rtol=2e-5, atol=1e-7)
    assert not torch.allclose(scaled, out, atol=1e-4)


def test_large_logits_stay_finite(device):
    """Online max / sum: logits of +-1000 do not overflow."""
    q, k = qk(1, 2, 11, 29, 16, torch.float32, device, seed=4, scale=12.0)
    out = ops.attention_received(q, k, key_slice=(2, 29), backend="triton")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.attention_received(q, k, (2, 29)), rtol=1e-4, atol=1e-7)


def test_strided_inputs_from_token_layout(device):
    """q / k as diffusers builds them: [B, T, H*D] viewed as [B, H, T, D] (non-contiguous)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, 3 * 24, generator=gen).to(device)
    heads = x.unflatten(-1, (3, 24)).transpose(1, 2)  # [B, H, T, D], strides of the token layout
    assert not heads.is_contiguous()
    q, k = heads[:, :, 31:], heads
    out = ops.attention_received(q, k, key_slice=(0, 31), backend="triton")
    torch.testing.assert_close(out, ref.attention_received(q.contiguous(), k.contiguous(), (0, 31)),
                               rtol=2e-5, atol=1e-7)


def test_deterministic(device):
    q, k = qk(3, 4, 50, 90, 32, torch.bfloat16, device, seed=6)
    first = ops.attention_received(q, k, key_slice=(10, 90), backend="triton")
    for _ in range(2):
        assert torch.equal(ops.attention_received(q, k, key_slice=(10, 90), backend="triton"), first)


def test_auto_backend(device):
    q, k = qk(1, 2, 6, 20, 8, torch.float32, device, seed=7)
    out = ops.attention_received(q, k, key_slice=(0, 12))
    torch.testing.assert_close(out, ref.attention_received(q, k, (0, 12)), rtol=2e-5, atol=1e-7)


def test_opcheck(device):
    q, k = qk(2, 2, 5, 21, 16, torch.float32, device, seed=8)
    for backend in ("reference", "triton"):
        torch.library.opcheck(lib.attention_received, (q, k, 3, 21, 0.25, backend))
        torch.library.opcheck(lib.attention_received, (q, k, 0, 1, None, backend))


def test_compiles_without_graph_breaks(device):
    torch._dynamo.reset()
    q, k = qk(1, 2, 4, 19, 8, torch.float32, device, seed=9)

    def fn(q, k):
        return ops.attention_received(q, k, key_slice=(0, 15), backend="reference") * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k), fn(q, k))


@pytest.mark.parametrize("case", [
    "q_rank", "k_rank", "q_dtype", "k_dtype", "q_type", "batch", "heads", "head_dim", "no_queries",
    "slice_type", "slice_order", "slice_end", "slice_start", "slice_float", "scale", "backend", "device",
])
def test_bad_input(case):
    q = torch.randn(2, 2, 5, 8)
    k = torch.randn(2, 2, 12, 8)
    kwargs = dict(key_slice=(0, 12))
    expected, match = ValueError, None
    if case == "q_rank":
        q, match = q[0], "q must have rank 4"
    elif case == "k_rank":
        k, match = k[0], "k must have rank 4"
    elif case == "q_dtype":
        q, k, expected, match = q.double(), k.double(), TypeError, "q has unsupported dtype"
    elif case == "k_dtype":
        k, expected, match = k.half(), TypeError, "k has dtype"
    elif case == "q_type":
        q, expected, match = q.numpy(), TypeError, "q must be a torch.Tensor"
    elif case == "batch":
        k, match = torch.randn(3, 2, 12, 8), "batch B"
    elif case == "heads":
        k, match = torch.randn(2, 3, 12, 8), "heads H"
    elif case == "head_dim":
        k, match = torch.randn(2, 2, 12, 4), "head dim D"
    elif case == "no_queries":
        q, match = q[:, :, :0], "at least one query"
    elif case == "slice_type":
        kwargs["key_slice"], expected, match = 5, TypeError, "key_slice must be a pair"
    elif case == "slice_order":
        kwargs["key_slice"], match = (6, 6), "key_slice must satisfy"
    elif case == "slice_end":
        kwargs["key_slice"], match = (0, 13), "key_slice must satisfy"
    elif case == "slice_start":
        kwargs["key_slice"], match = (-1, 5), r"key_slice\[0\]"
    elif case == "slice_float":
        kwargs["key_slice"], expected, match = (0, 5.0), TypeError, r"key_slice\[1\]"
    elif case == "scale":
        kwargs["scale"], match = 0.0, "scale must be > 0"
    elif case == "backend":
        kwargs["backend"], match = "cuda", "backend must be one of"
    elif case == "device":
        k, match = k.to("meta"), "k is on meta"
    with pytest.raises(expected, match=match):
        ops.attention_received(q, k, **kwargs)


# -- the paper's IDM plan -------------------------------------------------------------------------

def _plans_equal(a, b):
    assert a.num_rows == b.num_rows
    for name in ("row_of_token", "members", "row_start", "rep_token", "blend"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("grid,batch,n_remove,with_li", [((8, 8), 2, 40, True), ((7, 9), 1, 30, False),
                                                          ((6, 10), 3, 60, True)])
def test_plan_idm_attention_triton_equals_reference(device, grid, batch, n_remove, with_li):
    num_tokens = grid[0] * grid[1]
    metric = random_tokens(batch, num_tokens, 24, torch.float32, device, seed=11)
    gen = torch.Generator().manual_seed(12)
    received = torch.randperm(batch * num_tokens, generator=gen).reshape(batch, num_tokens).float().to(device)
    received = received / received.sum(dim=1, keepdim=True)
    li = torch.randint(0, 5, (batch, num_tokens), generator=gen, dtype=torch.int32).to(device) if with_li else None
    plans = [sk.plan_idm_attention(metric, grid, n_remove, received, a_d=0.05, li=li, random_dst=True,
                                   generator=torch.Generator(device=device).manual_seed(1), backend=backend)
             for backend in ("triton", "reference")]
    _plans_equal(*plans)
    assert plans[0].num_rows < num_tokens
    direct = ref_plans.idm_attention_plan(metric, grid, n_remove, received, li=li, a_d=0.05, random_dst=True,
                                          generator=torch.Generator(device=device).manual_seed(1))
    _plans_equal(plans[1], direct)


def test_plan_idm_attention_merges_the_least_attended_into_their_most_similar_dst(device):
    """a_d = 0: the merged candidates are exactly the r least attended ones; each joins the dst that
    plan_idm's matching picks (most similar by cosine)."""
    grid, batch, n_remove = (8, 8), 2, 32
    metric = random_tokens(batch, 64, 16, torch.float32, device, seed=13)
    received = torch.rand(batch, 64, generator=torch.Generator().manual_seed(14)).to(device)
    token = torch.arange(64, device=device)
    window_dst = token.reshape(4, 2, 4, 2)[:, 0, :, 0].reshape(-1)  # position 0 of each 2x2 window
    is_dst = torch.zeros(64, dtype=torch.bool, device=device)
    is_dst[window_dst] = True
    cand = token[~is_dst]
    for backend in ("reference", "triton"):
        plan = sk.plan_idm_attention(metric, grid, n_remove, received, a_d=0.0, backend=backend)
        assert plan.num_rows == 64 - n_remove
        rep = plan.rep_token.long().gather(1, plan.row_of_token.long())  # representative of each token
        is_merged = rep != token
        for b in range(batch):
            expected = cand[received[b, cand].argsort()[:n_remove]]
            assert sorted(token[is_merged[b]].tolist()) == sorted(expected.tolist())
            unit = torch.nn.functional.normalize(metric[b], dim=-1)
            best_dst = window_dst[(unit[cand] @ unit[window_dst].T).argmax(dim=1)]
            chosen = is_merged[b, cand]
            assert torch.equal(rep[b, cand][chosen], best_dst[chosen])


def test_idm_attention_score_definition():
    received = torch.tensor([[0.5, 0.25, 0.0, 0.125]])
    li = torch.tensor([[2, 0, 1, 1]], dtype=torch.int32)
    p_ina = torch.tensor([[0.0, 0.5, 1.0, 0.75]])
    torch.testing.assert_close(ref.inattention_priority(received), p_ina)
    p_fre = li.float() / (li.float().mean() + 1e-6)
    torch.testing.assert_close(ref.idm_attention_score(received, li, a_d=0.1), p_ina + 0.1 * p_fre)
    torch.testing.assert_close(ref.idm_attention_score(received, None, a_d=0.1), p_ina)
    zeros = ref.inattention_priority(torch.zeros(1, 4))
    assert torch.isfinite(zeros).all()


@pytest.mark.parametrize("case", ["received_rank", "received_shape", "received_dtype", "a_d"])
def test_plan_idm_attention_bad_input(case):
    metric = torch.randn(1, 64, 8)
    received = torch.rand(1, 64)
    kwargs = {}
    expected, match = ValueError, None
    if case == "received_rank":
        received, match = received[0], "received must have rank 2"
    elif case == "received_shape":
        received, match = torch.rand(1, 63), "received must have shape"
    elif case == "received_dtype":
        received, expected, match = torch.ones(1, 64, dtype=torch.int32), TypeError, "received must be a floating"
    elif case == "a_d":
        kwargs["a_d"], expected, match = "x", TypeError, "a_d must be a real number"
    with pytest.raises(expected, match=match):
        sk.plan_idm_attention(metric, (8, 8), 16, received, **kwargs)
