"""Attention received by keys (SPEC 7, "attend to not attended"), with an explicit softmax.

``attention_received(q, k, key_slice)`` is, for every key in ``key_slice``, the attention it
receives from the queries ``q`` averaged over heads and queries::

    p = softmax(q @ k.transpose(-1, -2) * scale, dim=-1)   # [B, H, Tq, Tk], rows sum to 1
    received = p.mean(dim=(1, 2))[:, start:end]            # [B, end - start] float32

In SD3 / Flux ``q`` are the prompt tokens' queries and ``k`` all keys of the joint attention;
the slice picks the image keys. This module materialises ``p`` on purpose (readability); the
Triton kernel in ``csrc_triton/attention.py`` never does.
"""
import math

import torch


def attention_received(q: torch.Tensor, k: torch.Tensor, key_slice, scale=None, upcast: bool = True):
    """``softmax(q k^T * scale).mean((heads, queries))[:, start:end]`` as float32 ``[B, end - start]``.

    ``upcast`` computes in float64 (the accuracy reference of the tests); otherwise float32.
    """
    start, end = key_slice
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    dtype = torch.float64 if upcast else torch.float32
    logits = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    probs = torch.softmax(logits, dim=-1)
    return probs.mean(dim=(1, 2))[:, start:end].to(torch.float32)


def inattention_priority(received: torch.Tensor) -> torch.Tensor:
    """``P_ina = 1 - received / max_n received`` per batch row, in [0, 1] (float32 ``[B, N]``).

    Tokens that receive little attention from the prompt score high and are merged first; the
    most attended token scores 0. Dividing by the row maximum makes the score independent of
    the sequence length and of how much attention the prompt keys keep for themselves.
    """
    received = received.to(torch.float32)
    peak = received.amax(dim=1, keepdim=True).clamp_min(1e-30)
    return 1.0 - received / peak


def idm_attention_score(received: torch.Tensor, li=None, a_d: float = 0.05) -> torch.Tensor:
    """Candidate ranking score of the paper's IDM: ``P_x = P_ina + a_d * P_fre`` (float32 ``[B, N]``)
    with ``P_fre = li / (mean_n li + 1e-6)`` (SPEC 3.4); ``P_fre = 0`` without ``li``."""
    score = inattention_priority(received)
    if li is not None and a_d != 0.0:
        li = li.to(torch.float32)
        score = score + a_d * (li / (li.mean(dim=1, keepdim=True) + 1e-6))
    return score
