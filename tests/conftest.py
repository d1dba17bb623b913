"""Shared fixtures. Without a GPU the Triton kernels run in the Triton interpreter, which
must be switched on before triton is first imported (torch._dynamo imports it too)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    """The device the whole suite runs on: CUDA when present, else CPU (interpreter)."""
    return DEVICE


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    return f"sdtm_kernels tests on {DEVICE} (torch {torch.__version__}, TRITON_INTERPRET={interp})"
