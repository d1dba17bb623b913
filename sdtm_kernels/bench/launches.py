"""Count the device kernels a piece of code launches, on any machine (CPU included).

A GPU launches about one kernel per compute op; on a CPU the same code runs the same ops,
so counting them is a deterministic proxy for the launch count on a GPU (issue: at most 8
launches added per merged block). Counted, from a ``torch.profiler`` trace of CPU ops:

* every outermost compute op: an aten op that is not a view, metadata or allocation op
  (``NO_KERNEL``) and has no counted ancestor (``aten::sum`` counts once, not its inner
  ``fill_``), at any depth, inside custom ops (``sdtm::*``) too;
* every Triton kernel launch (the launcher is wrapped so that each launch is one event and
  what the interpreter does inside it is not counted).

Ops outside the package's control (e.g. ``aten::item``) count like the rest: a host sync is
worse than a launch, so it must show.
"""
import contextlib
from collections import Counter

from torch.profiler import ProfilerActivity, profile, record_function

TRITON_PREFIX = "triton::"

# Ops that launch no kernel on a GPU: views, metadata, allocation without initialisation.
NO_KERNEL = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::slice", "aten::select", "aten::expand",
    "aten::reshape", "aten::_reshape_alias", "aten::unsqueeze", "aten::squeeze", "aten::permute",
    "aten::transpose", "aten::t", "aten::alias", "aten::detach", "aten::detach_", "aten::lift_fresh",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::resize_", "aten::unbind",
    "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::narrow", "aten::contiguous", "aten::to", "aten::result_type",
    "aten::view_as", "aten::expand_as", "aten::flatten", "aten::unflatten", "aten::movedim", "aten::diagonal",
    "aten::unfold", "aten::set_", "aten::is_nonzero", "aten::size", "aten::stride", "aten::numel",
    "aten::dim", "aten::is_same_size", "aten::_has_compatible_shallow_copy_type", "aten::type_as",
    "aten::promote_types",
})


@contextlib.contextmanager
def _triton_launches_as_events():
    """Wrap Triton's launcher (JIT and interpreter) in a ``triton::<kernel>`` profiler range."""
    patched = []
    try:
        from triton.runtime import interpreter, jit
    except ImportError:
        yield
        return
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        original = cls.run

        def run(self, *args, __original=original, **kwargs):
            if kwargs.get("warmup"):
                return __original(self, *args, **kwargs)
            name = getattr(getattr(self, "fn", self), "__name__", "kernel")
            with record_function(TRITON_PREFIX + name):
                return __original(self, *args, **kwargs)

        cls.run = run
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            cls.run = original


BLOCK_RANGE = "sdtm_count::block"


def _counts(prof, blocks_only=False):
    """Counter of launches per op name from a finished profile (only inside the block ranges of
    ``_block_ranges`` when ``blocks_only``)."""
    counts = Counter()

    def visit(event, inside_counted, in_block):
        name = event.name
        in_block = in_block or name == BLOCK_RANGE
        if name.startswith(TRITON_PREFIX):
            if in_block or not blocks_only:
                counts[name] += 1
            return  # the interpreter's own work inside a launch is not the kernel's
        counted = not inside_counted and name.startswith("aten::") and name not in NO_KERNEL
        if counted and (in_block or not blocks_only):
            counts[name] += 1
        for child in event.cpu_children:
            visit(child, inside_counted or counted, in_block)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event, False, False)
    return counts


@contextlib.contextmanager
def _block_ranges(blocks):
    """Each call of a module in ``blocks`` inside a ``sdtm_count::block`` profiler range."""
    handles, open_ranges = [], []

    def enter(module, args, kwargs=None):
        rng = record_function(BLOCK_RANGE)
        rng.__enter__()
        open_ranges.append(rng)

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    for block in blocks:
        handles.append(block.register_forward_pre_hook(enter))
        handles.append(block.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_launches(fn, *args, blocks=None, **kwargs):
    """``(result of fn, Counter {op name: launches})`` for one call of ``fn``. With ``blocks``
    (modules), ``(result, all launches, launches inside those modules' calls)``."""
    ranges = _block_ranges(blocks) if blocks is not None else contextlib.nullcontext()
    with _triton_launches_as_events(), ranges, profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn(*args, **kwargs)
    if blocks is None:
        return out, _counts(prof)
    return out, _counts(prof), _counts(prof, blocks_only=True)


def total(counts):
    return sum(counts.values())


def per_block_added(patched, unpatched, blocks):
    """Launches SDTM adds per block: (patched - unpatched) / blocks, and the op breakdown."""
    added = Counter(patched)
    added.subtract(unpatched)
    return (total(patched) - total(unpatched)) / max(1, blocks), +added



def _model_blocks(model):
    for name in ("transformer_blocks", "blocks"):
        blocks = getattr(model, name, None)
        if blocks is not None:
            return list(blocks) + list(getattr(model, "single_transformer_blocks", []))
    raise ValueError(f"{type(model).__name__}: no transformer_blocks / blocks")


def merged_block_launches(bench_model, steps, preset="fast", backend="triton"):
    """Launches SDTM adds per merged block at the first structure (SSM) and the first detail (IDM)
    step of ``preset``'s schedule on ``backend`` (``sdtm_kernels.bench.BenchModel``): the patched
    call minus the unpatched call, inside the blocks, over the blocks that merged. Returns
    ``{"ssm": {"per_block", "ops"}, "idm": {...}, "backend"}`` (only the stages the schedule has)."""
    import torch

    spec = bench_model.spec
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(bench_model.model_batch, *spec["noise_shape"], generator=gen)
    latent = latent.to(bench_model.device, bench_model.dtype)

    def timestep(step):
        return torch.full((bench_model.model_batch,), 1000.0 * (1 - step / steps), device=bench_model.device)

    with torch.no_grad():
        _, _, unpatched = count_launches(bench_model.forward, latent, timestep(0),
                                         blocks=_model_blocks(bench_model.model))
        state = bench_model.patch(preset, backend, steps)
        blocks = _model_blocks(bench_model.model)  # the generic path wraps the blocks
        try:
            report = {"backend": backend, "preset": preset}
            for mode in ("ssm", "idm"):
                step = _first_step(state, steps, mode)
                if step is None:
                    continue
                state.reset()
                for s in range(step):  # earlier steps only move the counter (no model call)
                    state.begin_call(timestep(s), spec["grid"], text_len=spec["text_len"] or None)
                    state.end_call()
                before = len(state.stats)
                _, _, patched = count_launches(bench_model.forward, latent, timestep(step), blocks=blocks)
                merged = sum(1 for r in state.stats[before:] if r["mode"] == mode)
                per_block, ops = per_block_added(patched, unpatched, merged)
                report[mode] = {"step": step, "blocks": merged, "per_block": per_block, "ops": dict(ops)}
        finally:
            bench_model.unpatch()
    return report


def _first_step(state, steps, mode):
    saved = state.step
    try:
        for step in range(steps):
            state.step = step
            if state.step_mode() == mode:
                return step
        return None
    finally:
        state.step = saved
