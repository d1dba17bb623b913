"""Command line: ``python -m sdtm_kernels demo | bench`` (also the ``sdtm-kernels`` console script;
``sdtm-bench`` runs ``bench``).

``demo`` builds SSM and IDM plans over a whole denoising schedule on a synthetic token grid
(smooth structure plus detail noise, like a DiT's hidden states) and reports tokens kept,
merge fidelity and plan/merge timing. It needs no GPU and no downloads.

``bench`` runs a whole denoising schedule of a DiT-sized transformer with random weights
unpatched and with SDTM and reports speedups, FLOP-bound speedups, tokens per step and the
bookkeeping share (``sdtm_kernels/bench/``; ``python -m sdtm_kernels bench --help``).

``gpu-check`` produces every GPU number the README needs in one run (``sdtm_kernels/gpu_check/``;
``--dry-run``: the same steps at tiny sizes on CPU).

``quality`` puts speed and fidelity side by side on a real diffusers pipeline: unpatched vs SDTM
images from the same seeds, PSNR / SSIM / LPIPS / CLIP score, timings and FLOP-bound speedups
(``sdtm_kernels/quality/``; ``python -m sdtm_kernels quality --help``).
"""
import argparse
import json
import math
import sys
import time

import torch

from . import bench, gpu_check, plan_idm, plan_ssm, quality, ratio_schedule
from .reference.schedule import tokens_requested


def synthetic_tokens(batch, height, width, channels, detail, seed=0):
    """Tokens of a smooth random field (low-frequency sinusoids) plus ``detail`` noise."""
    gen = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(height, 1, 1)
    xs = torch.linspace(0, 1, width).view(1, width, 1)
    freq = torch.rand(4, channels, generator=gen) * 3.0
    phase = torch.rand(4, channels, generator=gen) * 2 * math.pi
    field = sum(torch.sin(2 * math.pi * (freq[i] * (ys if i % 2 else xs)) + phase[i]) for i in range(4))
    tokens = field.reshape(1, height * width, channels).repeat(batch, 1, 1)
    return tokens + detail * torch.randn(batch, height * width, channels, generator=gen)


def _timed(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - start) / repeats * 1e3


def run_demo(args):
    height, width = args.grid
    x = synthetic_tokens(args.batch, height, width, args.channels, args.detail, args.seed)
    num_tokens = height * width
    li = None
    rows = []
    for step in range(args.steps):
        rho = ratio_schedule(step, args.steps, args.ratio, args.deviation)
        n_remove = tokens_requested(num_tokens, rho)
        stage = "SSM" if step <= args.switch_step else "IDM"
        build = (lambda: plan_ssm(x, (height, width), n_remove, li=li, backend=args.backend)) if stage == "SSM" \
            else (lambda: plan_idm(x, (height, width), n_remove, li=li, backend=args.backend))
        plan, plan_ms = _timed(build, args.repeats)
        merged, merge_ms = _timed(lambda: plan.merge(x, backend=args.backend), args.repeats)
        restored, unmerge_ms = _timed(lambda: plan.unmerge(merged, backend=args.backend), args.repeats)
        rel_err = ((restored - x).norm() / x.norm()).item()
        li = plan.update_li(li)
        rows.append({
            "step": step, "stage": stage, "requested": n_remove, "kept": plan.num_rows,
            "kept_pct": 100.0 * plan.num_rows / num_tokens, "rel_error": rel_err,
            "plan_ms": plan_ms, "merge_ms": merge_ms, "unmerge_ms": unmerge_ms,
        })
    return rows


def print_table(rows, out=sys.stdout):
    header = f"{'step':>4} {'stage':>5} {'requested':>9} {'kept':>6} {'kept%':>6} {'rel.err':>8} " \
             f"{'plan ms':>8} {'merge ms':>8} {'unmerge ms':>10}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        print(f"{r['step']:>4} {r['stage']:>5} {r['requested']:>9} {r['kept']:>6} {r['kept_pct']:>6.1f} "
              f"{r['rel_error']:>8.4f} {r['plan_ms']:>8.2f} {r['merge_ms']:>8.2f} {r['unmerge_ms']:>10.2f}", file=out)


def _grid(text):
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError("grid must look like HxW, e.g. 64x64")
    return int(parts[0]), int(parts[1])


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m sdtm_kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="plans over a schedule on a synthetic token grid (CPU friendly)")
    demo.add_argument("--grid", type=_grid, default=(64, 64), help="token grid HxW (default 64x64 = 1024px SD3)")
    demo.add_argument("--channels", type=int, default=64)
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--steps", type=int, default=10)
    demo.add_argument("--switch-step", type=int, default=4, help="last SSM step (default 4 of 10)")
    demo.add_argument("--ratio", type=float, default=0.3)
    demo.add_argument("--deviation", type=float, default=0.2)
    demo.add_argument("--detail", type=float, default=0.3, help="std of the per-token noise")
    demo.add_argument("--backend", choices=["auto", "reference", "triton"], default=None)
    demo.add_argument("--repeats", type=int, default=3, help="timing repeats per op")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    bench.add_arguments(sub.add_parser(
        "bench", help="unpatched vs SDTM over a whole schedule of a random DiT-sized transformer",
        description=bench.__doc__.splitlines()[0]))
    gpu_check.add_arguments(sub.add_parser(
        "gpu-check", help="every GPU number the README needs in one run (--dry-run: tiny sizes on CPU)",
        description=gpu_check.__doc__.splitlines()[0]))
    quality.add_arguments(sub.add_parser(
        "quality", help="speed and fidelity (PSNR, SSIM, LPIPS, CLIP) of SDTM settings on a real pipeline",
        description=quality.__doc__.splitlines()[0]))
    return parser


def bench_main(argv=None):
    """The ``sdtm-bench`` console script: ``python -m sdtm_kernels bench`` with ``argv``."""
    return bench.main(argv)


def main(argv=None):
    args = build_parser().parse_args(argv)  # parsing imports nothing heavy
    if args.command == "bench":
        bench.prepare_environment()  # TRITON_INTERPRET=1 without CUDA, before anything imports triton
        argv = sys.argv[1:] if argv is None else list(argv)
        return bench.run_args(args, argv[argv.index("bench") + 1:] if "bench" in argv else argv)
    if args.command == "gpu-check":
        argv = sys.argv[1:] if argv is None else list(argv)
        return gpu_check.run_args(args, argv[argv.index("gpu-check") + 1:] if "gpu-check" in argv else argv)
    if args.command == "quality":
        argv = sys.argv[1:] if argv is None else list(argv)
        return quality.run_args(args, argv[argv.index("quality") + 1:] if "quality" in argv else argv)
    if args.command == "demo":
        height, width = args.grid
        print(f"SDTM demo: grid {height}x{width} (N={height * width}), C={args.channels}, B={args.batch}, "
              f"{args.steps} steps, ratio {args.ratio}+/-{args.deviation}, torch {torch.__version__}")
        rows = run_demo(args)
        print_table(rows)
        total = sum(r["kept"] for r in rows) / (len(rows) * height * width)
        print(f"mean tokens kept: {100 * total:.1f}%   (rel.err = ||unmerge(merge(x)) - x|| / ||x||)")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump({"command": " ".join(sys.argv), "args": {k: v for k, v in vars(args).items()},
                           "rows": rows}, fh, indent=2, default=str)
    return 0
