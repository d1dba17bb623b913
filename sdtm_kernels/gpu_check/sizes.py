"""Problem sizes of the GPU check: SD3-medium at 1024^2 on CUDA, tiny ones for ``--dry-run``."""
from dataclasses import dataclass, field
from typing import Tuple

import torch


@dataclass(frozen=True)
class CheckSizes:
    dtype: torch.dtype              # kernels, plans and the profiled block
    model_dtype: str                # the end-to-end job (bench --dtype)
    batch: int                      # B of the kernel problems (the CFG batch of one image)
    grid: Tuple[int, int]           # token grid of kernels / plans (64x64 = N 4096, SD3 at 1024^2)
    large_grid: Tuple[int, int]     # selection and matching also here (128x128 = N 16384, 2048^2)
    channels: int                   # C
    block: dict                     # bench.make_spec arguments of the profiled SD3 block's model
    block_iterations: int           # profiled / timed calls of the block per step kind
    schedule_steps: int             # the block's step kinds come from this schedule (released preset)
    kernel_reps: int
    kernel_warmup: int
    copy_bytes: int                 # size of the copy that measures the bandwidth roofline
    e2e_args: Tuple[str, ...]       # bench options of the end-to-end job
    e2e_compiled_presets: Tuple[str, ...]
    estimates_s: dict = field(default_factory=dict)  # seconds a step needs at least; below: skipped


FULL = CheckSizes(
    dtype=torch.bfloat16, model_dtype="bfloat16", batch=2, grid=(64, 64), large_grid=(128, 128), channels=1536,
    # 2 layers: block 0 is a full joint block (the single block of a 1-layer SD3 is context_pre_only)
    block=dict(family="sd3", layers=2, width=1536, head_dim=64, latent=128, in_channels=16, text_len=333,
               text_dim=4096, pooled_dim=2048),
    block_iterations=10, schedule_steps=28, kernel_reps=50, kernel_warmup=3, copy_bytes=1024 * 1024 * 1024,
    e2e_args=("--steps", "28", "--size", "1024", "--presets", "released", "fast"),
    e2e_compiled_presets=("fast",),
    # measured nowhere yet: guesses for an H100/H200 with a cold Triton cache
    estimates_s=dict(correctness=60, kernel_timings=60, block_profile=45, plan_agreement=20, end_to_end=120,
                     end_to_end_compiled=200),
)

DRY = CheckSizes(
    dtype=torch.bfloat16, model_dtype="float32", batch=2, grid=(16, 16), large_grid=(16, 32), channels=32,
    block=dict(family="sd3", layers=2, width=64, head_dim=32, latent=32, in_channels=4, text_len=8,
               text_dim=16, pooled_dim=8),
    block_iterations=2, schedule_steps=6, kernel_reps=2, kernel_warmup=1, copy_bytes=8 * 1024 * 1024,
    e2e_args=("--steps", "3", "--latent", "32", "--blocks", "1", "--width", "64", "--presets", "fast",
              "--repeats", "1", "--warmup", "0", "--no-kernel-check"),
    e2e_compiled_presets=("fast",),
    estimates_s=dict(correctness=3, kernel_timings=3, block_profile=3, plan_agreement=2, end_to_end=5,
                     end_to_end_compiled=60),
)
