"""Random-weight transformers the bench job times (diffusers SD3 / PixArt / Qwen-Image / Flux.1 / Flux.2 /
Wan / HunyuanVideo, or the package's DiT)."""
import contextlib

import torch

from ..dit.config import make_config
from .common import BenchError
from .timing import TimedSDTMState

# The pipelines' default embedded guidance of the guidance-distilled dev models (FluxPipeline,
# Flux2Pipeline: guidance_scale); the transformers scale it by 1000 themselves.
FLUX_GUIDANCE = {"flux": 3.5, "flux2": 4.0}
PACKED_FAMILIES = ("qwen", "flux", "flux2")  # latents packed 2 x 2 into tokens by the pipeline

# -- models ------------------------------------------------------------------------------------
def have_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


class BenchModel:
    """A transformer with random weights and the inputs of one CFG call.

    ``forward(latent [B, c, H, W] or [B, c, F, H, W], t [B])`` returns the velocity. ``patch(preset, backend,
    steps)`` applies SDTM and returns the (timed) state; ``unpatch()`` removes it."""

    def __init__(self, spec, device, dtype, batch=1, seed=0):
        self.spec, self.device, self.dtype = spec, torch.device(device), dtype
        self.model_batch = 2 * batch  # CFG: unconditional + conditional rows
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        # The random weights are initialised on the device (fast on a GPU) and in the run's dtype:
        # Flux.2-dev's 32 B parameters take 60 GiB in bf16, 120 GiB in float32 before a cast.
        with torch.device(self.device), _default_dtype(dtype):
            self.model, self.cond = self._build(spec, gen)
        with _quiet_diffusers():  # "modules that should be kept in float32": none for random weights
            self.model = self.model.to(self.device, dtype).eval().requires_grad_(False)
        # integer tensors (Flux.2's position ids) keep their dtype, as the pipelines pass them
        self.cond = {k: v.to(self.device, dtype if v.is_floating_point() else v.dtype) for k, v in self.cond.items()}
        self.state = None
        self._handles = ()

    def _build(self, spec, gen):
        family = spec["family"]
        t, d = spec["text_len"], spec["text_dim"]
        if family == "sd3":
            import diffusers

            self.model = diffusers.SD3Transformer2DModel(
                sample_size=spec["latent"], patch_size=spec["patch"], in_channels=spec["in_channels"],
                num_layers=spec["layers"], attention_head_dim=spec["head_dim"], num_attention_heads=spec["heads"],
                joint_attention_dim=d, caption_projection_dim=spec["width"], pooled_projection_dim=spec["pooled_dim"],
                out_channels=spec["in_channels"], pos_embed_max_size=max(spec["grid"][0], 96))
            self.cond = dict(encoder_hidden_states=torch.randn(self.model_batch, t, d, generator=gen, device="cpu"),
                             pooled_projections=torch.randn(self.model_batch, spec["pooled_dim"], generator=gen,
                                                            device="cpu"))
        elif family == "pixart":
            import diffusers

            self.model = diffusers.PixArtTransformer2DModel(
                num_attention_heads=spec["heads"], attention_head_dim=spec["head_dim"],
                in_channels=spec["in_channels"], out_channels=2 * spec["in_channels"], num_layers=spec["layers"],
                sample_size=spec["latent"], patch_size=spec["patch"], cross_attention_dim=spec["width"],
                caption_channels=d, use_additional_conditions=False)
            self.cond = dict(encoder_hidden_states=torch.randn(self.model_batch, t, d, generator=gen, device="cpu"))
        elif family == "wan":
            import diffusers

            self.model = diffusers.WanTransformer3DModel(
                patch_size=(1, spec["patch"], spec["patch"]), num_attention_heads=spec["heads"],
                attention_head_dim=spec["head_dim"], in_channels=spec["in_channels"], out_channels=spec["in_channels"],
                text_dim=d, freq_dim=256, ffn_dim=spec["ffn_dim"], num_layers=spec["layers"],
                rope_max_seq_len=1024)
            self.cond = dict(encoder_hidden_states=torch.randn(self.model_batch, t, d, generator=gen, device="cpu"))
        elif family == "qwen":  # latents packed 2 x 2 into tokens (QwenImagePipeline._pack_latents)
            import diffusers

            head = spec["head_dim"]
            self.model = diffusers.QwenImageTransformer2DModel(
                patch_size=2, in_channels=4 * spec["in_channels"], out_channels=spec["in_channels"],
                num_layers=spec["layers"], attention_head_dim=head, num_attention_heads=spec["heads"],
                joint_attention_dim=d, axes_dims_rope=(head - 2 * (3 * head // 8), 3 * head // 8, 3 * head // 8))
            self.cond = dict(encoder_hidden_states=torch.randn(self.model_batch, t, d, generator=gen, device="cpu"),
                             encoder_hidden_states_mask=torch.ones(self.model_batch, t))
        elif family in ("flux", "flux2"):
            self.model, self.cond = self._build_flux(spec, gen)
        elif family == "hunyuan":
            import diffusers

            head = spec["head_dim"]
            self.model = diffusers.HunyuanVideoTransformer3DModel(
                in_channels=spec["in_channels"], out_channels=spec["in_channels"], num_attention_heads=spec["heads"],
                attention_head_dim=head, num_layers=spec["double_layers"],  # 20 double + 40 single
                num_single_layers=spec["layers"] - spec["double_layers"],
                num_refiner_layers=1, patch_size=spec["patch"], patch_size_t=1, text_embed_dim=d,
                pooled_projection_dim=spec["pooled_dim"], rope_axes_dim=(head // 4, 3 * head // 8, 3 * head // 8))
            self.cond = dict(encoder_hidden_states=torch.randn(self.model_batch, t, d, generator=gen, device="cpu"),
                             encoder_attention_mask=torch.ones(self.model_batch, t),
                             pooled_projections=torch.randn(self.model_batch, spec["pooled_dim"], generator=gen,
                                                            device="cpu"),
                             guidance=torch.full((self.model_batch,), 6000.0))
        elif family == "dit":
            from ..small_dit import SmallDiT

            self.model = SmallDiT(in_channels=spec["in_channels"], hidden=spec["width"], depth=spec["layers"],
                                  heads=spec["heads"], patch=spec["patch"], grid=spec["grid"], cond_dim=d,
                                  mlp_ratio=spec["mlp_ratio"])
            self.cond = dict(y=torch.randn(self.model_batch, d, generator=gen, device="cpu"))
        else:
            raise BenchError(f"unknown model family {family!r}")
        return self.model, self.cond

    def _build_flux(self, spec, gen):
        """Flux.1 (``FluxTransformer2DModel``, guidance-distilled like Flux.1-dev) or Flux.2
        (``Flux2Transformer2DModel``) and the inputs its pipeline passes: text embeddings, the
        position ids of the packed latent tokens and of the text tokens, the embedded guidance
        (and Flux.1's pooled CLIP embedding)."""
        import diffusers

        family, head, double = spec["family"], spec["head_dim"], spec["double_layers"]
        t, d, b = spec["text_len"], spec["text_dim"], self.model_batch
        h, w = (side // 2 for side in spec["noise_shape"][-2:])  # the token grid: 2 x 2 latent patches
        common = dict(patch_size=1, in_channels=4 * spec["in_channels"], num_layers=double,
                      num_single_layers=spec["layers"] - double, attention_head_dim=head,
                      num_attention_heads=spec["heads"], joint_attention_dim=d, guidance_embeds=True)
        cond = dict(encoder_hidden_states=torch.randn(b, t, d, generator=gen, device="cpu"),
                    guidance=torch.full((b,), FLUX_GUIDANCE[family]))
        if family == "flux":
            axis = 2 * (7 * head // 32)  # rotary channels per axis (t, row, column): 16, 56, 56 of 128
            model = diffusers.FluxTransformer2DModel(pooled_projection_dim=spec["pooled_dim"],
                                                     axes_dims_rope=(head - 2 * axis, axis, axis), **common)
            # FluxPipeline._prepare_latent_image_ids: (0, row, column) per token in raster order; text ids 0
            img_ids = torch.zeros(h, w, 3)
            img_ids[..., 1] = torch.arange(h)[:, None]
            img_ids[..., 2] = torch.arange(w)[None, :]
            cond.update(pooled_projections=torch.randn(b, spec["pooled_dim"], generator=gen, device="cpu"),
                        img_ids=img_ids.reshape(h * w, 3), txt_ids=torch.zeros(t, 3))
        else:
            axis = 2 * (head // 8)  # rotary channels per axis (t, h, w, l): 32 each of 128
            model = diffusers.Flux2Transformer2DModel(mlp_ratio=spec["ffn_dim"] / spec["width"],
                                                      axes_dims_rope=(head - 3 * axis, axis, axis, axis), **common)
            # Flux2Pipeline._prepare_latent_ids / _prepare_text_ids: (t, h, w, l) int64 ids per batch row
            one = torch.arange(1)
            img_ids = torch.cartesian_prod(one, torch.arange(h), torch.arange(w), one)
            txt_ids = torch.cartesian_prod(one, one, one, torch.arange(t))
            cond.update(img_ids=img_ids.expand(b, -1, -1), txt_ids=txt_ids.expand(b, -1, -1))
        return model, cond

    def forward(self, latent, t):
        if self.spec["family"] == "dit":
            return self.model(latent, t, **self.cond)
        if self.spec["family"] in PACKED_FAMILIES:
            return self._forward_packed(latent, t)
        out = self.model(hidden_states=latent, timestep=t, return_dict=False, **self.cond)[0]
        if self.spec["family"] == "pixart":
            out = out.chunk(2, dim=1)[0]  # learned-sigma models: the first half is the prediction
        return out

    def _forward_packed(self, latent, t):
        """Qwen-Image, Flux.1, Flux.2: ``[B, c, H, W]`` -> 2 x 2 patches as tokens (channel ``4 c' +
        2 dy + dx``, ``FluxPipeline._pack_latents``; Flux.2's patchify + pack give the same order) ->
        the model (timestep as a fraction of 1000) -> back."""
        b, c, h, w = latent.shape
        packed = latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
        extra = dict(img_shapes=[[(1, h // 2, w // 2)]] * b) if self.spec["family"] == "qwen" else {}
        out = self.model(hidden_states=packed, timestep=t / 1000, return_dict=False, **extra, **self.cond)[0]
        # [B, N, 4c] -> [B, c, H, W] (QwenImagePipeline / FluxPipeline._unpack_latents)
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def patch(self, preset, backend, steps):
        self.unpatch()
        if self.spec["family"] == "dit":
            from ..dit import attach_state, wrap_dit_blocks
            from ..small_dit import dit_modulation

            state = TimedSDTMState(make_config(preset, num_steps=steps, backend=backend), num_steps=steps)
            wrap_dit_blocks(self.model.blocks, state, modulation=dit_modulation)
            self._handles = attach_state(self.model, state, grid=self.spec["grid"], timestep="t")
        else:
            from ..dit import apply_sdtm, get_state

            apply_sdtm(self.model, preset=preset, num_steps=steps, backend=backend)
            state = get_state(self.model)
            state.__class__ = TimedSDTMState  # adds the timed sections; same state object the blocks hold
        self.state = state
        return state

    def unpatch(self):
        if self.state is None:
            return
        if self.spec["family"] == "dit":
            from ..dit import unwrap_dit_blocks

            unwrap_dit_blocks(self.model.blocks)
            for handle in self._handles:
                handle.remove()
            self._handles = ()
        else:
            from ..dit import remove_sdtm

            remove_sdtm(self.model)
        self.state = None


@contextlib.contextmanager
def _default_dtype(dtype):
    """Modules built inside create their floating parameters in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def _quiet_diffusers():
    try:
        from diffusers.utils import logging as dlogging
    except ImportError:
        yield
        return
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)
