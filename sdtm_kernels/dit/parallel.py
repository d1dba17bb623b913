"""SDTM under diffusers' context parallelism (``model.enable_parallelism(config=ContextParallelConfig(...))``).

Context parallelism (CP) cuts the token sequence into ``degree = ring_degree * ulysses_degree``
equal, contiguous chunks, one per rank; attention then exchanges queries/keys/values (Ulysses:
all-to-all) or keys/values (Ring: all-gather) between the ranks. SDTM runs rank-locally:

* Each rank merges on its own slab of the token grid: the grid cut into ``degree`` equal parts
  along its first axis (rows of ``(H, W)``, frames of ``(T, H, W)``). It plans, keeps ``li``, its
  cache and its dst draws for that slab only, so windows and merge groups never span two ranks,
  and gathers the rotary entries of its merged rows from its own (split) rotary table.
* Every decision follows from the step schedule and shapes that are equal on every rank (the
  slab's grid, the step, the layer): every rank merges the same number of tokens at every block,
  which Ulysses' all-to-all needs, and no rank ever waits for a collective another one skips.
* ``shards=k`` (an ``apply_sdtm`` option) applies the same rule on one process: the grid is
  planned in ``k`` slabs, each as one rank would, so a single-process run reproduces a k-rank
  run up to the rounding of attention.

Where the slab's grid comes from (``local_grid``): when the CP plan splits the transformer's own
``hidden_states`` (the ``""`` entry: Flux.1, Flux.2), SDTM's transformer hook, which sits
beneath diffusers' split hook, reads the grid from the rank's split inputs (Flux: its ``img_ids``
rows). Otherwise (a plan that splits at the first block: Wan, Qwen-Image) the hook reads the global
grid and cuts it along its first axis. A grid that cannot be cut so (height not divisible by the
degree; a grid read from split inputs less than 2 along its first axis, the rule that keeps the
decision the same on every rank) runs without merging, with a warning.
"""
import math
from dataclasses import dataclass
from typing import Optional

from ..reference import schedule as ref_schedule

SPLIT_HOOK_PREFIXES = ("cp_input---", "cp_output---")  # diffusers' context-parallel hook names
ROOT_SPLIT_HOOK = "cp_input---"  # the plan's "" entry: the transformer's own inputs


# -- the slab rule (also on one process: ``shards``) -------------------------------------------
def shard_grid(grid, shards: int):
    """One of ``shards`` equal slabs of ``grid`` cut along its first axis (None for None)."""
    if grid is None or shards == 1:
        return grid
    return (grid[0] // shards,) + tuple(grid[1:])


def check_shards(shards: int, grid):
    if grid and grid[0] % shards:
        raise ValueError(f"shards={shards} must divide the first axis of the token grid {tuple(grid)} "
                         "(every slab is planned on its own with the same merge count)")


def slab_rows(tensor, shards: int, repeat: bool = False):
    """``[B, N, ...]`` -> ``[B * shards, N / shards, ...]``: slab ``s`` of sample ``b`` is row
    ``b * shards + s`` (a view of a contiguous tensor, so a planner writing ``li_out`` writes the
    caller's buffer). ``repeat``: ``[B, G]`` per-slab draws, the same for every slab (as every
    rank draws them from the same seed under context parallelism)."""
    if tensor is None:
        return None
    batch, rest = tensor.shape[0], tuple(tensor.shape[1:])
    if repeat:
        return tensor.unsqueeze(1).expand(batch, shards, *rest).reshape(batch * shards, *rest)
    return tensor.reshape(batch * shards, rest[0] // shards, *rest[1:])


# -- context parallelism of a model ------------------------------------------------------------
@dataclass(frozen=True)
class ContextParallel:
    """What SDTM needs to know of a model's context parallelism."""

    degree: int  # ranks the sequence is split over: ring_degree * ulysses_degree
    ring_degree: int
    ulysses_degree: int
    root_split: bool  # the CP plan splits the transformer's own hidden_states (its "" entry)
    uneven: bool  # ulysses_anything / ring_anything: chunks of different lengths


def context_parallel(model) -> Optional[ContextParallel]:
    """The model's context parallelism (None without): read from ``model._parallel_config``
    (set by ``enable_parallelism``) and the split hook on the model itself."""
    parallel = getattr(model, "_parallel_config", None)
    config = getattr(parallel, "context_parallel_config", None)
    if config is None:
        return None
    registry = getattr(model, "_diffusers_hook", None)
    root = None if registry is None else registry.hooks.get(ROOT_SPLIT_HOOK)
    metadata = getattr(root, "metadata", None) or {}
    ring, ulysses = config.ring_degree or 1, config.ulysses_degree or 1
    return ContextParallel(degree=ring * ulysses, ring_degree=ring, ulysses_degree=ulysses,
                           root_split="hidden_states" in metadata,
                           uneven=bool(config.ulysses_anything or config.ring_anything))


def has_split_hooks(model) -> bool:
    """Whether diffusers' context-parallel hooks sit anywhere in ``model``."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and any(name.startswith(SPLIT_HOOK_PREFIXES) for name in registry._hook_order):
            return True
    return False


def local_grid(grid, parallel: ContextParallel, seen_tokens: Optional[int]):
    """``(grid of this rank's slab or None, why not or None)``. ``grid``: what the transformer
    hook read from the call; ``seen_tokens``: the image tokens of the ``hidden_states`` it saw
    (a ``[B, N, C]`` sequence; None for a latent). Decided from shapes every rank shares."""
    degree = parallel.degree
    rows = ("whole rows (frames) of the token grid: its first axis must be divisible by the context-parallel "
            f"degree {degree}")
    if grid is None:
        if parallel.root_split:
            return None, (f"SDTM under context parallelism: this rank's image tokens are not one block of {rows}, "
                          "with at least 2 per rank; such calls run without merging on every rank")
        return None, None  # the hook's own warning (no grid at all)
    grid = tuple(grid)
    if parallel.root_split and seen_tokens is not None and math.prod(grid) == seen_tokens:
        # read from this rank's split inputs. A slab of 1 along the first axis may also be a piece of
        # one row, read on some ranks only; from 2 on, every rank holds the same whole slab.
        if grid[0] < 2:
            return None, (f"SDTM under context parallelism: each rank holds {grid} tokens, under 2 rows (frames) "
                          f"of the token grid; SDTM needs {rows} with at least 2 per rank. Such calls run without "
                          "merging on every rank")
        return grid, None
    if grid[0] % degree:
        return None, (f"SDTM under context parallelism: the token grid {grid} cannot be cut into {degree} slabs "
                      f"of {rows}. Such calls run without merging on every rank")
    local = (grid[0] // degree,) + grid[1:]
    if parallel.root_split and seen_tokens is not None and math.prod(local) != seen_tokens:
        return None, (f"SDTM under context parallelism: a slab of the token grid {grid} holds {math.prod(local)} "
                      f"tokens but this rank sees {seen_tokens}; such calls run without merging on every rank")
    return local, None


def too_small(state) -> Optional[str]:
    """The warning when the schedule removes no token at any merging step on one plan's grid
    (``state.plan_grid``, a rank's slab) of the current call (None when it does, or merging is
    off): a slab too small for the merge granularity of 16 windows / tokens."""
    config, grid = state.config, state.plan_grid
    if grid is None or config.ratio == 0.0:
        return None
    tokens = math.prod(grid)
    removal = {"ssm": 0, "idm": 0}
    switch = config.switch_index(state.num_steps)
    for step in range(state.num_steps):
        if config.protect_steps and step % config.protect_steps == 0:
            continue  # exact steps
        stage = "ssm" if step <= switch else "idm"
        removal[stage] = max(removal[stage], math.floor(tokens * state.step_ratio(step)))
    if any(ref_schedule.tokens_removed(stage, count, grid, state.window) for stage, count in removal.items()):
        return None
    return (f"SDTM under context parallelism: each rank's slab of the token grid, {grid}, is too small for the "
            "schedule to merge any token at any step (merges come in groups of 16 windows or tokens per rank); "
            "SDTM runs but changes nothing. Use fewer ranks, a larger image or a higher ratio")


def check(model, config):
    """Raise ``SDTMError`` where SDTM cannot run under the model's context parallelism."""
    from .hooks import SDTMError

    parallel = context_parallel(model)
    if parallel is None:
        if has_split_hooks(model):
            raise SDTMError("SDTM found diffusers' context-parallel hooks on this model but no "
                            "model._parallel_config: apply context parallelism with model.enable_parallelism(...)")
        return
    name = type(model).__name__
    if getattr(type(model), "_cp_plan", None) is None:
        raise SDTMError(
            f"SDTM cannot run with context parallelism on {name}: diffusers has no context-parallel plan "
            "(_cp_plan) for it (SD3, PixArt, DiT), and SDTM supports context parallelism only with the plans "
            "diffusers ships (Flux.1; see docs/PARALLEL.md). Use one of the two")
    if parallel.uneven:
        raise SDTMError(
            "SDTM cannot run with ulysses_anything / ring_anything: their chunks differ in length between ranks, "
            "so the ranks would merge different token counts. Use even chunks (the default) with SDTM")
    options = [o for o, on in (("idm_score='attention'", config.idm_score == "attention"),
                               ("prompt_reweight=True", config.prompt_reweight)) if on]
    if options:
        raise SDTMError(
            f"SDTM's {' and '.join(options)} compute the joint attention with SDTM's own SDPA call, which would "
            "attend to this rank's tokens only under context parallelism; use idm_score='similarity' and "
            "prompt_reweight=False (the stock processors run diffusers' Ulysses / Ring attention)")
