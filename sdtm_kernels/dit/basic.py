"""diffusers ``BasicTransformerBlock`` with ``norm_type`` "ada_norm_zero" (DiT) and
"ada_norm_single" (PixArt-alpha/sigma), mirroring diffusers' forward (0.30 to 0.42).

Attention (and, with ``merge_cross_attention``, the query side of PixArt's cross-attention)
runs on merged rows on SSM steps; the MLP on SSM and IDM steps. The prompt is never merged.

diffusers adds ``gated + residual`` here (SD3 / Flux add ``residual + gated``): the operand
order decides the memory layout of the sum when the residual is not contiguous (the patch
embedding's ``flatten(2).transpose(1, 2)``), and the layout decides the rounding of the next
matmul, so the exact path keeps diffusers' order (``residual_first=False``) to stay bit-identical.
"""
from .core import block_context

SUPPORTED_NORMS = ("ada_norm_zero", "ada_norm_single")


def supports(block) -> bool:
    return getattr(block, "norm_type", None) in SUPPORTED_NORMS


def feed_forward(block, h):
    chunk = getattr(block, "_chunk_size", None)
    if chunk is not None and h.shape[block._chunk_dim] % chunk == 0:
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(block.ff, h, block._chunk_dim, chunk)
    return block.ff(h)


def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
            timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
    state = getattr(self, "_sdtm_state", None)
    batch_size = hidden_states.shape[0]
    if self.norm_type == "ada_norm_zero":
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
            hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype
        )
    elif self.norm_type == "ada_norm_single":
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(batch_size, 6, -1)
        ).chunk(6, dim=1)
        norm_hidden_states = self.norm1(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_msa) + shift_msa
    else:  # apply_sdtm only patches the norms above
        raise ValueError(f"SDTM does not support BasicTransformerBlock with norm_type={self.norm_type!r}")

    if self.pos_embed is not None:
        norm_hidden_states = self.pos_embed(norm_hidden_states)

    cross_attention_kwargs = cross_attention_kwargs.copy() if cross_attention_kwargs is not None else {}
    gligen_kwargs = cross_attention_kwargs.pop("gligen", None)

    ctx = block_context(state, self._sdtm_slot, norm_hidden_states)

    # 1. self-attention
    attn_output = self.attn1(
        ctx.merge("attn", norm_hidden_states),
        encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
        attention_mask=attention_mask,
        **cross_attention_kwargs,
    )
    if attn_output.ndim == 4:
        attn_output = attn_output.squeeze(1)
    hidden_states = ctx.finish("attn", attn_output, residual=hidden_states, gate=gate_msa, residual_first=False)

    if gligen_kwargs is not None:
        hidden_states = self.fuser(hidden_states, gligen_kwargs["objs"])

    # 2. cross-attention (query side merged only with merge_cross_attention)
    if self.attn2 is not None:
        if self.norm_type == "ada_norm_zero":
            norm_hidden_states = self.norm2(hidden_states)
        else:  # PixArt applies no norm before cross-attention
            norm_hidden_states = hidden_states
        if self.pos_embed is not None and self.norm_type != "ada_norm_single":
            norm_hidden_states = self.pos_embed(norm_hidden_states)
        merge_cross = state is not None and state.config.merge_cross_attention
        query = ctx.merge("cross", norm_hidden_states) if merge_cross else norm_hidden_states
        attn_output = self.attn2(
            query,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **cross_attention_kwargs,
        )
        if merge_cross:
            hidden_states = ctx.finish("cross", attn_output, residual=hidden_states, residual_first=False)
        else:
            ctx.note("cross", norm_hidden_states.shape[1])
            hidden_states = attn_output + hidden_states

    # 3. feed-forward
    if self.norm_type == "ada_norm_zero":
        norm_hidden_states = self.norm3(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    else:
        norm_hidden_states = self.norm2(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp) + shift_mlp
    ff_output = feed_forward(self, ctx.merge("mlp", norm_hidden_states))
    hidden_states = ctx.finish("mlp", ff_output, residual=hidden_states, gate=gate_mlp, residual_first=False)
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    return hidden_states
