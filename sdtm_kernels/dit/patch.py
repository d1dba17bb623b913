"""``apply_sdtm`` / ``remove_sdtm`` for diffusers pipelines and transformers (diffusers >= 0.33).

SDTM runs as diffusers hooks (``sdtm_kernels.dit.hooks``), all named ``"sdtm"``: one
``SDTMBlockHook`` per supported block (its ``new_forward`` is the family's SDTM forward; the
block's class is unchanged) and one ``SDTMTransformerHook`` on the transformer that reads the
timestep and the token grid of each call (``SDTMState.begin_call``) and closes the call. The
hooks sit at the bottom of each module's wrapper chain, beneath hooks registered earlier (group
offloading, a cache applied first, accelerate's offload hooks), so those keep running around
SDTM's forward; hooks registered later wrap SDTM's. The state lives in the transformer hook
(``get_state``); the blocks' ``_sdtm_state`` / ``_sdtm_layer`` / ``_sdtm_slot`` attributes point the family
forwards to it. ``remove_sdtm`` takes every SDTM hook and attribute out again (the output is
then the unpatched model's, bit for bit).

Generations. A patched pipeline's class is swapped for a subclass of the same name whose
``__call__`` starts a new generation at every ``pipe(...)`` call and counts its steps in
scheduler steps (a class swap because Python looks ``__call__`` up on the type; it touches no
module, so model hooks are unaffected; wrapping ``scheduler.set_timesteps`` instead would be lost
whenever ``pipe.scheduler`` is replaced, the usual way to change schedulers): for the duration of
the call the pipeline's ``scheduler.step`` is wrapped by a counter (``_SchedulerSteps``) and the
step count is the number of scheduler steps the pipeline really runs (``pipe._num_timesteps``,
else ``len(scheduler.timesteps) - scheduler.begin_index``, divided by ``scheduler.order``), read
at the first transformer call; before that the call's ``num_inference_steps`` (bound by
``inspect.signature``; ``len(timesteps)`` / ``len(sigmas)`` when custom schedules are passed)
stands in. The pipeline call also resets the transformer's other stateful diffusers hooks
(cache hooks) when the transformer has no ``CacheMixin`` (SD3, PixArt: their pipelines never
reset them), so SDTM and a cache hook start each generation together. The transformer hook is
itself stateful: diffusers' ``_reset_stateful_cache()`` (``pipe.maybe_free_model_hooks()`` after
every call of a ``CacheMixin`` model, e.g. Flux) makes the next call start a new generation.
Bare transformers: ``reset_sdtm``, ``_reset_stateful_cache()`` or the timestep rules of
``SDTMState``.

Applying twice reconfigures (only the options passed change); removing twice does nothing.
A patched model pickles with its hooks (``pickle`` / ``torch.save`` / ``copy.deepcopy``: the
settings travel, the generation state does not); the pipeline's generated class pickles as its
original class and is re-created on load.
"""
import dataclasses

import torch

from .config import DEFAULT_PRESET, OPTION_NAMES, make_config
# which blocks and grids (registry.py); FAMILY_MODULES, SUPPORTED_FAMILIES, _GRID_READERS, _token_grid and
# latent_grid are re-exported for the code and tests that look for them here
from .registry import (  # noqa: F401
    _DESCRIBED_GRIDS,
    _GRID_READERS,
    FAMILY_MODULES,
    SUPPORTED_FAMILIES,
    _family,
    _token_grid,
    latent_grid,
    unsupported_message,
)
from .state import SDTMState

MIN_DIFFUSERS = "0.33"


def _hooks():
    """``sdtm_kernels.dit.hooks`` (imports diffusers.hooks: diffusers >= 0.33)."""
    try:
        from . import hooks
    except ImportError as error:
        try:
            import diffusers

            version = diffusers.__version__
        except ImportError:
            version = None
        if version is None:
            raise ImportError("apply_sdtm needs diffusers (pip install 'sdtm_kernels[diffusers]'); for your "
                              "own DiT blocks use sdtm_kernels.dit.SDTMBlockWrapper") from error
        raise ImportError(f"apply_sdtm needs diffusers >= {MIN_DIFFUSERS} (diffusers.hooks); this is diffusers "
                          f"{version}: pip install -U 'diffusers>={MIN_DIFFUSERS}'") from error
    return hooks


def _patched_blocks(model):
    hooks = _hooks()
    return [m for m in model.modules() if isinstance(hooks.block_hook(m), hooks.SDTMBlockHook)]


def _check_model(model):
    """Run by the transformer hook at the first call of each generation: combinations that were
    set up after ``apply_sdtm`` (e.g. a TaylorSeer cache on the attention modules) raise here."""
    hooks = _hooks()
    hook = hooks.block_hook(model)
    if hook is not None:
        hooks.check_combinations(model, _patched_blocks(model), hook.state.config)


# -- public ------------------------------------------------------------------------------------
def _unwrap(module):
    """The module under ``torch.compile(module)`` (an ``OptimizedModule``'s ``_orig_mod``)."""
    while isinstance(module, torch.nn.Module) and isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        module = module._orig_mod
    return module


def _split(pipe_or_model):
    if isinstance(pipe_or_model, torch.nn.Module):
        return None, _unwrap(pipe_or_model)
    transformer = getattr(pipe_or_model, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return pipe_or_model, _unwrap(transformer)
    second = getattr(pipe_or_model, "transformer_2", None)
    if transformer is None and isinstance(second, torch.nn.Module):  # Wan 2.2 loaded with one expert
        return pipe_or_model, _unwrap(second)
    raise TypeError(
        "apply_sdtm expects a diffusers pipeline with a .transformer or a transformer module, "
        f"got {type(pipe_or_model).__name__}"
    )


def _transformer_hook(model):
    registry = getattr(model, "_diffusers_hook", None)
    hook = None if registry is None else registry.hooks.get("sdtm")
    if hook is None or not hasattr(hook, "pending_reset"):
        return None
    return hook


class _Unset:
    """Default of ``apply_sdtm``'s options: tells "not passed" from any value."""

    def __repr__(self):
        return "<unset>"


_UNSET = _Unset()


def apply_sdtm(pipe_or_model, *, preset=_UNSET, ratio=_UNSET, deviation=_UNSET, switch_step=_UNSET,
               protect_steps=_UNSET, protect_layers=_UNSET, mcw=_UNSET, a_s=_UNSET, merge_mode=_UNSET,
               random_dst=_UNSET, seed=_UNSET, num_steps=_UNSET, backend=_UNSET, merge_cross_attention=_UNSET,
               window=_UNSET, idm_score=_UNSET, a_d=_UNSET, prompt_reweight=_UNSET, a_p=_UNSET,
               min_saving=_UNSET, ratio_levels=_UNSET, shards=_UNSET):
    """Patch a diffusers pipeline (anything with ``.transformer``) or transformer with SDTM.

    Supported blocks: ``BasicTransformerBlock`` (ada_norm_zero: DiT; ada_norm_single: PixArt),
    ``JointTransformerBlock`` (SD3, SD3.5 incl. dual attention), ``FluxTransformerBlock`` and
    ``FluxSingleTransformerBlock``, and the families of ``FAMILY_MODULES``: Wan 2.1 / 2.2
    (``WanTransformerBlock``), Qwen-Image, Flux.2 (double and single), HunyuanVideo (double,
    single, token-replace). Other blocks: ``describe_block`` (the generic path).

    Settings: ``preset`` names an entry of ``PRESETS``; without one the first ``apply_sdtm``
    uses ``"released"`` (the defaults: ``apply_sdtm(pipe) == apply_sdtm(pipe, preset="released")``).
    Every option passed wins over the preset. Applying again to a patched model keeps the
    earlier settings and changes only the options passed (passing ``preset=`` again starts over
    from that preset). ``ratio=0`` turns merging off (``deviation`` ignored). The options and
    their defaults: ``SDTMConfig``. ``idm_score="attention"`` (IDM candidates ranked by the
    attention they receive from the prompt, plus ``a_d`` times the frequency term) and
    ``prompt_reweight`` (``+log(size)`` on merged image keys, ``+log(a_p)`` on prompt keys) are
    the paper's options; they need joint attention (SD3, Flux) and raise ``ValueError`` for
    other models.

    A pipeline's second transformer (``transformer_2``: Wan 2.2 A14B) is patched too, with its
    own state on the pipeline's step indices (``get_state(pipe.transformer_2)``).

    Steps: a patched pipeline counts the scheduler steps each call really runs (img2img /
    inpainting ``strength``, Heun-type schedulers: one step per scheduler step); a bare
    transformer needs ``num_steps`` and counts a step per new timestep. Returns the pipeline
    or model. Applying again resets the state; ``remove_sdtm`` undoes everything.

    Multi-GPU: under diffusers' context parallelism (``enable_parallelism``, before or after
    ``apply_sdtm``) every rank merges on its own slab of the token grid; ``shards=k`` plans the
    same way on one process (k slabs along the grid's first axis). docs/PARALLEL.md.
    """
    given = dict(ratio=ratio, deviation=deviation, switch_step=switch_step, protect_steps=protect_steps,
                 protect_layers=protect_layers, mcw=mcw, a_s=a_s, merge_mode=merge_mode, random_dst=random_dst,
                 seed=seed, num_steps=num_steps, backend=backend, merge_cross_attention=merge_cross_attention,
                 window=window, idm_score=idm_score, a_d=a_d, prompt_reweight=prompt_reweight, a_p=a_p,
                 min_saving=min_saving, ratio_levels=ratio_levels, shards=shards)
    assert set(given) == set(OPTION_NAMES)
    explicit = {name: value for name, value in given.items() if value is not _UNSET}
    pipe, model = _split(pipe_or_model)
    others = _other_transformers(pipe)
    # Every transformer is checked before any is patched: a failure leaves the pipeline as it was.
    prepared = [_prepare_model(t, pipe, preset, explicit) for t in [model] + others]
    installed = []
    try:
        for index, (transformer, plan) in enumerate(zip([model] + others, prepared)):
            state = _install_model(transformer, plan, transformers=len(prepared))
            installed.append(transformer)
            if index or (pipe is not None and _unwrap(getattr(pipe, "transformer_2", None)) is transformer):
                state.global_steps = True  # Wan 2.2 A14B's second expert: the pipeline's step indices
    except BaseException:
        for transformer, plan in zip(installed, prepared):
            if plan.fresh:
                remove_sdtm(transformer)
        raise
    if pipe is not None and getattr(type(pipe), "_sdtm_original_class", None) is None:
        from .pipelines import pipeline_subclass

        pipe.__class__ = pipeline_subclass(type(pipe))
    return pipe_or_model


def _other_transformers(pipe):
    """The transformers of a pipeline that take turns with ``pipe.transformer`` (Wan 2.2 A14B's
    ``transformer_2`` for the low-noise steps); each gets its own state (caches, ``li``)."""
    if pipe is None or not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        return []  # no pipe.transformer: transformer_2, if any, is the one (_split)
    other = getattr(pipe, "transformer_2", None)
    if not isinstance(other, torch.nn.Module) or _unwrap(other) is _unwrap(pipe.transformer):
        return []  # none, or the same module twice (one state drives it)
    return [_unwrap(other)]


@dataclasses.dataclass
class _Prepared:
    """What ``apply_sdtm`` will do to one transformer, checked before anything changes."""
    hook: object
    state: object
    request: tuple
    config: object
    blocks: list
    described_grid: object

    @property
    def fresh(self) -> bool:
        return self.hook is None


def _prepare_model(model, pipe, preset, explicit) -> _Prepared:
    """The settings and blocks of ``apply_sdtm`` on one transformer, every check done; changes nothing."""
    hook = _transformer_hook(model)
    state = None if hook is None else hook.state
    previous = getattr(state, "request", None)
    if preset is not _UNSET or previous is None:
        request = (DEFAULT_PRESET if preset is _UNSET or preset is None else preset, explicit)
    else:
        request = (previous[0], {**previous[1], **explicit})
    config = make_config(request[0], **request[1])
    if pipe is None and config.num_steps is None and state is None:
        raise ValueError(
            "num_steps is required when a bare transformer is patched (a patched pipeline reads "
            "num_inference_steps from each call): apply_sdtm(transformer, num_steps=50, ...)"
        )
    blocks = [(block, forward) for block in model.modules() if (forward := _family(block)) is not None]
    if not blocks:
        raise TypeError(unsupported_message(model))
    from . import describe

    described_grid = describe.grid_reader(block for block, _ in blocks)  # describe_block(..., grid=)
    _check_joint_attention(config, model, blocks)
    _hooks().check_combinations(model, [block for block, _ in blocks], config)
    return _Prepared(hook, state, request, config, blocks, described_grid)


def _install_model(model, prepared: _Prepared, transformers=1):
    """Patch one transformer as ``prepared`` says; returns its state."""
    from . import describe

    hooks = _hooks()
    state, config, request, blocks = prepared.state, prepared.config, prepared.request, prepared.blocks
    described_grid, fresh = prepared.described_grid, prepared.fresh
    try:
        if fresh:
            state = SDTMState(config, num_layers=len(blocks))
            hooks.insert_innermost(model, hooks.SDTMTransformerHook(state, check=_check_model))
        else:
            state.config = config
            state.num_layers = len(blocks)
        state.request = request
        state.num_steps = config.num_steps
        state.reset()
        for layer, (block, forward) in enumerate(blocks):
            block_hook = hooks.block_hook(block)
            if block_hook is None:
                hooks.insert_innermost(block, hooks.SDTMBlockHook(forward, layer))
            else:
                block_hook.forward, block_hook.layer = forward, layer
            block._sdtm_state = state
            block._sdtm_layer = layer
            block._sdtm_slot = state.slot(layer)
            describe.sync(block, forward)  # described blocks: hooks on their sub-modules
        _DESCRIBED_GRIDS.pop(model, None)
        if described_grid is not None:
            _DESCRIBED_GRIDS[model] = described_grid
    except BaseException:
        if fresh:
            remove_sdtm(model)
        raise
    hooks.invalidate_tree(model)
    reserve_recompiles(config, len({type(block) for block, _ in blocks}) * transformers)
    return state


def graphs_per_block(config) -> int:
    """Graphs a compiled block of one type needs over a generation: one per step kind (protected,
    each structure and detail level of ``ratio_levels``, skipped by ``min_saving``, protected layer).
    None without ``ratio_levels`` (the exact schedule: one per distinct token count)."""
    if config.ratio == 0.0:
        return 1
    if not config.ratio_levels:
        return None
    return 1 + 2 * config.ratio_levels + bool(config.min_saving) + bool(config.protect_layers)


def reserve_recompiles(config, block_types: int):
    """Regional compilation (``block.compile()``, ``compile_repeated_blocks``) caches the graphs of
    every compiled block under one code object (``nn.Module._call_impl``), whose entries dynamo
    limits (``torch._dynamo.config.recompile_limit``, 8). A patched block has a bounded number of
    graphs per type (``graphs_per_block``; diffusers models also give their first or last block its
    own graph), so the limit is raised to what a generation needs, never lowered (docs/SEMANTICS.md,
    "Compiled models")."""
    per_block = graphs_per_block(config)
    if per_block is None:
        return
    needed = per_block * max(block_types, 1) * 2
    dynamo_config = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    if getattr(dynamo_config, name) < needed:
        setattr(dynamo_config, name, needed)


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
            f"{' and '.join(options)} need SDTM's own joint text-image attention, written for SD3 "
            f"(JointTransformerBlock) and Flux.1 blocks; {type(model).__name__} has {', '.join(others)} blocks it "
            "does not cover: use idm_score='similarity' and prompt_reweight=False"
        )


def remove_sdtm(pipe_or_model):
    """Undo ``apply_sdtm``: every SDTM hook (``HookRegistry`` name ``"sdtm"``) and attribute
    removed, the pipeline's class restored. Hooks of other methods stay (and keep working).
    Harmless on an unpatched object."""
    pipe, model = _split(pipe_or_model)
    if pipe is not None:
        original = getattr(type(pipe), "_sdtm_original_class", None)
        if original is not None:
            pipe.__class__ = original
        for other in _other_transformers(pipe):
            remove_sdtm(other)
    if not any(getattr(getattr(m, "_diffusers_hook", None), "hooks", {}).get("sdtm") is not None
               or "_sdtm_state" in vars(m) for m in model.modules()):
        return pipe_or_model
    hooks = _hooks()
    for module in model.modules():
        hooks.remove_innermost(module)
        for name in ("_sdtm_state", "_sdtm_layer", "_sdtm_slot", "_sdtm_run"):
            module.__dict__.pop(name, None)
    _DESCRIBED_GRIDS.pop(model, None)  # a described grid= reader goes with the patch
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None:  # anything named "sdtm" that was registered some other way
        registry.remove_hook(hooks.HOOK_NAME, recurse=True)
    hooks.invalidate_tree(model)
    return pipe_or_model


def get_state(pipe_or_model):
    """The ``SDTMState`` of a patched pipeline or transformer (None when unpatched)."""
    _, model = _split(pipe_or_model)
    hook = _transformer_hook(model)
    return None if hook is None else hook.state


def reset_sdtm(pipe_or_model, num_steps=None):
    """Start a new generation (optionally with a new step count) on a patched model (on a
    pipeline: every patched transformer of it, ``transformer_2`` included). Returns the state of
    ``pipe.transformer`` (or of the model)."""
    state = get_state(pipe_or_model)
    if state is None:
        raise ValueError("reset_sdtm: the model is not patched with apply_sdtm")
    state.reset(num_steps=num_steps)
    pipe, _ = _split(pipe_or_model)
    for other in _other_transformers(pipe):
        other_state = get_state(other)
        if other_state is not None:
            other_state.reset(num_steps=num_steps)
    return state
