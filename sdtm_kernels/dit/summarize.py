"""``summary(pipe_or_model)``: what SDTM patched, what else hooks the model, the settings, and
what the last generation did (tokens per step and stage, estimated FLOP saving, warnings).
Imports no diffusers: everything is read from the modules, the hooks and ``SDTMState.stats``."""
import dataclasses
import math
import statistics
from collections import Counter, defaultdict

MERGED_MODES = ("ssm", "idm")


@dataclasses.dataclass
class Summary:
    """The result of ``summary``; ``print(summary(pipe))`` shows it as text, ``as_dict()`` as data.

    patched          ``{block class: count}`` of the blocks with an SDTM hook
    other_hooks      ``{diffusers hook name: modules}`` of the other methods' hooks on the model
    other            other accelerations seen: accelerate offload, PEFT adapters, compiled
                     blocks / model, attention backends
    settings         the ``SDTMConfig`` fields
    generation       index of the last generation (0 = the first since ``apply_sdtm``)
    num_steps, grid, text_len   of the last generation
    steps            per step: ``{"step", "mode", "calls", "blocks", "attn", "mlp"}`` (mean image
                     tokens each sub-layer saw over the block calls of that step)
    stages           per mode: ``{"steps", "attn", "mlp"}`` (mean fraction of the image tokens)
    tokens           mean fraction of the image tokens the attention / MLP sub-layers saw
    flop_saving      estimated fraction of the block FLOPs saved (token-count FLOP model:
                     projections and MLP linear in the tokens, attention quadratic; the
                     prompt tokens and modulation counted, embeddings not)
    warnings         what looks wrong (a stage that never ran, no merged step, unreadable grid, ...)
    notes            informational lines (blocks skipped by a cache hook, ...)
    experts          a pipeline's other transformers (Wan 2.2 A14B's ``transformer_2``): their
                     ``Summary``, same fields
    """

    patched: dict
    other_hooks: dict
    other: list
    settings: dict
    generation: int = None
    num_steps: int = None
    grid: tuple = None
    text_len: int = None
    steps: list = dataclasses.field(default_factory=list)
    stages: dict = dataclasses.field(default_factory=dict)
    tokens: dict = dataclasses.field(default_factory=dict)
    flop_saving: float = None
    warnings: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    experts: list = dataclasses.field(default_factory=list)

    def as_dict(self):
        return dataclasses.asdict(self)

    def __str__(self):
        lines = []
        if not self.patched:
            lines.append("SDTM: not patched")
        else:
            blocks = ", ".join(f"{count} {name}" for name, count in self.patched.items())
            lines.append(f"SDTM: {sum(self.patched.values())} blocks patched ({blocks})")
        if self.other_hooks:
            lines.append("other diffusers hooks: " + ", ".join(f"{n} x{c}" for n, c in self.other_hooks.items()))
        for line in self.other:
            lines.append(f"also: {line}")
        if self.settings:
            keys = ("ratio", "deviation", "switch_step", "protect_steps", "protect_layers", "mcw", "merge_mode",
                    "backend", "idm_score", "prompt_reweight")
            lines.append("settings: " + ", ".join(f"{k}={self.settings[k]!r}" for k in keys if k in self.settings))
        if self.steps:
            grid = "x".join(map(str, self.grid)) if self.grid else "?"
            lines.append(f"last generation (#{self.generation}): {len(self.steps)} of {self.num_steps} steps, "
                         f"grid {grid}, prompt tokens {self.text_len}")
            lines.append("  step  mode       calls blocks   attn tokens   mlp tokens")
            for row in self.steps:
                lines.append(f"  {row['step']:>4}  {row['mode']:<10} {row['calls']:>5} {row['blocks']:>6}"
                             f"   {row['attn']:>11.1f}   {row['mlp']:>10.1f}")
            for mode, row in self.stages.items():
                lines.append(f"  stage {mode:<10} {row['steps']:>3} steps: attention saw {100 * row['attn']:.1f}%, "
                             f"MLP {100 * row['mlp']:.1f}% of the image tokens")
            if self.tokens:
                lines.append(f"  overall: attention saw {100 * self.tokens['attn']:.1f}%, MLP "
                             f"{100 * self.tokens['mlp']:.1f}% of the image tokens")
            if self.flop_saving is not None:
                lines.append(f"  estimated block FLOPs saved: {100 * self.flop_saving:.1f}%")
        for note in self.notes:
            lines.append(f"note: {note}")
        for index, expert in enumerate(self.experts, start=2):
            lines.append(f"transformer_{index}:")
            lines.extend("  " + line for line in str(expert).splitlines())
        for warning in self.warnings:
            lines.append(f"WARNING: {warning}")
        return "\n".join(lines)


def _split(pipe_or_model):
    from .patch import _split as split

    return split(pipe_or_model)


def summary(pipe_or_model) -> Summary:
    """Summarise SDTM on a pipeline or transformer (patched or not): see ``Summary``."""
    from .patch import _other_transformers

    pipe, model = _split(pipe_or_model)
    result = _summary(model)
    result.experts = [_summary(other) for other in _other_transformers(pipe)]
    return result


def _summary(model) -> Summary:
    from .patch import _transformer_hook

    hook = _transformer_hook(model)
    state = None if hook is None else hook.state
    blocks = [m for m in model.modules() if _sdtm_block_hook(m) is not None]
    patched = dict(Counter(type(m).__name__ for m in blocks))
    result = Summary(patched=patched, other_hooks=_other_hooks(model), other=_other(model), settings={})
    if state is None:
        if blocks:
            result.warnings.append("SDTM block hooks without the transformer hook: call apply_sdtm again")
        else:
            result.warnings.append("not patched with apply_sdtm")
        return result
    result.settings = dataclasses.asdict(state.config)
    result.generation, result.num_steps = state.generations, state.num_steps
    result.grid = tuple(state.grid) if state.grid is not None else None
    result.text_len = state.text_len
    _chain_warnings(model, blocks, result)
    stats = list(state.stats)
    if not stats:
        if hook.generation == state.generations and hook.calls:
            result.warnings.append(f"the last generation made {hook.calls} transformer call(s) but no patched block "
                                   "ran under SDTM (their hooks are bypassed)")
        else:
            result.warnings.append("no generation has run since apply_sdtm / the last reset")
        return result
    num_tokens = _num_tokens(state, stats)
    result.steps = _steps(stats, num_tokens)
    result.stages, result.tokens = _stages(stats, num_tokens)
    result.flop_saving = _flop_saving(model, state, stats, num_tokens)
    _generation_warnings(hook, state, stats, blocks, num_tokens, result)
    return result


def _sdtm_block_hook(module):
    registry = getattr(module, "_diffusers_hook", None)
    hook = None if registry is None else registry.hooks.get("sdtm")
    return hook if hook is not None and hasattr(hook, "layer") else None


def _other_hooks(model):
    names = {}
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for name in getattr(registry, "_hook_order", ()):
            if name != "sdtm":
                names[name] = names.get(name, 0) + 1
    return names


def _other(model):
    lines = []
    if getattr(model, "_hf_hook", None) is not None:
        lines.append(f"accelerate hook {type(model._hf_hook).__name__} on the transformer (model CPU offload)")
    adapters = getattr(model, "peft_config", None)
    if adapters:
        active = getattr(model, "active_adapters", None)
        try:
            active = active() if callable(active) else active
        except (ValueError, AttributeError):
            active = None
        lines.append(f"PEFT adapters {sorted(adapters)}" + (f" (active {list(active)})" if active else ""))
    compiled = sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    if compiled:
        lines.append(f"torch.compile on {compiled} module(s) (compile_repeated_blocks / module.compile)")
    backends = Counter()
    for m in model.modules():
        backend = getattr(getattr(m, "processor", None), "_attention_backend", None)
        if backend is not None:
            backends[str(getattr(backend, "value", backend))] += 1
    for backend, count in backends.items():
        lines.append(f"attention backend {backend!r} on {count} attention module(s)")
    if getattr(getattr(model, "_parallel_config", None), "tensor_parallel_config", None) is not None:
        lines.append("tensor parallelism (untested with SDTM)")
    return lines


def _num_tokens(state, stats):
    if state.grid is not None:
        return math.prod(state.grid)  # (H, W) or (T, H, W)
    return max(max(r.get("attn", 0), r.get("mlp", 0)) for r in stats) or None


def _steps(stats, num_tokens):
    by_step = defaultdict(list)
    for rec in stats:
        by_step[rec["step"]].append(rec)
    rows = []
    for step in sorted(by_step):
        recs = by_step[step]
        modes = Counter(r["mode"] for r in recs if r["mode"] != "layer") or Counter(r["mode"] for r in recs)
        rows.append({
            "step": step,
            "mode": modes.most_common(1)[0][0],
            "calls": len({r["call"] for r in recs}),
            "blocks": sum(r["call"] == 0 for r in recs),
            "attn": statistics.fmean(r.get("attn", num_tokens or 0) for r in recs),
            "mlp": statistics.fmean(r.get("mlp", num_tokens or 0) for r in recs),
        })
    return rows


def _stages(stats, num_tokens):
    if not num_tokens:
        return {}, {}
    by_mode = defaultdict(list)
    for rec in stats:
        by_mode[rec["mode"]].append(rec)
    stages = {}
    for mode in ("protected", "layer", "exact", "ssm", "idm"):
        recs = by_mode.get(mode)
        if not recs:
            continue
        stages[mode] = {
            "steps": len({r["step"] for r in recs}),
            "attn": statistics.fmean(r.get("attn", num_tokens) for r in recs) / num_tokens,
            "mlp": statistics.fmean(r.get("mlp", num_tokens) for r in recs) / num_tokens,
        }
    tokens = {
        "attn": statistics.fmean(r.get("attn", num_tokens) for r in stats) / num_tokens,
        "mlp": statistics.fmean(r.get("mlp", num_tokens) for r in stats) / num_tokens,
    }
    return stages, tokens


def _width(model):
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "attention_head_dim", None)
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads * head_dim
    return None


def _flop_saving(model, state, stats, num_tokens):
    """1 - FLOPs(tokens seen) / FLOPs(all tokens) of the block calls (module docstring of Summary)."""
    width = _width(model)
    if not num_tokens or not width:
        return None
    c, r = width, 4
    t = state.text_len or 0
    joint = any(name in type(model).__name__ for name in ("SD3", "Flux"))
    t_joint = t if joint else 0

    def block(na, nm, nx):
        flops = 8 * (na + t_joint) * c * c + 4 * (na + t_joint) ** 2 * c + 4 * r * (nm + t_joint) * c * c
        if not joint and t:  # cross-attention (PixArt): queries nx, keys/values the prompt
            flops += 4 * nx * c * c + 4 * t * c * c + 4 * nx * t * c
        return flops

    full = merged = 0
    for rec in stats:
        n = num_tokens
        full += block(n, n, n)
        merged += block(rec.get("attn", n), rec.get("mlp", n), rec.get("cross", n))
    return 1.0 - merged / full if full else None


def _chain_warnings(model, blocks, result):
    try:
        from . import hooks
    except ImportError:
        return
    if not hooks.in_chain(model):
        result.warnings.append(f"the SDTM hook of the {type(model).__name__} is no longer reached from its forward "
                               "(module.forward replaced after apply_sdtm?): calls are not counted")
    lost = [m for m in blocks if not hooks.in_chain(m)]
    if lost:
        result.warnings.append(f"{len(lost)} patched block(s) whose SDTM hook is no longer in their forward chain "
                               "(module.forward replaced after apply_sdtm?); apply SDTM after such wrapping")


def _generation_warnings(hook, state, stats, blocks, num_tokens, result):
    cfg = state.config
    if hook.calls_without_grid:
        result.warnings.append(f"{hook.calls_without_grid} of {hook.calls} transformer calls of the last generation "
                               "had no readable token grid (no [B, C, H, W] latent with config.patch_size, or Flux "
                               "img_ids off one raster grid): they ran without merging")
    exact = sum(r["mode"] == "exact" for r in stats)
    if exact:
        result.warnings.append(f"{exact} block call(s) ran exactly: their image token count did not match the grid "
                               f"{state.grid} (extra tokens, a split sequence?)")
    merged = [r for r in stats if r["mode"] in MERGED_MODES
              and (r.get("attn", num_tokens) < (num_tokens or 0) or r.get("mlp", num_tokens) < (num_tokens or 0))]
    if not merged:
        reason = " (ratio=0)" if cfg.ratio == 0 else ""
        result.warnings.append(f"no step of the last generation merged any token{reason}")
    seen = {r["mode"] for r in stats}
    last = max(r["step"] for r in stats)
    num_steps = state.num_steps or last + 1
    if cfg.ratio > 0 and last + 1 >= num_steps:  # a complete generation: each stage it schedules should run
        switch = cfg.switch_index(num_steps)
        protect = cfg.protect_steps
        unprotected = [s for s in range(num_steps) if not (protect and s % protect == 0)]
        expect = {"ssm": any(s <= switch for s in unprotected), "idm": any(s > switch for s in unprotected)}
        names = {"ssm": "structure stage (SSM)", "idm": "detail stage (IDM)"}
        for mode, expected in expect.items():
            if expected and mode not in seen:
                result.warnings.append(f"the {names[mode]} never ran in the last generation although its schedule has "
                                       "steps for it (blocks skipped by a cache on those steps, or no readable grid?)")
    layers = {r["layer"] for r in stats}
    missing = sorted(set(range(state.num_layers)) - layers)
    if missing:
        result.warnings.append(f"blocks {missing} never ran under SDTM in the last generation")
    per_call = Counter((r["step"], r["call"]) for r in stats)
    skipped = sum(state.num_layers - n for n in per_call.values() if n < state.num_layers)
    if skipped:
        result.notes.append(f"{skipped} block call(s) of the last generation were skipped (a cache hook such as "
                            "First Block Cache or MagCache reused their output)")
