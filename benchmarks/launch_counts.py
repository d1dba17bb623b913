"""Kernel launches SDTM adds per merged block, per model family and block type (Triton backend).

``python benchmarks/launch_counts.py [--out FILE]`` builds the tiny random models of the test
suite (``tests/test_dit_*.py``), runs a protected, a structure (SSM) and a detail (IDM) step, and
counts launches as ``tests/test_launch_budget.py`` does (``sdtm_kernels.bench.launches``: every
outermost compute op plus every Triton launch inside the blocks; patched minus unpatched, per
block of the type). Counting is deterministic, so the table is the same on any CPU; without a GPU
the kernels run in the Triton interpreter (slow: a few minutes). Batch 2 throughout.
"""
import argparse
import datetime
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..")]
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

import sdtm_kernels as sk  # noqa: E402
from sdtm_kernels.bench.launches import count_launches, per_block_added  # noqa: E402
from sdtm_kernels.dit import get_state  # noqa: E402

SETTINGS = dict(ratio=0.5, deviation=0.1, switch_step=1, protect_steps=3, backend="triton")


def _models():
    """(name, model, run, timesteps, before) per case; ``before()`` runs before apply_sdtm."""
    import test_dit_describe
    import test_dit_diffusers
    import test_dit_flux2
    import test_dit_hunyuan_video
    import test_dit_qwen_image
    import test_dit_wan

    ts = test_dit_diffusers.TIMESTEPS[:4]
    for name in ("sd3", "flux", "pixart"):
        model, run = test_dit_diffusers.build(name, layers=2)
        yield name, model, run, ts, None
    model, run = test_dit_diffusers.build("pixart", layers=2)  # the same model, described generically
    yield "pixart (generic path)", model, run, ts, test_dit_describe.DESCRIPTIONS["pixart"]
    model, run = test_dit_wan.build_wan("t2v", layers=1)
    yield "wan", model, run, test_dit_wan.TIMESTEPS[:4], None
    model, run = test_dit_qwen_image.build_qwen(layers=1)
    yield "qwen-image", model, run, test_dit_qwen_image.TIMESTEPS[:4], None
    model, run = test_dit_flux2.build_flux2()
    yield "flux.2", model, run, test_dit_flux2.TIMESTEPS[:4], None
    model, run = test_dit_hunyuan_video.build_hunyuan("t2v", layers=1, single_layers=1)
    yield "hunyuanvideo", model, run, test_dit_hunyuan_video.TIMESTEPS[:4], None


def _blocks(model, before=None):
    """The blocks SDTM patches, by type (``before`` registers a description first)."""
    from sdtm_kernels.dit.patch import _family

    if before is not None:
        before()
    by_type = {}
    for module in model.modules():
        if _family(module) is not None:
            by_type.setdefault(type(module).__name__, []).append(module)
    return by_type


def count(model, run, timesteps, before=None):
    """``{block type: {"ssm": added, "idm": added}}``."""
    by_type = _blocks(model, before)
    unpatched = {kind: [count_launches(run, [t], blocks=blocks)[2] for t in timesteps]
                 for kind, blocks in by_type.items()}
    sk.apply_sdtm(model, num_steps=len(timesteps), **SETTINGS)
    try:
        patched = {kind: [count_launches(run, [t], blocks=blocks)[2] for t in timesteps]
                   for kind, blocks in by_type.items()}
        modes = {}
        for rec in get_state(model).stats:
            modes.setdefault(rec["step"], set()).add(rec["mode"])
    finally:
        sk.remove_sdtm(model)
        if before is not None:
            from sdtm_kernels.dit.describe import described_blocks, forget_block

            for block_class in list(described_blocks()):
                forget_block(block_class)
    out = {}
    for kind, blocks in by_type.items():
        row = {}
        for step, mode in ((1, "ssm"), (2, "idm")):
            if mode in modes.get(step, ()):
                row[mode] = per_block_added(patched[kind][step], unpatched[kind][step], len(blocks))[0]
        out[kind] = row
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the table (markdown) to this file")
    args = parser.parse_args(argv)
    lines = ["| model | block type | SSM | IDM |", "|---|---|---|---|"]
    with torch.no_grad():
        for name, model, run, timesteps, before in _models():
            for kind, row in count(model, run, timesteps, before).items():
                lines.append(f"| {name} | {kind} | {row.get('ssm', float('nan')):.1f} | "
                             f"{row.get('idm', float('nan')):.1f} |")
                print(lines[-1], flush=True)
    if args.out:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
        with open(args.out, "w") as fh:
            fh.write(f"# Launches SDTM adds per merged block (Triton backend, batch 2)\n\n"
                     f"Command: `python benchmarks/launch_counts.py --out {args.out}`; date "
                     f"{datetime.date.today().isoformat()}; device: {device}; torch {torch.__version__}. "
                     "Per block of each type (per-call work, e.g. Flux's rotary stack, falls into the first "
                     "block). Budget: 8.\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
