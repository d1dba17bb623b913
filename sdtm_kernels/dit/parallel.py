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
decision the same on every rank; a sequence holding tokens besides the grid's, e.g. reference
images, which the plan splits together with the generated ones) runs without merging, with a warning.

A rank's own chunk of split inputs cannot tell whether the other ranks' chunks continue the same
image: with reference-image tokens (Flux.2 edit, Flux.1 Kontext) rank 0 may hold nothing but
generated rows while rank 1 holds generated rows and references, or only references. So under a
plan that splits at the transformer's inputs the ranks agree (``agree``: one all-reduce of a few
integers per transformer call) that their grids are the equal, consecutive slabs of one image, and
all run without merging otherwise; without it they would merge different counts (a collective size
mismatch: an error on gloo, a hang or garbage on NCCL) or merge reference tokens.
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..reference import schedule as ref_schedule

SPLIT_HOOK_PREFIXES = ("cp_input---", "cp_output---")  # diffusers' context-parallel hook names
ROOT_SPLIT_HOOK = "cp_input---"  # the plan's "" entry: the transformer's own inputs


# -- the slab rule (also on one process: ``shards``) -------------------------------------------
def shard_grid(grid, shards: int):
    """One of ``shards`` equal slabs of ``grid`` cut along its first axis (None for None)."""
    if grid is None or shards == 1:
        return grid
    return (grid[0] // shards,) + tuple(grid[1:])


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
    split_timestep: bool = False  # the "" entry splits a per-token timestep with the sequence (Wan 2.2 TI2V)
    mesh: object = field(default=None, compare=False, repr=False)  # the CP ranks' (flattened) device mesh


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
                           uneven=bool(config.ulysses_anything or config.ring_anything),
                           split_timestep="timestep" in metadata, mesh=getattr(config, "_flattened_mesh", None))


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
    if not parallel.root_split and seen_tokens is not None and seen_tokens != math.prod(grid):
        # a global sequence with tokens besides the grid's: the plan splits them all, so rank 0's chunk is not
        # slab 0 (the same shapes on every rank: the same decision)
        return None, (f"SDTM under context parallelism: this call's sequence holds {seen_tokens} image tokens, of "
                      f"which the token grid {grid} covers {math.prod(grid)}; the others (reference images of an "
                      "edit model, Qwen-Image-Layered's condition image) are split over the ranks with them, so a "
                      "rank's tokens are not one slab of the grid. Such calls run without merging on every rank")
    if grid[0] % degree:
        return None, (f"SDTM under context parallelism: the token grid {grid} cannot be cut into {degree} slabs "
                      f"of {rows}. Such calls run without merging on every rank")
    local = (grid[0] // degree,) + grid[1:]
    if parallel.root_split and seen_tokens is not None and math.prod(local) != seen_tokens:
        return None, (f"SDTM under context parallelism: a slab of the token grid {grid} holds {math.prod(local)} "
                      f"tokens but this rank sees {seen_tokens}; such calls run without merging on every rank")
    return local, None


AGREE_ENTRIES = 8  # valid, len(grid), grid (3), first t, last t, first row - rank * slab height


def chunk_layout(arguments):
    """``[lowest t, highest t, first row]`` of the rank's ``img_ids`` (Flux.1 / Flux.2 columns
    ``t, h, w[, l]``) as a tensor on the ids' device (no host read), or None without such ids."""
    ids = arguments.get("img_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (2, 3) or ids.shape[-1] < 2 or ids.shape[-2] == 0:
        return None
    ids = ids[0] if ids.dim() == 3 else ids
    return torch.stack([ids[:, 0].min(), ids[:, 0].max(), ids[:, 1].min()]).long()


def agree(grid, reason, parallel: ContextParallel, arguments, device):
    """``(grid, reason)`` the same on every rank, for a plan that splits the transformer's inputs
    (else returned as given): the rank keeps its grid only when every rank has one, all equal, and
    their ``img_ids`` say they are consecutive slabs of one image (one ``t``, rank ``r``'s first row
    ``r`` slab heights after rank 0's). One all-reduce (max of the entries and of their negatives)
    and one host read per call, on every rank whatever its own grid: no rank skips it."""
    if not parallel.root_split or parallel.mesh is None:
        return grid, reason
    import torch.distributed as dist

    group = parallel.mesh.get_group()
    shape = tuple(grid) if grid is not None and len(grid) <= 3 else ()  # (H, W) or (T, H, W)
    head = torch.tensor([bool(shape), len(shape), *shape, *(0,) * (3 - len(shape))], dtype=torch.long)
    layout = chunk_layout(arguments)
    if layout is None:  # no ids to check the slabs' order by: equal grids only
        layout = torch.zeros(3, dtype=torch.long)
    elif shape:
        layout = layout - torch.tensor([0, 0, dist.get_rank(group) * shape[0]], device=layout.device)
    entries = torch.cat([head.to(device), layout.to(device)])
    both = torch.cat([entries, -entries])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    values = both.tolist()
    high, low = values[:AGREE_ENTRIES], [-v for v in values[AGREE_ENTRIES:]]
    if low[0] == 1 and high == low and high[5] == high[6]:
        return grid, reason
    if grid is None:
        return None, reason  # this rank's own reason (or the hook's no-grid warning)
    return None, ("SDTM under context parallelism: the ranks' image tokens are not the equal, consecutive slabs of "
                  "one token grid (e.g. reference-image tokens, which the plan splits together with the generated "
                  "ones, so a rank may hold generated rows only, references only or both); such calls run without "
                  "merging on every rank")


def global_timestep(timestep, parallel: Optional[ContextParallel]):
    """The timestep SDTM counts steps by, the same on every rank: a per-token ``[B, N]`` timestep
    that the plan splits with the sequence (Wan's ``""`` entry) becomes the largest value of the
    first sample over all ranks (one all-reduce), as ``state.timestep_value`` takes it on one
    process. Without it a rank holding only a conditioning frame's tokens (timestep 0 at every step)
    would count one long step while the others step on: different modes, different merge counts."""
    if (parallel is None or not parallel.split_timestep or parallel.mesh is None
            or not isinstance(timestep, torch.Tensor) or timestep.dim() < 2 or timestep.numel() == 0):
        return timestep
    import torch.distributed as dist

    value = timestep[0].amax().reshape(1).clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=parallel.mesh.get_group())
    return value


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
            "diffusers ships (Flux.1, Flux.2, Qwen-Image, Wan; see docs/PARALLEL.md). Use one of the two")
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
