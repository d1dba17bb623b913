"""diffusers Flux blocks: ``FluxTransformerBlock`` (double stream) and
``FluxSingleTransformerBlock``, mirroring diffusers' forward (0.30 to 0.42; before 0.35 the
single block took the joint text+image sequence and returned it, from 0.35 it takes and
returns the two streams; both signatures are handled).

Rotary embeddings: Flux passes one ``(cos, sin)`` table of shape ``[T + N, D]`` (text tokens
first) shared by the whole batch, and the attention processor broadcasts it over the batch.
A merged row takes the rotary entry of its representative token (``plan.rep_token``). As the
table cannot differ per sample, Flux blocks use ONE plan shared by the batch, built from the
batch-mean metric (``block_context(..., shared=True)``); ``li`` rows are then identical.
"""
import inspect

import torch
import torch.nn.functional as F

from .adapters import linear_weights
from .core import block_context, gather_entries
from .joint_attention import JointAttention, _check_kwargs, prompt_key_bias
from .sd3 import uses_own_attention


def supports(block) -> bool:
    return True


def gather_rotary(ctx, sublayer, image_rotary_emb, text_len):
    """Rotary table for ``[text, merged image rows]``: the text entries, then the entry of
    each row's representative token."""
    if image_rotary_emb is None or not ctx.merges(sublayer):
        return image_rotary_emb
    num_tokens = ctx.num_tokens
    if (isinstance(image_rotary_emb, (tuple, list)) and len(image_rotary_emb) == 2
            and all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == text_len + num_tokens
                    for t in image_rotary_emb)):
        rep = ctx.plan.rep_token[0]  # shared plan: every row of rep_token is the same (int32 indexes too)
        table = ctx.state.stacked_rotary(image_rotary_emb)  # [2, T + N, D]: cos and sin, stacked once per call
        rows = gather_entries(table, 1, rep.to(table.device), text_len, text_len + num_tokens)  # one launch
        return rows[0], rows[1]
    import diffusers

    raise RuntimeError(
        "SDTM expects Flux rotary embeddings as a (cos, sin) pair of [text + image tokens, D] tensors "
        f"(diffusers >= 0.30); this diffusers {diffusers.__version__} passes "
        f"{type(image_rotary_emb).__name__}, which is not supported"
    )


def double_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                   joint_attention_kwargs=None):
    state = getattr(self, "_sdtm_state", None)
    norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
        encoder_hidden_states, emb=temb
    )
    joint_attention_kwargs = joint_attention_kwargs or {}
    text_len = encoder_hidden_states.shape[1]
    if uses_own_attention(state):
        _check_kwargs(joint_attention_kwargs)
        backend = state.config.backend
        full = JointAttention(self.attn, "flux", norm_hidden_states, norm_encoder_hidden_states, image_rotary_emb,
                              backend=backend)
        ctx = block_context(state, self._sdtm_slot, norm_hidden_states, shared=True, received=full.received)
        rows = ctx.merge("attn", norm_hidden_states)
        joint = full if rows is norm_hidden_states else JointAttention(
            self.attn, "flux", rows, norm_encoder_hidden_states, gather_rotary(ctx, "attn", image_rotary_emb, text_len),
            backend=backend)
        bias = prompt_key_bias(ctx, text_len, rows.shape[1], rows.shape[0], False, rows.device, rows.dtype)
        attention_outputs = joint.output(bias)
    else:
        ctx = block_context(state, self._sdtm_slot, norm_hidden_states, shared=True)
        attention_outputs = self.attn(
            hidden_states=ctx.merge("attn", norm_hidden_states),
            encoder_hidden_states=norm_encoder_hidden_states,
            image_rotary_emb=gather_rotary(ctx, "attn", image_rotary_emb, text_len),
            **joint_attention_kwargs,
        )
    if len(attention_outputs) == 2:
        attn_output, context_attn_output = attention_outputs
        ip_attn_output = None
    else:
        attn_output, context_attn_output, ip_attn_output = attention_outputs

    hidden_states = ctx.finish("attn", attn_output, residual=hidden_states, gate=gate_msa)

    norm_hidden_states = self.norm2(hidden_states)
    norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    ff_output = self.ff(ctx.merge("mlp", norm_hidden_states))
    hidden_states = ctx.finish("mlp", ff_output, residual=hidden_states, gate=gate_mlp)
    if ip_attn_output is not None:
        hidden_states = hidden_states + ctx.unmerge("attn", ip_attn_output)

    context_attn_output = c_gate_msa.unsqueeze(1) * context_attn_output
    encoder_hidden_states = encoder_hidden_states + context_attn_output
    norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
    norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    context_ff_output = self.ff_context(norm_encoder_hidden_states)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _single(self, hidden_states, text_len, temb, image_rotary_emb, joint_attention_kwargs):
    """The single block on the joint ``[text, image]`` sequence; returns its joint output (merged
    steps: the text rows pass through the merge and the unmerge, no join launch).

    The attention and MLP branches share one input and one output projection
    ``proj_out(cat[attn, mlp]) = W_a @ attn + W_m @ mlp + b``. Caches (image tokens): "parallel"
    holds the gated output ``gate * proj_out(...)``, "mlp" its MLP half ``gate * (W_m @ mlp)``. SSM
    steps run both branches on merged rows and blend with "parallel"; IDM steps run attention at
    full length and only the MLP branch (its half of ``proj_out`` included) on merged rows, blended
    with "mlp".
    """
    state = getattr(self, "_sdtm_state", None)
    joint_attention_kwargs = joint_attention_kwargs or {}
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    image_norm = norm_hidden_states[:, text_len:]
    own = uses_own_attention(state) and text_len > 0
    full = None
    if own:
        _check_kwargs(joint_attention_kwargs)
        full = JointAttention(self.attn, "flux", norm_hidden_states, None, image_rotary_emb, text_len=text_len,
                              backend=state.config.backend)
    ctx = block_context(state, self._sdtm_slot, image_norm, shared=True,
                        received=None if full is None else full.received)
    weight, bias = linear_weights(self.proj_out)  # LoRA on proj_out included (PEFT, unfused)
    attn_dim = weight.shape[1] - self.mlp_hidden_dim
    gate_b = gate.unsqueeze(1)

    if ctx.merges("attn"):  # SSM: both branches on [text, merged image rows]
        rows = ctx.merge("attn", norm_hidden_states, prefix=text_len)  # the text rows pass through
        ctx.note("mlp", ctx.num_rows)
        mlp_hidden_states = self.act_mlp(self.proj_mlp(rows))
        rotary = gather_rotary(ctx, "attn", image_rotary_emb, text_len)
        if own:
            key_bias = prompt_key_bias(ctx, text_len, ctx.num_rows, rows.shape[0], False, rows.device, rows.dtype)
            attn_output = JointAttention(self.attn, "flux", rows, None, rotary, text_len=text_len,
                                         backend=state.config.backend).output(key_bias)
        else:
            attn_output = self.attn(hidden_states=rows, image_rotary_emb=rotary, **joint_attention_kwargs)
        out = self.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))
        hidden_states = ctx.finish("attn", out, residual=residual, gate=gate, cache_names=("parallel",),
                                   prefix=text_len)  # text rows: residual + gate * out, in the same launch
        return _clip_fp16(hidden_states)
    elif ctx.merges("mlp"):  # IDM: attention at full length, MLP branch on [text, merged image rows]
        if own:
            key_bias = prompt_key_bias(ctx, text_len, ctx.num_tokens, norm_hidden_states.shape[0], False,
                                   norm_hidden_states.device, norm_hidden_states.dtype)
            attn_output = full.output(key_bias)
        else:
            attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                                    **joint_attention_kwargs)
        ctx.note("attn", ctx.num_tokens)
        w_attn, w_mlp = weight[:, :attn_dim], weight[:, attn_dim:]
        # the MLP half on [text, merged image rows]; the unmerge adds gate * (W_a attn + b), the
        # attention half for every token, in its launch
        attn_part = F.linear(attn_output, w_attn, bias)
        rows = ctx.merge("mlp", norm_hidden_states, prefix=text_len)
        mlp_out = F.linear(self.act_mlp(self.proj_mlp(rows)), w_mlp)
        return _clip_fp16(ctx.finish("mlp", mlp_out, residual=residual, gate=gate, prefix=text_len,
                                     addend=attn_part))
    else:  # exact (diffusers' computation); protected steps also split the image output for the cache
        ctx.note("attn", ctx.num_tokens)
        ctx.note("mlp", ctx.num_tokens)
        mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
        key_bias = None
        if own:  # an identity plan on a merging step still takes the prompt weight
            key_bias = prompt_key_bias(ctx, text_len, ctx.num_tokens, norm_hidden_states.shape[0], False,
                                   norm_hidden_states.device, norm_hidden_states.dtype)
        if key_bias is not None:
            attn_output = full.output(key_bias)
        else:
            attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                                    **joint_attention_kwargs)
        out = gate_b * self.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))
        if ctx.mode == "protected":
            mlp_part = gate_b * F.linear(mlp_hidden_states[:, text_len:], weight[:, attn_dim:])
            state.set_cache(ctx.slot, "mlp", mlp_part)
            state.set_cache(ctx.slot, "parallel", out[:, text_len:])
    return _clip_fp16(residual + out)


def _clip_fp16(x):
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def single_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                   joint_attention_kwargs=None):
    """diffusers >= 0.35 signature: two streams in, two streams out."""
    text_len = encoder_hidden_states.shape[1]
    joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    out = _single(self, joint, text_len, temb, image_rotary_emb, joint_attention_kwargs)
    return out[:, :text_len], out[:, text_len:]


def single_forward_joint(self, hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
    """diffusers < 0.35 signature: the joint ``[text, image]`` sequence in and out; the text
    length comes from the transformer call (``state.text_len``)."""
    state = getattr(self, "_sdtm_state", None)
    text_len = getattr(state, "text_len", None)
    if text_len is None:  # no step context: nothing is merged, any split is fine
        text_len = 0
    return _single(self, hidden_states, text_len, temb, image_rotary_emb, joint_attention_kwargs)


def single_forward_for(cls):
    params = inspect.signature(cls.forward).parameters
    return single_forward if "encoder_hidden_states" in params else single_forward_joint
