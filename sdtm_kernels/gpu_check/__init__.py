"""``python -m sdtm_kernels gpu-check --out DIR``: every GPU number the README needs, in one run
that fits the 8 minutes a borrowed H100/H200 session can give it (Triton JIT included).

Steps, cheap first (each timed, guarded and written to ``DIR/gpu_check.json`` and
``DIR/gpu_check.md`` as soon as it ends; a step whose estimate no longer fits ``--budget-s``
is recorded as skipped):

1. ``correctness``: a curated CUDA subset run as plain functions (``correctness.py``): SSM and
   IDM plans at 64x64 tokens in bf16, Triton vs reference; merge / prune / unmerge with the SD3
   epilogue (residual + gate * value with the cache blend) vs the fp32 reference; one patched
   SD3-sized block per step kind (protected, SSM, IDM), Triton vs reference backend; CUDA-graph
   capture / replay of merge + unmerge equals eager (skipped, with the reason, off CUDA).
2. ``kernel_timings``: per kernel at B=2, N=4096, C=1536 bf16 (selection and matching also at
   N=16384): microseconds, GB/s against the measured ``Tensor.copy_`` bandwidth, TFLOP/s of the
   matching, speedup vs the reference, first-call (JIT) seconds (``kernels.py``).
3. ``block_profile``: one random-weight SD3-medium block unpatched vs patched per step kind under
   ``torch.profiler``: kernels launched, their GPU time, host time per block (``blocks.py``).
4. ``plan_agreement``: differing entries per plan tensor between the backends at SD3 size, each
   differing decision explained (or not) by its top-2 / threshold margin (``agreement.py``).
5. ``end_to_end`` (``bench.run_suite``: unpatched and the SDTM presets, eager, random-weight
   SD3-medium at 1024^2, 28 steps, FLOP-bound speedups) and ``end_to_end_compiled`` (the same
   with ``torch.compile``, when the budget allows) (``end_to_end.py``).

``--dry-run`` runs the same steps at tiny sizes on the CPU (Triton interpreter). The JSON also
records the device, versions, date, command line and, per step, the Triton JIT compiles and
cache misses (``timing.JitCounter``); ``--triton-cache`` / ``--save-triton-cache`` carry a warm
cache between GPU sessions (README, "GPU check").
"""
from .runner import STEP_NAMES, add_arguments, main, run_args

__all__ = ["STEP_NAMES", "add_arguments", "main", "run_args"]
