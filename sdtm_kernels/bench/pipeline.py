"""``--pipeline``: a real diffusers pipeline, baseline vs SDTM images, timed per step."""
import inspect
import os
import statistics
import time

import torch

from .common import BenchError
from .flops import make_spec, schedule_flops, tokens_per_step
from .models import have_diffusers
from .timing import Progress, _sync

# -- real pipelines ----------------------------------------------------------------------------
def looks_like_path(name):
    """A folder name rather than a Hub id (``owner/name``)."""
    return name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or "\\" in name or name.count("/") > 1


def load_pipeline(name, device, dtype):
    """``DiffusionPipeline.from_pretrained(name)``; a clear ``BenchError`` when it cannot load."""
    path = os.path.expanduser(name)
    if not os.path.exists(path) and looks_like_path(name):
        raise BenchError(f"--pipeline {name}: no such directory (pass a local diffusers pipeline folder or a "
                         "Hugging Face Hub id such as stabilityai/stable-diffusion-3-medium-diffusers)")
    if not have_diffusers():
        raise BenchError("--pipeline needs diffusers: pip install 'diffusers>=0.30' transformers accelerate")
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(path if os.path.exists(path) else name, torch_dtype=dtype)
    except Exception as exc:  # network, missing files, missing transformers: all end the bench here
        raise BenchError(f"--pipeline {name}: cannot load it with diffusers from_pretrained "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        raise BenchError(f"--pipeline {name}: {type(pipe).__name__} has no .transformer (SDTM patches DiTs)")
    return pipe.to(device)


def _pipeline_spec(transformer, text_len):
    cfg = transformer.config
    name = type(transformer).__name__
    family = "sd3" if name.startswith("SD3") else "pixart" if name.startswith("PixArt") else None
    if family is None:
        return None
    width = cfg.num_attention_heads * cfg.attention_head_dim
    return make_spec(family, layers=cfg.num_layers, width=width, head_dim=cfg.attention_head_dim,
                     latent=cfg.sample_size, patch=cfg.patch_size, in_channels=cfg.in_channels,
                     text_len=text_len or 0, text_dim=getattr(cfg, "joint_attention_dim", None)
                     or getattr(cfg, "caption_channels", None) or width)


def run_pipeline(args, log=print, pipe=None):
    """Baseline and SDTM images of a real pipeline (``pipe``, or loaded from ``args.pipeline``),
    timed per step (``callback_on_step_end``, or ``callback`` on older pipelines)."""
    from ..dit import apply_sdtm, get_state, remove_sdtm

    device = torch.device(args.device)
    if pipe is None:
        pipe = load_pipeline(args.pipeline, device, getattr(torch, args.dtype))
    log(f"SDTM bench: pipeline {args.pipeline} ({type(pipe).__name__}), presets {', '.join(args.presets)}")
    steps = args.steps or 28
    size = args.size or 1024
    runs, images = [], {}
    progress = Progress((1 + len(args.presets)) * steps, enabled=not args.no_progress)
    for preset in (None, *args.presets):
        stamps = []

        def on_step(pipeline, step, timestep, kwargs):
            _sync(device)
            stamps.append(time.perf_counter())
            progress.update(label=preset or "unpatched")
            return {}

        if preset is not None:
            apply_sdtm(pipe, preset=preset)
        _sync(device)
        start = time.perf_counter()
        call_args = dict(num_inference_steps=steps, height=size, width=size,
                         generator=torch.Generator(device).manual_seed(args.seed))
        params = inspect.signature(type(pipe).__call__).parameters
        if "callback_on_step_end" in params:
            call_args["callback_on_step_end"] = on_step
        elif "callback" in params:  # older pipelines (PixArt-alpha): callback(step, timestep, latents)
            call_args.update(callback=lambda step, timestep, latents: on_step(pipe, step, timestep, {}),
                             callback_steps=1)
        else:
            raise BenchError(f"{type(pipe).__name__} has no per-step callback; cannot time its steps")
        image = pipe(args.prompt, **call_args).images[0]
        _sync(device)
        total = time.perf_counter() - start
        times = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
        run = {"name": preset or "unpatched", "preset": preset, "total_s": total, "step_ms": [1e3 * t for t in times],
               "step_ms_median": 1e3 * statistics.median(times)}
        state = get_state(pipe)
        if state is not None:
            spec = _pipeline_spec(pipe.transformer, state.text_len)
            grid = state.grid or (0, 0)
            run["tokens_per_step"] = tokens_per_step(state.stats, grid[0] * grid[1])
            run["mean_tokens"] = statistics.fmean((r["attn"] + r["mlp"]) / 2 for r in run["tokens_per_step"])
            if spec is not None and state.grid is not None:
                spec.update(grid=state.grid, num_tokens=grid[0] * grid[1])
                calls = len({(r["step"], r["call"]) for r in state.stats})
                run["flop_bound_speedup"] = schedule_flops(spec, steps=1, calls_per_step=calls) / schedule_flops(
                    spec, state.stats)
            remove_sdtm(pipe)
        images[run["name"]] = image
        runs.append(run)
    progress.close()
    for run in runs:
        run["speedup"] = runs[0]["total_s"] / run["total_s"]
        if run.get("flop_bound_speedup"):
            run["pct_of_flop_bound"] = 100.0 * run["speedup"] / run["flop_bound_speedup"]
    os.makedirs(args.out, exist_ok=True)
    saved = []
    for preset in args.presets:
        path = os.path.join(args.out, f"images_{preset}.png")
        side_by_side(images["unpatched"], images[preset]).save(path)
        saved.append(path)
    return {"config": {"pipeline": args.pipeline, "steps": steps, "size": size, "prompt": args.prompt,
                       "dtype": args.dtype, "device": str(device), "presets": list(args.presets), "seed": args.seed,
                       "family": type(pipe.transformer).__name__,
                       "timing": "one generation per run; per step: time between per-step callbacks"},
            "runs": runs, "images": saved}


def side_by_side(baseline, other, gain=4.0):
    """``baseline | other | |difference| * gain`` as one PIL image."""
    import numpy as np
    from PIL import Image

    a = np.asarray(baseline.convert("RGB"), dtype=np.float32)
    b = np.asarray(other.convert("RGB"), dtype=np.float32)
    diff = np.clip(np.abs(a - b) * gain, 0, 255)
    return Image.fromarray(np.concatenate([a, b, diff], axis=1).astype(np.uint8))
