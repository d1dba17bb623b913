"""Every Triton kernel variant the package launches compiles for a real GPU (sm_90, H100).

Without a GPU the suite runs the kernels in the Triton interpreter, which accepts code the
GPU compiler rejects and never sees the tile sizes used on a GPU. ``tests/aot_compile.py``
records the launches (as a GPU would specialise them) and compiles them ahead of time with
the installed triton's bundled LLVM and ptxas; no GPU needed.

To stay near a minute on a small CPU machine this file records the ``--quick`` scenario set
once and compiles, one test per kernel, a pairwise covering subset of that kernel's variants
(every pair of argument types / constexpr values / warps seen together in a recorded variant
is compiled together at least once). ``python tests/aot_compile.py`` records everything and
compiles every variant.

Skipped only when a GPU is present: then the rest of the suite compiles the kernels for real.
"""
import json
import os

import pytest
import torch

import aot_compile

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is present: the suite compiles and runs the kernels for real"
)

KERNELS = (
    "merge._segment_chunk_kernel", "merge._segment_reduce_kernel", "merge._gather_rows_kernel",
    "scores._window_scores_kernel", "match._row_norms_kernel", "match._bipartite_match_kernel",
    "match._match_combine_kernel", "select._topk_rank_kernel", "plan_build._ssm_plan_kernel",
    "plan_build._bipartite_lists_kernel", "plan_build._bipartite_plan_kernel",
    "attention._row_lse_kernel", "attention._received_kernel",
)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("aot") / "records.json")
    aot_compile.record(path, quick=True)
    return path


def test_every_kernel_is_recorded(records):
    with open(records) as fh:
        recorded = {aot_compile.kernel_name(r) for r in json.load(fh)["records"]}
    assert recorded == set(KERNELS)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_variants_compile_for_sm90(records, kernel):
    summary = aot_compile.compile_all(records, jobs=os.cpu_count() or 1, subset=True, quiet=True, kernel=kernel)
    text, failed = aot_compile.summarize(summary)
    print(text)
    assert summary["results"], f"no {kernel} variant was compiled"
    assert not failed, text
    # The launch's dynamic shared memory is what the sm_90 limit applies to; it is reported
    # apart from cuobjdump's static figure.
    assert all(r["shared"] <= aot_compile.H100_MAX_SHARED for r in summary["results"])
