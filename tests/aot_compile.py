"""Ahead-of-time compile check of every Triton kernel variant the package launches, for sm_90.

Without a GPU the test suite runs the kernels in the Triton interpreter, which accepts code
that the real compiler may reject (and never sees the tile sizes used on a GPU). This script
closes that gap without a GPU:

1. ``record`` (run in a subprocess with ``TRITON_INTERPRET=1``): wraps the interpreter's
   kernel launch, drives the public API (plans, scores, matching, merge / prune / unmerge,
   forward and backward, every dtype and epilogue combination) plus a shape sweep of the
   launchers on small CPU inputs, and records every launch as the GPU JIT would specialise
   it: ``native_specialize_impl`` with the CUDA backend gives each argument's type
   (``*bf16``, ``i32``, ``fp32``, ...) and its specialisation (divisible by 16 -> ``D``, ints
   equal to 1 -> constexpr), constexpr parameters keep their values (``tl.float32`` dtypes
   included), and ``num_warps`` / ``num_stages`` come from the launch. The launchers'
   ``_interpreting`` check is patched to return False during recording, so they pick the
   tile sizes, warps, stages and ``DOT_FP32`` flag they use on a GPU (the interpreter still
   executes those launches). Duplicates are dropped; the result is JSON.
2. ``compile`` (subprocess without ``TRITON_INTERPRET``): imports each kernel, builds
   ``triton.compiler.ASTSource`` the way ``JITFunction._pack_args`` does (works with
   triton 3.6 and 3.9) and ``triton.compile``s it for ``GPUTarget("cuda", 90, 32)``
   (ptxas included). Reports OK / the compiler error, the dynamic shared memory the launch
   requests (``metadata.shared``, checked against the sm_90 limit), and, from the bundled
   ``cuobjdump``, registers, local memory (spills) and static shared memory per variant.

Usage::

    python tests/aot_compile.py                       # record + compile all variants, this python
    python tests/aot_compile.py --python /tmp/t36/bin/python --python python   # several tritons
    python tests/aot_compile.py --subset              # one variant per (kernel, constexprs, warps)
    python tests/aot_compile.py record out.json       # the steps on their own
    python tests/aot_compile.py compile out.json [--shard I/J] [--report r.json]

Exit status 0 only when every selected variant compiled.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Check the checkout's kernels, never an installed copy of the package (a plain, non-editable
# install in site-packages would otherwise win when the script runs from outside the repo).
if REPO not in sys.path:
    sys.path.insert(0, REPO)
TARGET = ("cuda", 90, 32)  # H100, warp size 32
H100_MAX_SHARED = 232448  # bytes of shared memory a block may opt into on sm_90 (227 KiB)
KERNEL_MODULES = ("merge", "scores", "match", "select", "plan_build")


# =========================================================================================
# 1. record (TRITON_INTERPRET=1)
# =========================================================================================

def _encode_constexpr(value):
    import triton.language as tl

    if isinstance(value, tl.constexpr):
        value = value.value
    if isinstance(value, tl.dtype):
        return {"tl_dtype": str(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record constexpr value {value!r} of type {type(value).__name__}")


class Recorder:
    """Wraps ``InterpretedFunction.run``; every launch becomes a record (deduplicated)."""

    def __init__(self, execute_all=False):
        import inspect

        import triton.language as tl
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime import interpreter

        self.inspect = inspect
        self.tl = tl
        self.specialize = native_specialize_impl
        self.backend = make_backend(GPUTarget(*TARGET))
        self.interpreter = interpreter
        self.records = {}
        self.label = "?"
        self.execute_all = execute_all
        self._orig_run = interpreter.InterpretedFunction.run

    def install(self):
        recorder = self
        orig = self._orig_run

        def run(fn_self, *args, grid, warmup, **kwargs):
            if not warmup:
                recorder.record(fn_self, args, kwargs)
                # merge.py kernels only write the tokens merge / unmerge return: no later launch
                # depends on their values, so they are recorded and not executed (the slow part
                # of the interpreter). Plans need real scores, ranks and matches.
                if not recorder.execute_all and fn_self.fn.__module__.endswith(".merge"):
                    return None
            return orig(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        self.interpreter.InterpretedFunction.run = run

    def record(self, fn_self, args, kwargs):
        fn = fn_self.fn
        sig = self.inspect.signature(fn)
        names = list(sig.parameters)
        options = {k: v for k, v in kwargs.items() if k not in names}
        bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        spec = []
        for name, param in sig.parameters.items():
            value = bound.arguments[name]
            annotation = param.annotation
            is_constexpr = annotation is self.tl.constexpr or "constexpr" in str(annotation)
            if is_constexpr:
                spec.append(["constexpr", _encode_constexpr(value)])
                continue
            # Exactly what the GPU JIT does for an unannotated argument (is_const=False,
            # specialize=True, align=True) with the CUDA backend.
            ty, attr = self.specialize(self.backend, value, False, True, True)
            if ty == "constexpr":
                spec.append(["constexpr", _encode_constexpr(attr)])
            else:
                spec.append([ty, attr])
        unknown = set(options) - {"num_warps", "num_stages", "num_ctas", "maxnreg"}
        if unknown:
            raise RuntimeError(f"unexpected launch options {sorted(unknown)} for {fn.__name__}")
        rec = {
            "module": fn.__module__,
            "kernel": fn.__name__,
            "arg_names": names,
            "spec": spec,
            "num_warps": int(options.get("num_warps", 4)),
            "num_stages": int(options.get("num_stages", 3)),
        }
        key = json.dumps([rec["module"], rec["kernel"], spec, rec["num_warps"], rec["num_stages"]], sort_keys=True)
        if key in self.records:
            self.records[key]["count"] += 1
        else:
            rec["label"] = self.label
            rec["count"] = 1
            self.records[key] = rec


def _drive(recorder, quick=False):
    """Every public entry point that reaches a kernel, small CPU inputs, backend="triton"."""
    import itertools

    import torch

    from sdtm_kernels import MergePlan, ops, plan_idm, plan_ssm, plan_tome
    from sdtm_kernels.csrc_triton import attention as k_attention
    from sdtm_kernels.csrc_triton import match as k_match
    from sdtm_kernels.csrc_triton import merge as k_merge
    from sdtm_kernels.csrc_triton import scores as k_scores
    from sdtm_kernels.csrc_triton import plan_build as k_plan_build
    from sdtm_kernels.csrc_triton import select as k_select

    # GPU tile sizes / warps / DOT_FP32: the launchers ask ``_interpreting`` which config to use.
    for mod in (k_scores, k_match, k_select, k_attention, k_plan_build):
        mod._interpreting = lambda t: False

    gen = torch.Generator().manual_seed(0)
    T = "triton"
    floats = (torch.float32, torch.float16, torch.bfloat16)

    def tokens(b, n, c, dtype=torch.float32, requires_grad=False):
        x = torch.randn(b, n, c, generator=gen).to(dtype)
        return x.requires_grad_(requires_grad)

    def li_for(b, n, dtype=torch.int32):
        return torch.randint(0, 5, (b, n), generator=gen).to(dtype)

    def section(label):
        recorder.label = label

    # -- plans (window scores, top-k, group rank, matching) ---------------------------------
    # random_dst changes no kernel argument, so it is varied on the first grid only; quick mode
    # builds the other grids for one dtype / channel count (their tile sizes do not depend on it).
    plans, first_idm = [], None
    plan_shapes = (((8, 8), (2, 2), 48), ((4, 4), (2, 2), 8), ((16, 16), (2, 2), 96), ((6, 6), (3, 3), 16),
                   ((8, 8), (2, 1), 16))
    for dtype, channels in itertools.product(floats + (torch.float64,), (16, 40)):
        for shape_index, (grid, window, n_remove) in enumerate(plan_shapes):
            if dtype == torch.float64 and (channels != 16 or shape_index not in (0, 2)):
                continue
            if quick and shape_index > 0 and (dtype, channels) != (torch.float16, 16):
                continue
            if quick and channels != 16:
                continue
            n = grid[0] * grid[1]
            metric = tokens(2, n, channels, dtype)
            draws = (False, True) if shape_index == 0 else (False,)
            for li, score, random_dst in itertools.product((None, li_for(2, n)), ("released", "paper"), draws):
                section(f"plan_ssm {dtype} C={channels} grid={grid} window={window} li={li is not None} {score} random_dst={random_dst}")
                plans.append(plan_ssm(metric, grid, n_remove, window=window, li=li, score=score,
                                      random_dst=random_dst, generator=gen, backend=T))
            if first_idm is None:
                first_idm = len(plans)
            for li, random_dst in itertools.product((None, li_for(2, n)), draws):
                section(f"plan_idm {dtype} C={channels} grid={grid} window={window} li={li is not None} random_dst={random_dst}")
                plans.append(plan_idm(metric, grid, n_remove, window=window, li=li, random_dst=random_dst,
                                      generator=gen, backend=T))
            for random_dst in (True, False) if shape_index == 0 else (True,):
                section(f"plan_tome {dtype} C={channels} grid={grid} window={window} random_dst={random_dst}")
                plans.append(plan_tome(metric, grid, n_remove, window=window, random_dst=random_dst,
                                       generator=gen, backend=T))
    if not quick:
        # SD3 at 1024px (64x64 tokens): top-k over 3072 candidates, 64-wide match tiles.
        section("plan_idm/plan_ssm 64x64 grid")
        big = tokens(1, 4096, 16, torch.float16)
        plan_idm(big, (64, 64), 1024, generator=gen, backend=T)
        plan_ssm(big, (64, 64), 1024, li=li_for(1, 4096), generator=gen, backend=T)

    # -- ops.window_scores / ops.bipartite_match -------------------------------------------
    for dtype, channels in itertools.product(floats + (torch.float64,), (8, 16, 64, 200)):
        if dtype == torch.float64 and channels != 16:
            continue
        metric = tokens(2, 64, channels, dtype)
        for li, a_s, score in itertools.product((None, li_for(2, 64), li_for(2, 64, torch.int64)), (0.0, 0.05),
                                                ("released", "paper")):
            section(f"ops.window_scores {dtype} C={channels} li={None if li is None else li.dtype} a_s={a_s} {score}")
            ops.window_scores(metric, (8, 8), window=(2, 2), li=li, a_s=a_s, score=score, backend=T)
        section(f"ops.window_scores strided {dtype} C={channels}")
        ops.window_scores(metric.transpose(1, 2).contiguous().transpose(1, 2), (8, 8), backend=T)
        for num_cand, num_dst, idx_dtype in ((48, 16, torch.int64), (20, 40, torch.int32), (60, 60, torch.int64)):
            section(f"ops.bipartite_match {dtype} C={channels} Na={num_cand} D={num_dst} {idx_dtype}")
            perm = torch.randperm(64, generator=gen)
            cand = perm[:num_cand].sort().values.to(idx_dtype).expand(2, -1)
            dst = perm[-num_dst:].sort().values.to(idx_dtype).expand(2, -1).contiguous()
            ops.bipartite_match(metric, cand, dst, backend=T)

    # -- merge / prune / unmerge, forward and backward --------------------------------------
    base_plans = [plans[0], plans[first_idm], MergePlan.identity(2, 64)]  # SSM, IDM, no merging
    dtypes = floats + (torch.float64,)
    for plan, dtype, channels in itertools.product(base_plans, dtypes, (16, 40, 128)):
        b, n, m = plan.batch_size, plan.num_tokens, plan.num_rows
        for mode in ("mean", "prune"):
            section(f"MergePlan.merge {mode} {dtype} C={channels} M={m}")
            x = tokens(b, n, channels, dtype, requires_grad=True)
            out = plan.merge(x, mode=mode, backend=T)
            out.backward(torch.randn(out.shape, generator=gen).to(dtype))
        gate_dtypes = (torch.float32,) if dtype == torch.float32 else (torch.float32, dtype)
        for has_res, has_gate, has_cache, gate_dtype, mcw in itertools.product(
                (False, True), (False, True), (False, True), gate_dtypes, (1.0, 0.3)):
            if (not has_gate and gate_dtype != torch.float32) or (not has_cache and mcw != 1.0):
                continue
            section(f"MergePlan.unmerge {dtype} C={channels} residual={has_res} gate={has_gate}:{gate_dtype} "
                    f"cache={has_cache} mcw={mcw}")
            y = tokens(b, m, channels, dtype, requires_grad=True)
            terms = {}
            if has_res:
                terms["residual"] = tokens(b, n, channels, dtype, requires_grad=True)
            if has_gate:
                terms["gate"] = tokens(1, b, channels, gate_dtype)[0].requires_grad_(True)
            if has_cache:
                terms["cache"] = tokens(b, n, channels, dtype, requires_grad=True)
            out = plan.unmerge(y, mcw=mcw, backend=T, **terms)
            out.backward(torch.randn(out.shape, generator=gen).to(dtype))
            section(f"ops.unmerge blend=None {dtype} C={channels} residual={has_res} gate={has_gate}:{gate_dtype} "
                    f"cache={has_cache} mcw={mcw}")
            y2 = y.detach().requires_grad_(True)
            out = ops.unmerge(y2, plan.row_of_token, blend=None, mcw=mcw, backend=T, **terms)
            out.backward(torch.randn(out.shape, generator=gen).to(dtype))
        section(f"ops.unmerge strided y {dtype} C={channels}")
        y = tokens(b, channels, m, dtype).transpose(1, 2)
        plan.unmerge(y, backend=T)
        # passthrough rows around the plan's span (Flux single blocks: the text rows), eager path
        for prefix, suffix in ((1, 0), (7, 0), (0, 16), (5, 3)):
            section(f"MergePlan merge / unmerge passthrough {dtype} C={channels} prefix={prefix} suffix={suffix}")
            with torch.no_grad():
                x = tokens(b, prefix + n + suffix, channels, dtype)
                for mode in ("mean", "prune"):
                    plan.merge(x, mode=mode, backend=T, prefix=prefix, suffix=suffix)
                y = tokens(b, prefix + m + suffix, channels, dtype)
                plan.unmerge(y, residual=x, gate=tokens(1, b, channels)[0], cache=tokens(b, n, channels, dtype),
                             mcw=0.3, gate_first=True, backend=T, prefix=prefix, suffix=suffix)
                for cache in (None, tokens(b, n, channels, dtype)):  # the second output term of single blocks
                    plan.unmerge(y, residual=x, gate=tokens(1, b, channels)[0], cache=cache, mcw=0.3, gate_first=True,
                                 addend=tokens(b, prefix + n + suffix, channels, dtype), backend=T, prefix=prefix,
                                 suffix=suffix)

    # -- attention received by image tokens (prompt queries x all joint keys) -----------------
    for dtype, head_dim, (num_q, num_k) in itertools.product(floats, (16, 64, 128), ((7, 40), (77, 300))):
        if quick and (dtype != torch.float16 or num_q != 7):
            continue
        section(f"ops.attention_received {dtype} D={head_dim} Tq={num_q} Tk={num_k}")
        q = torch.randn(2, 3, num_q, head_dim, generator=gen).to(dtype)
        k = torch.randn(2, 3, num_k, head_dim, generator=gen).to(dtype)
        ops.attention_received(q, k, key_slice=(num_q, num_k), backend=T)

    # -- shape sweep of the launchers: every tile size they can pick on a GPU ---------------
    plan = base_plans[0]
    for channels in (8, 24, 64, 256, 512, 1536, 3072):  # BLOCK_C 16 .. 512, block_t and warps
        for dtype in floats:
            section(f"sweep merge/unmerge {dtype} C={channels}")
            x = tokens(plan.batch_size, plan.num_tokens, channels, dtype)
            k_merge.merge_mean(x, plan.members, plan.row_start)
            k_merge.prune(x, plan.rep_token)
            y = k_merge.merge_mean(x, plan.members, plan.row_start)
            k_merge.unmerge(y, plan.row_of_token, residual=x, cache=x, blend=plan.blend, mcw=0.5,
                            gate=tokens(1, plan.batch_size, channels)[0])
            k_merge.merge_backward(y, plan.row_of_token, plan.row_start, out_dtype=dtype)
            k_merge.unmerge_backward_y(x, plan.members, plan.row_start, gate=tokens(1, plan.batch_size, channels)[0],
                                       blend=plan.blend, mcw=0.5, out_dtype=dtype)
    for num_tokens in (1, 2, 3, 5, 9, 17):  # small N: block_t = next_power_of_2(N)
        section(f"sweep gather N={num_tokens}")
        x = tokens(1, num_tokens, 64)
        idx = torch.zeros(1, num_tokens, dtype=torch.int32)
        k_merge.prune(x, idx)
        # N < SEG_CHUNK: the segment reduction runs without its first (chunk) pass.
        section(f"sweep segment reduce N={num_tokens}")
        k_merge.merge_mean(x, torch.arange(num_tokens, dtype=torch.int32)[None],
                           torch.tensor([[0, num_tokens]], dtype=torch.int32))
    for n in (10, 20, 40, 100, 200, 400, 1000, 2000, 3000):  # topk BLOCK 16 .. 4096, warps 4 / 8
        if quick and n not in (20, 3000):  # GPU tiles run many programs per row in the interpreter
            continue
        section(f"sweep topk_rank n={n}")
        k_select.topk_rank(torch.randn(2, n, generator=gen), n // 3)
    for side in (2, 4, 8, 16, 32, 64):  # fused plan builds: token blocks 16 .. 1024 (SSM, lists), 16 .. 128
        if quick and side not in (4, 32):
            continue
        section(f"sweep plan builds grid {side}x{side}")
        metric = tokens(2, side * side, 16)
        li = li_for(2, side * side)
        n = side * side
        for li_arg, random in ((None, False), (li, True)):
            for mode in ("mean", "prune"):
                plan_ssm(metric, (side, side), n // 2, li=li_arg, random_dst=random,
                                      generator=torch.Generator().manual_seed(0), li_mode=mode, backend=T)
                plan_idm(metric, (side, side), n // 2, li=li_arg, random_dst=random,
                                      generator=torch.Generator().manual_seed(0), li_mode=mode, backend=T)
        plan_tome(metric, (side, side), n // 3, random_dst=True, backend=T)
    # 3-D grids (T, H, W): the HAS_T specialisations of the window-score and plan-build kernels
    # (per-frame and cross-frame windows, extents the windows do not divide, token blocks 128 .. 1024).
    grids_3d = (((2, 8, 8), (2, 2, 2)), ((3, 6, 10), (1, 2, 2)), ((5, 4, 4), (2, 1, 3)), ((4, 16, 16), (1, 2, 2)))
    for grid, window in grids_3d:
        if quick and grid[1] != 8:
            continue
        n = grid[0] * grid[1] * grid[2]
        metric = tokens(2, n, 16)
        li = li_for(2, n)
        section(f"3-D plan builds grid={grid} window={window}")
        for li_arg, random in ((None, False), (li, True)):
            for mode in ("mean", "prune"):
                plan_ssm(metric, grid, n // 2, window=window, li=li_arg, random_dst=random,
                         generator=torch.Generator().manual_seed(0), li_mode=mode, backend=T)
                plan_idm(metric, grid, n // 2, window=window, li=li_arg, random_dst=random,
                         generator=torch.Generator().manual_seed(0), li_mode=mode, backend=T)
        plan_tome(metric, grid, n // 3, window=window, random_dst=True, backend=T)
        for dtype, channels in itertools.product(floats, (16, 1536)):
            if quick and channels != 16:
                continue
            section(f"3-D window_scores {dtype} C={channels} grid={grid} window={window}")
            x = tokens(1, n, channels, dtype)
            for li_arg, paper in ((None, False), (li[:1], True)):
                k_scores.window_scores(x, grid, window, li=li_arg, a_s=0.05, paper=paper)
    for dtype, channels in itertools.product(floats, (8, 16, 32, 64, 128, 1536)):
        for window in ((2, 2), (2, 1), (3, 3), (4, 4), (1, 1)):
            if quick and dtype != torch.float16 and window != (2, 2):
                continue
            section(f"sweep window_scores {dtype} C={channels} window={window}")
            grid = (window[0] * 4, window[1] * 4)
            metric = tokens(1, grid[0] * grid[1], channels, dtype)
            k_scores.window_scores(metric, grid, window, li=li_for(1, grid[0] * grid[1]), a_s=0.05,
                                   paper=window != (1, 1))
        for num_cand, num_dst in ((16, 16), (40, 16), (16, 40), (40, 40)):
            section(f"sweep bipartite_match {dtype} C={channels} Na={num_cand} D={num_dst}")
            metric = tokens(1, 64, channels, dtype)
            k_match.bipartite_match(metric, torch.arange(num_cand)[None], torch.arange(64 - num_dst, 64)[None])
        # Dsts split across programs (several 64-wide tiles), then the combine kernel.
        section(f"sweep bipartite_match split {dtype} C={channels} Na=40 D=200")
        metric = tokens(1, 256, channels, dtype)
        k_match.bipartite_match(metric, torch.arange(40)[None], torch.arange(56, 256)[None])


def cmd_record(out_path, quick=False, execute_all=False):
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("record must run with TRITON_INTERPRET=1 (set before triton is imported)")
    import triton

    recorder = Recorder(execute_all)
    recorder.install()
    t0 = time.time()
    _drive(recorder, quick)
    import sdtm_kernels.csrc_triton as pkg

    print(f"kernels from {os.path.dirname(pkg.__file__)}")
    records = sorted(recorder.records.values(), key=lambda r: (r["module"], r["kernel"], json.dumps(r["spec"]),
                                                              r["num_warps"], r["num_stages"]))
    with open(out_path, "w") as fh:
        json.dump({"triton": triton.__version__, "target": TARGET, "quick": quick, "records": records}, fh, indent=1)
    print(f"recorded {len(records)} variants from {sum(r['count'] for r in records)} launches "
          f"in {time.time() - t0:.1f}s (triton {triton.__version__}) -> {out_path}")


# =========================================================================================
# 2. compile (no interpreter)
# =========================================================================================

def _decode_constexpr(value):
    import triton.language as tl

    if isinstance(value, dict) and "tl_dtype" in value:
        return tl.dtype(value["tl_dtype"])
    return value


def _describe(rec):
    consts = [f"{n}={v['tl_dtype'] if isinstance(v, dict) else v}"
              for n, (t, v) in zip(rec["arg_names"], rec["spec"]) if t == "constexpr"]
    ptrs = [t for t, _ in rec["spec"] if t.startswith("*")]
    return (f"{rec['module'].rsplit('.', 1)[-1]}.{rec['kernel']}[{', '.join(consts)}; "
            f"ptrs={'/'.join(sorted(set(ptrs)))}; warps={rec['num_warps']} stages={rec['num_stages']}]")


def _resource_usage(cubin):
    """REG / SHARED / LOCAL of the kernel from the bundled cuobjdump (None when unavailable)."""
    import re

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
        path = fh.name
    try:
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, timeout=60).stdout
    except Exception:  # noqa: BLE001 - informational only
        return None
    finally:
        os.unlink(path)
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", out)}
    if "shared" in usage:  # cuobjdump's figure is the static part only; keep it apart from the dynamic one
        usage["static_shared"] = usage.pop("shared")
    return usage or None


def compile_record(rec):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    module = importlib.import_module(rec["module"])
    if not os.path.abspath(module.__file__).startswith(REPO + os.sep):
        raise RuntimeError(f"{rec['module']} imported from {module.__file__}, not from the checkout {REPO}")
    kernel = getattr(module, rec["kernel"])
    if list(kernel.arg_names) != rec["arg_names"]:
        raise RuntimeError(f"signature changed since recording: {kernel.arg_names} != {rec['arg_names']}")
    target = GPUTarget(*TARGET)
    backend = make_backend(target)
    # Same construction as JITFunction._pack_args (3.6 and 3.9): signature keyed by name,
    # constexprs and attrs by argument path (i,).
    signature = {name: ty for name, (ty, _) in zip(rec["arg_names"], rec["spec"])}
    constexprs = {(i,): _decode_constexpr(v) for i, (ty, v) in enumerate(rec["spec"]) if ty == "constexpr"}
    attrs = {(i,): backend.parse_attr(a) for i, (ty, a) in enumerate(rec["spec"])
             if ty != "constexpr" and isinstance(a, str)}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = backend.parse_options({"num_warps": rec["num_warps"], "num_stages": rec["num_stages"]})
    ccinfo = triton.compile(src, target=target, options=options.__dict__)
    info = {"shared": int(ccinfo.metadata.shared)}  # dynamic shared memory the launch requests
    usage = _resource_usage(ccinfo.asm["cubin"])
    if usage:
        info.update(usage)
    return info


def kernel_name(rec):
    """``module._kernel`` of a record, e.g. ``match._bipartite_match_kernel``."""
    return f"{rec['module'].rsplit('.', 1)[-1]}.{rec['kernel']}"


def cmd_compile(in_path, shard="0/1", report=None, subset=False, quiet=False, kernel=None):
    import triton

    with open(in_path) as fh:
        records = json.load(fh)["records"]
    if kernel:
        records = [r for r in records if kernel_name(r) == kernel]
    records = select_records(records, subset)
    index, count = map(int, shard.split("/"))
    mine = [(i, r) for i, r in enumerate(records) if i % count == index]
    results = []
    t_all = time.time()
    for i, rec in mine:
        t0 = time.time()
        try:
            info = compile_record(rec)
            status, error = "OK", None
            if info["shared"] > H100_MAX_SHARED:
                status, error = "FAIL", f"shared memory {info['shared']} B > {H100_MAX_SHARED} B (launch would fail)"
        except Exception as exc:  # noqa: BLE001 - every compiler error is a result
            info, status, error = {}, "FAIL", f"{type(exc).__name__}: {exc}"
        seconds = time.time() - t0
        results.append({"index": i, "variant": _describe(rec), "label": rec.get("label"), "status": status,
                        "error": error, "seconds": round(seconds, 2), **info})
        if not quiet:
            extra = " ".join(f"{k}={info[k]}" for k in ("shared", "static_shared", "reg", "local") if k in info)
            print(f"[{status}] {seconds:5.1f}s {extra:28s} {_describe(rec)}", flush=True)
            if error:
                print("    " + error.replace("\n", "\n    "), flush=True)
    summary = {"triton": triton.__version__, "results": results, "seconds": round(time.time() - t_all, 1)}
    if report:
        with open(report, "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary


def _features(rec):
    """What a variant is made of: each argument's type and specialisation (constexpr values,
    pointer element types, divisibility), num_warps and num_stages."""
    feats = [("num_warps", rec["num_warps"]), ("num_stages", rec["num_stages"])]
    for name, (ty, value) in zip(rec["arg_names"], rec["spec"]):
        feats.append((name, json.dumps(value, sort_keys=True) if ty == "constexpr" else f"{ty}:{value}"))
    return [(rec["module"], rec["kernel"], name, value) for name, value in feats]


def select_records(records, subset):
    """All records, or (``subset``) a pairwise covering subset: greedily chosen records such
    that every pair of feature values (``_features``) that occurs together in some recorded
    variant of a kernel occurs together in a chosen one. Every flag combination of two
    constexprs, every pointer type next to every tile size, etc. is compiled at least once."""
    if not subset:
        return records
    import itertools

    pairs = [set(itertools.combinations(sorted(map(str, _features(r))), 2)) for r in records]
    uncovered = set().union(*pairs) if pairs else set()
    chosen = []
    while uncovered:
        best = max(range(len(records)), key=lambda i: (len(pairs[i] & uncovered), -i))
        chosen.append(best)
        uncovered -= pairs[best]
    return [records[i] for i in sorted(chosen)]


# =========================================================================================
# driver
# =========================================================================================

def _env(interpret, cache_dir=None):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if cache_dir:
        env["TRITON_CACHE_DIR"] = cache_dir
    # Make the checkout importable even without the editable install.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def record(json_path, python=None, quick=False, execute_all=False):
    cmd = [python or sys.executable, os.path.abspath(__file__), "record", json_path]
    cmd += (["--quick"] if quick else []) + (["--execute-all"] if execute_all else [])
    subprocess.run(cmd, env=_env(True), check=True)


def compile_all(json_path, python=None, jobs=None, subset=False, quiet=False, kernel=None):
    """Compile in ``jobs`` parallel subprocesses of ``python`` with a fresh triton cache
    (only ``kernel``'s records when given); returns ``{"triton", "results", "seconds"}``."""
    python = python or sys.executable
    jobs = jobs or max(1, os.cpu_count() or 1)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="aot_compile_") as tmp:
        procs = []
        for j in range(jobs):
            report = os.path.join(tmp, f"report{j}.json")
            cmd = [python, os.path.abspath(__file__), "compile", json_path, "--shard", f"{j}/{jobs}",
                   "--report", report] + (["--subset"] if subset else []) + (["--quiet"] if quiet else [])
            cmd += ["--kernel", kernel] if kernel else []
            env = _env(False, cache_dir=os.path.join(tmp, "cache"))
            procs.append((subprocess.Popen(cmd, env=env), report))
        results, version = [], None
        for proc, report in procs:
            proc.wait()
            if proc.returncode not in (0, 1) or not os.path.exists(report):  # 1: some variant failed
                raise RuntimeError(f"compile worker failed (rc={proc.returncode}): {' '.join(proc.args)}")
            with open(report) as fh:
                part = json.load(fh)
            version = part["triton"]
            results += part["results"]
    results.sort(key=lambda r: r["index"])
    return {"triton": version, "results": results, "seconds": round(time.time() - t0, 1)}


def summarize(summary):
    results = summary["results"]
    failed = [r for r in results if r["status"] != "OK"]
    per_kernel = {}
    for r in results:
        name = r["variant"].split("[", 1)[0]
        ok, total, shared, static = per_kernel.get(name, (0, 0, 0, 0))
        per_kernel[name] = (ok + (r["status"] == "OK"), total + 1, max(shared, r.get("shared", 0)),
                            max(static, r.get("static_shared", 0)))
    lines = [f"triton {summary['triton']}: {len(results) - len(failed)}/{len(results)} variants compiled for "
             f"sm_{TARGET[1]} in {summary['seconds']}s wall"]
    for name, (ok, total, shared, static) in sorted(per_kernel.items()):
        lines.append(f"  {name:40s} {ok}/{total} OK, max dynamic shared {shared} B "
                     f"(limit {H100_MAX_SHARED} B), max static shared {static} B")
    spills = [r for r in results if r.get("local", 0) > 0]
    for r in spills:
        lines.append(f"  spills: local={r['local']} B reg={r.get('reg')} {r['variant']}")
    for r in failed:
        lines.append(f"  FAILED {r['variant']}\n    from: {r['label']}\n    {r['error']}")
    return "\n".join(lines), failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", nargs="?", choices=("all", "record", "compile"), default="all")
    parser.add_argument("json", nargs="?", help="records file (record: output, compile: input)")
    parser.add_argument("--python", action="append", help="python to compile with (repeatable); default this one")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile workers (default: CPU count)")
    parser.add_argument("--subset", action="store_true", help="compile a pairwise covering subset of the variants")
    parser.add_argument("--quick", action="store_true", help="record: fewer plan shapes, no 64x64 plan")
    parser.add_argument("--execute-all", action="store_true",
                        help="record: also execute the merge.py kernels in the interpreter (slow)")
    parser.add_argument("--kernel", help="compile only this kernel's records, e.g. match._bipartite_match_kernel")
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--report")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    if args.step == "record":
        cmd_record(args.json or "aot_records.json", args.quick, args.execute_all)
        return 0
    if args.step == "compile":
        summary = cmd_compile(args.json, args.shard, args.report, args.subset, args.quiet, args.kernel)
        return 0 if all(r["status"] == "OK" for r in summary["results"]) else 1

    with tempfile.TemporaryDirectory(prefix="aot_record_") as tmp:
        json_path = args.json or os.path.join(tmp, "records.json")
        record(json_path, quick=args.quick, execute_all=args.execute_all)
        status = 0
        for python in args.python or [sys.executable]:
            summary = compile_all(json_path, python, args.jobs, args.subset, args.quiet, args.kernel)
            text, failed = summarize(summary)
            print(f"\n== {python}\n{text}", flush=True)
            status |= bool(failed)
    return status


if __name__ == "__main__":
    sys.exit(main())
