"""``apply_sdtm`` / ``remove_sdtm`` for diffusers pipelines and transformers.

Blocks are patched by a class swap (as tomesd does): ``block.__class__`` becomes a subclass
of its class whose ``forward`` is the SDTM forward of that model family; the original class
is remembered and restored by ``remove_sdtm``. The transformer gets a forward pre-hook that
reads the timestep and the token grid of each call (``SDTMState.begin_call``) and a forward
hook that closes the call. A patched pipeline's class is swapped too, so that every
``pipe(...)`` call starts a new generation with the call's ``num_inference_steps`` (bound by
``inspect.signature``, positional or keyword; ``len(timesteps)`` / ``len(sigmas)`` when
custom schedules are passed). Applying twice reconfigures; removing twice does nothing.
"""
import functools
import inspect
import warnings

import torch

from .config import make_config
from .state import SDTMState

_SUBCLASSES = {}
_PIPELINE_SUBCLASSES = {}


# -- which blocks ------------------------------------------------------------------------------
def _family(block):
    """The SDTM forward for ``block``'s class, or None when unsupported."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return None
    cls = type(block)
    if getattr(cls, "_sdtm_original_class", None) is not None:
        cls = cls._sdtm_original_class
    for module_name, class_name, loader in _FAMILIES:
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


def make_sdtm_subclass(cls, forward):
    """``cls`` with ``forward`` replaced (cached, so re-patching reuses the class)."""
    key = (cls, forward)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"SDTM{cls.__name__}", (cls,), {"forward": forward, "_sdtm_original_class": cls})
    return _SUBCLASSES[key]


# -- the transformer call ----------------------------------------------------------------------
def _bound_arguments(model, args, kwargs):
    forward = model._sdtm_original_forward_signature
    bound = forward.bind_partial(model, *args, **kwargs)
    return bound.arguments


def _token_grid(model, arguments):
    """(H, W) of the image token grid from the call's inputs, or None when unknown."""
    img_ids = arguments.get("img_ids")
    if img_ids is not None:  # Flux: ids[:, 1] = row, ids[:, 2] = column (raster order)
        ids = img_ids[0] if img_ids.dim() == 3 else img_ids
        key = (ids.data_ptr(), tuple(ids.shape), ids.device, getattr(ids, "_version", 0))
        cached = getattr(model, "_sdtm_grid_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        rows, cols = ids[:, 1].long(), ids[:, 2].long()
        rows, cols = rows - rows.min(), cols - cols.min()
        height, width = int(rows.max()) + 1, int(cols.max()) + 1  # one host read per new img_ids
        grid = (height, width)
        expected = torch.arange(ids.shape[0], device=ids.device)
        if height * width != ids.shape[0] or not torch.equal(rows * width + cols, expected):
            grid = None  # not one raster grid (e.g. extra reference-image tokens): run exactly
        model._sdtm_grid_cache = (key, grid)
        return grid
    hidden_states = arguments.get("hidden_states")
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 4 and patch:
        return hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
    return None


def _pre_hook(model, args, kwargs):
    state = model._sdtm_state
    arguments = _bound_arguments(model, args, kwargs)
    encoder = arguments.get("encoder_hidden_states")
    text_len = encoder.shape[1] if isinstance(encoder, torch.Tensor) and encoder.dim() == 3 else None
    grid = _token_grid(model, arguments)
    if grid is None and not getattr(model, "_sdtm_warned_grid", False):
        model._sdtm_warned_grid = True
        warnings.warn(f"SDTM: cannot read the image token grid from this {type(model).__name__} call "
                      "(expected a [B, C, H, W] latent with config.patch_size, or Flux img_ids on one raster "
                      "grid); such calls run without merging", RuntimeWarning, stacklevel=2)
    state.begin_call(arguments.get("timestep"), grid, text_len=text_len)
    return None


def _post_hook(model, args, kwargs, output):
    model._sdtm_state.end_call()
    return None


# -- pipelines ---------------------------------------------------------------------------------
def _pipeline_call(self, *args, **kwargs):
    original = type(self)._sdtm_original_class
    transformer = self.transformer
    state = getattr(transformer, "_sdtm_state", None)
    if state is not None:
        arguments = inspect.signature(original.__call__).bind(self, *args, **kwargs)
        arguments.apply_defaults()
        values = arguments.arguments
        num_steps = None
        for name in ("timesteps", "sigmas"):
            if values.get(name) is not None:
                num_steps = len(values[name])
                break
        if num_steps is None:
            num_steps = values.get("num_inference_steps")
        state.reset(num_steps=num_steps if num_steps is not None else state.num_steps)
    return original.__call__(self, *args, **kwargs)


def _pipeline_subclass(cls):
    if cls not in _PIPELINE_SUBCLASSES:
        def call(self, *args, **kwargs):
            return _pipeline_call(self, *args, **kwargs)

        call = functools.wraps(cls.__call__)(call)
        _PIPELINE_SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__call__": call, "_sdtm_original_class": cls})
    return _PIPELINE_SUBCLASSES[cls]


# -- public ------------------------------------------------------------------------------------
def _split(pipe_or_model):
    if isinstance(pipe_or_model, torch.nn.Module):
        return None, pipe_or_model
    transformer = getattr(pipe_or_model, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return pipe_or_model, transformer
    raise TypeError(
        "apply_sdtm expects a diffusers pipeline with a .transformer or a transformer module, "
        f"got {type(pipe_or_model).__name__}"
    )


def apply_sdtm(pipe_or_model, *, preset=None, ratio=0.3, deviation=0.2, switch_step=20, protect_steps=3,
               protect_layers=None, mcw=0.1, a_s=0.05, merge_mode="mean", random_dst=True, seed=None,
               num_steps=None, backend=None, merge_cross_attention=False, window=(2, 2), idm_score="similarity",
               a_d=0.05, prompt_reweight=False, a_p=1.0):
    """Patch a diffusers pipeline (anything with ``.transformer``) or transformer with SDTM.

    Supported blocks: ``BasicTransformerBlock`` (ada_norm_zero: DiT; ada_norm_single: PixArt),
    ``JointTransformerBlock`` (SD3, SD3.5 incl. dual attention), ``FluxTransformerBlock`` and
    ``FluxSingleTransformerBlock``. ``preset`` names an entry of ``PRESETS``; an option left at
    its default takes the preset's value. ``idm_score="attention"`` (IDM candidates ranked by the
    attention they receive from the prompt, plus ``a_d`` times the frequency term) and
    ``prompt_reweight`` (``+log(size)`` on merged image keys, ``+log(a_p)`` on prompt keys) are
    the paper's options; they need joint attention (SD3, Flux) and raise ``ValueError`` for
    other models. ``num_steps`` is read from each pipeline call;
    for a bare transformer it is required. Returns the pipeline or model. Applying again
    reconfigures (and resets) the state; ``remove_sdtm`` undoes everything.
    """
    config = make_config(preset, ratio=ratio, deviation=deviation, switch_step=switch_step,
                         protect_steps=protect_steps, protect_layers=protect_layers, mcw=mcw, a_s=a_s,
                         merge_mode=merge_mode, random_dst=random_dst, seed=seed, num_steps=num_steps,
                         backend=backend, merge_cross_attention=merge_cross_attention, window=window,
                         idm_score=idm_score, a_d=a_d, prompt_reweight=prompt_reweight, a_p=a_p)
    pipe, model = _split(pipe_or_model)
    if pipe is None and config.num_steps is None:
        raise ValueError(
            "num_steps is required when a bare transformer is patched (a patched pipeline reads "
            "num_inference_steps from each call): apply_sdtm(transformer, num_steps=50, ...)"
        )
    blocks = [(block, forward) for block in model.modules() if (forward := _family(block)) is not None]
    if not blocks:
        raise TypeError(
            f"{type(model).__name__} has no block SDTM supports (diffusers BasicTransformerBlock with "
            "ada_norm_zero/ada_norm_single, JointTransformerBlock, FluxTransformerBlock, "
            "FluxSingleTransformerBlock); for your own DiT blocks use sdtm_kernels.dit.SDTMBlockWrapper"
        )
    _check_joint_attention(config, model, blocks)
    state = getattr(model, "_sdtm_state", None)
    if state is None:
        state = SDTMState(config, num_layers=len(blocks))
        model._sdtm_state = state
        model._sdtm_original_forward_signature = inspect.signature(type(model).forward)
        model._sdtm_hooks = (
            model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
            model.register_forward_hook(_post_hook, with_kwargs=True),
        )
    else:
        state.config = config
        state.num_layers = len(blocks)
    state.num_steps = config.num_steps
    state.reset()
    for layer, (block, forward) in enumerate(blocks):
        original = getattr(type(block), "_sdtm_original_class", type(block))
        block.__class__ = make_sdtm_subclass(original, forward)
        block._sdtm_state = state
        block._sdtm_layer = layer
    if pipe is not None and getattr(type(pipe), "_sdtm_original_class", None) is None:
        pipe.__class__ = _pipeline_subclass(type(pipe))
    return pipe_or_model


JOINT_ATTENTION_MODULES = ("sdtm_kernels.dit.sd3", "sdtm_kernels.dit.flux")


def _check_joint_attention(config, model, blocks):
    """The paper's options read / reweight the joint text-image attention (SD3, Flux blocks)."""
    options = [name for name, on in (("idm_score='attention'", config.idm_score == "attention"),
                                      ("prompt_reweight=True", config.prompt_reweight)) if on]
    if not options:
        return
    others = sorted({type(block).__name__ for block, forward in blocks
                     if getattr(forward, "__module__", "") not in JOINT_ATTENTION_MODULES})
    if others:
        raise ValueError(
            f"{' and '.join(options)} need joint text-image attention (SD3 JointTransformerBlock, Flux blocks); "
            f"{type(model).__name__} has {', '.join(others)} blocks without it: use idm_score='similarity' and "
            "prompt_reweight=False"
        )


def remove_sdtm(pipe_or_model):
    """Undo ``apply_sdtm``: original block and pipeline classes, hooks and state removed.
    Harmless on an unpatched object."""
    pipe, model = _split(pipe_or_model)
    if pipe is not None:
        original = getattr(type(pipe), "_sdtm_original_class", None)
        if original is not None:
            pipe.__class__ = original
    for block in model.modules():
        original = getattr(type(block), "_sdtm_original_class", None)
        if original is not None:
            block.__class__ = original
        for name in ("_sdtm_state", "_sdtm_layer"):
            block.__dict__.pop(name, None)
    for handle in model.__dict__.pop("_sdtm_hooks", ()):
        handle.remove()
    for name in ("_sdtm_state", "_sdtm_original_forward_signature", "_sdtm_grid_cache", "_sdtm_warned_grid"):
        model.__dict__.pop(name, None)
    return pipe_or_model


def get_state(pipe_or_model):
    """The ``SDTMState`` of a patched pipeline or transformer (None when unpatched)."""
    _, model = _split(pipe_or_model)
    return getattr(model, "_sdtm_state", None)


def reset_sdtm(pipe_or_model, num_steps=None):
    """Start a new generation (optionally with a new step count) on a patched model."""
    state = get_state(pipe_or_model)
    if state is None:
        raise ValueError("reset_sdtm: the model is not patched with apply_sdtm")
    state.reset(num_steps=num_steps)
    return state
