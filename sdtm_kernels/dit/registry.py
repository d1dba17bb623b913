"""Which diffusers blocks and transformers SDTM patches, and how it reads a call's token grid:
the fused families (``_FAMILIES`` here, ``FAMILY_MODULES`` in their own modules), the generic path
(``describe_block``), the grid readers. ``apply_sdtm`` (``patch``) asks ``_family(block)`` for each
block's SDTM forward; the transformer hook asks ``_token_grid`` at each call."""
import weakref

import torch

# -- which blocks ------------------------------------------------------------------------------
def _family(block):
    """The SDTM forward for ``block``'s class, or None when unsupported. A block described with
    ``describe_block`` takes the generic path, also when a fused family supports its class."""
    from . import describe

    if (forward := describe.forward_for(block)) is not None:
        return forward
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return None
    cls = type(block)
    for module_name, class_name, loader in _all_families():
        base = _load(module_name, class_name)
        if base is not None and isinstance(block, base) and cls.forward is base.forward:
            forward, supports = loader(cls)
            return forward if supports(block) else None
    return None


def _load(module_name, class_name):
    try:
        module = __import__(module_name, fromlist=[class_name])
    except ImportError:
        return None
    return getattr(module, class_name, None)


def _basic(cls):
    from . import basic

    return basic.forward, basic.supports


def _joint(cls):
    from . import sd3

    return sd3.forward, sd3.supports


def _flux_double(cls):
    from . import flux

    return flux.double_forward, flux.supports


def _flux_single(cls):
    from . import flux

    return flux.single_forward_for(cls), flux.supports


_FAMILIES = (
    ("diffusers.models.attention", "BasicTransformerBlock", _basic),
    ("diffusers.models.attention", "JointTransformerBlock", _joint),
    ("diffusers.models.transformers.transformer_flux", "FluxTransformerBlock", _flux_double),
    ("diffusers.models.transformers.transformer_flux", "FluxSingleTransformerBlock", _flux_single),
)

# Families in their own modules (``sdtm_kernels.dit.<name>``), each defining ``BLOCKS`` (entries
# like ``_FAMILIES``: module, class, loader(cls) -> (forward, supports)), ``MODELS`` ((module,
# class) of its transformers) and ``token_grid(state, model, arguments)`` (the grid of a call).
FAMILY_MODULES = ("wan", "qwen_image", "flux2", "hunyuan_video")

# What the unknown-model error lists: (family, transformer classes).
SUPPORTED_FAMILIES = (
    ("DiT", "DiTTransformer2DModel"),
    ("PixArt-alpha / sigma", "PixArtTransformer2DModel"),
    ("SD3 / SD3.5", "SD3Transformer2DModel"),
    ("Flux.1", "FluxTransformer2DModel"),
    ("Wan 2.1 / 2.2", "WanTransformer3DModel"),
    ("HunyuanVideo", "HunyuanVideoTransformer3DModel, HunyuanVideoFramepackTransformer3DModel"),
    ("Qwen-Image", "QwenImageTransformer2DModel"),
    ("Flux.2", "Flux2Transformer2DModel"),
)


def _family_module(name):
    import importlib

    return importlib.import_module(f"{__package__}.{name}")


def _all_families():
    entries = list(_FAMILIES)
    for name in FAMILY_MODULES:
        entries.extend(_family_module(name).BLOCKS)
    return entries


_GRID_READERS = {}  # transformer class -> token_grid function of its family module (or None)
_DESCRIBED_GRIDS = weakref.WeakKeyDictionary()  # patched transformer -> its describe_block(grid=) reader


def _grid_reader(model):
    described = _DESCRIBED_GRIDS.get(model)
    if described is not None:
        return described
    cls = type(model)
    if cls not in _GRID_READERS:
        reader = None
        for name in FAMILY_MODULES:
            module = _family_module(name)
            for module_name, class_name in module.MODELS:
                base = _load(module_name, class_name)
                if base is not None and isinstance(model, base):
                    reader = module.token_grid
                    break
            if reader is not None:
                break
        _GRID_READERS[cls] = reader
    return _GRID_READERS[cls]


def unsupported_message(model) -> str:
    """The error for a model without a block SDTM knows: the supported families and the
    generic path."""
    families = "; ".join(f"{family} ({cls})" for family, cls in SUPPORTED_FAMILIES)
    return (f"{type(model).__name__} has no block SDTM supports. Supported diffusers families: {families} "
            "(DiT / PixArt: BasicTransformerBlock with ada_norm_zero / ada_norm_single). For another DiT, "
            "describe its block in a few lines (sdtm_kernels.dit.describe_block, docs/SEMANTICS.md \"Other DiTs\") "
            "or wrap your own blocks with sdtm_kernels.dit.SDTMBlockWrapper")


# -- the transformer call ----------------------------------------------------------------------
def _token_grid(state, model, arguments):
    """(H, W) or (T, H, W) of the image token grid from the call's inputs, or None when unknown."""
    reader = _grid_reader(model)
    if reader is not None:
        return reader(state, model, arguments)
    img_ids = arguments.get("img_ids")
    if img_ids is not None:  # Flux: ids[:, 1] = row, ids[:, 2] = column (raster order)
        ids = img_ids[0] if img_ids.dim() == 3 else img_ids
        key = (ids.data_ptr(), tuple(ids.shape), ids.device, getattr(ids, "_version", 0))
        cached = state.grid_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        rows, cols = ids[:, 1].long(), ids[:, 2].long()
        rows, cols = rows - rows.min(), cols - cols.min()
        height, width = int(rows.max()) + 1, int(cols.max()) + 1  # one host read per new img_ids
        grid = (height, width)
        expected = torch.arange(ids.shape[0], device=ids.device)
        if height * width != ids.shape[0] or not torch.equal(rows * width + cols, expected):
            grid = None  # not one raster grid (e.g. extra reference-image tokens): run exactly
        state.grid_cache = (key, grid)
        return grid
    config = getattr(model, "config", None)
    return latent_grid(arguments.get("hidden_states"), getattr(config, "patch_size", None),
                       getattr(config, "patch_size_t", None))


def latent_grid(hidden_states, patch, patch_t=None):
    """Token grid of a patchified latent: ``[B, C, H, W]`` -> ``(H / p, W / p)``; ``[B, C, F, H, W]``
    -> ``(F / p_t, H / p_h, W / p_w)`` with ``patch`` ``(p_t, p_h, p_w)`` or ``p`` (and ``patch_t``).
    None when the latent or patch size is not of that form."""
    if not isinstance(hidden_states, torch.Tensor) or not patch:
        return None
    if hidden_states.dim() == 4 and isinstance(patch, int):
        return hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
    if hidden_states.dim() == 5:
        sizes = tuple(patch) if isinstance(patch, (tuple, list)) else (patch_t or 1, patch, patch)
        if len(sizes) == 3 and all(isinstance(p, int) and p > 0 for p in sizes):
            return tuple(extent // p for extent, p in zip(hidden_states.shape[-3:], sizes))
    return None
