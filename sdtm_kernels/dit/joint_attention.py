"""The joint attention of SD3 / Flux blocks, computed by SDTM itself for the paper's options
(SPEC 7): ``idm_score="attention"`` (the attention image tokens receive from the prompt
queries) and ``prompt_reweight`` (an additive key bias). Used only when one of them is on;
the default path keeps the stock diffusers processors and their attention backend.

Why not the stock processors: diffusers' ``JointAttnProcessor2_0`` (SD3) accepts an
``attention_mask`` argument but does not pass it to SDPA, and no stock processor returns its
queries and keys. ``JointAttention`` mirrors the stock processors (``JointAttnProcessor2_0``,
``FluxAttnProcessor`` / ``FluxAttnProcessor2_0``; checked against them in the tests) and:

- projects q / k / v once (lazily) and keeps them, so the statistic and the attention output
  share one projection: no recompute on IDM steps, where attention runs at full length;
- ``received()`` runs ``ops.attention_received`` on the prompt queries and all keys (the
  statistic of the unbiased logits), image keys sliced out;
- ``output(key_bias)`` runs ``F.scaled_dot_product_attention`` with ``attn_mask=key_bias``
  (float ``[B, 1, 1, Tk]``, added to the logits), so SDPA still runs.

Token order: SD3 concatenates ``[image, text]``, Flux ``[text, image]``.
"""
import math

import torch
import torch.nn.functional as F

from .. import ops


def _heads(x, heads):
    """[B, S, H*D] -> [B, H, S, D]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _maybe_norm(norm, x):
    return x if norm is None else norm(x)  # RMS / layer norms over the head dim: layout-agnostic


def _rotary(x, image_rotary_emb):
    if image_rotary_emb is None:
        return x
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, image_rotary_emb)  # [B, H, S, D], real (cos, sin) tables


def _check_kwargs(kwargs):
    if kwargs:
        raise ValueError(
            "SDTM's idm_score='attention' / prompt_reweight run their own joint attention and do not "
            f"support joint_attention_kwargs {sorted(kwargs)}; turn those options off for such calls"
        )


class JointAttention:
    """One joint attention call of an SD3 (``kind="sd3"``) or Flux (``kind="flux"``) block.

    ``hidden_states`` are image rows (SD3, Flux double block: with ``encoder_hidden_states``
    the prompt rows) or, for the Flux single block (no ``encoder_hidden_states``), the joint
    ``[text, image]`` sequence with ``text_len`` prompt rows first.
    """

    def __init__(self, attn, kind, hidden_states, encoder_hidden_states=None, image_rotary_emb=None,
                 text_len=None, backend=None):
        if kind not in ("sd3", "flux"):
            raise ValueError(f"kind must be 'sd3' or 'flux', got {kind!r}")
        self.attn = attn
        self.kind = kind
        self.hidden_states = hidden_states
        self.encoder_hidden_states = encoder_hidden_states
        self.image_rotary_emb = image_rotary_emb
        self.backend = backend
        if encoder_hidden_states is not None:
            self.text_len = encoder_hidden_states.shape[1]
            self.image_len = hidden_states.shape[1]
        else:
            self.text_len = int(text_len or 0)
            self.image_len = hidden_states.shape[1] - self.text_len
        self._qkv = None

    # -- token layout ----------------------------------------------------------------------
    @property
    def image_first(self) -> bool:
        return self.kind == "sd3"

    def image_slice(self):
        start = 0 if self.image_first else self.text_len
        return start, start + self.image_len

    def text_slice(self):
        start = self.image_len if self.image_first else 0
        return start, start + self.text_len

    # -- projections -----------------------------------------------------------------------
    def qkv(self):
        """(q, k, v) ``[B, H, T + N, D]`` of the joint sequence, as the stock processor builds them."""
        if self._qkv is None:
            self._qkv = self._project()
        return self._qkv

    def _project(self):
        attn, x, enc = self.attn, self.hidden_states, self.encoder_hidden_states
        heads = attn.heads
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)
        q, k = _maybe_norm(getattr(attn, "norm_q", None), q), _maybe_norm(getattr(attn, "norm_k", None), k)
        if enc is not None:
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(enc).chunk(3, dim=-1)
            else:
                eq, ek, ev = attn.add_q_proj(enc), attn.add_k_proj(enc), attn.add_v_proj(enc)
            eq, ek, ev = _heads(eq, heads), _heads(ek, heads), _heads(ev, heads)
            eq = _maybe_norm(getattr(attn, "norm_added_q", None), eq)
            ek = _maybe_norm(getattr(attn, "norm_added_k", None), ek)
            if self.image_first:
                q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
            else:
                q, k, v = torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2)
        if self.image_rotary_emb is not None:
            q, k = _rotary(q, self.image_rotary_emb), _rotary(k, self.image_rotary_emb)
        return q, k, v

    # -- the statistic ---------------------------------------------------------------------
    def received(self) -> torch.Tensor:
        """float32 ``[B, N]``: attention each image key receives from the prompt queries,
        ``softmax(q_text k^T / sqrt(D)).mean((heads, prompt queries))[:, image keys]``."""
        if self.text_len == 0:
            raise ValueError("idm_score='attention' needs prompt tokens: this joint attention has none")
        q, k, _ = self.qkv()
        t0, t1 = self.text_slice()
        return ops.attention_received(q[:, :, t0:t1], k, key_slice=self.image_slice(), backend=self.backend)

    # -- the attention ---------------------------------------------------------------------
    def output(self, key_bias=None):
        """The stock processor's outputs: ``(image_out, text_out)`` with a prompt stream, else the
        joint ``[B, T + N, H*D]`` (Flux single block). ``key_bias`` float ``[B, 1, 1, Tk]`` or None."""
        attn = self.attn
        q, k, v = self.qkv()
        if key_bias is not None:
            key_bias = key_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if self.encoder_hidden_states is None:
            to_out = getattr(attn, "to_out", None)
            if self.kind == "sd3" and to_out is not None:
                out = to_out[1](to_out[0](out))
            return out
        i0, i1 = self.image_slice()
        t0, t1 = self.text_slice()
        image_out, text_out = out[:, i0:i1], out[:, t0:t1]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        if not getattr(attn, "context_pre_only", False) and getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out


def prompt_key_bias(ctx, text_len: int, image_rows: int, batch: int, image_first: bool, device, dtype):
    """Additive key bias of ``prompt_reweight`` (``[B, 1, 1, Tk]``, or None when off).

    Image keys: ``+log(size)`` where ``size`` is the number of tokens a (merged) row stands for
    (proportional attention; 0 for unmerged keys). Prompt keys: ``+log(a_p)`` of the stage
    (``a_p[0]`` on SSM steps, ``a_p[1]`` on IDM steps). Protected, layer-protected and exact
    blocks get no bias: they stay the exact computation.
    """
    state = ctx.state
    if state is None or not state.config.prompt_reweight or ctx.mode not in ("ssm", "idm"):
        return None
    a_p = state.config.a_p[0 if ctx.mode == "ssm" else 1]
    if ctx.merges("attn"):
        row_start = ctx.plan.row_start
        size = (row_start[:, 1:] - row_start[:, :-1]).to(torch.float32)
        image_bias = size.log().to(device)
    else:
        image_bias = torch.zeros(batch, image_rows, dtype=torch.float32, device=device)
    if image_bias.shape[0] != batch:
        image_bias = image_bias.expand(batch, -1)
    text_bias = torch.full((batch, text_len), math.log(a_p), dtype=torch.float32, device=device)
    parts = [image_bias, text_bias] if image_first else [text_bias, image_bias]
    return torch.cat(parts, dim=1)[:, None, None, :].to(dtype)
