"""Tolerances and comparison helpers shared by the test files (STYLE items 4-5)."""
import torch

# (rtol, atol) per dtype for values computed in fp32 and stored in the input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# Scores are fp32 dot products of normalised vectors: error grows with the reduction length C.
def score_atol(channels: int) -> float:
    return 1e-6 * max(1.0, channels ** 0.5) * 4


def assert_close(actual, expected, dtype=None):
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: actual's)."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def random_tokens(batch, num_tokens, channels, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_tokens, channels, generator=gen).to(device=device, dtype=dtype)
