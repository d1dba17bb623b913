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


def resolve_device_dtype(args, error=BenchError):
    """Fill ``args.device`` (CUDA when available) and ``args.dtype`` (bf16 on CUDA, fp32 on CPU);
    ``error`` (a user-facing exception class) for a device that cannot be used."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise error(f"--device {args.device}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise error("--device cuda: CUDA is not available here (use --device cpu)")
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    return device
