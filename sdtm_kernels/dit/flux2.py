"""diffusers Flux.2 blocks: ``Flux2TransformerBlock`` (double stream) and
``Flux2SingleTransformerBlock`` (parallel block: one fused ``to_qkv_mlp_proj`` input
projection, one fused ``to_out`` output projection, a SwiGLU MLP), mirroring diffusers' forward
(written against diffusers 0.42, KV-cache processors included). Modulation comes from the transformer (``temb_mod_img`` / ``temb_mod_txt`` /
``temb_mod``); rotary embeddings are one ``(cos, sin)`` table of ``[text + image tokens, D]``
from the 4-axis ``(t, h, w, l)`` ids, shared by the batch, so one plan is shared by the batch
(batch-mean metric) and a merged row takes the entry of its representative token.

Merged per stage (image tokens only; text tokens never merge):

* double block: SSM merges the image rows of the joint attention and the MLP, IDM the MLP.
* single block: SSM runs attention and MLP (the fused projections included) on
  ``[text, merged image rows]``; IDM runs attention at full length and the MLP half of both fused
  projections on the merged rows (the output projection split as in ``flux.py``; caches "parallel", the
  whole gated output, and "mlp", its MLP half).

The rows around the generated tokens (text, references) pass through the merge and the unmerge
(``prefix`` / ``suffix``): copied around the merged rows, and given ``residual + gate * y`` in the
unmerge's launch.

Image tokens: the generated image is the leading run of tokens with the call's lowest ``t`` id
(Flux.2: 0), laid out as one raster grid (``token_grid``); the image tokens after it (Flux.2 edit /
multi-reference tokens, ``t = 10, 20, ...``) pass through every sub-layer exactly, so an edit
call merges the generated tokens only; references in front of it (outside an extract call) make
the call run exactly. ``kv_cache_mode="extract"`` (Flux.2 Klein KV:
reference tokens prepended) reads the generated tokens after the ``num_ref_tokens`` reference
tokens; ``"cached"`` calls merge as usual (the cached reference keys join the merged rows).

Runs exactly (the stock computation, recorded as mode "exact") when merging cannot be right:
per-token modulation (only the extract call, whose reference tokens get their own modulation;
its protected steps still store the caches), an ``attention_mask`` in ``joint_attention_kwargs``
(it has the full sequence's length), a single block whose attention processor is not one of
diffusers' two (SDTM splits the fused projections itself, so it must know the processor; all
steps), ids that are not one leading raster grid (``token_grid`` gives None). Not supported:
``idm_score="attention"`` and ``prompt_reweight`` (``apply_sdtm`` raises ``ValueError``).
"""
import math
import numbers

import torch
import torch.nn.functional as F

from .adapters import linear_weights
from .core import BlockContext, block_context, gather_entries

try:
    from diffusers.models.transformers import transformer_flux2 as _flux2
except ImportError:  # diffusers without Flux.2: nothing to patch
    _flux2 = None

MERGING = ("ssm", "idm")
ALL_STEPS = ("ssm", "idm", "protected")


def supports(block) -> bool:
    return True


def _double(cls):
    return double_forward, supports


def _single(cls):
    return single_forward, supports


BLOCKS = (
    ("diffusers.models.transformers.transformer_flux2", "Flux2TransformerBlock", _double),
    ("diffusers.models.transformers.transformer_flux2", "Flux2SingleTransformerBlock", _single),
)
MODELS = (("diffusers.models.transformers.transformer_flux2", "Flux2Transformer2DModel"),)


# -- the token grid of a call ------------------------------------------------------------------
def reference_prefix(kwargs) -> int:
    """Reference tokens in front of the generated ones (``kv_cache_mode="extract"``: ``[ref, img]``)."""
    if not kwargs or kwargs.get("kv_cache_mode") != "extract":
        return 0
    count = kwargs.get("num_ref_tokens", 0) or 0
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
        raise ValueError(f"num_ref_tokens must be a non-negative int, got {count!r}")
    return int(count)


def token_grid(state, model, arguments):
    """``(H, W)`` of the generated image tokens of one ``Flux2Transformer2DModel`` call, or None.

    The generated tokens are the leading run of ``img_ids`` rows sharing the first row's ``t``
    (after the ``num_ref_tokens`` reference tokens of an extract call); that ``t`` must be the
    lowest of the call (Flux.2 gives the generated image ``t = 0``, references ``10, 20, ...``) and
    the run one raster grid (row-major ``h``, ``w``, a constant ``l``). One host read per new
    ``img_ids`` tensor (cached in ``state.grid_cache``)."""
    img_ids, hidden = arguments.get("img_ids"), arguments.get("hidden_states")
    if not isinstance(img_ids, torch.Tensor) or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        return None
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    start = reference_prefix(arguments)
    if ids.dim() != 2 or ids.shape[1] < 3 or ids.shape[0] != hidden.shape[1] or start >= ids.shape[0]:
        return None
    key = ("flux2", ids.data_ptr(), tuple(ids.shape), ids.device, getattr(ids, "_version", 0), start)
    cached = state.grid_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    ids = ids.long()
    first_t = ids[start, 0]
    generated = ids[start:, 0] == first_t
    count = int(generated.int().cumprod(0).sum())  # the leading run (host read)
    rows, cols = ids[start:start + count, 1], ids[start:start + count, 2]
    rows, cols = rows - rows.min(), cols - cols.min()
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    raster = height * width == count and torch.equal(rows * width + cols, torch.arange(count, device=ids.device))
    flat = ids.shape[1] < 4 or bool((ids[start:start + count, 3] == ids[start, 3]).all())
    lowest = bool(first_t == ids[:, 0].min())  # Flux.2: t = 0 generated, 10, 20, ... references
    grid = (height, width) if raster and flat and lowest else None
    state.grid_cache = (key, grid)
    return grid


# -- where the generated tokens sit in a stream ------------------------------------------------------
class ImageSpan:
    """The generated image tokens ``[lo, hi)`` of a ``[B, length, C]`` stream; the tokens around
    them (text, reference images) run every sub-layer exactly. ``fits``: the call's grid fits."""

    def __init__(self, state, length: int, lo):
        grid = state.grid if state is not None and state.active and lo is not None else None
        size = math.prod(grid) if grid is not None else 0
        self.fits = grid is not None and lo + size <= length
        self.lo, self.hi, self.length = (lo, lo + size, length) if self.fits else (0, length, length)

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def context(self, state, block, metric, force_exact=()):
        """The block's ``BlockContext`` from the generated tokens of ``metric``; the modes in
        ``force_exact`` (every mode but "layer" when the grid does not fit) run exactly."""
        slot = getattr(block, "_sdtm_slot", None)
        if not self.fits:
            force_exact = ALL_STEPS
        if state is not None and state.active and slot is not None and slot.mode in force_exact:
            return BlockContext(state, slot, "exact", num_tokens=self.size)
        return block_context(state, slot, metric[:, self.lo:self.hi], shared=True)

    @property
    def around(self):
        """``(prefix, suffix)``: the rows before and after the generated tokens."""
        return self.lo, self.length - self.hi

    def merge(self, ctx, sublayer, x):
        """``x`` with its generated tokens merged when ``sublayer`` merges now (the rows around
        them are copied in the merge's launch)."""
        prefix, suffix = self.around
        return ctx.merge(sublayer, x, prefix=prefix, suffix=suffix)

    def finish(self, ctx, sublayer, y, residual, gate, cache_names=None, addend=None):
        """``residual + gate * y`` at full length: ``ctx.finish`` unmerges the generated rows (cache
        blend; protected steps store their cache) and gives the rows around them ``residual + gate * y``
        in the same launch. Merging runs with ``[B, 1, C]`` gates only (``_exact_modes``); per-token gates
        reach only the stock expression of unmerged steps. ``addend``: ``+ gate * addend`` (``ctx.finish``)."""
        prefix, suffix = self.around
        return ctx.finish(sublayer, y, residual=residual, gate=gate, cache_names=cache_names, prefix=prefix,
                          suffix=suffix, addend=addend)

    def rotary(self, ctx, sublayer, rotary, offset: int):
        """The ``(cos, sin)`` table of the rows ``sublayer`` runs on; the stream starts at ``offset``
        of the table (the double block's image stream follows the text)."""
        if rotary is None or not ctx.merges(sublayer):
            return rotary
        lo, hi = offset + self.lo, offset + self.hi
        if not (isinstance(rotary, (tuple, list)) and len(rotary) == 2 and all(
                isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == offset + self.length for t in rotary)):
            raise RuntimeError("SDTM expects Flux.2 rotary embeddings as a (cos, sin) pair of [text + image tokens, D] "
                               f"tensors; got {type(rotary).__name__}, which is not supported")
        rep = ctx.plan.rep_token[0]  # one plan shared by the batch
        table = ctx.state.stacked_rotary(rotary)  # [2, S, D], stacked once per call
        rows = gather_entries(table, 1, rep.to(table.device), lo, hi)  # [text, merged rows, references]
        return rows[0], rows[1]


def rows_of(modulation, lo: int, hi: int):
    """Rows ``lo:hi`` of a per-token modulation ``[B, S, C]``; a broadcast ``[B, 1, C]`` one as is."""
    return modulation if modulation.shape[1] == 1 else modulation[:, lo:hi]


def _exact_modes(modulation, kwargs):
    """Modes that must run exactly: merging with per-token modulation or an attention mask."""
    per_token = modulation.shape[1] != 1
    return MERGING if per_token or kwargs.get("attention_mask") is not None else ()


# -- double stream -----------------------------------------------------------------------------
def double_forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt, image_rotary_emb=None,
                   joint_attention_kwargs=None):
    state = getattr(self, "_sdtm_state", None)
    joint_attention_kwargs = joint_attention_kwargs or {}
    split = _flux2.Flux2Modulation.split
    (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = split(temb_mod_img, 2)
    (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = split(temb_mod_txt, 2)

    norm_hidden_states = self.norm1(hidden_states)
    norm_hidden_states = (1 + scale_msa) * norm_hidden_states + shift_msa
    norm_encoder_hidden_states = self.norm1_context(encoder_hidden_states)
    norm_encoder_hidden_states = (1 + c_scale_msa) * norm_encoder_hidden_states + c_shift_msa

    span = ImageSpan(state, hidden_states.shape[1], reference_prefix(joint_attention_kwargs))
    ctx = span.context(state, self, norm_hidden_states, _exact_modes(gate_msa, joint_attention_kwargs))
    text_len = encoder_hidden_states.shape[1]
    attn_output, context_attn_output = self.attn(
        hidden_states=span.merge(ctx, "attn", norm_hidden_states),
        encoder_hidden_states=norm_encoder_hidden_states,
        image_rotary_emb=span.rotary(ctx, "attn", image_rotary_emb, text_len),
        **joint_attention_kwargs,
    )
    hidden_states = span.finish(ctx, "attn", attn_output, hidden_states, gate_msa)

    norm_hidden_states = self.norm2(hidden_states)
    norm_hidden_states = norm_hidden_states * (1 + scale_mlp) + shift_mlp
    ff_output = self.ff(span.merge(ctx, "mlp", norm_hidden_states))
    hidden_states = span.finish(ctx, "mlp", ff_output, hidden_states, gate_mlp)

    context_attn_output = c_gate_msa * context_attn_output
    encoder_hidden_states = encoder_hidden_states + context_attn_output
    norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
    norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp) + c_shift_mlp
    context_ff_output = self.ff_context(norm_encoder_hidden_states)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp * context_ff_output
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


# -- single stream (parallel block) ------------------------------------------------------------------
def processor_kind(attn):
    """"stock" / "kv" for diffusers' two parallel-attention processors, else None."""
    processor = type(attn.processor)
    if processor is _flux2.Flux2ParallelSelfAttnProcessor:
        return "stock"
    if processor is getattr(_flux2, "Flux2KVParallelSelfAttnProcessor", None) \
            and hasattr(_flux2, "_flux2_kv_causal_attention"):
        return "kv"
    return None


def qkv_width(attn, out_features: int) -> int:
    """Columns of the fused input projection that are q, k, v (the processor's split rule)."""
    qkv_dim = 3 * attn.inner_dim
    return out_features * qkv_dim // (qkv_dim + attn.mlp_hidden_dim * attn.mlp_mult_factor)


def parallel_attention(attn, kind, qkv, rotary, kwargs):
    """The attention part of ``Flux2ParallelSelfAttnProcessor`` / ``Flux2KVParallelSelfAttnProcessor``
    on the ``q, k, v`` columns ``qkv [B, S, 3 inner]``: ``[B, S, inner]``, the processor's operations."""
    processor = attn.processor
    query, key, value = qkv.chunk(3, dim=-1)
    query = query.unflatten(-1, (-1, attn.head_dim))
    key = key.unflatten(-1, (-1, attn.head_dim))
    value = value.unflatten(-1, (-1, attn.head_dim))
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    if rotary is not None:
        query = _flux2.apply_rotary_emb(query, rotary, sequence_dim=1)
        key = _flux2.apply_rotary_emb(key, rotary, sequence_dim=1)
    mode = kwargs.get("kv_cache_mode") if kind == "kv" else None
    kv_cache = kwargs.get("kv_cache")
    num_txt, num_ref = kwargs.get("num_txt_tokens", 0), kwargs.get("num_ref_tokens", 0)
    if mode == "extract" and kv_cache is not None and num_ref > 0:
        kv_cache.store(key[:, num_txt:num_txt + num_ref].clone(), value[:, num_txt:num_txt + num_ref].clone())
    if mode == "extract" and num_ref > 0:
        out = _flux2._flux2_kv_causal_attention(query, key, value, num_txt, num_ref,
                                                backend=processor._attention_backend)
    elif mode == "cached" and kv_cache is not None:
        out = _flux2._flux2_kv_causal_attention(query, key, value, num_txt, 0, kv_cache=kv_cache,
                                                backend=processor._attention_backend)
    else:
        out = _flux2.dispatch_attention_fn(query, key, value, attn_mask=kwargs.get("attention_mask"),
                                           backend=processor._attention_backend,
                                           parallel_config=processor._parallel_config)
    return out.flatten(2, 3).to(query.dtype)


def single_forward(self, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb=None,
                   joint_attention_kwargs=None, split_hidden_states=False, text_seq_len=None):
    """Caches (generated tokens, ``to_out = [W_a | W_m]``): "parallel" holds the gated output
    ``gate * (W_a @ attn + W_m @ mlp + b)``, blended by SSM steps (both branches merged); "mlp" its
    MLP half ``gate * (W_m @ mlp)``, blended by IDM steps (only the MLP branch merged)."""
    state = getattr(self, "_sdtm_state", None)
    if encoder_hidden_states is not None:
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    mod_shift, mod_scale, mod_gate = _flux2.Flux2Modulation.split(temb_mod, 1)[0]
    norm_hidden_states = self.norm(hidden_states)
    norm_hidden_states = (1 + mod_scale) * norm_hidden_states + mod_shift
    kwargs = joint_attention_kwargs or {}
    attn = self.attn
    kind = processor_kind(attn)

    text_len = text_seq_len if text_seq_len is not None else getattr(state, "text_len", None)
    span = ImageSpan(state, hidden_states.shape[1], None if text_len is None else text_len + reference_prefix(kwargs))
    ctx = span.context(state, self, norm_hidden_states, ALL_STEPS if kind is None else _exact_modes(mod_gate, kwargs))
    residual = hidden_states
    if kind is None:  # an unknown processor: diffusers' own call, never merged
        ctx.note("attn", span.size)
        ctx.note("mlp", span.size)
        hidden_states = residual + mod_gate * attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                                                   **kwargs)
    elif ctx.merges("mlp") and not ctx.merges("attn"):  # IDM: attention at full length, MLP on merged rows
        weight_in, bias_in = linear_weights(attn.to_qkv_mlp_proj)
        weight_out, bias_out = linear_weights(attn.to_out)
        qkv_cols, attn_cols = qkv_width(attn, weight_in.shape[0]), weight_out.shape[1] - attn.mlp_hidden_dim
        qkv = F.linear(norm_hidden_states, weight_in[:qkv_cols], None if bias_in is None else bias_in[:qkv_cols])
        attn_output = parallel_attention(attn, kind, qkv, image_rotary_emb, kwargs)
        ctx.note("attn", span.size)
        mlp_in = F.linear(span.merge(ctx, "mlp", norm_hidden_states), weight_in[qkv_cols:],
                          None if bias_in is None else bias_in[qkv_cols:])
        attn_part = F.linear(attn_output, weight_out[:, :attn_cols], bias_out)  # gated and added by the unmerge
        mlp_out = F.linear(attn.mlp_act_fn(mlp_in), weight_out[:, attn_cols:])
        hidden_states = span.finish(ctx, "mlp", mlp_out, residual, mod_gate, addend=attn_part)
    else:  # exact, protected or SSM (both branches on the merged rows): the processor's computation
        rows = span.merge(ctx, "attn", norm_hidden_states)
        ctx.note("mlp", ctx.num_rows if ctx.merges("attn") else span.size)
        projected = attn.to_qkv_mlp_proj(rows)
        qkv_cols = qkv_width(attn, projected.shape[-1])
        qkv, mlp_hidden_states = torch.split(projected, [qkv_cols, projected.shape[-1] - qkv_cols], dim=-1)
        attn_output = parallel_attention(attn, kind, qkv, span.rotary(ctx, "attn", image_rotary_emb, 0), kwargs)
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        attn_output = attn.to_out(torch.cat([attn_output, mlp_hidden_states], dim=-1))
        if ctx.merges("attn"):
            hidden_states = span.finish(ctx, "attn", attn_output, residual, mod_gate, cache_names=("parallel",))
        else:
            gated = mod_gate * attn_output
            if ctx.mode == "protected":
                weight_out, _ = linear_weights(attn.to_out)
                gate = rows_of(mod_gate, span.lo, span.hi)
                mlp_part = gate * F.linear(mlp_hidden_states[:, span.lo:span.hi],
                                           weight_out[:, weight_out.shape[1] - attn.mlp_hidden_dim:])
                state.set_cache(ctx.slot, "mlp", mlp_part)
                state.set_cache(ctx.slot, "parallel", gated[:, span.lo:span.hi])
            hidden_states = residual + gated
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    if split_hidden_states:
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return hidden_states
