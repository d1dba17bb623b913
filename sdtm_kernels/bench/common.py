"""Shared pieces of the bench job: constants, the user-facing error, the interpreter switch."""
import os

import torch

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
