"""SDTM as diffusers hooks (``diffusers.hooks.ModelHook`` / ``HookRegistry``, diffusers >= 0.33).

One hook name, ``"sdtm"`` (``HOOK_NAME``), on the transformer and on every supported block:

* ``SDTMBlockHook`` (one per block): its ``new_forward`` runs the family's SDTM forward
  (``sd3.forward``, ``flux.double_forward``, ...) instead of the block's own. The block's class
  is untouched, so diffusers' cache hooks (``TransformerBlockRegistry.get(type(block))``) and
  ``compile_repeated_blocks`` (class names) still find it. The family forwards read the
  state and the block's per-call slot from the attributes ``_sdtm_state`` / ``_sdtm_slot``.
* ``SDTMTransformerHook`` (on the transformer): reads the timestep, token grid and prompt length
  of each call (``SDTMState.begin_call``) and closes the call (``end_call``). It is a *stateful*
  hook: diffusers' ``_reset_stateful_cache()`` (called by ``pipe.maybe_free_model_hooks()`` at
  the end of every pipeline call for ``CacheMixin`` models such as Flux) or
  ``HookRegistry.reset_stateful_hooks()`` makes the next transformer call start a new SDTM
  generation, as it does for the cache hooks. The statistics of the last generation stay
  readable until then.

Placement: SDTM hooks go at the *bottom* of a module's wrapper chain (``insert_innermost``),
i.e. they replace the module's own forward wherever it sits: beneath diffusers hooks that were
registered earlier (group offloading's onload/offload, a cache applied first: their
``pre_forward`` / ``new_forward`` still run around SDTM's forward) and beneath accelerate's
``_old_forward`` (``enable_model_cpu_offload`` removes and re-adds its hooks after every
pipeline call; a hook stacked on top of it would be dropped). Hooks registered later wrap SDTM
as usual. Context parallelism's split hooks therefore always run first, whichever was applied
first: the transformer hook sees the rank's split inputs (``parallel.local_grid``; the ranks
check with ``parallel.agree`` that those are slabs of one image).
``remove_innermost`` takes an SDTM hook out of that chain again without disturbing the hooks
above it (diffusers' own ``HookRegistry.remove_hook`` would overwrite the forward of a
``new_forward`` hook registered after it).

Pickling: the forwards installed here are instances of module-level classes
(``_ChainForward``, ``_ClassForward``) and ``functools.partial`` objects of bound methods, so a
model whose only hooks are SDTM's pickles (``pickle``, ``torch.save``, ``copy.deepcopy``) with
its hooks wired; the state pickles its settings only (``SDTMState.__getstate__``).
"""
import functools
import inspect
import warnings

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import HookFunctionReference

from . import parallel

HOOK_NAME = "sdtm"


class SDTMError(RuntimeError):
    """A combination SDTM cannot run with (the message names both methods)."""


# -- forwards that pickle ------------------------------------------------------------------------
class _ClassForward:
    """The module's own (class) forward, the bottom of a hook chain. Unlike a bound method kept in
    the module's own state, it unpickles to the class forward whatever the unpickling order."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)

    @property
    def __signature__(self):
        return inspect.signature(type(self.module).forward.__get__(self.module))

    def __repr__(self):
        return f"<forward of {type(self.module).__name__}>"


class _ChainForward:
    """``pre_forward -> forward -> post_forward`` of one hook (diffusers' ``create_new_forward``
    as a picklable object): called as ``_ChainForward(fn_ref)(module, *args, **kwargs)``."""

    def __init__(self, fn_ref):
        self.fn_ref = fn_ref

    def __call__(self, module, *args, **kwargs):
        fn_ref = self.fn_ref
        args, kwargs = fn_ref.pre_forward(module, *args, **kwargs)
        output = fn_ref.forward(*args, **kwargs)
        return fn_ref.post_forward(module, output)


def _is_class_forward(module, value) -> bool:
    if isinstance(value, _ClassForward):
        return value.module is module
    return getattr(value, "__self__", None) is module and getattr(value, "__func__", None) is type(module).forward


_NO_ATTRIBUTE = object()


def _slots(module):
    """The places a forward of ``module``'s wrapper chain can be stored: ``(holder, attribute)``."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        for ref in registry._fn_refs:
            yield ref, "original_forward" if ref.original_forward is not None else "forward"
    if "_old_forward" in vars(module):  # accelerate (add_hook_to_module) calls module._old_forward
        yield module, "_old_forward"
    yield module, "forward"


def _get(holder, attribute, module):
    if holder is module:  # the instance attribute only (the class forward when absent)
        return vars(module).get(attribute, _NO_ATTRIBUTE)
    return getattr(holder, attribute)


def _base_slot(module):
    """The slot holding the module's own forward (the innermost call of its chain), or None."""
    for holder, attribute in _slots(module):
        value = _get(holder, attribute, module)
        if value is _NO_ATTRIBUTE and attribute == "forward":
            return holder, attribute
        if value is not _NO_ATTRIBUTE and _is_class_forward(module, value):
            return holder, attribute
    return None


def _describe_forward(module):
    forward = vars(module).get("forward")
    return f"{type(module).__name__}.forward is replaced by {forward!r}"


def insert_innermost(module, hook, name=HOOK_NAME):
    """Register ``hook`` on ``module``'s ``HookRegistry`` as the innermost hook (see the module
    docstring). Raises ``SDTMError`` when the module's own forward cannot be found in its
    wrapper chain (``module.forward`` replaced by something else, e.g. ``torch.compile(module.forward)``)."""
    existing = getattr(module, "_diffusers_hook", None)
    if existing is not None and name in existing.hooks:
        raise ValueError(f"{type(module).__name__} already has a hook named {name!r}")
    slot = _base_slot(module)
    if slot is None:
        raise SDTMError(
            f"SDTM cannot hook this {type(module).__name__}: {_describe_forward(module)}, which SDTM does not know "
            "how to wrap. Apply SDTM before replacing module.forward (module.compile() and "
            "compile_repeated_blocks() are fine in either order)")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry._module_ref = hook.initialize_hook(registry._module_ref)
    inner = _ClassForward(module)
    fn_ref = HookFunctionReference()
    fn_ref.pre_forward = hook.pre_forward
    fn_ref.post_forward = hook.post_forward
    fn_ref.forward = inner
    if hasattr(hook, "new_forward"):
        fn_ref.original_forward = inner
        fn_ref.forward = functools.partial(hook.new_forward, module)
    chain = functools.partial(_ChainForward(fn_ref), module)
    chain.__wrapped__ = inner  # inspect.signature(module.forward) is the module's own signature
    hook.fn_ref = fn_ref
    hook._chain = chain
    holder, attribute = slot
    setattr(holder, attribute, chain)
    registry.hooks[name] = hook
    registry._hook_order.insert(0, name)
    registry._fn_refs.insert(0, fn_ref)
    _invalidate(registry)
    return hook


def remove_innermost(module, name=HOOK_NAME):
    """Take the hook ``name`` out of ``module``'s chain (any position), restore the forward it
    replaced, and drop the module's registry when it is left empty. Harmless when absent."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or name not in registry.hooks:
        return False
    hook = registry.hooks[name]
    index = registry._hook_order.index(name)
    chain = getattr(hook, "_chain", None)
    if chain is None:  # registered some other way: diffusers' own removal
        registry.remove_hook(name, recurse=False)
    else:
        registry._hook_order.pop(index)
        registry._fn_refs.pop(index)
        del registry.hooks[name]
        for holder, attribute in list(_slots(module)):
            if _get(holder, attribute, module) is chain:
                if holder is module and attribute == "forward":
                    del module.__dict__["forward"]  # the class forward again, no attribute left
                else:
                    setattr(holder, attribute, type(module).forward.__get__(module))
                break
        registry._module_ref = hook.deinitalize_hook(registry._module_ref)
        hook.fn_ref = None
        hook._chain = None
    if not registry.hooks and not registry._hook_order:
        module.__dict__.pop("_diffusers_hook", None)
    else:
        _invalidate(registry)
    return True


def _invalidate(registry):
    invalidate = getattr(registry, "invalidate_child_registries_cache", None)  # diffusers >= 0.36 or so
    if invalidate is not None:
        invalidate()


def invalidate_tree(model):
    """Clear diffusers' cached child-registry lists under ``model`` (hooks were added/removed)."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and hasattr(registry, "_child_registries_cache"):
            registry._child_registries_cache = None


def in_chain(module, name=HOOK_NAME) -> bool:
    """Whether the SDTM hook ``name`` of ``module`` is still reached from ``module.forward``
    (False when something replaced the forward or cut the chain after ``apply_sdtm``)."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = None if registry is None else registry.hooks.get(name)
    chain = getattr(hook, "_chain", None)
    if chain is None:
        return False
    return any(_get(holder, attribute, module) is chain for holder, attribute in _slots(module))


def hook_names(model, skip=(HOOK_NAME,)):
    """``{hook name: number of modules}`` of the diffusers hooks under ``model``."""
    names = {}
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook_name in registry._hook_order:
            if hook_name not in skip:
                names[hook_name] = names.get(hook_name, 0) + 1
    return names


# -- the hooks -----------------------------------------------------------------------------------
class SDTMBlockHook(ModelHook):
    """Runs ``forward(block, *args, **kwargs)`` (the family's SDTM forward) as the block's forward."""

    _is_stateful = False

    def __init__(self, forward, layer):
        super().__init__()
        self.forward = forward
        self.layer = layer
        self._chain = None

    def new_forward(self, module, *args, **kwargs):
        return self.forward(module, *args, **kwargs)

    def __repr__(self):
        return f"SDTMBlockHook(layer={self.layer}, forward={self.forward.__module__}.{self.forward.__name__})"


class SDTMTransformerHook(ModelHook):
    """Per-call state of the transformer: ``begin_call`` before, ``end_call`` after each forward."""

    _is_stateful = True

    def __init__(self, state, check=None):
        super().__init__()
        self.state = state
        self.check = check  # check(module) at the first call of each generation (combinations)
        self.pending_reset = False
        self._chain = None
        self._init_runtime()

    def _init_runtime(self):
        self._signature = None
        self.warned_grid = False
        self.warned_parallel = set()  # the context-parallel warnings given
        self.generation = None  # state.generations of the counters below
        self.calls = 0  # transformer calls of that generation
        self.calls_without_grid = 0

    def signature(self, module):
        if self._signature is None:
            self._signature = inspect.signature(type(module).forward)
        return self._signature

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        state = self.state
        if self.pending_reset:  # diffusers reset the stateful hooks since the last call
            self.pending_reset = False
            state.reset()
        arguments = self.signature(module).bind_partial(module, *args, **kwargs).arguments
        encoder = arguments.get("encoder_hidden_states")
        text_len = encoder.shape[1] if isinstance(encoder, torch.Tensor) and encoder.dim() == 3 else None
        from .registry import _token_grid

        warned = len(state._warned)
        grid = _token_grid(state, module, arguments)
        if len(state._warned) > warned:  # a family's grid reader warned with its reason: no second warning
            self.warned_grid = True
        hidden = arguments.get("hidden_states")
        context, reason = parallel.context_parallel(module), None
        if context is not None:  # this rank's slab (docs/PARALLEL.md)
            seen = hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else None
            grid, reason = parallel.local_grid(grid, context, seen)
            # every call, on every rank: the ranks' grids must be slabs of one image (split inputs)
            grid, reason = parallel.agree(grid, reason, context, arguments,
                                          hidden.device if isinstance(hidden, torch.Tensor) else "cpu")
            self._warn_parallel(reason)
        if grid is None and reason is None and not self.warned_grid:
            self.warned_grid = True
            warnings.warn(f"SDTM: cannot read the image token grid from this {type(module).__name__} call "
                          "(expected a [B, C, H, W] or [B, C, F, H, W] latent with config.patch_size, Flux / Flux.2 "
                          "img_ids on one raster grid, or Qwen-Image img_shapes); such calls run without merging",
                          RuntimeWarning, stacklevel=3)
        batch, device = (hidden.shape[0], hidden.device) if isinstance(hidden, torch.Tensor) else (None, None)
        timestep = parallel.global_timestep(arguments.get("timestep"), context)  # split per-token timesteps
        state.begin_call(timestep, grid, text_len=text_len, batch=batch, device=device)
        if self.generation != state.generations:  # the first call of a generation
            self.generation = state.generations
            self.calls = self.calls_without_grid = 0
            if self.check is not None:
                try:
                    self.check(module)
                except BaseException:
                    state.end_call()
                    self.generation = None
                    raise
            if context is not None:
                self._warn_parallel(parallel.too_small(state))
        self.calls += 1
        self.calls_without_grid += grid is None
        return args, kwargs

    def _warn_parallel(self, message):
        if message is not None and message not in self.warned_parallel:
            self.warned_parallel.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    @torch.compiler.disable
    def post_forward(self, module, output):
        self.state.end_call()
        return output

    def reset_state(self, module):
        """diffusers' ``reset_stateful_hooks``: the next call starts a new generation (lazily, so
        that the statistics of the generation that just ended stay readable)."""
        self.pending_reset = True
        return module

    def __getstate__(self):
        values = dict(self.__dict__)
        for name in ("_signature", "warned_grid", "warned_parallel", "generation", "calls", "calls_without_grid"):
            values.pop(name, None)
        values["pending_reset"] = False
        return values

    def __setstate__(self, values):
        self.__dict__.update(values)
        self._init_runtime()

    def __repr__(self):
        return f"SDTMTransformerHook(step={self.state.step}, num_steps={self.state.num_steps})"


def block_hook(module, name=HOOK_NAME):
    registry = getattr(module, "_diffusers_hook", None)
    hook = None if registry is None else registry.hooks.get(name)
    return hook if isinstance(hook, (SDTMBlockHook, SDTMTransformerHook)) else None


# -- combinations SDTM cannot run with -----------------------------------------------------------
def check_combinations(model, blocks, config):
    """Raise ``SDTMError`` for diffusers features that cannot work with SDTM's merging:

    * a stateful diffusers hook on a sub-module *inside* a patched block (TaylorSeer's default
      attention-output mode, Pyramid Attention Broadcast, FasterCache): it reuses a sub-layer's
      output from an earlier step, and under SDTM that sub-layer sees a different number of
      tokens at every step. Block-level caches (First Block Cache, MagCache, TaylorSeer lite) work.
    * context parallelism where SDTM cannot merge rank-locally (``parallel.check``: a model
      without diffusers' context-parallel plan, uneven chunks, SDTM's own attention options).
    * ``idm_score="attention"`` / ``prompt_reweight`` with an attention backend other than
      "native" set by ``set_attention_backend``: those options compute the joint attention with
      SDTM's own SDPA call, which would ignore that backend.
    """
    for block in blocks:
        for sub_name, sub in block.named_modules():
            if not sub_name:
                continue
            registry = getattr(sub, "_diffusers_hook", None)
            if registry is None:
                continue
            for hook_name in registry._hook_order:
                hook = registry.hooks[hook_name]
                if getattr(hook, "_is_stateful", False):
                    raise SDTMError(
                        f"SDTM cannot run together with the diffusers hook {hook_name!r} ({type(hook).__name__}) "
                        f"on the sub-module {sub_name!r} of a {type(block).__name__}: it reuses that sub-layer's "
                        "output from earlier steps, and under SDTM the sub-layer sees a different number of tokens "
                        "at every step. Use a block-level cache with SDTM (apply_first_block_cache, apply_mag_cache, "
                        "TaylorSeerCacheConfig(use_lite_mode=True)) or remove one of the two "
                        "(sdtm_kernels.remove_sdtm / transformer.disable_cache())")
    parallel.check(model, config)
    if config.idm_score == "attention" or config.prompt_reweight:
        for block in blocks:
            for sub in block.modules():
                backend = getattr(getattr(sub, "processor", None), "_attention_backend", None)
                value = getattr(backend, "value", backend)
                if value not in (None, "native"):
                    raise SDTMError(
                        f"SDTM's idm_score='attention' / prompt_reweight compute the joint attention with SDTM's own "
                        f"SDPA call and would ignore set_attention_backend({value!r}); use the default SDTM options "
                        "(the stock processors and their backend run) or set_attention_backend('native')")
