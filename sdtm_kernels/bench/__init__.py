"""``python -m sdtm_kernels bench``: end-to-end SDTM speed on a DiT-sized transformer (SPEC 8).

What it runs. A transformer with random weights (speed does not depend on weights): a
diffusers ``SD3Transformer2DModel`` built from a config when diffusers is installed, else the
package's own adaLN DiT (``sdtm_kernels.small_dit``) wrapped with ``wrap_dit_blocks``. Sizes:

* CUDA: SD3-medium (24 joint blocks, C=1536, 24 heads), 1024x1024 image -> 128x128 latent,
  patch 2 -> N=4096 image tokens, 333 text tokens, bf16, 50 steps.
* CPU: 6 blocks, C=384, 512x512 image -> 64x64 latent -> N=1024, 77 text tokens, fp32,
  20 steps (``--quick``: 2 blocks, C=128, N=256, 6 steps).
* ``--family`` picks another diffusers family (``bench.flops.default_spec`` has their sizes):
  pixart, qwen, wan, hunyuan, dit, and Flux.1 / Flux.2 (``flux`` / ``flux2``: on CUDA Flux.1-dev,
  19 double + 38 single blocks, C=3072, 1024² (64x64 tokens + 512 text), 28 steps; Flux.2-dev,
  8 + 48 blocks, C=6144, SwiGLU MLP of 3C, 50 steps, 60 GiB of weights in bf16; their double
  blocks are counted as ``joint``, single blocks as ``single`` in ``bench.families.block_flops``).

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

Host time per merged block (``hosttime.py``; skipped with ``--no-host-time``, and on CPU with
``--no-kernel-check``): one tiny block of the model family called on its own, unpatched and merged
by SDTM on the Triton backend at the first SSM and IDM step; SDTM's host time = merged -
unpatched block, reported against the target "at most 20% of an unpatched block". On a GPU the
block's wall time without synchronisation is its host time; on CPU the Triton interpreter's
launches are recorded once and replayed (their time subtracted, a GPU launch's host cost charged
instead), see that module.

``--compile`` (``compiled.py``): every run again on a fresh model copy compiled in place with
``torch.compile`` (``--compile-backend``, default inductor; ``--compile-mode``; ``--cuda-graphs``
= mode "reduce-overhead", CUDA only): one untimed generation compiles, then the timed ones; SDTM's
speedup over the compiled baseline, compile time (first-generation extra time), graphs, graph
breaks, recompiles with their reasons, and the distinct merged token counts per generation. A
compile error is reported in its run (and as a warning), the other runs go on.

Outputs (``--out``, default ``./sdtm_bench_out``): ``results.json`` (device, versions, date,
command line, config, every run), ``results.md`` (the table) and ``results.png`` (step
times and tokens per step; only when matplotlib is installed). ``--pipeline ID_OR_PATH``
loads a real diffusers pipeline with ``from_pretrained`` instead and also saves baseline and
SDTM images side by side with their difference.
"""
from .common import DEFAULT_OUT, GUIDANCE, PRESETS_RUN, VAE_FACTOR, BenchError, prepare_environment, resolve_device_dtype
from .flops import SIZES, block_flops, call_overhead_flops, default_spec, make_spec, schedule_flops, tokens_per_step
from .models import BenchModel, have_diffusers
from .timing import BookkeepingTimer, Progress, TimedSDTMState, rel_l2, sample, sample_steps
from .report import COLUMNS, device_name, environment, markdown_table, plot, summary_lines, text_table, write_outputs
from .suite import kernel_check, resolved_backend, run_suite, spec_from_args
from .pipeline import load_pipeline, run_pipeline, side_by_side
from .command import _check_args, add_arguments, main, run_args  # noqa: F401 - _check_args: used by tests

__all__ = [
    "BenchError", "BenchModel", "BookkeepingTimer", "COLUMNS", "DEFAULT_OUT", "GUIDANCE", "PRESETS_RUN", "Progress",
    "SIZES", "TimedSDTMState", "VAE_FACTOR", "add_arguments", "block_flops", "call_overhead_flops", "default_spec",
    "device_name", "environment", "have_diffusers", "kernel_check", "load_pipeline", "main", "make_spec",
    "markdown_table", "plot", "prepare_environment", "rel_l2", "resolve_device_dtype", "resolved_backend", "run_args", "run_pipeline",
    "run_suite", "sample", "sample_steps", "schedule_flops", "side_by_side", "spec_from_args", "summary_lines",
    "text_table",
    "tokens_per_step", "write_outputs",
]
