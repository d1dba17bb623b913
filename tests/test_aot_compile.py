"""Every Triton kernel variant the package launches compiles for a real GPU (sm_90, H100).

Without a GPU the suite runs the kernels in the Triton interpreter, which accepts code the
GPU compiler rejects and never sees the tile sizes used on a GPU. ``tests/aot_compile.py``
records the launches (as a GPU would specialise them) and compiles them ahead of time with
the installed triton's bundled LLVM and ptxas; no GPU needed.

To stay near a minute on a small CPU machine this test records the ``--quick`` scenario set
and compiles a pairwise covering subset of it (every pair of argument types / constexpr
values / warps seen together in a recorded variant is compiled together at least once).
``python tests/aot_compile.py`` records everything and compiles every variant.

Skipped only when a GPU is present: then the rest of the suite compiles the kernels for real.
"""
import os

import pytest
import torch

import aot_compile

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is present: the suite compiles and runs the kernels for real"
)


def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    records = str(tmp_path / "records.json")
    aot_compile.record(records, quick=True)
    summary = aot_compile.compile_all(records, jobs=os.cpu_count() or 1, subset=True, quiet=True)
    text, failed = aot_compile.summarize(summary)
    print(text)
    assert summary["results"], "no kernel launch was recorded"
    kernels = {r["variant"].split("[", 1)[0] for r in summary["results"]}
    assert kernels == {
        "merge._segment_reduce_kernel", "merge._gather_rows_kernel", "scores._window_scores_kernel",
        "match._bipartite_match_kernel", "select._topk_rank_kernel", "select._group_rank_kernel",
        "attention._row_lse_kernel", "attention._received_kernel",
    }
    assert not failed, text
