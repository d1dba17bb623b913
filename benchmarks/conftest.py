"""Benchmark fixtures. Sets TRITON_INTERPRET=1 without a GPU (before triton is imported)
and puts this folder on ``sys.path`` so bench files can ``from common import ...``."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402

from common import DEVICE, copy_bandwidth_gbps, device_name, device_properties  # noqa: E402


@pytest.fixture
def device():
    """CUDA when present, else CPU (kernels in the Triton interpreter, tiny shapes)."""
    return DEVICE


@pytest.fixture(scope="session")
def copy_gbps():
    """Measured device copy bandwidth, the roofline for memory-bound ops."""
    return copy_bandwidth_gbps(DEVICE)


def pytest_report_header(config):
    return f"sdtm_kernels benchmarks on {device_name(DEVICE)} (torch {torch.__version__})"


def pytest_benchmark_update_machine_info(config, machine_info):
    """Device properties and library versions in the JSON's ``machine_info`` (STYLE 13)."""
    import importlib.metadata

    machine_info["sdtm_device"] = device_name(DEVICE)
    machine_info["sdtm_device_properties"] = device_properties(DEVICE)
    versions = {"torch": torch.__version__}
    for name in ("triton", "diffusers", "sdtm_kernels"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    machine_info["sdtm_versions"] = versions
