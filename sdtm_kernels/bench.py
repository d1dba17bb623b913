"""``python -m sdtm_kernels bench``: end-to-end SDTM speed on a DiT-sized transformer (SPEC 8).

What it runs. A transformer with random weights (speed does not depend on weights): a
diffusers ``SD3Transformer2DModel`` built from a config when diffusers is installed, else the
package's own adaLN DiT (``sdtm_kernels.small_dit``) wrapped with ``wrap_dit_blocks``. Sizes:

* CUDA: SD3-medium (24 joint blocks, C=1536, 24 heads), 1024x1024 image -> 128x128 latent,
  patch 2 -> N=4096 image tokens, 333 text tokens, bf16, 50 steps.
* CPU: 6 blocks, C=384, 512x512 image -> 64x64 latent -> N=1024, 77 text tokens, fp32,
  20 steps (``--quick``: 2 blocks, C=128, N=256, 6 steps).

A flow-matching Euler sampler (``x += (sigma_{i+1} - sigma_i) * v``, sigmas linear from 1
to 0, timestep = 1000 * sigma) runs the whole schedule with classifier-free guidance (the
model sees a batch of 2 per image: unconditional and conditional random text embeddings),
from the same noise, several ways: unpatched; SDTM with the "released" and "fast" presets on
the default backend (Triton on CUDA, the reference on CPU); on CUDA also on
``backend="reference"`` so that the kernels' share of the gain is visible. On CPU the Triton
kernels are instead checked in the Triton interpreter against the reference on a small
sample (plans, merge, unmerge with residual/gate); ``TRITON_INTERPRET=1`` is set before
anything imports triton when CUDA is not available.

Timing: every step is timed (CUDA: synchronised before and after). ``--repeats`` schedules
per run (default 2 on CPU, 1 after a warm-up schedule on CUDA) go round-robin over the runs;
on CPU (``--interleave``, the default there) every run has its own copy of the model (same
weights) and the runs advance one step each in turn, so that a busy phase of a shared machine
slows all of them alike. A step's time is its minimum over the repeats.

What it reports per run: total time (sum of the step times) and the median step time, speedup vs unpatched (total and median step), the FLOP-bound speedup,
tokens per step, the share of time spent in SDTM bookkeeping and the relative L2 difference
of the final latent vs the unpatched run (and, on CUDA, between backends).

FLOP model (multiply-add = 2 FLOPs; per model call and per batch row; C = width, r = MLP
ratio (4), T = text tokens, n_a / n_m / n_x = image tokens the attention / MLP /
cross-attention sub-layer of a block actually saw, read from ``SDTMState.stats``; the
unpatched model sees N everywhere):

* SD3 joint block: projections ``6 (n_a + T) C^2`` (q, k, v of both streams) +
  ``2 n_a C^2`` (image out) + ``2 T C^2`` (text out), attention ``4 (n_a + T)^2 C``
  (QK^T and AV over the joint sequence), image MLP ``4 r n_m C^2``, text MLP ``4 r T C^2``.
  The last block (``context_pre_only``) has no text out-projection and no text MLP.
* PixArt block: self-attention ``8 n_a C^2 + 4 n_a^2 C``, cross-attention
  ``4 n_x C^2 + 4 T C^2 + 4 n_x T C``, MLP ``4 r n_m C^2``.
* DiT block (the package's own; pooled condition, T = 0): self-attention
  ``8 n_a C^2 + 4 n_a^2 C``, MLP ``4 r n_m C^2``.
* Per call, outside the blocks: patch embedding ``2 N C p^2 c_in``, output projection
  ``2 N C p^2 c_out`` and the text projection ``2 T d_text C``. Norms, modulation,
  element-wise ops and SDTM's own work are not counted.

FLOP-bound speedup = FLOPs of the unpatched schedule / FLOPs of the SDTM schedule: the
speedup a run would get if time were proportional to FLOPs. ``% of bound`` = measured
speedup / FLOP-bound speedup (SPEC 8 asks for >= 90%).

Bookkeeping = SDTM's plan builds (scores, matching, selection, ``li`` update), merges and
unmerges (whose epilogue fuses the residual add, gate and cache blend the unpatched block
does anyway). It is timed by a subclass of ``SDTMState`` whose ``build_plan`` and whose
returned plans' ``merge`` / ``unmerge`` run inside a timed section (also a
``torch.profiler.record_function("sdtm::plan" | "sdtm::merge" | "sdtm::unmerge")`` range).
On CUDA a timed section synchronises the device, so the timed sections are measured in a
separate, instrumented pass of the same schedule and the share is bookkeeping time /
that pass's total; on CPU the sections cost a few microseconds and the main pass is timed.

Outputs (``--out``, default ``./sdtm_bench_out``): ``results.json`` (device, versions, date,
command line, config, every run), ``results.md`` (the table) and ``results.png`` (step
times and tokens per step; only when matplotlib is installed). ``--pipeline ID_OR_PATH``
loads a real diffusers pipeline with ``from_pretrained`` instead and also saves baseline and
SDTM images side by side with their difference.
"""
import argparse
import contextlib
import datetime
import importlib.metadata
import inspect
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections import defaultdict

import torch

from .dit.config import make_config
from .dit.state import SDTMState

DEFAULT_OUT = "sdtm_bench_out"
PRESETS_RUN = ("released", "fast")
GUIDANCE = 4.5
VAE_FACTOR = 8


class BenchError(Exception):
    """A user-facing error of the bench command (printed without a traceback, exit code 2)."""


def prepare_environment():
    """Without CUDA the Triton kernels run in the interpreter, which must be switched on before
    triton is first imported (diffusers and torch._dynamo import it)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


# -- progress bar ------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr: ``[#####-----] 12/36 label 3.1s``."""

    def __init__(self, total, stream=None, width=28, enabled=True):
        self.total, self.done, self.width = max(int(total), 1), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.start = time.perf_counter()
        self.label = ""
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_pct = -1

    def update(self, n=1, label=None):
        self.done = min(self.total, self.done + n)
        if label is not None:
            self.label = label
        if not self.enabled:
            return
        pct = int(100 * self.done / self.total)
        if not self._tty and pct // 10 == self._last_pct // 10 and self.done < self.total:
            return  # a log file gets one line per 10%
        self._last_pct = pct
        filled = int(self.width * self.done / self.total)
        line = (f"[{'#' * filled}{'-' * (self.width - filled)}] {self.done}/{self.total} {self.label} "
                f"{time.perf_counter() - self.start:.1f}s")
        self.stream.write(("\r" + line + "\033[K") if self._tty else line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()


# -- bookkeeping timer -------------------------------------------------------------------------
class BookkeepingTimer:
    """Seconds spent in SDTM plan builds, merges and unmerges (see the module docstring)."""

    def __init__(self, device, enabled=True):
        self.cuda = torch.device(device).type == "cuda"
        self.enabled = enabled
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)

    @contextlib.contextmanager
    def section(self, name):
        if not self.enabled:
            yield
            return
        with torch.profiler.record_function(f"sdtm::{name}"):
            if self.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                yield
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

    def reset(self):
        self.seconds.clear()
        self.calls.clear()

    @property
    def total(self):
        return sum(self.seconds.values())


class _TimedPlan:
    """A ``MergePlan`` whose ``merge`` / ``unmerge`` run inside the timer's sections."""

    def __init__(self, plan, timer):
        self._plan = plan
        self._timer = timer

    def __getattr__(self, name):
        return getattr(self._plan, name)

    def merge(self, *args, **kwargs):
        with self._timer.section("merge"):
            return self._plan.merge(*args, **kwargs)

    def unmerge(self, *args, **kwargs):
        with self._timer.section("unmerge"):
            return self._plan.unmerge(*args, **kwargs)


class TimedSDTMState(SDTMState):
    """``SDTMState`` that times plan builds and the plans' merges / unmerges when ``timer`` is set."""

    timer = None

    def build_plan(self, *args, **kwargs):
        timer = self.timer
        if timer is None or not timer.enabled:
            return super().build_plan(*args, **kwargs)
        with timer.section("plan"):
            plan = super().build_plan(*args, **kwargs)
        return _TimedPlan(plan, timer)


# -- model specs and the FLOP model ------------------------------------------------------------
def default_spec(family, device, quick=False):
    """The model size the bench uses by default on ``device`` (see the module docstring)."""
    if torch.device(device).type == "cuda":
        spec = dict(layers=24, width=1536, head_dim=64, latent=128, patch=2, in_channels=16, text_len=333,
                    text_dim=4096, pooled_dim=2048, steps=50, dtype="bfloat16")
        if quick:
            spec.update(layers=8, latent=64, steps=20)
    else:
        spec = dict(layers=6, width=384, head_dim=64, latent=64, patch=2, in_channels=16, text_len=77,
                    text_dim=256, pooled_dim=128, steps=20, dtype="float32")
        if quick:
            spec.update(layers=2, width=128, latent=32, steps=6)
    if family == "pixart":
        spec.update(in_channels=4, text_len=120, text_dim=4096 if torch.device(device).type == "cuda" else 256,
                    head_dim=72 if spec["width"] % 72 == 0 else spec["head_dim"])
    spec.update(family=family, mlp_ratio=4)
    return spec


SIZES = {
    "sd3-medium": dict(family="sd3", layers=24, width=1536, head_dim=64, in_channels=16, text_len=333,
                       text_dim=4096, pooled_dim=2048),
    "pixart-alpha": dict(family="pixart", layers=28, width=1152, head_dim=72, in_channels=4, text_len=120,
                         text_dim=4096, pooled_dim=0),
}


def make_spec(family, *, layers, width, latent, head_dim=64, patch=2, in_channels=16, text_len=77, text_dim=256,
              pooled_dim=128, mlp_ratio=4, **_ignored):
    if width % head_dim:
        head_dim = 64 if width % 64 == 0 else 32
    if width % head_dim:
        raise BenchError(f"--width {width} must be a multiple of 32 (heads of 64 or 32 channels)")
    if latent % patch:
        raise BenchError(f"latent size {latent} must be a multiple of the patch size {patch}")
    if family == "dit":
        text_len = 0  # the package's DiT takes a pooled condition (adaLN), no text tokens
    return dict(family=family, layers=int(layers), width=int(width), head_dim=int(head_dim), heads=width // head_dim,
                latent=int(latent), patch=int(patch), grid=(latent // patch, latent // patch),
                num_tokens=(latent // patch) ** 2, in_channels=int(in_channels), text_len=int(text_len),
                text_dim=int(text_dim), pooled_dim=int(pooled_dim), mlp_ratio=int(mlp_ratio))


def block_flops(spec, layer, attn=None, mlp=None, cross=None):
    """FLOPs of one block call for one batch row (module docstring); token counts default to N."""
    n = spec["num_tokens"]
    c, t, r = spec["width"], spec["text_len"], spec["mlp_ratio"]
    na = n if attn is None else attn
    nm = n if mlp is None else mlp
    nx = n if cross is None else cross
    family = spec["family"]
    if family == "sd3":
        last = layer == spec["layers"] - 1
        flops = 6 * (na + t) * c * c + 2 * na * c * c + 4 * (na + t) ** 2 * c + 4 * r * nm * c * c
        if not last:
            flops += 2 * t * c * c + 4 * r * t * c * c
        return flops
    flops = 8 * na * c * c + 4 * na * na * c + 4 * r * nm * c * c
    if family == "pixart":
        flops += 4 * nx * c * c + 4 * t * c * c + 4 * nx * t * c
    return flops


def call_overhead_flops(spec):
    """FLOPs of one model call outside the blocks (patch embedding, output and text projections)."""
    n, c, p = spec["num_tokens"], spec["width"], spec["patch"]
    out_channels = spec["in_channels"] * (2 if spec["family"] == "pixart" else 1)
    return 2 * n * c * p * p * (spec["in_channels"] + out_channels) + 2 * spec["text_len"] * spec["text_dim"] * c


def schedule_flops(spec, stats=None, steps=None, calls_per_step=1):
    """FLOPs of a whole schedule per batch row: from ``stats`` (SDTM) or with N tokens everywhere."""
    if stats is None:
        per_call = sum(block_flops(spec, layer) for layer in range(spec["layers"])) + call_overhead_flops(spec)
        return per_call * steps * calls_per_step
    total = 0
    calls = set()
    for rec in stats:
        total += block_flops(spec, rec["layer"], rec.get("attn"), rec.get("mlp"), rec.get("cross"))
        calls.add((rec["step"], rec["call"]))
    return total + len(calls) * call_overhead_flops(spec)


def tokens_per_step(stats, num_tokens):
    """Per step (first call): the majority mode and the mean image tokens the attention and MLP
    sub-layers saw over the blocks."""
    by_step = defaultdict(list)
    for rec in stats:
        if rec["call"] == 0:
            by_step[rec["step"]].append(rec)
    rows = []
    for step in sorted(by_step):
        recs = by_step[step]
        modes = [r["mode"] for r in recs]
        rows.append({
            "step": step,
            "mode": max(set(modes), key=modes.count),
            "attn": statistics.fmean(r.get("attn", num_tokens) for r in recs),
            "mlp": statistics.fmean(r.get("mlp", num_tokens) for r in recs),
        })
    return rows


# -- models ------------------------------------------------------------------------------------
def have_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


class BenchModel:
    """A transformer with random weights and the inputs of one CFG call.

    ``forward(latent [B, c, H, W], t [B])`` returns the velocity. ``patch(preset, backend,
    steps)`` applies SDTM and returns the (timed) state; ``unpatch()`` removes it."""

    def __init__(self, spec, device, dtype, batch=1, seed=0):
        self.spec, self.device, self.dtype = spec, torch.device(device), dtype
        self.model_batch = 2 * batch  # CFG: unconditional + conditional rows
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        with torch.device(self.device):  # initialise the random weights on the device (fast on a GPU)
            self.model, self.cond = self._build(spec, gen)
        with _quiet_diffusers():  # "modules that should be kept in float32": none for random weights
            self.model = self.model.to(self.device, dtype).eval().requires_grad_(False)
        self.cond = {k: v.to(self.device, dtype) for k, v in self.cond.items()}
        self.state = None
        self._handles = ()

    def _build(self, spec, gen):
        family = spec["family"]
        t, d = spec["text_len"], spec["text_dim"]
        if family == "sd3":
            import diffusers

            self.model = diffusers.SD3Transformer2DModel(
                sample_size=spec["latent"], patch_size=spec["patch"], in_channels=spec["in_channels"],
                num_layers=spec["layers"], attention_head_dim=spec["head_dim"], num_attention_heads=spec["heads"],
                joint_attention_dim=d, caption_projection_dim=spec["width"], pooled_projection_dim=spec["pooled_dim"],
                out_channels=spec["in_channels"], pos_embed_max_size=max(spec["grid"][0], 96))
            self.cond = dict(encoder_hidden_states=torch.randn(self.model_batch, t, d, generator=gen, device="cpu"),
                             pooled_projections=torch.randn(self.model_batch, spec["pooled_dim"], generator=gen,
                                                            device="cpu"))
        elif family == "pixart":
            import diffusers

            self.model = diffusers.PixArtTransformer2DModel(
                num_attention_heads=spec["heads"], attention_head_dim=spec["head_dim"],
                in_channels=spec["in_channels"], out_channels=2 * spec["in_channels"], num_layers=spec["layers"],
                sample_size=spec["latent"], patch_size=spec["patch"], cross_attention_dim=spec["width"],
                caption_channels=d, use_additional_conditions=False)
            self.cond = dict(encoder_hidden_states=torch.randn(self.model_batch, t, d, generator=gen, device="cpu"))
        elif family == "dit":
            from .small_dit import SmallDiT

            self.model = SmallDiT(in_channels=spec["in_channels"], hidden=spec["width"], depth=spec["layers"],
                                  heads=spec["heads"], patch=spec["patch"], grid=spec["grid"], cond_dim=d,
                                  mlp_ratio=spec["mlp_ratio"])
            self.cond = dict(y=torch.randn(self.model_batch, d, generator=gen, device="cpu"))
        else:
            raise BenchError(f"unknown model family {family!r}")
        return self.model, self.cond

    def forward(self, latent, t):
        if self.spec["family"] == "dit":
            return self.model(latent, t, **self.cond)
        out = self.model(hidden_states=latent, timestep=t, return_dict=False, **self.cond)[0]
        if self.spec["family"] == "pixart":
            out = out.chunk(2, dim=1)[0]  # learned-sigma models: the first half is the prediction
        return out

    def patch(self, preset, backend, steps):
        self.unpatch()
        if self.spec["family"] == "dit":
            from .dit import attach_state, wrap_dit_blocks
            from .small_dit import dit_modulation

            state = TimedSDTMState(make_config(preset, num_steps=steps, backend=backend), num_steps=steps)
            wrap_dit_blocks(self.model.blocks, state, modulation=dit_modulation)
            self._handles = attach_state(self.model, state, grid=self.spec["grid"], timestep="t")
        else:
            from .dit import apply_sdtm, get_state

            apply_sdtm(self.model, preset=preset, num_steps=steps, backend=backend)
            state = get_state(self.model)
            state.__class__ = TimedSDTMState  # adds the timed sections; same state object the blocks hold
        self.state = state
        return state

    def unpatch(self):
        if self.state is None:
            return
        if self.spec["family"] == "dit":
            from .dit import unwrap_dit_blocks

            unwrap_dit_blocks(self.model.blocks)
            for handle in self._handles:
                handle.remove()
            self._handles = ()
        else:
            from .dit import remove_sdtm

            remove_sdtm(self.model)
        self.state = None


@contextlib.contextmanager
def _quiet_diffusers():
    try:
        from diffusers.utils import logging as dlogging
    except ImportError:
        yield
        return
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sample_steps(bench_model, noise, steps):
    """Euler flow-matching schedule with CFG, one step per ``next()``: yields each step's
    seconds and returns the final latent (``StopIteration.value``)."""
    device = bench_model.device
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = noise.clone()
    for i in range(steps):
        with torch.no_grad():
            _sync(device)
            start = time.perf_counter()
            # float32 timesteps: in bf16 two steps could round to the same value (= the same SDTM step)
            t = torch.full((bench_model.model_batch,), 1000.0 * sigmas[i], device=device, dtype=torch.float32)
            v = bench_model.forward(torch.cat([x, x]), t)
            v_uncond, v_cond = v.chunk(2)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_uncond + GUIDANCE * (v_cond - v_uncond))
            _sync(device)
        yield time.perf_counter() - start
    return x


def sample(bench_model, noise, steps, progress=None, label=""):
    """The whole schedule at once; returns the final latent and per-step seconds."""
    gen = sample_steps(bench_model, noise, steps)
    times = []
    while True:
        try:
            times.append(next(gen))
        except StopIteration as stop:
            return stop.value, times
        if progress is not None:
            progress.update(label=label)


def rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


# -- the Triton interpreter check --------------------------------------------------------------
def kernel_check(seed=0, grid=(16, 16), channels=32, batch=2):
    """Triton kernels (interpreter on CPU) vs the reference on a small sample: plans (same
    size, share of tokens assigned the same row) and merge / unmerge of the same plan."""
    from . import plan_idm, plan_ssm
    from .backend import BackendUnavailableError

    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    metric = torch.randn(batch, n, channels, generator=gen)
    x = torch.randn(batch, n, channels, generator=gen)
    residual = torch.randn(batch, n, channels, generator=gen)
    gate = torch.randn(batch, channels, generator=gen)
    result = {"shape": [batch, n, channels], "grid": list(grid), "device": "cpu"}
    start = time.perf_counter()
    try:
        for name, builder in (("ssm", plan_ssm), ("idm", plan_idm)):
            n_remove = n // 2
            ref = builder(metric, grid, n_remove, backend="reference")
            tri = builder(metric, grid, n_remove, backend="triton")
            same = (ref.row_of_token == tri.row_of_token).float().mean().item() if ref.num_rows == tri.num_rows else 0.0
            merged_ref = ref.merge(x, backend="reference")
            merged_tri = ref.merge(x, backend="triton")
            un_ref = ref.unmerge(merged_ref, residual=residual, gate=gate, backend="reference")
            un_tri = ref.unmerge(merged_ref, residual=residual, gate=gate, backend="triton")
            result[f"plan_{name}"] = {"num_rows_reference": ref.num_rows, "num_rows_triton": tri.num_rows,
                                      "same_assignment_fraction": same}
            result[f"merge_{name}_max_abs_diff"] = float((merged_ref - merged_tri).abs().max())
            result[f"unmerge_{name}_max_abs_diff"] = float((un_ref - un_tri).abs().max())
    except BackendUnavailableError as exc:
        result["error"] = str(exc)
        return result
    result["max_abs_diff"] = max(v for k, v in result.items() if k.endswith("_max_abs_diff"))
    result["seconds"] = time.perf_counter() - start
    return result


# -- runs --------------------------------------------------------------------------------------
def resolved_backend(backend, device):
    from .backend import resolve_backend

    return resolve_backend(backend, torch.device(device), "merge")


def run_suite(args, log=print):
    """Build the model and run every configuration; returns the result dict."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    family = args.family or ("sd3" if have_diffusers() else "dit")
    if family in ("sd3", "pixart") and not have_diffusers():
        raise BenchError(f"--family {family} needs diffusers (pip install diffusers); --family dit needs nothing")
    base = default_spec(family, device, quick=args.quick)
    if args.size is not None:
        if args.size % (VAE_FACTOR * base["patch"]):
            raise BenchError(f"--size {args.size} must be a multiple of {VAE_FACTOR * base['patch']} pixels")
        base["latent"] = args.size // VAE_FACTOR
    if args.latent is not None:
        base["latent"] = args.latent
    if args.blocks is not None:
        base["layers"] = args.blocks
    if args.width is not None:
        base["width"] = args.width
    steps = args.steps or base["steps"]
    spec = make_spec(**base)
    backends = [None] + (["reference"] if cuda and not args.no_reference else [])
    configs = [("unpatched", None, None)] + [(f"{p}/{resolved_backend(b, device)}", p, b)
                                             for p in args.presets for b in backends]

    log(f"SDTM bench: {family} {spec['layers']} blocks, C={spec['width']}, {spec['heads']} heads, "
        f"latent {spec['latent']}x{spec['latent']} -> N={spec['num_tokens']} image + {spec['text_len']} text "
        f"tokens, batch {2 * args.batch} (CFG), {steps} steps, {args.dtype}, on {device_name(device)}")
    bench_model = BenchModel(spec, device, dtype, batch=args.batch, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(args.batch, spec["in_channels"], spec["latent"], spec["latent"], generator=gen)
    noise = noise.to(device, dtype)

    warmup = args.warmup if args.warmup is not None else (1 if cuda else 0)
    repeats = args.repeats if args.repeats is not None else (1 if cuda else 2)
    instrumented_pass = cuda  # CPU: the timed sections are cheap, the main pass is instrumented
    n_sdtm = sum(1 for c in configs if c[1] is not None)
    passes = len(configs) * (repeats + warmup) + (n_sdtm if instrumented_pass else 0)
    progress = Progress(passes * steps, enabled=not args.no_progress)
    runs = {name: None for name, _, _ in configs}
    finals = {}
    # Interleaved (default on CPU): every configuration has its own copy of the model (same seed,
    # same weights) and the schedules advance one step each in turn, so that a slow phase of a
    # shared machine hits all of them alike. Repeats go round-robin too; each step's time is the
    # minimum over the repeats.
    interleave = (not cuda) if args.interleave is None else args.interleave
    models = {name: (BenchModel(spec, device, dtype, batch=args.batch, seed=args.seed) if interleave and i else
                     bench_model) for i, (name, _, _) in enumerate(configs)}
    with torch.no_grad():  # first call of each model: lazy initialisation outside the timings
        for bm in {id(m): m for m in models.values()}.values():
            bm.forward(torch.cat([noise, noise]), torch.full((bm.model_batch,), 999.0, device=device))

    def finish(entry, final, times):
        name, preset, bm, state, timer = entry[:5]
        run = runs[name]
        if run is None:
            run = runs[name] = {"name": name, "preset": preset, "backend": entry[5] or "auto",
                                "resolved_backend": None if preset is None else resolved_backend(entry[5], device),
                                "pass_s": [], "min_step_s": list(times)}
            finals[name] = final.float().cpu()
            if preset is None:
                run["flops"] = schedule_flops(spec, steps=steps) * bm.model_batch
                run["tokens_per_step"] = [{"step": s, "mode": "full", "attn": spec["num_tokens"],
                                           "mlp": spec["num_tokens"]} for s in range(steps)]
            else:
                stats = list(state.stats)
                run["flops"] = schedule_flops(spec, stats) * bm.model_batch
                run["tokens_per_step"] = tokens_per_step(stats, spec["num_tokens"])
        else:
            run["min_step_s"] = [min(a, b) for a, b in zip(run["min_step_s"], times)]
            run["rerun_rel_l2"] = max(run.get("rerun_rel_l2", 0.0), rel_l2(final.float().cpu(), finals[name]))
        run["pass_s"].append(sum(times))
        if preset is None:
            return
        if instrumented_pass and entry[6] == repeats - 1:
            timer.enabled = True
            timer.reset()
            _, inst_times = sample(bm, noise, steps, progress, name + " (bookkeeping pass)")
            pass_total = sum(inst_times)
        else:
            pass_total = sum(times)
        if instrumented_pass or run.get("bookkeeping_share") is None or pass_total < run["_bk_pass"]:
            run.update(_bk_pass=pass_total, bookkeeping_s=timer.total, bookkeeping_share=timer.total / pass_total,
                       bookkeeping={k: {"seconds": v, "calls": timer.calls[k]} for k, v in timer.seconds.items()})
        bm.unpatch()

    for rep in range(repeats):
        active = []
        for name, preset, backend in configs:
            bm = models[name]
            timer = BookkeepingTimer(device, enabled=not instrumented_pass)
            state = None
            if preset is not None:
                state = bm.patch(preset, backend, steps)
                state.timer = timer
            for _ in range(warmup if rep == 0 else 0):
                sample(bm, noise, steps, progress, name + " (warm-up)")
            timer.reset()
            entry = (name, preset, bm, state, timer, backend, rep)
            if interleave:
                active.append((entry, sample_steps(bm, noise, steps), []))
            else:
                finish(entry, *sample(bm, noise, steps, progress, f"{name} ({rep + 1}/{repeats})"))
        for step in range(steps if interleave else 0):
            for entry, gen, times in active:
                times.append(next(gen))
                progress.update(label=f"step {step + 1}/{steps} {entry[0]} (repeat {rep + 1}/{repeats}, interleaved)")
        for entry, gen, times in active:
            try:
                next(gen)
            except StopIteration as stop:
                finish(entry, stop.value, times)
    runs = list(runs.values())
    for run in runs:
        run.pop("_bk_pass", None)
        times = run.pop("min_step_s")
        run["step_ms"] = [1e3 * t for t in times]
        run["total_s"] = sum(times)
        run["step_ms_median"] = 1e3 * statistics.median(times)
        run["tflops_achieved"] = run["flops"] / run["total_s"] / 1e12
        run["mean_tokens"] = statistics.fmean((r["attn"] + r["mlp"]) / 2 for r in run["tokens_per_step"])
        run.setdefault("bookkeeping_s", 0.0)
    progress.close()

    base_run = runs[0]
    for run in runs:
        run["speedup"] = base_run["total_s"] / run["total_s"]
        run["speedup_median_step"] = base_run["step_ms_median"] / run["step_ms_median"]
        run["flop_bound_speedup"] = base_run["flops"] / run["flops"]
        run["pct_of_flop_bound"] = 100.0 * run["speedup"] / run["flop_bound_speedup"]
        run["rel_l2_vs_unpatched"] = rel_l2(finals[run["name"]], finals[base_run["name"]])
    backend_diffs = []
    for preset in args.presets:
        default_name = f"{preset}/{resolved_backend(None, device)}"
        ref_name = f"{preset}/reference"
        if default_name != ref_name and default_name in finals and ref_name in finals:
            a, b = finals[default_name], finals[ref_name]
            backend_diffs.append({"preset": preset, "a": default_name, "b": ref_name, "rel_l2": rel_l2(a, b),
                                  "max_abs_diff": float((a - b).abs().max())})
    result = {"config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()}, "steps": steps,
                         "batch": args.batch, "model_batch": bench_model.model_batch, "dtype": args.dtype,
                         "device": str(device), "guidance": GUIDANCE, "warmup_schedules": warmup,
                         "presets": list(args.presets), "seed": args.seed, "repeats": repeats,
                         "interleaved": interleave,
                         "timing": "per step: minimum over the repeats (round-robin over the runs; interleaved: "
                                   "one step of each run in turn, each run on its own model copy); total = sum of "
                                   "those; CUDA: synchronised around every step",
                         "bookkeeping_timing": "separate instrumented pass" if instrumented_pass else "main pass"},
              "runs": runs, "backend_diffs": backend_diffs}
    if not cuda and not args.no_kernel_check:
        log("checking the Triton kernels (interpreter) against the reference on a small sample ...")
        result["kernel_check"] = kernel_check(seed=args.seed)
    return result


# -- reporting ---------------------------------------------------------------------------------
def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device):
    from . import __version__

    info = {"device": device_name(device), "device_type": torch.device(device).type,
            "torch": torch.__version__, "triton": _version("triton"), "diffusers": _version("diffusers"),
            "sdtm_kernels": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", memory_gb=props.total_memory / 2**30)
    return info


COLUMNS = (("run", "name", "{}"), ("total s", "total_s", "{:.2f}"), ("step ms", "step_ms_median", "{:.1f}"),
           ("speedup", "speedup", "{:.2f}x"), ("FLOP-bound", "flop_bound_speedup", "{:.2f}x"),
           ("% bound", "pct_of_flop_bound", "{:.0f}%"), ("tokens/step", "mean_tokens", "{:.0f}"),
           ("bookkeeping", "bookkeeping_share", "{:.1%}"), ("rel.L2 vs unpatched", "rel_l2_vs_unpatched", "{:.4f}"))


def _cell(run, key, fmt):
    value = run.get(key)
    return "-" if value is None else fmt.format(value)


def text_table(result):
    rows = [[h for h, _, _ in COLUMNS]] + [[_cell(r, k, f) for _, k, f in COLUMNS] for r in result["runs"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def summary_lines(result):
    cfg, env = result["config"], result.get("environment", {})
    if "pipeline" in cfg:
        return [f"pipeline {cfg['pipeline']} ({cfg['family']}), {cfg['size']}px, {cfg['steps']} steps, "
                f"{cfg['dtype']}; {env.get('device', cfg['device'])}, torch {env.get('torch')}; images: "
                + ", ".join(result.get("images", []))]
    lines = [f"{cfg['family']} {cfg['layers']} blocks, C={cfg['width']}, N={cfg['num_tokens']} image + "
             f"{cfg['text_len']} text tokens, batch {cfg['model_batch']}, {cfg['steps']} steps, {cfg['dtype']}; "
             f"{env.get('device', cfg['device'])}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"diffusers {env.get('diffusers')}"]
    for diff in result.get("backend_diffs", []):
        lines.append(f"backends {diff['a']} vs {diff['b']}: rel.L2 {diff['rel_l2']:.2e}, "
                     f"max abs {diff['max_abs_diff']:.2e}")
    check = result.get("kernel_check")
    if check:
        if "error" in check:
            lines.append(f"Triton kernel check not run: {check['error']}")
        else:
            lines.append(f"Triton kernels (interpreter) vs reference on {check['shape']}: max abs diff "
                         f"{check['max_abs_diff']:.2e} (merge/unmerge), same plan assignment "
                         f"{check['plan_ssm']['same_assignment_fraction']:.0%} SSM / "
                         f"{check['plan_idm']['same_assignment_fraction']:.0%} IDM")
    return lines


def markdown_table(result):
    """The runs of a bench result as a markdown table plus its configuration line."""
    head = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    body = ["| " + " | ".join(_cell(r, k, f) for _, k, f in COLUMNS) + " |" for r in result["runs"]]
    return "\n".join([head, sep, *body, "", *summary_lines(result)]) + "\n"


def plot(result, path):
    """Step times and tokens per step per run (needs matplotlib; returns False without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for run in result["runs"]:
        ax1.plot(run["step_ms"], label=run["name"])
        ax2.plot([r["mlp"] for r in run["tokens_per_step"]], label=run["name"])
    ax1.set(xlabel="step", ylabel="ms", title="step time")
    ax2.set(xlabel="step", ylabel="tokens (mean over blocks)", title="MLP tokens per step")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md")}
    with open(paths["json"], "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    with open(paths["markdown"], "w", encoding="utf-8") as fh:
        fh.write(markdown_table(result))
    png = os.path.join(out_dir, "results.png")
    if plot(result, png):
        paths["plot"] = png
    return paths


# -- real pipelines ----------------------------------------------------------------------------
def _looks_like_path(name):
    return name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or "\\" in name or name.count("/") > 1


def load_pipeline(name, device, dtype):
    """``DiffusionPipeline.from_pretrained(name)``; a clear ``BenchError`` when it cannot load."""
    path = os.path.expanduser(name)
    if not os.path.exists(path) and _looks_like_path(name):
        raise BenchError(f"--pipeline {name}: no such directory (pass a local diffusers pipeline folder or a "
                         "Hugging Face Hub id such as stabilityai/stable-diffusion-3-medium-diffusers)")
    if not have_diffusers():
        raise BenchError("--pipeline needs diffusers: pip install 'diffusers>=0.30' transformers accelerate")
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(path if os.path.exists(path) else name, torch_dtype=dtype)
    except Exception as exc:  # network, missing files, missing transformers: all end the bench here
        raise BenchError(f"--pipeline {name}: cannot load it with diffusers from_pretrained "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        raise BenchError(f"--pipeline {name}: {type(pipe).__name__} has no .transformer (SDTM patches DiTs)")
    return pipe.to(device)


def _pipeline_spec(transformer, text_len):
    cfg = transformer.config
    name = type(transformer).__name__
    family = "sd3" if name.startswith("SD3") else "pixart" if name.startswith("PixArt") else None
    if family is None:
        return None
    width = cfg.num_attention_heads * cfg.attention_head_dim
    return make_spec(family, layers=cfg.num_layers, width=width, head_dim=cfg.attention_head_dim,
                     latent=cfg.sample_size, patch=cfg.patch_size, in_channels=cfg.in_channels,
                     text_len=text_len or 0, text_dim=getattr(cfg, "joint_attention_dim", None)
                     or getattr(cfg, "caption_channels", None) or width)


def run_pipeline(args, log=print, pipe=None):
    """Baseline and SDTM images of a real pipeline (``pipe``, or loaded from ``args.pipeline``),
    timed per step (``callback_on_step_end``, or ``callback`` on older pipelines)."""
    from .dit import apply_sdtm, get_state, remove_sdtm

    device = torch.device(args.device)
    if pipe is None:
        pipe = load_pipeline(args.pipeline, device, getattr(torch, args.dtype))
    log(f"SDTM bench: pipeline {args.pipeline} ({type(pipe).__name__}), presets {', '.join(args.presets)}")
    steps = args.steps or 28
    size = args.size or 1024
    runs, images = [], {}
    progress = Progress((1 + len(args.presets)) * steps, enabled=not args.no_progress)
    for preset in (None, *args.presets):
        stamps = []

        def on_step(pipeline, step, timestep, kwargs):
            _sync(device)
            stamps.append(time.perf_counter())
            progress.update(label=preset or "unpatched")
            return {}

        if preset is not None:
            apply_sdtm(pipe, preset=preset)
        _sync(device)
        start = time.perf_counter()
        call_args = dict(num_inference_steps=steps, height=size, width=size,
                         generator=torch.Generator(device).manual_seed(args.seed))
        params = inspect.signature(type(pipe).__call__).parameters
        if "callback_on_step_end" in params:
            call_args["callback_on_step_end"] = on_step
        elif "callback" in params:  # older pipelines (PixArt-alpha): callback(step, timestep, latents)
            call_args.update(callback=lambda step, timestep, latents: on_step(pipe, step, timestep, {}),
                             callback_steps=1)
        else:
            raise BenchError(f"{type(pipe).__name__} has no per-step callback; cannot time its steps")
        image = pipe(args.prompt, **call_args).images[0]
        _sync(device)
        total = time.perf_counter() - start
        times = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
        run = {"name": preset or "unpatched", "preset": preset, "total_s": total, "step_ms": [1e3 * t for t in times],
               "step_ms_median": 1e3 * statistics.median(times)}
        state = get_state(pipe)
        if state is not None:
            spec = _pipeline_spec(pipe.transformer, state.text_len)
            grid = state.grid or (0, 0)
            run["tokens_per_step"] = tokens_per_step(state.stats, grid[0] * grid[1])
            run["mean_tokens"] = statistics.fmean((r["attn"] + r["mlp"]) / 2 for r in run["tokens_per_step"])
            if spec is not None and state.grid is not None:
                spec.update(grid=state.grid, num_tokens=grid[0] * grid[1])
                calls = len({(r["step"], r["call"]) for r in state.stats})
                run["flop_bound_speedup"] = schedule_flops(spec, steps=1, calls_per_step=calls) / schedule_flops(
                    spec, state.stats)
            remove_sdtm(pipe)
        images[run["name"]] = image
        runs.append(run)
    progress.close()
    for run in runs:
        run["speedup"] = runs[0]["total_s"] / run["total_s"]
        if run.get("flop_bound_speedup"):
            run["pct_of_flop_bound"] = 100.0 * run["speedup"] / run["flop_bound_speedup"]
    os.makedirs(args.out, exist_ok=True)
    saved = []
    for preset in args.presets:
        path = os.path.join(args.out, f"images_{preset}.png")
        side_by_side(images["unpatched"], images[preset]).save(path)
        saved.append(path)
    return {"config": {"pipeline": args.pipeline, "steps": steps, "size": size, "prompt": args.prompt,
                       "dtype": args.dtype, "device": str(device), "presets": list(args.presets), "seed": args.seed,
                       "family": type(pipe.transformer).__name__,
                       "timing": "one generation per run; per step: time between per-step callbacks"},
            "runs": runs, "images": saved}


def side_by_side(baseline, other, gain=4.0):
    """``baseline | other | |difference| * gain`` as one PIL image."""
    import numpy as np
    from PIL import Image

    a = np.asarray(baseline.convert("RGB"), dtype=np.float32)
    b = np.asarray(other.convert("RGB"), dtype=np.float32)
    diff = np.clip(np.abs(a - b) * gain, 0, 255)
    return Image.fromarray(np.concatenate([a, b, diff], axis=1).astype(np.uint8))


# -- command line ------------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50 on CUDA, 12 on CPU)")
    parser.add_argument("--size", type=int, default=None,
                        help="image size in pixels (latent = size / 8); default 1024 on CUDA, 512 on CPU")
    parser.add_argument("--latent", type=int, default=None, help="latent size instead of --size")
    parser.add_argument("--blocks", type=int, default=None, help="number of transformer blocks")
    parser.add_argument("--width", type=int, default=None, help="hidden size C (heads of 64 channels)")
    parser.add_argument("--family", choices=["sd3", "pixart", "dit"], default=None,
                        help="model: diffusers SD3 (default when diffusers is installed) or PixArt, or the "
                             "package's own DiT")
    parser.add_argument("--batch", type=int, default=1, help="images per call (the model sees 2x for CFG)")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS_RUN), default=list(PRESETS_RUN))
    parser.add_argument("--warmup", type=int, default=None, help="untimed schedules per run (default 1 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed schedules per run, round-robin; per step the minimum counts (default 1 on "
                             "CUDA, 2 on CPU)")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="advance all runs one step at a time, each on its own model copy (default on CPU; "
                             "on CUDA it needs one model per run in memory)")
    parser.add_argument("--no-reference", action="store_true", help="CUDA: skip the backend='reference' runs")
    parser.add_argument("--no-kernel-check", action="store_true", help="CPU: skip the Triton interpreter check")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    parser.add_argument("--pipeline", default=None, metavar="ID_OR_PATH",
                        help="a diffusers pipeline (Hub id or local folder) instead of the random model")
    parser.add_argument("--prompt", default="a photo of a red fox in the snow, highly detailed",
                        help="--pipeline: the prompt")
    return parser


def _check_args(args):
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise BenchError(f"--device {args.device}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: CUDA is not available here")
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    for name in ("steps", "size", "latent", "blocks", "width", "batch", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name} must be >= 1, got {value}")
    if args.steps is not None and args.steps < 2:
        raise BenchError("--steps must be >= 2 (step 0 is a protected step)")
    if args.size is not None and args.latent is not None:
        raise BenchError("pass --size (image pixels) or --latent, not both")


def main(argv=None, log=print):
    """Parse ``argv``, run, print the table and write the outputs; returns the exit code."""
    prepare_environment()
    parser = add_arguments(argparse.ArgumentParser(prog="python -m sdtm_kernels bench",
                                                   description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return run_args(args, argv, log)


def run_args(args, argv=None, log=print):
    prepare_environment()
    wall = time.perf_counter()
    try:
        _check_args(args)
        result = run_pipeline(args, log) if args.pipeline else run_suite(args, log)
    except BenchError as exc:
        print(f"sdtm bench: error: {exc}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    result["environment"] = environment(args.device)
    result["command"] = shlex.join(sys.argv)  # exactly as invoked (pytest's argv when run in-process)
    result["argv"] = argv
    result["reproduce"] = shlex.join(["python", "-m", "sdtm_kernels", "bench", *argv])
    result["wall_s"] = time.perf_counter() - wall
    paths = write_outputs(result, args.out)
    log(text_table(result))
    for line in summary_lines(result):
        log(line)
    log(f"wall time {result['wall_s']:.1f}s; wrote {', '.join(paths.values())}")
    return 0
