"""Shared fixtures. Without a GPU the Triton kernels run in the Triton interpreter, which
must be switched on before triton is first imported (torch._dynamo imports it too)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# pytest-xdist: each worker gets its share of the cores (torch would start one thread per core in
# every worker and the workers would fight over them).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Reference fp32 matmuls follow the global TF32 switch; the kernels compute in full fp32.
# Comparisons on CUDA must not see TF32's 10-bit mantissa on the reference side.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def device():
    """The device the whole suite runs on: CUDA when present, else CPU (interpreter)."""
    return DEVICE


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    return f"sdtm_kernels tests on {DEVICE} (torch {torch.__version__}, TRITON_INTERPRET={interp})"
