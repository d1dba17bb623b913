"""diffusers Wan 2.1 / 2.2 blocks (``WanTransformerBlock`` of ``WanTransformer3DModel`` and of
``WanVACETransformer3DModel``), mirroring diffusers' forward (0.42.1): T2V, I2V (image context
keys in ``attn2``, ``added_kv_proj_dim``), Wan 2.2 TI2V (per-token modulation) and the two
experts of Wan 2.2 A14B (each a ``WanTransformer3DModel``).

What merges. SSM steps: self-attention ``attn1`` and, with ``merge_cross_attention``, the query
side of the cross-attention ``attn2`` (prompt and image-context keys are never merged), and the
FFN; IDM steps: the FFN only. Protected steps and protected layers run diffusers' computation
bit for bit (the fp32 residual adds and ``.type_as`` included) and store the gated caches.

Token grid: the 5-D latent ``[B, C, F, H, W]`` with ``config.patch_size`` ``(p_t, p_h, p_w)``
gives ``(F / p_t, H / p_h, W / p_w)``; the patch embedding flattens frame-major, which is the
3-D grid's raster order. The default window is ``(1, 2, 2)``, inside each frame.

Rotary embeddings and plans: Wan passes ``(cos, sin)`` tables of shape ``[1, N, 1, D]`` that the
processor broadcasts over the batch and the heads. A merged row takes the entry of its
representative token (``plan.rep_token``). Unlike Flux's 2-D table, this one already has a batch
axis that ``WanAttnProcessor`` broadcasts, so the gathered table can differ per sample
(``[B, M, 1, D]``, one gather of cos and sin together): Wan blocks use per-sample plans, each
sample merged by its own similarity as DiT / SD3 are, at the cost of a ``2 * B * M * D`` gather.
(Wan pipelines run the conditional and unconditional passes as separate batch-1 calls, where
the two choices coincide.)

Per-token modulation (Wan 2.2 TI2V, ``temb`` ``[B, N, 6, C]``): the shift and scale are applied
at full length before merging, as in diffusers. The gates are ``[B, N, C]``, which the fused
unmerge epilogue (a ``[B, C]`` gate) cannot take, so a merged sub-layer is unmerged by a plain
gather, gated per token at full length, and blended with the cache explicitly
(``where(blend, mcw * gate * value + (1 - mcw) * cache, gate * value)``, the epilogue's rule).

Not supported (run or are left as stated): blocks whose ``attn1`` / ``attn2`` processor is not a
``WanAttnProcessor`` are not patched (a custom processor may depend on the sequence it sees);
the copies of this block in ``transformer_wan_animate`` and ``transformer_chronoedit`` are other
classes and are not patched; ``idm_score="attention"`` and ``prompt_reweight`` need joint
attention and are rejected by ``apply_sdtm``; a rotary table not of the form above raises.
A pipeline's second expert (``pipe.transformer_2``, Wan 2.2 A14B) is patched by ``apply_sdtm(pipe)``
too, with its own state (caches, ``li``) and the pipeline's step indices; its first step of a
generation is protected (exact, writing its first cache), whatever its index.
A bare transformer reads
a step's timestep from the first sample; per-token timesteps (TI2V, ``[B, N]``) by their largest
value, since a conditioning first frame holds 0 at every step.
"""
import torch

from .core import block_context
from .registry import latent_grid


def _attention_processor_class():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    return WanAttnProcessor


def supports(block) -> bool:
    """Blocks whose attention runs diffusers' ``WanAttnProcessor`` (any attention backend)."""
    processor = _attention_processor_class()
    return all(isinstance(getattr(getattr(block, name, None), "processor", None), processor)
               for name in ("attn1", "attn2"))


def _loader(cls):
    return forward, supports


BLOCKS = (("diffusers.models.transformers.transformer_wan", "WanTransformerBlock", _loader),)
MODELS = (
    ("diffusers.models.transformers.transformer_wan", "WanTransformer3DModel"),
    ("diffusers.models.transformers.transformer_wan_vace", "WanVACETransformer3DModel"),
)


def token_grid(state, model, arguments):
    """``(F / p_t, H / p_h, W / p_w)`` of the call's 5-D latent, or None when it is not one."""
    hidden_states = arguments.get("hidden_states")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
        return None
    return latent_grid(hidden_states, getattr(getattr(model, "config", None), "patch_size", None))


def gather_rotary(ctx, sublayer, rotary_emb):
    """``(cos, sin)`` for the merged rows: ``[B, M, 1, D]`` entries of each row's representative."""
    if rotary_emb is None or not ctx.merges(sublayer):
        return rotary_emb
    num_tokens = ctx.num_tokens
    if not (isinstance(rotary_emb, (tuple, list)) and len(rotary_emb) == 2
            and all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] == 1 and t.shape[1] == num_tokens
                    and t.shape[2] == 1 for t in rotary_emb)
            and rotary_emb[0].shape == rotary_emb[1].shape):
        import diffusers

        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                  for t in (rotary_emb if isinstance(rotary_emb, (tuple, list)) else [rotary_emb])]
        raise RuntimeError(
            f"SDTM expects Wan rotary embeddings as a (cos, sin) pair of [1, {num_tokens}, 1, D] tensors "
            f"(diffusers 0.42); this diffusers {diffusers.__version__} passes {shapes}, which is not supported")
    rep = ctx.plan.rep_token  # [B, M]
    table = ctx.state.stacked_rotary(rotary_emb)[:, 0, :, 0]  # [2, N, D], stacked once per call
    rows = table.index_select(1, rep.reshape(-1).to(table.device))  # cos and sin in one gather
    rows = rows.view(2, rep.shape[0], rep.shape[1], 1, table.shape[-1])
    return rows[0], rows[1]


def finish_gated(ctx, sublayer, y, residual, gate):
    """``residual + gate * value`` at full length. A ``[B, 1, C]`` gate goes through the fused
    unmerge epilogue (``ctx.finish``); for a per-token ``[B, N, C]`` gate (TI2V) a merged ``y`` is
    unmerged by a plain gather, gated per token, and blended with the cache by the epilogue's rule."""
    if gate.shape[1] == 1 or not ctx.merges(sublayer):
        return ctx.finish(sublayer, y, residual=residual, gate=gate)
    gated = ctx.unmerge(sublayer, y) * gate
    cache = ctx.state.get_cache(ctx.slot, sublayer, gated)
    if cache is not None:
        mcw = ctx.state.config.mcw
        gated = torch.where(ctx.plan.blend.unsqueeze(-1), mcw * gated + (1.0 - mcw) * cache, gated)
    return residual + gated


def _modulation(self, temb):
    """The six fp32 modulation tensors: ``[B, 1, C]`` (Wan 2.1 / A14B) or ``[B, N, C]`` (TI2V)."""
    if temb.ndim == 4:  # [B, N, 6, C]
        return [t.squeeze(2) for t in (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    return (self.scale_shift_table + temb.float()).chunk(6, dim=1)


def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
    state = getattr(self, "_sdtm_state", None)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = _modulation(self, temb)

    # 1. Self-attention
    norm_hidden_states = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
    ctx = block_context(state, getattr(self, "_sdtm_slot", None), norm_hidden_states)
    attn_output = self.attn1(ctx.merge("attn", norm_hidden_states), None, None,
                             gather_rotary(ctx, "attn", rotary_emb))
    hidden_states = finish_gated(ctx, "attn", attn_output, hidden_states.float(), gate_msa).type_as(hidden_states)

    # 2. Cross-attention (query side merged only with merge_cross_attention; no gate)
    norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
    if state is not None and state.config.merge_cross_attention:
        attn_output = self.attn2(ctx.merge("cross", norm_hidden_states), encoder_hidden_states, None, None)
        hidden_states = ctx.finish("cross", attn_output, residual=hidden_states)
    else:
        ctx.note("cross", norm_hidden_states.shape[1])
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None)
        hidden_states = hidden_states + attn_output

    # 3. Feed-forward
    norm_hidden_states = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(
        hidden_states
    )
    ff_output = self.ffn(ctx.merge("mlp", norm_hidden_states))
    return finish_gated(ctx, "mlp", ff_output.float(), hidden_states.float(), c_gate_msa).type_as(hidden_states)
