"""diffusers ``JointTransformerBlock`` (SD3, SD3.5; MMDiT), mirroring diffusers' forward
(0.30 to 0.42): the SD3.5-medium dual-attention blocks (``use_dual_attention``: a second,
image-only attention ``attn2`` on its own modulated input) and the last block with
``context_pre_only`` included. Only image tokens are merged; the prompt tokens attend to
the merged image rows and keep their full length."""
from .core import block_context
from .joint_attention import JointAttention, _check_kwargs, prompt_key_bias


def uses_own_attention(state) -> bool:
    """The paper's options (``idm_score="attention"``, ``prompt_reweight``) need SDTM's own joint
    attention (``joint_attention.JointAttention``); otherwise the stock processor runs."""
    if state is None or not state.active:
        return False
    cfg = state.config
    return cfg.idm_score == "attention" or cfg.prompt_reweight


def supports(block) -> bool:
    return True


def _feed_forward(block, ff, h):
    chunk = getattr(block, "_chunk_size", None)
    if chunk is not None and h.shape[block._chunk_dim] % chunk == 0:
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(ff, h, block._chunk_dim, chunk)
    return ff(h)


def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
    state = getattr(self, "_sdtm_state", None)
    joint_attention_kwargs = joint_attention_kwargs or {}
    dual = getattr(self, "use_dual_attention", False)
    if dual:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden_states2, gate_msa2 = self.norm1(
            hidden_states, emb=temb
        )
    else:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)

    if self.context_pre_only:
        norm_encoder_hidden_states = self.norm1_context(encoder_hidden_states, temb)
    else:
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb
        )

    if uses_own_attention(state):
        _check_kwargs(joint_attention_kwargs)
        backend = state.config.backend
        full = JointAttention(self.attn, "sd3", norm_hidden_states, norm_encoder_hidden_states, backend=backend)
        ctx = block_context(state, self._sdtm_slot, norm_hidden_states, received=full.received)
        rows = ctx.merge("attn", norm_hidden_states)
        joint = full if rows is norm_hidden_states else JointAttention(
            self.attn, "sd3", rows, norm_encoder_hidden_states, backend=backend)
        bias = prompt_key_bias(ctx, joint.text_len, rows.shape[1], rows.shape[0], True, rows.device, rows.dtype)
        attn_output, context_attn_output = joint.output(bias)
    else:
        ctx = block_context(state, self._sdtm_slot, norm_hidden_states)
        # Joint attention: merged image rows + the whole prompt.
        attn_output, context_attn_output = self.attn(
            hidden_states=ctx.merge("attn", norm_hidden_states),
            encoder_hidden_states=norm_encoder_hidden_states,
            **joint_attention_kwargs,
        )
    hidden_states = ctx.finish("attn", attn_output, residual=hidden_states, gate=gate_msa)

    if dual:
        attn_output2 = self.attn2(hidden_states=ctx.merge("attn2", norm_hidden_states2), **joint_attention_kwargs)
        hidden_states = ctx.finish("attn2", attn_output2, residual=hidden_states, gate=gate_msa2)

    norm_hidden_states = self.norm2(hidden_states)
    norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    ff_output = _feed_forward(self, self.ff, ctx.merge("mlp", norm_hidden_states))
    hidden_states = ctx.finish("mlp", ff_output, residual=hidden_states, gate=gate_mlp)

    if self.context_pre_only:
        encoder_hidden_states = None
    else:
        context_attn_output = c_gate_msa.unsqueeze(1) * context_attn_output
        encoder_hidden_states = encoder_hidden_states + context_attn_output
        norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
        norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context_ff_output = _feed_forward(self, self.ff_context, norm_encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output

    return encoder_hidden_states, hidden_states
