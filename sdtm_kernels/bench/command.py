"""Arguments and the entry point of ``python -m sdtm_kernels bench``."""
import argparse
import os
import shlex
import sys
import time

import torch

from .compiled import check_compile_args
from .common import DEFAULT_OUT, PRESETS_RUN, BenchError, prepare_environment, resolve_device_dtype
from .pipeline import run_pipeline
from .report import (compile_table, environment, legend_lines, method_lines, notes, summary_lines, text_table,
                     warning_lines, write_outputs)
from .suite import run_suite

EXIT_STRICT = 3  # --strict and a sanity warning


def default_threads():
    """CPU: half the cores (at least 1), leaving the rest of a shared machine its share; a run
    whose threads compete with other work measures the competition, not SDTM."""
    return max(1, (os.cpu_count() or 2) // 2)


# -- command line ------------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: 50 on CUDA, 28 for flux, 20 with --quick; 12 to 20 on CPU, "
                             "6 with --quick)")
    parser.add_argument("--size", type=int, default=None,
                        help="image size in pixels (latent = size / 8); default 1024 on CUDA, 512 on CPU")
    parser.add_argument("--latent", type=int, default=None, help="latent size instead of --size")
    parser.add_argument("--blocks", type=int, default=None,
                        help="number of transformer blocks (flux, flux2, hunyuan: double + single blocks, split "
                             "as in the real model: a third double, a seventh for flux2)")
    parser.add_argument("--width", type=int, default=None, help="hidden size C (heads of 64 channels)")
    parser.add_argument("--family", choices=["sd3", "pixart", "qwen", "flux", "flux2", "wan", "hunyuan", "dit"],
                        default=None,
                        help="model: diffusers SD3 (default when diffusers is installed), PixArt, Qwen-Image, "
                             "Flux.1 (flux: Flux.1-dev, 19 double + 38 single blocks, 28 steps on CUDA), Flux.2 "
                             "(flux2: Flux.2-dev, 8 double + 48 single blocks of C=6144, 60 GiB in bf16 on CUDA), "
                             "Wan 2.1 (video: 1.3B at 480p / 81 frames on CUDA) or HunyuanVideo (720p / 129 "
                             "frames on CUDA), or the package's own DiT")
    parser.add_argument("--frames", type=int, default=None, help="latent frames of a video family (wan, hunyuan)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (the model sees 2x for CFG)")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS_RUN), default=list(PRESETS_RUN))
    parser.add_argument("--warmup", type=int, default=None, help="untimed schedules per run (default 1 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed schedules per run, round-robin; per step the minimum counts (default 1 on "
                             "CUDA, 2 on CPU)")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="advance all runs one step at a time, each on its own model copy (default on CPU; "
                             "on CUDA it needs one model per run in memory)")
    parser.add_argument("--no-reference", action="store_true", help="CUDA: skip the backend='reference' runs")
    parser.add_argument("--no-kernel-check", action="store_true", help="CPU: skip the Triton interpreter check")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch threads for the timed runs (default: half the cores, at least 1)")
    parser.add_argument("--strict", action="store_true",
                        help=f"exit with code {EXIT_STRICT} when a sanity check fails (speedup above its FLOP "
                             "bound, repeats that disagree, a loaded machine)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    parser.add_argument("--pipeline", default=None, metavar="ID_OR_PATH",
                        help="a diffusers pipeline (Hub id or local folder) instead of the random model")
    parser.add_argument("--prompt", default="a photo of a red fox in the snow, highly detailed",
                        help="--pipeline: the prompt")
    parser.add_argument("--no-host-time", action="store_true",
                        help="skip the host time per merged block (a tiny block, SDTM vs unpatched)")
    parser.add_argument("--compile", action="store_true",
                        help="also time every run with the transformer torch.compile'd (one untimed generation "
                             "compiles): speedup over the compiled baseline, compile time, graphs, recompiles")
    parser.add_argument("--compile-backend", default="inductor",
                        help="--compile: the dynamo backend (default inductor; eager / aot_eager for a fast check)")
    parser.add_argument("--compile-mode", default=None,
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="--compile: inductor's mode (default: inductor's default)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="CUDA only: --compile with mode='reduce-overhead' (CUDA graphs); an error on CPU")
    return parser


def _check_args(args):
    resolve_device_dtype(args)
    for name in ("steps", "size", "latent", "blocks", "width", "batch", "repeats", "threads", "frames"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise BenchError(f"--{name} must be >= 1, got {value}")
    if args.steps is not None and args.steps < 2:
        raise BenchError("--steps must be >= 2 (step 0 is a protected step)")
    if args.size is not None and args.latent is not None:
        raise BenchError("pass --size (image pixels) or --latent, not both")
    if hasattr(args, "compile"):
        check_compile_args(args)


def main(argv=None, log=print):
    """Parse ``argv``, run, print the table and write the outputs; returns the exit code."""
    prepare_environment()
    from . import __doc__ as package_doc

    parser = add_arguments(argparse.ArgumentParser(prog="python -m sdtm_kernels bench",
                                                   description=package_doc.splitlines()[0]))
    args = parser.parse_args(argv)
    return run_args(args, argv, log)


def run_args(args, argv=None, log=print):
    prepare_environment()
    wall = time.perf_counter()
    threads_before = torch.get_num_threads()
    try:
        _check_args(args)
        if torch.device(args.device).type == "cpu":
            torch.set_num_threads(getattr(args, "threads", None) or default_threads())
        result = run_pipeline(args, log) if args.pipeline else run_suite(args, log)
        result["environment"] = environment(args.device)  # while the run's thread count is set
    except BenchError as exc:
        print(f"sdtm bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)  # in-process callers (tests) keep their setting
    argv = sys.argv[1:] if argv is None else list(argv)
    result["command"] = shlex.join(sys.argv)  # exactly as invoked (pytest's argv when run in-process)
    result["argv"] = argv
    result["reproduce"] = shlex.join(["python", "-m", "sdtm_kernels", "bench", *argv])
    result["wall_s"] = time.perf_counter() - wall
    paths = write_outputs(result, args.out)
    log(text_table(result))
    if result.get("compile"):
        log(compile_table(result))
    for line in summary_lines(result) + notes(result):
        log(line)
    log("columns:")
    for line in legend_lines():
        log("  " + line)
    methods = method_lines(result)
    if methods:
        log("measurements:")
        for line in methods:
            log("  " + line)
    for line in warning_lines(result):
        log(line)
        print(line, file=sys.stderr)
    log(f"wall time {result['wall_s']:.1f}s; wrote {', '.join(paths.values())}")
    if result.get("warnings") and getattr(args, "strict", False):
        return EXIT_STRICT
    return 0
