"""diffusers HunyuanVideo blocks (``transformer_hunyuan_video``, diffusers 0.42.1), mirroring
diffusers' forwards: ``HunyuanVideoTransformerBlock`` (double stream, joint attention),
``HunyuanVideoSingleTransformerBlock`` (joint ``[image, text]`` sequence, attention and MLP in
parallel with one output projection), and their image-to-video ``token_replace`` variants
``HunyuanVideoTokenReplaceTransformerBlock`` / ``HunyuanVideoTokenReplaceSingleTransformerBlock``.
The same two standard blocks also run in ``HunyuanVideoFramepackTransformer3DModel``.

What merges. SSM steps: the image rows of the joint attention (queries and keys; the prompt
is never merged, prompt tokens attend to the merged image rows) and the MLP; IDM steps: the
MLP only. Protected steps and protected layers run diffusers' computation bit for bit and
store the gated caches.

Token grid: the 5-D latent ``[B, C, F, H, W]`` with ``config.patch_size`` / ``patch_size_t``
gives ``(F / p_t, H / p, W / p)`` (the patch embedding flattens frame-major: the 3-D grid's
raster order); the default window is ``(1, 2, 2)``, inside each frame.

Tokens that never merge. The grid's tokens are the *last* ``T * H * W`` image tokens; image
tokens before them (the "prefix") are computed at full length, like the prompt:
Framepack's history latents (clean context prepended to the noisy latent: the prefix is the
image tokens beyond the call's grid), and in ``token_replace`` models the first latent frame
(the conditioning image, modulated and gated with the clean-timestep embedding, apart from the
other frames). The grid of a ``token_replace`` model is ``(T - 1, H, W)``; a one-frame call has
no grid and runs exactly. On merged steps the prefix rows (and the single blocks' prompt rows) pass
through the merge and the unmerge: copied around the merged rows, given ``residual + gate * y`` in
the unmerge's launch. The first frame's own gate then rewrites its rows (one launch per unmerge).

Rotary embeddings and plans: HunyuanVideo passes a ``(cos, sin)`` pair of ``[N, D]`` tables
over the image tokens only (no batch axis, no prompt rows). A merged row takes the entry of
its representative token (``plan.rep_token``), so, as for Flux, every block uses one plan
shared by the batch, built from the batch-mean metric.

Attention mask: the transformer passes a bool ``[B, 1, 1, N + T]`` key mask over ``[image,
text]`` (padded prompt tokens masked). On merged steps it is rebuilt for ``[prefix, merged
rows, text]``: each merged key takes its representative's entry, prefix and prompt keys keep
theirs (eager inference: one gather per block into a buffer made once per call, as for the
rotary table; compiled or with autograd: a join). Other mask shapes raise ``ValueError`` on
merged steps.

Single blocks split ``proj_out(cat[attn, mlp]) = W_a @ attn + W_m @ mlp + b`` as Flux's: SSM
runs both branches on merged rows and blends with the cache "parallel" (the whole gated output
``gate * proj_out(...)``), IDM runs attention at full length and only the MLP half on merged rows,
blended with the cache "mlp" (``gate * (W_m @ mlp)``).

Not supported: blocks whose attention processor is not ``HunyuanVideoAttnProcessor2_0`` are
left unpatched (a custom processor may depend on the sequence it sees); ``idm_score="attention"``
and ``prompt_reweight`` are rejected by ``apply_sdtm`` (SDTM's own joint attention covers SD3 /
Flux, not HunyuanVideo's masked, prompt-last layout). HunyuanVideo 1.5 has other block classes.
"""
import math

import torch
import torch.nn.functional as F

from .adapters import linear_weights
from .core import block_context, gather_entries
from .registry import latent_grid

_DIFFUSERS_MODULE = "diffusers.models.transformers.transformer_hunyuan_video"


def supports(block) -> bool:
    """Blocks whose attention runs diffusers' ``HunyuanVideoAttnProcessor2_0`` (any backend)."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    return isinstance(getattr(getattr(block, "attn", None), "processor", None), HunyuanVideoAttnProcessor2_0)


# -- per-call inputs for merged rows ------------------------------------------------------------
def grid_prefix(state, num_image: int) -> int:
    """Image tokens before the call's grid tokens (Framepack history), 0 when none or unknown."""
    grid = getattr(state, "grid", None)
    if grid is None:
        return 0
    return max(num_image - math.prod(grid), 0)  # fewer tokens than the grid: block_context runs exactly


def gather_rotary(ctx, sublayer, image_rotary_emb, prefix: int = 0):
    """The ``(cos, sin)`` tables for ``[prefix tokens, merged rows]``: the prefix entries, then
    the entry of each row's representative token."""
    if image_rotary_emb is None or not ctx.merges(sublayer):
        return image_rotary_emb
    expected = prefix + ctx.num_tokens
    if not (isinstance(image_rotary_emb, (tuple, list)) and len(image_rotary_emb) == 2
            and all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == expected
                    for t in image_rotary_emb)):
        import diffusers

        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                  for t in (image_rotary_emb if isinstance(image_rotary_emb, (tuple, list)) else [image_rotary_emb])]
        raise ValueError(f"image_rotary_emb: SDTM expects HunyuanVideo's (cos, sin) pair of [{expected}, D] tables "
                         f"over the image tokens (diffusers {diffusers.__version__}); got {shapes}")
    table = ctx.state.stacked_rotary(image_rotary_emb)  # [2, P + N, D]: cos and sin in one gather
    rep = ctx.plan.rep_token[0].to(table.device)  # shared plan: every row of rep_token is the same
    rows = gather_entries(table, 1, rep, prefix, expected)
    return rows[0], rows[1]


def merged_attention_mask(ctx, sublayer, attention_mask, prefix: int, text_len: int):
    """The key mask over ``[prefix, merged rows, text]`` from diffusers' mask over ``[image, text]``
    (``[B, 1, 1, P + N + T]``): merged keys take their representative's entry."""
    if attention_mask is None or not ctx.merges(sublayer):
        return attention_mask
    end = prefix + ctx.num_tokens
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
            and attention_mask.shape[-2] == 1 and attention_mask.shape[-1] == end + text_len):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask: SDTM merges image keys and needs a [B, 1, 1, {end + text_len}] key mask "
                         f"over the [image, text] tokens (as HunyuanVideoTransformer3DModel builds it); got {shape}")
    return gather_entries(attention_mask, 3, ctx.plan.rep_token[0].to(attention_mask.device), prefix, end)


# -- merge / finish with an unmerged prefix -----------------------------------------------------
def _finish(ctx, sublayer, y, residual, gate, prefix, prefix_gate=None, residual_first=True):
    """``residual + y * gate`` at full length; the prefix rows pass through ``ctx.finish`` (one launch
    when merging), or, with ``prefix_gate`` (the token-replace gate of the first frame), take it."""
    if prefix_gate is None:
        return ctx.finish(sublayer, y, residual=residual, gate=gate, prefix=prefix, residual_first=residual_first)
    if ctx.merges(sublayer):
        return _regate_prefix(ctx.finish(sublayer, y, residual=residual, gate=gate, prefix=prefix), residual, y,
                              prefix_gate, prefix)
    head = residual[:, :prefix] + y[:, :prefix] * prefix_gate.unsqueeze(1)  # diffusers' expression, bit for bit
    return torch.cat([head, ctx.finish(sublayer, y[:, prefix:], residual=residual[:, prefix:], gate=gate)], dim=1)


def _regate_prefix(out, residual, y, prefix_gate, prefix):
    """``out`` (a fresh merged-step output) with rows ``[0, prefix)`` set to ``residual + y * prefix_gate``
    (``addcmul``, rounded once): the unmerge gave every passthrough row the image gate. Eager inference
    writes them in place (one launch); under autograd or ``torch.compile`` a join replaces them."""
    if not prefix:
        return out
    gate = prefix_gate.unsqueeze(1)
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return torch.cat([torch.addcmul(residual[:, :prefix], y[:, :prefix], gate), out[:, prefix:]], dim=1)
    torch.addcmul(residual[:, :prefix], y[:, :prefix], gate, out=out[:, :prefix])
    return out


def _gated(x, gate, prefix_gate, prefix):
    """``gate * x`` over a joint sequence whose first ``prefix`` rows take ``prefix_gate``."""
    if prefix_gate is None:
        return gate.unsqueeze(1) * x
    return torch.cat([x[:, :prefix] * prefix_gate.unsqueeze(1), x[:, prefix:] * gate.unsqueeze(1)], dim=1)


def _attention(self, ctx, norm_hidden_states, norm_encoder_hidden_states, attention_mask, rotary, prefix):
    """The double block's joint attention, image rows merged on SSM steps."""
    text_len = norm_encoder_hidden_states.shape[1]
    return self.attn(
        hidden_states=ctx.merge("attn", norm_hidden_states, prefix=prefix),
        encoder_hidden_states=norm_encoder_hidden_states,
        attention_mask=merged_attention_mask(ctx, "attn", attention_mask, prefix, text_len),
        image_rotary_emb=gather_rotary(ctx, "attn", rotary, prefix),
    )


def _check_first_frame(num_tokens):
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise TypeError(f"num_tokens (the first frame's token count of a token_replace block) must be an int >= 0, "
                        f"got {num_tokens!r}")


# -- double-stream blocks -----------------------------------------------------------------------
def double_forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, freqs_cis=None,
                   *args, **kwargs):
    state = getattr(self, "_sdtm_state", None)
    norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
        encoder_hidden_states, emb=temb
    )
    prefix = grid_prefix(state, hidden_states.shape[1])
    metric = norm_hidden_states[:, prefix:] if prefix else norm_hidden_states
    ctx = block_context(state, getattr(self, "_sdtm_slot", None), metric, shared=True)
    attn_output, context_attn_output = _attention(self, ctx, norm_hidden_states, norm_encoder_hidden_states,
                                                  attention_mask, freqs_cis, prefix)
    # IDM steps (attention unmerged, the MLP merged): the gated value first, so that the sum is dense
    # whatever the stream's layout (the patch embedding's is channel-major, and the MLP's unmerge
    # needs a unit channel stride); the same bits as diffusers' order
    hidden_states = _finish(ctx, "attn", attn_output, hidden_states, gate_msa, prefix,
                            residual_first=not ctx.merges("mlp"))
    encoder_hidden_states = encoder_hidden_states + context_attn_output * c_gate_msa.unsqueeze(1)

    norm_hidden_states = self.norm2(hidden_states)
    norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
    norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]

    ff_output = self.ff(ctx.merge("mlp", norm_hidden_states, prefix=prefix))
    context_ff_output = self.ff_context(norm_encoder_hidden_states)
    hidden_states = _finish(ctx, "mlp", ff_output, hidden_states, gate_mlp, prefix)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
    return hidden_states, encoder_hidden_states


def token_replace_double_forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None,
                                 freqs_cis=None, token_replace_emb=None, num_tokens=None):
    """The first ``num_tokens`` image tokens (first frame) take the token-replace modulation and
    are never merged; the grid ``(T - 1, H, W)`` covers the others."""
    _check_first_frame(num_tokens)
    state = getattr(self, "_sdtm_state", None)
    (norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp,
     tr_gate_msa, tr_shift_mlp, tr_scale_mlp, tr_gate_mlp) = self.norm1(hidden_states, temb, token_replace_emb,
                                                                        num_tokens)
    norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
        encoder_hidden_states, emb=temb
    )
    first = num_tokens
    ctx = block_context(state, getattr(self, "_sdtm_slot", None), norm_hidden_states[:, first:], shared=True)
    attn_output, context_attn_output = _attention(self, ctx, norm_hidden_states, norm_encoder_hidden_states,
                                                  attention_mask, freqs_cis, first)
    hidden_states = _finish(ctx, "attn", attn_output, hidden_states, gate_msa, first, tr_gate_msa)
    encoder_hidden_states = encoder_hidden_states + context_attn_output * c_gate_msa.unsqueeze(1)

    norm_hidden_states = self.norm2(hidden_states)
    norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
    hidden_states_zero = norm_hidden_states[:, :first] * (1 + tr_scale_mlp[:, None]) + tr_shift_mlp[:, None]
    hidden_states_orig = norm_hidden_states[:, first:] * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    norm_hidden_states = torch.cat([hidden_states_zero, hidden_states_orig], dim=1)
    norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]

    ff_output = self.ff(ctx.merge("mlp", norm_hidden_states, prefix=first))
    context_ff_output = self.ff_context(norm_encoder_hidden_states)
    hidden_states = _finish(ctx, "mlp", ff_output, hidden_states, gate_mlp, first, tr_gate_mlp)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
    return hidden_states, encoder_hidden_states


# -- single-stream blocks -----------------------------------------------------------------------
def _single(self, hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb,
            token_replace_emb=None, num_tokens=None, token_replace=False):
    """Both single blocks on the joint ``[prefix, grid tokens, text]`` sequence (module doc)."""
    state = getattr(self, "_sdtm_state", None)
    end = hidden_states.shape[1]  # image tokens [0, end), text after
    hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    residual = hidden_states
    if token_replace:
        norm_hidden_states, gate, prefix_gate = self.norm(hidden_states, temb, token_replace_emb, num_tokens)
        prefix = num_tokens
    else:
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        prefix_gate, prefix = None, grid_prefix(state, end)
    text_len = residual.shape[1] - end
    image_norm = norm_hidden_states[:, prefix:end]
    ctx = block_context(state, getattr(self, "_sdtm_slot", None), image_norm, shared=True)
    gate_b = gate.unsqueeze(1)

    def regated(out, base, y):  # token replace: the first frame's rows take their own gate
        return out if prefix_gate is None else _regate_prefix(out, base, y, prefix_gate, prefix)

    if ctx.merges("attn"):  # SSM: both branches on [prefix, merged rows, text] (one merge launch)
        rows = ctx.merge("attn", norm_hidden_states, prefix=prefix, suffix=text_len)
        head = prefix + ctx.num_rows
        ctx.note("mlp", ctx.num_rows)
        mlp_hidden_states = self.act_mlp(self.proj_mlp(rows))
        attn_output, context_attn_output = self.attn(
            hidden_states=rows[:, :head], encoder_hidden_states=rows[:, head:],
            attention_mask=merged_attention_mask(ctx, "attn", attention_mask, prefix, text_len),
            image_rotary_emb=gather_rotary(ctx, "attn", image_rotary_emb, prefix))
        out = self.proj_out(torch.cat([torch.cat([attn_output, context_attn_output], dim=1), mlp_hidden_states], 2))
        hidden_states = regated(ctx.finish("attn", out, residual=residual, gate=gate, cache_names=("parallel",),
                                           prefix=prefix, suffix=text_len), residual, out)
        return hidden_states[:, :end], hidden_states[:, end:]
    if ctx.merges("mlp"):  # IDM: attention at full length, the MLP branch on merged rows
        attn_output, context_attn_output = self.attn(
            hidden_states=norm_hidden_states[:, :end], encoder_hidden_states=norm_hidden_states[:, end:],
            attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
        ctx.note("attn", ctx.num_tokens)
        weight, bias = linear_weights(self.proj_out)  # LoRA on proj_out included (PEFT, unfused)
        attn_dim = residual.shape[-1]
        attn_part = F.linear(torch.cat([attn_output, context_attn_output], dim=1), weight[:, :attn_dim], bias)
        rows = ctx.merge("mlp", norm_hidden_states, prefix=prefix, suffix=text_len)
        mlp_out = F.linear(self.act_mlp(self.proj_mlp(rows)), weight[:, attn_dim:])
        if prefix_gate is None:  # the unmerge adds gate * attn_part (the attention half) in its launch
            hidden_states = ctx.finish("mlp", mlp_out, residual=residual, gate=gate, prefix=prefix, suffix=text_len,
                                       addend=attn_part)
        else:  # token replace: the first frame's rows take their own gate on both halves
            with_attn = regated(torch.addcmul(residual, gate_b, attn_part), residual, attn_part)
            hidden_states = regated(ctx.finish("mlp", mlp_out, residual=with_attn, gate=gate, prefix=prefix,
                                               suffix=text_len), with_attn, mlp_out)
        return hidden_states[:, :end], hidden_states[:, end:]
    # exact (diffusers' computation); protected steps also split the grid rows for the cache
    ctx.note("attn", ctx.num_tokens)
    ctx.note("mlp", ctx.num_tokens)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
    attn_output, context_attn_output = self.attn(
        hidden_states=norm_hidden_states[:, :end], encoder_hidden_states=norm_hidden_states[:, end:],
        attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
    attn_output = torch.cat([attn_output, context_attn_output], dim=1)
    out = _gated(self.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2)), gate, prefix_gate, prefix)
    if ctx.mode == "protected":
        weight, _ = linear_weights(self.proj_out)
        mlp_part = gate_b * F.linear(mlp_hidden_states[:, prefix:end], weight[:, residual.shape[-1]:])
        state.set_cache(ctx.slot, "mlp", mlp_part)
        state.set_cache(ctx.slot, "parallel", out[:, prefix:end])
    hidden_states = out + residual
    return hidden_states[:, :end], hidden_states[:, end:]


def single_forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None,
                   *args, **kwargs):
    return _single(self, hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb)


def token_replace_single_forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None,
                                 image_rotary_emb=None, token_replace_emb=None, num_tokens=None):
    _check_first_frame(num_tokens)
    return _single(self, hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb,
                   token_replace_emb, num_tokens, token_replace=True)


# -- registration (registry.FAMILY_MODULES) ----------------------------------------------------------
def _double(cls):
    return double_forward, supports


def _single_loader(cls):
    return single_forward, supports


def _token_replace_double(cls):
    return token_replace_double_forward, supports


def _token_replace_single(cls):
    return token_replace_single_forward, supports


BLOCKS = (
    (_DIFFUSERS_MODULE, "HunyuanVideoTransformerBlock", _double),
    (_DIFFUSERS_MODULE, "HunyuanVideoSingleTransformerBlock", _single_loader),
    (_DIFFUSERS_MODULE, "HunyuanVideoTokenReplaceTransformerBlock", _token_replace_double),
    (_DIFFUSERS_MODULE, "HunyuanVideoTokenReplaceSingleTransformerBlock", _token_replace_single),
)
MODELS = (
    (_DIFFUSERS_MODULE, "HunyuanVideoTransformer3DModel"),
    ("diffusers.models.transformers.transformer_hunyuan_video_framepack", "HunyuanVideoFramepackTransformer3DModel"),
)


def token_grid(state, model, arguments):
    """``(F / p_t, H / p, W / p)`` of the call's noisy latent ``hidden_states`` ``[B, C, F, H, W]``;
    ``token_replace`` models: ``(F / p_t - 1, H / p, W / p)`` (the first frame never merges).
    None when it cannot be read or is empty."""
    config = getattr(model, "config", None)
    grid = latent_grid(arguments.get("hidden_states"), getattr(config, "patch_size", None),
                       getattr(config, "patch_size_t", None))
    if grid is None or len(grid) != 3:
        return None
    if getattr(config, "image_condition_type", None) == "token_replace":
        grid = (grid[0] - 1,) + grid[1:]
    return grid if math.prod(grid) > 0 else None
