"""Step 1: a curated correctness subset on the device, run as plain functions (the full test
suite JIT-compiles ~900 kernel variants; this subset needs a few dozen).

Each check returns ``{"passed": bool, ...numbers}``; an exception inside one check is recorded
as that check's failure and the others still run.
"""
import time
import traceback

import torch

from .. import plan_idm, plan_ssm
from ..reference import merge as ref
from .agreement import compare_plans
from .blocks import BlockHarness, image_output
from .timing import is_cuda

# (rtol, atol) of a bf16 / fp16 / fp32 result against an fp32 reference (tests/helpers.py's table)
TOLERANCE = {torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3), torch.float32: (1e-5, 1e-5)}
BLOCK_REL_L2_LIMIT = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def _tokens(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device, dtype)


def _close(actual, expected, dtype):
    rtol, atol = TOLERANCE[dtype]
    diff = (actual.float() - expected.float()).abs()
    bad = diff > atol + rtol * expected.float().abs()
    return {"passed": not bool(bad.any()), "max_abs_diff": float(diff.max()), "mismatched": int(bad.sum())}


def _problem(sizes, device):
    batch, (h, w), channels = sizes.batch, sizes.grid, sizes.channels
    n = h * w
    metric = _tokens((batch, n, channels), sizes.dtype, device, 0)
    li = torch.randint(0, 4, (batch, n), generator=torch.Generator().manual_seed(1), dtype=torch.int32).to(device)
    return metric, li, n


def check_plans(sizes, device):
    """SSM and IDM plans, Triton vs reference, with ``li`` and seeded random dst positions as in use."""
    metric, li, n = _problem(sizes, device)
    out = {}
    for name, builder in (("ssm", plan_ssm), ("idm", plan_idm)):
        plans = {}
        for backend in ("reference", "triton"):
            gen = torch.Generator(device=device).manual_seed(3)
            plans[backend] = builder(metric, sizes.grid, n // 2, li=li, random_dst=True, generator=gen,
                                     backend=backend)
        plans["triton"].check()  # a valid plan (reads values: a host sync, fine here)
        diffs = compare_plans(plans["reference"], plans["triton"])
        out[name] = {"passed": all(v == 0 for v in diffs.values()), "differing_entries": diffs,
                     "num_rows": plans["triton"].num_rows, "note": "differences are analysed in plan_agreement"}
    return out


def check_merge_unmerge(sizes, device):
    """merge / prune / unmerge with the SD3 epilogue ``residual + gate * where(blend, mcw*v +
    (1-mcw)*cache, v)`` on a Triton SSM plan, Triton vs the fp32 reference."""
    metric, li, n = _problem(sizes, device)
    plan = plan_ssm(metric, sizes.grid, n // 2, li=li, backend="triton")
    dtype, (batch, channels) = sizes.dtype, (sizes.batch, sizes.channels)
    x = _tokens((batch, n, channels), dtype, device, 10)
    y = _tokens((batch, plan.num_rows, channels), dtype, device, 11)
    residual, cache = _tokens((batch, n, channels), dtype, device, 12), _tokens((batch, n, channels), dtype, device, 13)
    gate = _tokens((batch, channels), dtype, device, 14)
    out = {"num_rows": plan.num_rows}
    merged = plan.merge(x, backend="triton")
    out["merge"] = _close(merged, ref.merge_mean(x.float(), plan.row_of_token, plan.num_rows), dtype)
    out["prune"] = {"passed": torch.equal(plan.merge(x, mode="prune", backend="triton"), ref.prune(x, plan.rep_token))}
    out["unmerge_copy"] = {"passed": torch.equal(plan.unmerge(y, backend="triton"), ref.unmerge(y, plan.row_of_token))}
    got = plan.unmerge(y, residual=residual, gate=gate, cache=cache, mcw=0.1, backend="triton")
    expected = ref.unmerge(y.float(), plan.row_of_token, residual=residual.float(), gate=gate.float(),
                           cache=cache.float(), blend=plan.blend, mcw=0.1)
    out["unmerge_epilogue"] = _close(got, expected, dtype)
    return out


def check_block(sizes, device):
    """One patched SD3-sized block per step kind: Triton vs reference backend (same seeded plans),
    and the protected step equal to the unpatched block."""
    harness = BlockHarness(sizes.block, device, sizes.dtype, sizes.schedule_steps)
    unpatched = image_output(harness.call()).float()
    outputs = {}
    for backend in ("reference", "triton"):
        harness.patch(backend)
        try:  # one pass through the schedule collects every kind's output
            harness.run_schedule("idm", outputs=outputs.setdefault(backend, {}))
        finally:
            harness.unpatch()
    limit = BLOCK_REL_L2_LIMIT[sizes.dtype]
    out = {"model": f"{harness.spec['family']} C={harness.spec['width']} N={harness.num_tokens}",
           "rel_l2_limit": limit}
    for kind in harness.step_of_kind:
        a, b = outputs["triton"][kind], outputs["reference"][kind]
        rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
        out[kind] = {"passed": rel <= limit, "rel_l2_triton_vs_reference": rel,
                     "max_abs_diff": float((a - b).abs().max())}
    protected = outputs["triton"]["protected"]
    rel = float((protected - unpatched).norm() / unpatched.norm().clamp_min(1e-12))
    # the protected step runs the block exactly; only the epilogue's op order may differ
    out["protected_equals_unpatched"] = {"passed": rel <= limit / 10, "rel_l2": rel,
                                         "bit_exact": torch.equal(protected, unpatched)}
    return out


def check_cuda_graph(sizes, device):
    """merge + unmerge (with the epilogue) captured in a CUDA graph and replayed equals eager, also
    after new input values are copied into the captured input."""
    if not is_cuda(device):
        return {"skipped": "CUDA-graph capture needs a CUDA device"}
    metric, li, n = _problem(sizes, device)
    plan = plan_idm(metric, sizes.grid, n // 2, li=li, backend="triton")
    dtype, (batch, channels) = sizes.dtype, (sizes.batch, sizes.channels)
    residual, cache = _tokens((batch, n, channels), dtype, device, 12), _tokens((batch, n, channels), dtype, device, 13)
    gate = _tokens((batch, channels), dtype, device, 14)

    def merged_block(x):
        return plan.unmerge(plan.merge(x, backend="triton") * 2.0, residual=residual, gate=gate, cache=cache,
                            mcw=0.1, backend="triton")

    static_x = _tokens((batch, n, channels), dtype, device, 10)
    eager = merged_block(static_x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        merged_block(static_x)  # warm-up off the default stream, as torch.cuda.graphs advises
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = merged_block(static_x)
    graph.replay()
    torch.cuda.synchronize()
    first = torch.equal(static_out, eager)
    static_x.copy_(_tokens((batch, n, channels), dtype, device, 20))
    graph.replay()
    torch.cuda.synchronize()
    second = torch.equal(static_out, merged_block(static_x))
    return {"passed": first and second, "replay_equals_eager": first, "replay_after_new_input_equals_eager": second}


CHECKS = (("plans", check_plans), ("merge_unmerge", check_merge_unmerge), ("patched_block", check_block),
          ("cuda_graph", check_cuda_graph))


def _failed(result):
    """Names of failed leaf checks inside a check's result."""
    if not isinstance(result, dict):
        return []
    names = [] if result.get("passed", True) else [""]
    for key, value in result.items():
        names += [f"{key}.{sub}" if sub else key for sub in _failed(value)]
    return names


def correctness(sizes, device, deadline):
    results, failed = {}, []
    for name, check in CHECKS:
        if time.perf_counter() > deadline:
            results[name] = {"skipped": "step budget spent"}
            continue
        start = time.perf_counter()
        try:
            results[name] = check(sizes, device)
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
            results[name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}",
                             "traceback_tail": traceback.format_exc()[-1500:]}
        results[name]["seconds"] = round(time.perf_counter() - start, 3)
        failed += [f"{name}.{sub}" if sub else name for sub in _failed(results[name])]
    results["failed_checks"] = failed
    return results
