"""SDTM for other DiTs from a few-line description of their block (docs/SEMANTICS.md, "Other DiTs").

A block of the pattern ``x + gate * attn(modulate(norm(x)))`` (prompt tokens may be joined),
``x + cross(x, prompt)``, ``x + gate * ff(modulate(norm(x)))`` is described by where its
sub-modules are instead of mirroring its forward::

    describe_block(LTXVideoTransformerBlock, attn="attn1", cross="attn2", ff="ff", rotary="image_rotary_emb",
                   grid=lambda args: (args["num_frames"], args["height"], args["width"]))
    apply_sdtm(pipe)      # patches every LTXVideoTransformerBlock (registry._family asks forward_for)

The block's own forward runs unchanged, inside ``described_forward`` (its SDTM block hook), and SDTM
hooks the described sub-modules (diffusers hooks named "sdtm": ``remove_sdtm`` takes them out). The
first one called in a block call builds the block's ``BlockContext`` from its input (the modulated
norm output: the metric); each then runs on the merged image rows and its output is unmerged to full
length before the block applies its own gate and residual. Caches and blends are of that ungated output.
"""
import dataclasses
import inspect
import math
import numbers
from typing import Callable, Optional

import torch
from torch import nn

from .core import BlockContext, block_context

IMAGE_TOKENS = ("all", "first", "last")
_OPTIONS = (("attn", "attn"), ("cross", "cross"), ("ff", "mlp"))  # (describe_block option, sub-layer role)
_ABSENT = object()
_DESCRIPTIONS = {}  # block class -> BlockDescription (describe_block registers, forget_block removes)


@dataclasses.dataclass(frozen=True, repr=False)
class BlockDescription:
    """What ``describe_block`` registered for ``block_class`` (the arguments: see there)."""

    block_class: type
    attn: Optional[str] = None
    ff: Optional[str] = None
    cross: Optional[str] = None
    image_tokens: str = "all"
    rotary: Optional[str] = None
    grid: object = None
    when: Optional[Callable] = None
    exact_if: tuple = ()
    shared_plan: Optional[bool] = None

    def __repr__(self):
        fields = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)[1:]
                  if getattr(self, f.name) != f.default]
        return f"describe_block({', '.join([self.block_class.__name__] + fields)})"

    def sublayers(self, block):
        """``[(role, path, module)]`` of ``block``. A path whose attribute is None is skipped (a block
        built without cross-attention); a missing one raises ``TypeError``."""
        out, seen = [], {}
        for option, role in _OPTIONS:
            path = getattr(self, option)
            if path is None:
                continue
            parent_path, _, name = path.rpartition(".")
            try:
                module = getattr(block.get_submodule(parent_path) if parent_path else block, name, _ABSENT)
            except AttributeError:
                module = _ABSENT
            if module is None:
                continue
            if not isinstance(module, nn.Module) or module is block:
                raise TypeError(f"{self}: {type(block).__name__} has no sub-module {path!r} ({option}={path!r})")
            if id(module) in seen:
                raise ValueError(f"{self}: {option}={path!r} and {seen[id(module)]} name the same sub-module")
            seen[id(module)] = f"{option}={path!r}"
            out.append((role, path, module))
        return out


def describe_block(block_class, *, attn=None, ff=None, cross=None, image_tokens="all", rotary=None, grid=None,
                   when=None, exact_if=(), shared_plan=None) -> BlockDescription:
    """Register how SDTM merges around the sub-modules of ``block_class`` (and of subclasses that
    keep its ``forward``): ``apply_sdtm`` then patches those blocks, even where a fused family exists.
    Returns the description; ``forget_block(block_class)`` removes it.

    ``attn`` / ``ff`` / ``cross``: paths (``"attn1"``, ``"ff.net"``) of the self-attention (merged on SSM
    steps), feed-forward (SSM and IDM) and cross-attention (its query side, SSM steps with
    ``merge_cross_attention``); at least one. Each takes the ``[B, L, C]`` sequence first and returns an
    aligned ``[B, L, C]`` tensor (or a tuple whose first item is). ``image_tokens``: where the
    ``N = prod(grid)`` image tokens sit in those sequences: ``"all"`` (``L == N``), ``"last"`` (after a
    prefix, e.g. joined prompt tokens) or ``"first"``; other sequences run exactly. ``rotary``: the
    keyword of the attention call with the rotary table (a tensor or tuple of tensors, one entry per
    token: ``[L or N, D]`` shared by the batch, which makes the block build one plan for the batch, or
    ``[B, L or N, ...]``); merged rows take their representative token's entry (``shared_plan``
    forces the plan choice). ``grid``: the token grid of a transformer call, ``callable(arguments) ->
    (H, W) / (T, H, W) / None`` on the transformer forward's bound arguments, or ``(argument, patch)``
    for a ``[B, C, H, W]`` / ``[B, C, F, H, W]`` latent; None: the transformer's default (a latent with
    ``config.patch_size``). ``when(block) -> bool``: which instances. ``exact_if``: argument names (e.g.
    ``"attention_mask"``): a sub-module call passing one (not None) runs exactly, the whole block call
    when it is the first.
    """
    def fail(error, message):
        raise error(f"describe_block: {message}")

    if not (isinstance(block_class, type) and issubclass(block_class, nn.Module)) \
            or block_class.forward is nn.Module.forward:
        fail(TypeError, f"block_class must be an nn.Module subclass with a forward, got {block_class!r}")
    for name, value in (("attn", attn), ("ff", ff), ("cross", cross), ("rotary", rotary)):
        if value is not None and (not isinstance(value, str) or not value):
            fail(TypeError, f"{name} must be a sub-module path / argument name (str) or None, got {value!r}")
    paths = [p for p in (attn, ff, cross) if p is not None]
    if not paths:
        fail(ValueError, "name at least one of attn=, ff=, cross=")
    if len(set(paths)) != len(paths):
        fail(ValueError, f"attn={attn!r}, ff={ff!r}, cross={cross!r} must name different sub-modules")
    if image_tokens not in IMAGE_TOKENS:
        fail(ValueError, f"image_tokens must be one of {IMAGE_TOKENS}, got {image_tokens!r}")
    if rotary is not None and attn is None:
        fail(ValueError, "rotary= is an argument of the self-attention: name attn= too")
    if grid is not None and not callable(grid) and not _is_latent_spec(grid):
        fail(TypeError, "grid must be None, a callable (arguments) -> grid, or (argument name, patch) with patch an "
                        f"int or (p_t, p_h, p_w); got {grid!r}")
    if when is not None and not callable(when):
        fail(TypeError, f"when must be a callable (block) -> bool or None, got {when!r}")
    exact_if = (exact_if,) if isinstance(exact_if, str) else exact_if
    if not isinstance(exact_if, (tuple, list)) or not all(isinstance(n, str) and n for n in exact_if):
        fail(TypeError, f"exact_if must be argument names (str or tuple of str), got {exact_if!r}")
    if shared_plan is not None and not isinstance(shared_plan, bool):
        fail(TypeError, f"shared_plan must be None or a bool, got {shared_plan!r}")
    description = BlockDescription(block_class, attn, ff, cross, image_tokens, rotary, grid, when,
                                   tuple(exact_if), shared_plan)
    _DESCRIPTIONS[block_class] = description
    return description


def forget_block(block_class) -> Optional[BlockDescription]:
    """Remove (and return) the description of ``block_class``; a patched model keeps its hooks
    until ``apply_sdtm`` or ``remove_sdtm`` runs again."""
    return _DESCRIPTIONS.pop(block_class, None)


def described_blocks() -> dict:
    """``{block class: BlockDescription}`` of the registered descriptions (a copy)."""
    return dict(_DESCRIPTIONS)


def _positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _is_latent_spec(grid) -> bool:
    if not (isinstance(grid, tuple) and len(grid) == 2 and isinstance(grid[0], str)):
        return False
    patch = grid[1]
    return len(patch) == 3 and all(map(_positive_int, patch)) if isinstance(patch, tuple) else _positive_int(patch)


def description_of(block) -> Optional[BlockDescription]:
    """The description of ``block``'s class or of a base class whose forward it keeps, else None."""
    cls = type(block)
    for klass in cls.__mro__:
        if klass in _DESCRIPTIONS:
            return _DESCRIPTIONS[klass] if cls.forward is klass.forward else None
    return None


def forward_for(block):
    """``described_forward`` for a described block that ``when`` selects (and that has one of the
    described sub-modules), else None; ``TypeError`` / ``ValueError`` when the description does not fit."""
    description = description_of(block)
    if description is None or (description.when is not None and not description.when(block)):
        return None
    return described_forward if description.sublayers(block) else None


# -- the block call ----------------------------------------------------------------------------------
class _BlockRun:
    """A described block's current call, shared by its sub-module hooks: state and slot (None outside
    a call with an active step), the call's image token count and batch, the ``BlockContext``."""

    def __init__(self, block_forward):
        self.block_forward = block_forward  # the class's forward as a plain function (dynamo traces it)
        self.end()

    def begin(self, state, slot):
        active = state is not None and state.active
        self.state, self.slot = (state, slot) if active else (None, None)
        self.num_tokens = math.prod(state.grid) if active and state.grid is not None else 0
        self.ctx, self.batch, self.shared = None, None, False

    def end(self):
        self.state = self.slot = self.ctx = self.batch = None
        self.num_tokens, self.shared = 0, False

    def __getstate__(self):
        return {"block_forward": self.block_forward}

    def __setstate__(self, values):
        self.__init__(values["block_forward"])


def described_forward(self, *args, **kwargs):
    """The SDTM forward of a described block: its own forward, with the call open for the hooks of
    its sub-modules."""
    run = getattr(self, "_sdtm_run", None)
    if run is None:
        return type(self).forward(self, *args, **kwargs)
    run.begin(getattr(self, "_sdtm_state", None), getattr(self, "_sdtm_slot", None))
    try:
        return run.block_forward(self, *args, **kwargs)
    finally:
        run.end()


# -- sub-module hooks ----------------------------------------------------------------------------------
def _sublayer_hook_class():
    """``SublayerHook``, a diffusers ``ModelHook`` made on first use (importing this module imports no
    diffusers); a module-level name, so patched models pickle."""
    if "SublayerHook" in globals():
        return globals()["SublayerHook"]
    from diffusers.hooks import ModelHook

    class SublayerHook(ModelHook):
        """Merges the input of one described sub-module and unmerges its output (``_sublayer_call``)."""

        _is_stateful = False

        def __init__(self, run, role, path, module, description):
            super().__init__()
            self.run, self.role, self.path, self._chain = run, role, path, None
            self.original = type(module).forward  # the bottom of the module's chain, a plain function
            self.label = f"{type(module).__name__} {description.block_class.__name__}.{path}"
            self.image_tokens, self.shared_plan = description.image_tokens, description.shared_plan
            params = list(inspect.signature(self.original).parameters.values())[1:]  # without self
            if not params or params[0].kind in (params[0].KEYWORD_ONLY, params[0].VAR_KEYWORD):
                raise TypeError(f"{self.label}: its forward takes no positional input to merge")
            positional = []  # names that can be passed by position, in order
            for param in params:
                if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                    break
                positional.append(param.name if param.kind == param.POSITIONAL_OR_KEYWORD else None)

            def where(name):  # (name, positional index or None)
                return name, positional.index(name) if name in positional else None

            self.input = (positional[0] if positional else None), 0
            self.rotary = where(description.rotary) if role == "attn" and description.rotary else None
            self.exact_if = tuple(where(name) for name in description.exact_if)

        def new_forward(self, module, *args, **kwargs):
            return _sublayer_call(self, module, args, kwargs)

        def __repr__(self):
            return f"SDTMSublayerHook(role={self.role!r}, path={self.path!r})"

    SublayerHook.__module__, SublayerHook.__qualname__ = __name__, "SublayerHook"
    globals()["SublayerHook"] = SublayerHook
    return SublayerHook


def __getattr__(name):  # pickle finds SublayerHook by name
    if name == "SublayerHook":
        return _sublayer_hook_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _argument(args, kwargs, name, index):
    if name is not None and name in kwargs:
        return kwargs[name]
    return args[index] if index is not None and index < len(args) else _ABSENT


def _given(value) -> bool:
    return value is not None and value is not _ABSENT


def _with_argument(args, kwargs, name, index, value):
    if index is not None and index < len(args) and name not in kwargs:
        return args[:index] + (value,) + args[index + 1:], kwargs
    return args, {**kwargs, name: value}


def _image_start(rule, length, num_tokens):
    """Where the ``num_tokens`` image tokens start in a sequence of ``length``, or None."""
    if num_tokens == 0 or length < num_tokens or (rule == "all" and length != num_tokens):
        return None
    return length - num_tokens if rule == "last" else 0


def _sublayer_call(hook, module, args, kwargs):
    run, state = hook.run, hook.run.state

    def original(*args, **kwargs):
        return hook.original(module, *args, **kwargs)

    if state is None:  # not inside a patched block's call with an active step
        return original(*args, **kwargs)
    x = _argument(args, kwargs, *hook.input)
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{hook.label}: called with a {shape} input; the generic path merges [batch, tokens, "
                         "channels] sequences (a sub-module that mixes neighbouring tokens, e.g. a convolution over "
                         "the token grid, cannot run on merged rows: leave it out of describe_block)")
    start = _image_start(hook.image_tokens, x.shape[1], run.num_tokens)
    exact = any(_given(_argument(args, kwargs, *arg)) for arg in hook.exact_if)
    ctx = run.ctx
    if ctx is None:
        ctx = run.ctx = _block_context(hook, run, x, start, exact, args, kwargs)
    if exact or start is None or ctx.num_tokens != run.num_tokens or x.shape[0] != run.batch:
        return original(*args, **kwargs)  # not the block's image sequence (e.g. one chunk of a chunked FF)
    mergeable = hook.role != "cross" or state.config.merge_cross_attention
    if mergeable and ctx.merges(hook.role):
        return _merged_call(hook, run, ctx, original, x, start, args, kwargs)
    ctx.note(hook.role, run.num_tokens)
    out = original(*args, **kwargs)
    if ctx.mode == "protected" and mergeable:  # the cache: this sub-module's ungated image output
        state.set_cache(ctx.slot, hook.role, _sequence(hook, out, x.shape[1])[:, start:start + run.num_tokens])
    return out


def _block_context(hook, run, x, start, exact, args, kwargs):
    metric = x if start is None else x[:, start:start + run.num_tokens]
    run.batch = x.shape[0]
    if exact:
        return BlockContext(run.state, run.slot, "exact", num_tokens=metric.shape[1])
    shared = hook.shared_plan
    if shared is None:
        shared = hook.rotary is not None and _shared_table(_argument(args, kwargs, *hook.rotary))
    run.shared = shared
    return block_context(run.state, run.slot, metric, shared=shared)


def _merged_call(hook, run, ctx, original, x, start, args, kwargs):
    n, length = run.num_tokens, x.shape[1]
    whole = length == n
    rows = ctx.merge(hook.role, x if whole else x[:, start:start + n])
    joined = rows if whole else torch.cat([x[:, :start], rows, x[:, start + n:]], dim=1)
    args = tuple(joined if a is x else a for a in args)  # every argument that is the sequence (k/v too)
    kwargs = {k: (joined if v is x else v) for k, v in kwargs.items()}
    if hook.rotary is not None:
        table = _argument(args, kwargs, *hook.rotary)
        if table is _ABSENT:
            raise ValueError(f"{hook.label}: rotary={hook.rotary[0]!r}, but the attention was called without it")
        args, kwargs = _with_argument(args, kwargs, *hook.rotary, _gather_rotary(hook, run, table, start, length))
    out = original(*args, **kwargs)
    y = _sequence(hook, out, joined.shape[1])
    m, cfg = rows.shape[1], ctx.state.config
    part = y if whole else y[:, start:start + m]
    like = torch.empty((), dtype=part.dtype, device=part.device).expand(part.shape[0], n, part.shape[2])
    cache = ctx.state.get_cache(ctx.slot, hook.role, like)  # ``like``: the shape, dtype, device it must have
    if cache is None:
        full = ctx.plan.unmerge(part, backend=cfg.backend)
    else:
        full = ctx.plan.unmerge(part, cache=cache, mcw=cfg.mcw, backend=cfg.backend)
    if not whole:
        full = torch.cat([y[:, :start], full, y[:, start + m:]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    return [full, *out[1:]] if isinstance(out, list) else (full,) + tuple(out[1:])


def _sequence(hook, out, length):
    """The sequence output of a sub-module call (the tensor, or the first item of a tuple/list)."""
    y = out[0] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(y, torch.Tensor) or y.dim() != 3 or y.shape[1] != length:
        got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{hook.label}: returned {got}; the generic path needs a [batch, tokens, channels] output "
                         f"aligned with its {length}-token input (or a tuple whose first item is)")
    return y


def _tables(table):
    tensors = (table,) if isinstance(table, torch.Tensor) else table
    if not isinstance(tensors, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"rotary tables must be a tensor or a tuple/list of tensors, got {type(table).__name__}")
    return tensors


def _shared_table(table) -> bool:
    """Whether a rotary table is shared by the batch (``[L, D]``, or a batch dimension of 1)."""
    return _given(table) and any(t.dim() == 2 or (t.dim() >= 3 and t.shape[0] == 1) for t in _tables(table))


def _gather_rotary(hook, run, table, start, length):
    """The rotary table of the merged sequence: a merged row takes its representative token's entry,
    other (prompt) tokens keep theirs. Token axis: 0 of ``[L, D]``, 1 of ``[B, L, ...]``. A tuple of
    like tensors (cos, sin) is gathered in one pass from its stack (made once per transformer call)."""
    if table is None:
        return None
    tensors, indexes = _tables(table), {}
    first = tensors[0]
    if len(tensors) > 1 and all(t.shape == first.shape and t.dtype == first.dtype and t.device == first.device
                                for t in tensors):
        stacked = run.state.stacked_rotary(tuple(tensors))
        return type(table)(_gather_table(hook, run, stacked, 1, start, length, indexes).unbind(0))
    out = [_gather_table(hook, run, t, 0, start, length, indexes) for t in tensors]
    return out[0] if isinstance(table, torch.Tensor) else type(table)(out)


def _gather_table(hook, run, t, lead, start, length, indexes):
    """One table (after ``lead`` stacking dimensions) gathered for the merged sequence."""
    n, rep = run.num_tokens, run.ctx.plan.rep_token
    dims = t.dim() - lead
    batched, axis = dims >= 3 and t.shape[lead] != 1, lead + (1 if dims >= 3 else 0)
    size = t.shape[axis] if dims >= 2 else None
    if size not in (length, n) or (batched and t.shape[lead] != rep.shape[0]):
        raise ValueError(f"{hook.label}: a rotary table of shape {list(t.shape[lead:])}; expected {length} (sequence) "
                         f"or {n} (image) entries along dim {axis - lead}, batch 1 or {rep.shape[0]}")
    if not batched and rep.shape[0] > 1 and not run.shared:
        raise ValueError(f"{hook.label}: the rotary table is shared by the batch but the block built one plan per "
                         "sample: describe_block(..., shared_plan=True)")
    if (size, batched) not in indexes:
        index = rep.long() + start if size == length and start else rep.long()
        if size == length and length != n:  # the other tokens keep their entries
            index = torch.cat([torch.arange(start, device=rep.device).expand(rep.shape[0], -1), index,
                               torch.arange(start + n, length, device=rep.device).expand(rep.shape[0], -1)], 1)
        indexes[(size, batched)] = index if batched else index[0]
    index = indexes[(size, batched)]
    if not batched:
        return t.index_select(axis, index)
    shape = (1,) * lead + tuple(index.shape) + (1,) * (t.dim() - axis - 1)
    return t.gather(axis, index.reshape(shape).expand(*t.shape[:lead], -1, -1, *t.shape[axis + 1:]))


# -- installing ------------------------------------------------------------------------------------
def _hooks():
    from .patch import _hooks as load

    return load()


def _own_hook(module, run=None):
    """The ``SublayerHook`` of ``module`` (of ``run``'s block when given), else None."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = None if registry is None else registry.hooks.get("sdtm")
    if type(hook).__name__ != "SublayerHook" or type(hook).__module__ != __name__:
        return None
    return hook if run is None or hook.run is run else None


def sync(block, forward):
    """``apply_sdtm``'s step for each patched block: hooks on the described sub-modules when ``forward``
    is ``described_forward`` (replacing earlier ones), no sub-module hook otherwise."""
    hooks = _hooks()
    run = block.__dict__.get("_sdtm_run")
    wanted = set()
    if forward is described_forward:
        if not isinstance(run, _BlockRun):
            run = block._sdtm_run = _BlockRun(type(block).forward)
        description, cls = description_of(block), _sublayer_hook_class()
        for role, path, module in description.sublayers(block):
            wanted.add(id(module))
            if _own_hook(module) is not None:
                hooks.remove_innermost(module)
            elif "sdtm" in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}):
                raise TypeError(f"{description}: the sub-module {path!r} already carries an SDTM hook")
            hooks.insert_innermost(module, cls(run, role, path, module, description))
    elif run is not None:
        del block.__dict__["_sdtm_run"]
    if run is not None:
        for module in block.modules():  # sub-modules no (longer) described
            if id(module) not in wanted and _own_hook(module, run) is not None:
                hooks.remove_innermost(module)


def attach_described(model: nn.Module, state) -> list:
    """Patch the described blocks of a model that is no diffusers transformer (drive ``state`` with
    ``attach_state(model, state, grid=..., timestep=...)``); ``remove_sdtm(model)`` undoes it.
    Returns the patched blocks (layer = position) and sets ``state.num_layers``."""
    if state.config.idm_score == "attention" or state.config.prompt_reweight:
        raise ValueError("idm_score='attention' and prompt_reweight=True need joint text-image attention (SD3, "
                         "Flux); described blocks have none: use idm_score='similarity' and prompt_reweight=False")
    hooks = _hooks()
    blocks = [m for m in model.modules() if forward_for(m) is not None]
    if not blocks:
        raise TypeError(f"attach_described: {type(model).__name__} has no block described with describe_block")
    for layer, block in enumerate(blocks):
        existing = hooks.block_hook(block)
        if existing is None:
            hooks.insert_innermost(block, hooks.SDTMBlockHook(described_forward, layer))
        else:
            existing.forward, existing.layer = described_forward, layer
        block._sdtm_state, block._sdtm_layer, block._sdtm_slot = state, layer, state.slot(layer)
        sync(block, described_forward)
    state.num_layers = len(blocks)
    return blocks


# -- token grid ------------------------------------------------------------------------------------
class GridReader:
    """``token_grid(state, model, arguments)`` of a model whose described blocks give ``grid=``."""

    def __init__(self, description):
        self.description = description

    def __call__(self, state, model, arguments):
        spec = self.description.grid
        if callable(spec):
            grid = spec(arguments)
        else:
            from .registry import latent_grid

            grid = latent_grid(arguments.get(spec[0]), spec[1])
        if grid is not None and not (isinstance(grid, (tuple, list)) and len(grid) in (2, 3)
                                     and all(map(_positive_int, grid))):
            raise ValueError(f"{self.description}: grid= gave {grid!r}; expected (H, W) or (T, H, W) positive ints "
                             "or None")
        return None if grid is None else tuple(int(g) for g in grid)


def grid_reader(blocks) -> Optional[GridReader]:
    """The ``grid=`` of a model's described blocks (None when none gives one; ``ValueError`` for two)."""
    found = {}
    for block in blocks:
        description = description_of(block)
        if description is not None and description.grid is not None and forward_for(block) is described_forward:
            found.setdefault(id(description.grid), description)
    if len(found) > 1:
        raise ValueError("described blocks of one model give different grid= readers: "
                         + "; ".join(map(repr, found.values())))
    return GridReader(next(iter(found.values()))) if found else None


__all__ = ["BlockDescription", "attach_described", "describe_block", "described_blocks", "forget_block"]
