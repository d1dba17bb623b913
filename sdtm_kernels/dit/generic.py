"""SDTM for user-written DiT blocks of the standard adaLN shape (no diffusers needed)::

    shift1, scale1, gate1, shift2, scale2, gate2 = modulation(block, c)
    x = x + gate1 * attn(modulate(norm1(x), shift1, scale1))
    x = x + gate2 * mlp(modulate(norm2(x), shift2, scale2))

Usage (facebookresearch DiT style)::

    state = SDTMState(SDTMConfig(...), num_steps=50)
    wrap_dit_blocks(model.blocks, state,
                    modulation=lambda blk, c: blk.adaLN_modulation(c).chunk(6, dim=1))
    attach_state(model, state, grid=(h, w), timestep="t")   # or state.begin_call(t, grid) per call
    # new generation: state.reset() (or a step whose timestep equals the first one)
"""
import inspect
from typing import Callable, Optional

from torch import nn

from .core import block_context
from .state import SDTMState


def modulate(x, shift, scale):
    """DiT's ``x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SDTMBlockWrapper(nn.Module):
    """Runs ``block`` with SDTM. ``attn``, ``mlp``, ``norm1``, ``norm2`` name the block's
    sub-modules (or are callables taking the block and a tensor); ``modulation(block, *cond)``
    returns ``(shift1, scale1, gate1, shift2, scale2, gate2)`` with ``[B, C]`` tensors;
    ``modulate(x, shift, scale)`` applies one (default: DiT's). The wrapper's forward takes
    ``(x, *cond)``; ``x`` is ``[B, N, C]`` image tokens in raster order of ``state.grid``.
    Without an active step (``state.begin_call``) the block runs exactly."""

    def __init__(self, block: nn.Module, state: Optional[SDTMState], layer: int, *, modulation: Callable,
                 attn="attn", mlp="mlp", norm1="norm1", norm2="norm2", modulate: Callable = modulate):
        super().__init__()
        if not callable(modulation):
            raise TypeError("modulation must be a callable (block, *cond) -> 6 tensors")
        for name, part in (("attn", attn), ("mlp", mlp), ("norm1", norm1), ("norm2", norm2)):
            if isinstance(part, str) and not isinstance(getattr(block, part, None), nn.Module):
                raise TypeError(f"{name}={part!r}: {type(block).__name__} has no sub-module {part!r}")
            if not isinstance(part, str) and not callable(part):
                raise TypeError(f"{name} must be a sub-module name or a callable (block, x) -> tensor")
        config = getattr(state, "config", None)
        if config is not None and (config.idm_score == "attention" or config.prompt_reweight):
            raise ValueError("idm_score='attention' and prompt_reweight=True need joint text-image attention "
                             "(SD3, Flux); SDTMBlockWrapper blocks have none: use idm_score='similarity' and "
                             "prompt_reweight=False")
        self.block = block
        self.state = state
        self.layer = layer
        self._modulation = modulation
        self._parts = {"attn": attn, "mlp": mlp, "norm1": norm1, "norm2": norm2}
        self._modulate = modulate

    def _run(self, part, x):
        fn = self._parts[part]
        return getattr(self.block, fn)(x) if isinstance(fn, str) else fn(self.block, x)

    def forward(self, x, *cond):
        shift1, scale1, gate1, shift2, scale2, gate2 = self._modulation(self.block, *cond)
        h = self._modulate(self._run("norm1", x), shift1, scale1)
        ctx = block_context(self.state, self.layer, h)
        x = ctx.finish("attn", self._run("attn", ctx.merge("attn", h)), residual=x, gate=gate1)
        h = self._modulate(self._run("norm2", x), shift2, scale2)
        return ctx.finish("mlp", self._run("mlp", ctx.merge("mlp", h)), residual=x, gate=gate2)


def wrap_dit_blocks(blocks: nn.ModuleList, state: SDTMState, **adapter) -> nn.ModuleList:
    """Replace every block of ``blocks`` by an ``SDTMBlockWrapper`` (layer = position) in place;
    already wrapped blocks are re-bound to ``state``. Sets ``state.num_layers``."""
    for layer, block in enumerate(blocks):
        inner = block.block if isinstance(block, SDTMBlockWrapper) else block
        blocks[layer] = SDTMBlockWrapper(inner, state, layer, **adapter)
    state.num_layers = len(blocks)
    return blocks


def unwrap_dit_blocks(blocks: nn.ModuleList) -> nn.ModuleList:
    """Undo ``wrap_dit_blocks`` in place."""
    for layer, block in enumerate(blocks):
        if isinstance(block, SDTMBlockWrapper):
            blocks[layer] = block.block
    return blocks


def attach_state(model: nn.Module, state: SDTMState, *, grid, timestep: str = "t"):
    """Forward hooks on ``model`` that call ``state.begin_call(<timestep argument>, grid)``
    before and ``state.end_call()`` after each forward. ``grid`` is ``(H, W)`` or a callable
    taking the bound arguments dict. Returns the hook handles (``.remove()`` them to detach)."""
    signature = inspect.signature(type(model).forward)

    def pre_hook(module, args, kwargs):
        arguments = signature.bind_partial(module, *args, **kwargs).arguments
        if timestep not in arguments:
            raise ValueError(f"attach_state: the model was called without its {timestep!r} argument")
        state.begin_call(arguments[timestep], grid(arguments) if callable(grid) else grid)

    def post_hook(module, args, kwargs, output):
        state.end_call()

    return (model.register_forward_pre_hook(pre_hook, with_kwargs=True),
            model.register_forward_hook(post_hook, with_kwargs=True))


__all__ = ["SDTMBlockWrapper", "attach_state", "modulate", "unwrap_dit_blocks", "wrap_dit_blocks"]
