"""diffusers Qwen-Image blocks (``QwenImageTransformerBlock`` of ``QwenImageTransformer2DModel``:
Qwen-Image, Qwen-Image-Edit / Edit-Plus / Edit-2511, Qwen-Image-Layered), mirroring diffusers'
forward (0.42.1, ``zero_cond_t`` and ``modulate_index`` included; the older block without them is
handled, only 0.42.1 is tested). Double stream: image and text keep their own modulation, norms
and MLPs and meet in one joint attention over ``[text, image]`` (``QwenDoubleStreamAttnProcessor2_0``).

What merges. Only the tokens of the *generated image*, the first entry of the call's
``img_shapes`` (Qwen-Image-Layered: the generated layers, see the grid): SSM steps run the joint
attention on ``[text, merged rows, reference rows]`` and the image MLP on ``[merged rows,
reference rows]``; IDM steps run attention at full length and only the image MLP on merged rows.
The text stream is never merged (its tokens attend to the merged image rows). The tokens of
further ``img_shapes`` entries (the reference images of the edit models, Layered's condition
image; diffusers appends them after the generated image) keep their full length and their exact
modulation. Protected steps, protected layers and calls without a grid run diffusers'
computation bit for bit; protected steps cache the gated outputs of the generated image's tokens.

Token grid: from ``img_shapes`` (per sample ``[(frames, h, w), ...]`` in tokens), never assumed:
``(h, w)`` of the first entry, ``(frames, h, w)`` when it has several frames. Qwen-Image-Layered
(``use_layer3d_rope`` without ``zero_cond_t``) generates several layers, the entries before the
last (the condition image), each at its own rotary frame index: the leading entries equal to the
first are the frames of one ``(layers, h, w)`` grid (windows inside each layer). A call runs exactly,
with a warning, when ``img_shapes`` is missing or malformed, when the samples' shapes differ
(diffusers' rotary embedding then lays out every sample as the first, so the token layout of the
others is unknown) or when ``hidden_states`` does not hold the tokens the shapes describe.

Rotary embeddings and plans: ``(img_freqs, txt_freqs)`` are complex ``[tokens, D / 2]`` tables
that the processor broadcasts over batch and heads; a per-sample table would not broadcast
(``apply_rotary_emb_qwen`` unsqueezes the head axis in front of the tokens). So a merged row takes
the frequency of its representative token (``plan.rep_token``, one ``index_select``) and every
Qwen block uses ONE plan shared by the batch, built from the batch-mean metric (as Flux).

``modulate_index`` (``zero_cond_t``, Edit-2511): the modulation has two halves (the timestep and
timestep 0) and each image token picks one by its index. The transformer gives the generated
image's tokens index 0, so its merged rows take the first half's gate ``[B, 1, C]`` (the fused
unmerge epilogue); reference rows keep diffusers' per-token shift, scale and gate.

Not supported: blocks with another attention processor are not patched (a custom processor may
depend on the image sequence it sees). ``idm_score="attention"`` and ``prompt_reweight`` need
SDTM's own joint attention (written for SD3 / Flux): ``apply_sdtm`` raises ``ValueError``. A
rotary format other than the pair above raises ``RuntimeError`` on a merging step.
"""
import math
import operator

import torch

from .core import block_context

_QWEN = "diffusers.models.transformers.transformer_qwenimage"


def supports(block) -> bool:
    """Blocks whose joint attention runs diffusers' ``QwenDoubleStreamAttnProcessor2_0`` (any
    attention backend): another processor may depend on the image sequence it sees."""
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    return isinstance(getattr(getattr(block, "attn", None), "processor", None), QwenDoubleStreamAttnProcessor2_0)


def _loader(cls):
    return forward, supports


BLOCKS = ((_QWEN, "QwenImageTransformerBlock", _loader),)
MODELS = ((_QWEN, "QwenImageTransformer2DModel"),)


# -- the token grid of a call --------------------------------------------------------------------
def image_shapes(img_shapes):
    """``([(frames, h, w), ...], None)``: the image entries in token order as diffusers' rotary
    embedding lays them out (the first sample's list, used for the whole batch), or ``(None, why)``."""
    if img_shapes is None:
        return None, "the call has no img_shapes"
    samples = img_shapes if isinstance(img_shapes, list) else [img_shapes]
    if not samples:
        return None, "img_shapes is empty"
    layouts = []
    for sample in samples:
        entries = sample if isinstance(sample, list) else [sample]
        layout = []
        for entry in entries:
            sizes = ()
            if isinstance(entry, (tuple, list)):
                try:
                    sizes = tuple(operator.index(v) for v in entry)  # ints only (8.5 is no size)
                except TypeError:
                    pass
            if len(sizes) != 3 or min(sizes) < 1:
                return None, f"img_shapes entry {entry!r} is not a (frames, height, width) triple of positive ints"
            layout.append(sizes)
        if not layout:
            return None, "img_shapes holds a sample without image shapes"
        layouts.append(layout)
    if any(layout != layouts[0] for layout in layouts[1:]):
        return None, (f"the samples' img_shapes differ ({layouts[0]} and others): diffusers lays out every "
                      "sample's rotary embedding as the first, so the token layout of the others is unknown")
    return layouts[0], None


def token_grid(state, model, arguments):
    """``(h, w)`` (or ``(frames, h, w)``) of the generated image, the first ``img_shapes`` entry,
    when ``hidden_states`` holds exactly the tokens of the entries; else None (with a warning)."""
    shapes, why = image_shapes(arguments.get("img_shapes"))
    if shapes is not None:
        hidden_states = arguments.get("hidden_states")
        total = sum(math.prod(s) for s in shapes)
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            shapes, why = None, "hidden_states is not a packed [B, tokens, C] tensor"
        elif hidden_states.shape[1] != total:
            shapes, why = None, (f"hidden_states holds {hidden_states.shape[1]} tokens but img_shapes "
                                 f"{shapes} describe {total}")
    if shapes is None:
        state._warn_once("qwen_image_grid", f"SDTM: {why}; such Qwen-Image calls run without merging")
        return None
    frames, height, width = shapes[0]
    config = getattr(model, "config", None)
    if frames == 1 and getattr(config, "use_layer3d_rope", False) and not getattr(config, "zero_cond_t", False):
        # Qwen-Image-Layered: the entries before the last (the condition image) are generated layers, at rotary
        # frame index = entry index; equal ones in a row are the frames of one (layers, h, w) grid
        layers = 1
        while layers < len(shapes) - 1 and shapes[layers] == shapes[0]:
            layers += 1
        frames = layers
    return (height, width) if frames == 1 else (frames, height, width)


# -- the block -------------------------------------------------------------------------------------
def _target_len(state, image_len: int) -> int:
    """Tokens of the generated image (the grid's), the first of the ``image_len`` image tokens."""
    if state is None or not state.active or state.grid is None:
        return image_len
    return min(math.prod(state.grid), image_len)


def _modulate(block, x, mod_params, modulate_index):
    if modulate_index is None:  # diffusers before modulate_index: _modulate(x, mod_params)
        return block._modulate(x, mod_params)
    return block._modulate(x, mod_params, modulate_index)


def _target_gate(mod_params, modulate_index):
    """The gate ``[B, 1, C]`` of the generated image's tokens: with ``modulate_index`` the first
    half of the modulation (index 0, which the transformer gives those tokens)."""
    gate = mod_params.chunk(3, dim=-1)[2]
    if modulate_index is not None:
        gate = gate[: gate.shape[0] // 2]
    return gate.unsqueeze(1)


def _image_rows(ctx, sublayer, x, target_len):
    """The image rows ``sublayer`` runs on: merged generated-image rows, then the reference rows
    (``x`` itself when nothing merges)."""
    if target_len == x.shape[1]:
        return ctx.merge(sublayer, x)
    target = x[:, :target_len]
    rows = ctx.merge(sublayer, target)
    return x if rows is target else torch.cat([rows, x[:, target_len:]], dim=1)


def _finish(ctx, sublayer, y, residual, gate, target_len, mod_params, modulate_index):
    """``residual + gate * value`` at full length; merged rows unmerged (with the cache blend) by
    ``ctx.finish``, reference rows by diffusers' expression. ``gate``: diffusers' gate (``[B, 1, C]``,
    per token ``[B, L, C]`` with ``modulate_index``)."""
    merging = ctx.merges(sublayer)
    if residual.shape[1] == target_len:  # the generated image alone
        return ctx.finish(sublayer, y, residual=residual,
                          gate=_target_gate(mod_params, modulate_index) if merging else gate)
    if not merging:  # diffusers' expression; a protected step caches the generated image's part
        gated = gate * y
        if ctx.mode == "protected":
            ctx.state.set_cache(ctx.slot, sublayer, gated[:, :target_len])
        return residual + gated
    rows = ctx.num_rows
    image = ctx.finish(sublayer, y[:, :rows], residual=residual[:, :target_len],
                       gate=_target_gate(mod_params, modulate_index))
    reference_gate = gate if gate.shape[1] == 1 else gate[:, target_len:]
    reference = residual[:, target_len:] + reference_gate * y[:, rows:]
    return torch.cat([image, reference], dim=1)


def gather_rotary(ctx, sublayer, image_rotary_emb, target_len, image_len):
    """``(img_freqs, txt_freqs)`` for ``[merged rows, reference rows]``: each merged row takes its
    representative token's frequency, the reference rows keep theirs."""
    if image_rotary_emb is None or not ctx.merges(sublayer):
        return image_rotary_emb
    if not (isinstance(image_rotary_emb, (tuple, list)) and len(image_rotary_emb) == 2
            and isinstance(image_rotary_emb[0], torch.Tensor) and image_rotary_emb[0].dim() == 2
            and image_rotary_emb[0].shape[0] == image_len):
        import diffusers

        first = image_rotary_emb[0] if isinstance(image_rotary_emb, (tuple, list)) and image_rotary_emb else None
        raise RuntimeError(
            f"SDTM expects Qwen-Image rotary embeddings as a pair (img_freqs [{image_len}, D/2], txt_freqs) "
            f"(diffusers 0.42); this diffusers {diffusers.__version__} passes {type(image_rotary_emb).__name__} "
            f"with {tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__} first, "
            "which is not supported")
    img_freqs, txt_freqs = image_rotary_emb
    rep = ctx.plan.rep_token[0]  # one plan shared by the batch: every row of rep_token is the same
    rows = img_freqs.index_select(0, rep.to(img_freqs.device))
    if image_len > target_len:
        rows = torch.cat([rows, img_freqs[target_len:]], dim=0)
    return rows, txt_freqs


def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None, temb=None,
            image_rotary_emb=None, joint_attention_kwargs=None, modulate_index=None):
    state = getattr(self, "_sdtm_state", None)
    img_mod_params = self.img_mod(temb)
    if getattr(self, "zero_cond_t", False):
        temb = torch.chunk(temb, 2, dim=0)[0]
    txt_mod_params = self.txt_mod(temb)
    img_mod1, img_mod2 = img_mod_params.chunk(2, dim=-1)
    txt_mod1, txt_mod2 = txt_mod_params.chunk(2, dim=-1)

    img_normed = self.img_norm1(hidden_states)
    img_modulated, img_gate1 = _modulate(self, img_normed, img_mod1, modulate_index)
    txt_normed = self.txt_norm1(encoder_hidden_states)
    txt_modulated, txt_gate1 = self._modulate(txt_normed, txt_mod1)

    # One plan per block, from the generated image's modulated norm1 output, shared by the batch.
    image_len = hidden_states.shape[1]
    target_len = _target_len(state, image_len)
    ctx = block_context(state, getattr(self, "_sdtm_slot", None), img_modulated[:, :target_len], shared=True)

    joint_attention_kwargs = joint_attention_kwargs or {}
    img_attn_output, txt_attn_output = self.attn(
        hidden_states=_image_rows(ctx, "attn", img_modulated, target_len),
        encoder_hidden_states=txt_modulated,
        encoder_hidden_states_mask=encoder_hidden_states_mask,
        image_rotary_emb=gather_rotary(ctx, "attn", image_rotary_emb, target_len, image_len),
        **joint_attention_kwargs,
    )
    hidden_states = _finish(ctx, "attn", img_attn_output, hidden_states, img_gate1, target_len, img_mod1,
                            modulate_index)
    encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn_output

    img_normed2 = self.img_norm2(hidden_states)
    img_modulated2, img_gate2 = _modulate(self, img_normed2, img_mod2, modulate_index)
    img_mlp_output = self.img_mlp(_image_rows(ctx, "mlp", img_modulated2, target_len))
    hidden_states = _finish(ctx, "mlp", img_mlp_output, hidden_states, img_gate2, target_len, img_mod2,
                            modulate_index)

    txt_normed2 = self.txt_norm2(encoder_hidden_states)
    txt_modulated2, txt_gate2 = self._modulate(txt_normed2, txt_mod2)
    txt_mlp_output = self.txt_mlp(txt_modulated2)
    encoder_hidden_states = encoder_hidden_states + txt_gate2 * txt_mlp_output

    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states
