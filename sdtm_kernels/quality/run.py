"""The quality run: for every prompt and seed, the unpatched image and one image per SDTM
setting from the same seed, timed, compared and written out (see ``sdtm_kernels/quality``)."""
import argparse
import inspect
import os
import re
import shlex
import sys
import time

import torch

from .. import bench
from . import report
from .inputs import QualityError, build_settings, is_class_conditional, load_pipeline, resolve_prompts
from .metrics import ClipScorer, FidelityMetrics, MetricsUnavailable, mean, one_line
from .speed import TransformerTimer, speed_stats, sync

DEFAULT_OUT = "sdtm_quality_out"


def add_arguments(parser):
    parser.add_argument("--pipeline", required=True, metavar="ID_OR_PATH",
                        help="a diffusers pipeline: Hub id or a local folder saved with save_pretrained")
    parser.add_argument("--prompts", metavar="FILE", default=None,
                        help="one prompt a line (DiT: ImageNet class ids or labels); default: 8 built-in prompts "
                             "(DiT: 8 ImageNet classes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; every setting uses the same ones")
    parser.add_argument("--presets", nargs="+", default=None, metavar="PRESET",
                        help="SDTM presets (released, fast); default: both, unless --ratios is given")
    parser.add_argument("--ratios", type=float, nargs="+", default=None, metavar="R",
                        help="SDTM ratios on the released preset (0 = merging off)")
    parser.add_argument("--deviation", type=float, default=0.2,
                        help="--ratios: schedule deviation (capped to the ratio so that it stays in [0, 1))")
    parser.add_argument("--backend", choices=["auto", "reference", "triton"], default=None)
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the pipeline's)")
    parser.add_argument("--size", type=int, default=None, help="height = width in pixels (default: the pipeline's; "
                                                                 "DiT: fixed by the model)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the pipeline's)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed generations per setting before timing (default 1: first-call costs stay out)")
    parser.add_argument("--lpips-net", choices=["alex", "vgg", "squeeze", "none"], default="alex",
                        help="LPIPS backbone (needs torchvision and its weights; 'none' skips LPIPS)")
    parser.add_argument("--clip-model", default=None, metavar="ID_OR_PATH",
                        help="CLIP model (Hub id or folder with CLIPModel + CLIPProcessor) for CLIP scores")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    parser.add_argument("--no-progress", action="store_true", help="no per-image progress lines")
    return parser


def _check_args(args):
    bench.resolve_device_dtype(args, QualityError)
    if args.warmup is None:  # also on CPU: a pipeline's first call pays one-off costs the others do not
        args.warmup = 1
    for name in ("steps", "size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise QualityError(f"--{name} must be >= 1, got {value}")
    if args.warmup < 0:
        raise QualityError(f"--warmup must be >= 0, got {args.warmup}")
    if len(set(args.seeds)) != len(args.seeds):
        raise QualityError(f"--seeds repeat: {args.seeds}")


def _slug(text):
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


class Generator:
    """Calls the pipeline for one prompt and seed, timed (wall and transformer time)."""

    def __init__(self, pipe, args):
        self.pipe, self.device = pipe, torch.device(args.device)
        params = inspect.signature(type(pipe).__call__).parameters
        self.class_conditional = is_class_conditional(pipe)
        self.kwargs = {}
        if args.steps is not None:
            self.kwargs["num_inference_steps"] = args.steps
        if args.size is not None and "height" in params:
            self.kwargs.update(height=args.size, width=args.size)
        if args.guidance is not None:
            self.kwargs["guidance_scale"] = args.guidance
        if "use_resolution_binning" in params:
            # PixArt: square sizes map to themselves in its bins; off, any model size works
            self.kwargs["use_resolution_binning"] = False
        self.timer = TransformerTimer(pipe.transformer, self.device)

    def __call__(self, prompt, seed):
        # a CPU generator: the same noise on every device for a seed
        call = dict(self.kwargs, generator=torch.Generator("cpu").manual_seed(seed))
        if self.class_conditional:
            call["class_labels"] = [prompt["class_id"]]
        else:
            call["prompt"] = prompt["text"]
        self.timer.reset()
        sync(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            image = self.pipe(**call).images[0]
        sync(self.device)
        wall = time.perf_counter() - start
        return image, {"wall_s": wall, "transformer_s": self.timer.seconds, "transformer_calls": self.timer.calls}


def _generate(generator, setting, prompt, seed):
    """One image with ``setting`` applied (None: unpatched); SDTM is removed again after."""
    from ..dit import apply_sdtm, get_state, remove_sdtm

    pipe = generator.pipe
    if setting is None:
        image, timing = generator(prompt, seed)
        return image, dict(timing, flop_bound_speedup=1.0)
    apply_sdtm(pipe, preset=setting.preset, **setting.options)
    try:
        image, timing = generator(prompt, seed)
        timing.update(speed_stats(pipe.transformer, get_state(pipe)))
    finally:
        remove_sdtm(pipe)
    return image, timing


def _summaries(records, settings, baseline_name="unpatched"):
    by_setting = {}
    for rec in records:
        by_setting.setdefault(rec["setting"], []).append(rec)
    base = by_setting[baseline_name]
    base_wall = sum(r["wall_s"] for r in base)
    base_transformer = sum(r["transformer_s"] for r in base)
    rows = []
    for name in [baseline_name] + [s.name for s in settings]:
        recs = by_setting[name]
        wall, transformer = sum(r["wall_s"] for r in recs), sum(r["transformer_s"] for r in recs)
        rows.append({
            "name": name, "images": len(recs), "wall_s": wall / len(recs), "transformer_s": transformer / len(recs),
            "speedup": base_wall / wall if wall else None,
            "transformer_speedup": base_transformer / transformer if transformer else None,
            **{key: mean([r.get(key) for r in recs])
               for key in ("flop_bound_speedup", "mean_tokens", "psnr", "ssim", "lpips", "clip_score")},
        })
    return rows


def run_quality(args, log=print, progress_stream=None):
    """Generate, compare and time; returns the result dict (written by ``write_outputs``)."""
    progress_stream = sys.stderr if progress_stream is None else progress_stream
    device = torch.device(args.device)
    settings = build_settings(args)
    try:  # metric libraries first: fail before minutes of loading and generating
        fidelity = FidelityMetrics(device, lpips_net=args.lpips_net)
        clip = ClipScorer(args.clip_model, device) if args.clip_model else None
    except MetricsUnavailable as exc:
        raise QualityError(str(exc)) from exc
    except Exception as exc:  # the CLIP model did not load (offline, gated, not a CLIP folder)
        raise QualityError(f"--clip-model {args.clip_model}: cannot load it ({one_line(exc)}); pass a Hub id such "
                           "as openai/clip-vit-large-patch14 or a folder with CLIPModel + CLIPProcessor") from exc
    notes = list(fidelity.notes)
    if clip is None:
        notes.append("CLIP score not computed: pass --clip-model ID_OR_PATH (e.g. openai/clip-vit-large-patch14)")
    pipe = load_pipeline(args.pipeline, device, getattr(torch, args.dtype))
    prompts = resolve_prompts(pipe, args)
    generator = Generator(pipe, args)
    if args.size is not None and "height" not in generator.kwargs:
        notes.append(f"--size {args.size} ignored: {type(pipe).__name__} takes no height/width (the model fixes it)")
    if generator.class_conditional:
        notes.append("class-conditional pipeline (DiT): each prompt is an ImageNet class id; CLIP scores use the "
                     "text 'a photo of a <label>'")
    log(f"SDTM quality: {args.pipeline} ({type(pipe).__name__}), {len(prompts)} prompt(s) x {len(args.seeds)} "
        f"seed(s), settings: unpatched, {', '.join(s.name for s in settings)}")
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    for _ in range(args.warmup):  # untimed: first-call allocations, kernel compilation
        for setting in (None, *settings):
            _generate(generator, setting, prompts[0], args.seeds[0])

    records, grids = [], []
    total = len(prompts) * len(args.seeds) * (1 + len(settings))
    done = 0
    try:
        for p_index, prompt in enumerate(prompts):
            grid_rows = []
            for seed in args.seeds:
                baseline = None
                others = []
                for setting in (None, *settings):
                    name = "unpatched" if setting is None else setting.name
                    image, rec = _generate(generator, setting, prompt, seed)
                    path = os.path.join(args.out, "images", f"p{p_index:02d}_s{seed}_{_slug(name)}.png")
                    image.save(path)
                    rec.update(prompt_index=p_index, prompt=prompt["text"], seed=seed, setting=name, image=path)
                    if clip is not None:
                        rec["clip_score"] = clip.score(image, prompt["text"])
                    if setting is None:
                        baseline, base_rec = image, rec
                    else:
                        rec.update(fidelity.compare(baseline, image))
                        rec["speedup"] = base_rec["wall_s"] / rec["wall_s"]
                        if rec["transformer_s"]:
                            rec["transformer_speedup"] = base_rec["transformer_s"] / rec["transformer_s"]
                        others.append((name, image, rec))
                    records.append(rec)
                    done += 1
                    if not args.no_progress:
                        fid = "" if setting is None else (
                            f", PSNR {report._fmt(rec.get('psnr'), '{:.2f}')} dB, "
                            f"SSIM {report._fmt(rec.get('ssim'), '{:.4f}')}")
                        progress_stream.write(f"[{done}/{total}] prompt {p_index + 1}/{len(prompts)} seed {seed} "
                                              f"{name}: {rec['wall_s']:.2f}s{fid}\n")
                        progress_stream.flush()
                grid_rows.append((seed, baseline, others))
            grids.append(report.image_grid(grid_rows, report.grid_path(args.out, p_index)))
    finally:
        generator.timer.remove()
    num_tokens = next((r["num_tokens"] for r in records if r.get("num_tokens")), None)
    for rec in records:  # the unpatched model sees every image token at every step
        if rec["setting"] == "unpatched" and num_tokens:
            rec["mean_tokens"] = float(num_tokens)
    notes = list(dict.fromkeys(notes + fidelity.notes))
    transformer = pipe.transformer
    return {
        "config": {"pipeline": args.pipeline, "pipeline_class": type(pipe).__name__,
                   "transformer_class": type(transformer).__name__, "device": str(device), "dtype": args.dtype,
                   "steps": args.steps or "pipeline default", "image_size": f"{baseline.width}x{baseline.height}",
                   "call_kwargs": {k: v for k, v in generator.kwargs.items()}, "seeds": list(args.seeds),
                   "warmup_generations_per_setting": args.warmup, "lpips_net": fidelity.lpips_net,
                   "clip_model": args.clip_model,
                   "timing": "one timed generation per image; wall = the whole pipeline call, transformer = its "
                             "forward calls (forward hooks); CUDA: synchronised around both; speedup = total "
                             "unpatched time / total setting time"},
        "settings_config": [s.describe() for s in settings],
        "prompts": prompts, "settings": _summaries(records, settings), "images": records,
        "grids": grids, "notes": notes,
    }


def _versions():
    import importlib.metadata

    versions = {}
    for name in ("torchmetrics", "transformers", "matplotlib", "torchvision"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_outputs(result, out_dir):
    paths = {"json": os.path.join(out_dir, "quality.json"), "markdown": os.path.join(out_dir, "quality.md")}
    title = f"{result['config']['pipeline']} ({result['config']['transformer_class']}), {result['environment']['device']}"
    plot = report.speed_fidelity_plot(result["settings"], os.path.join(out_dir, "quality_plot.png"), title=title)
    if plot is None:
        result["notes"].append("speed-vs-fidelity plot not drawn: pip install matplotlib")
    else:
        paths["plot"] = plot
    report.write_json(result, paths["json"])
    report.write_markdown(result, paths["markdown"])
    return paths


def run_args(args, argv=None, log=print):
    """Run a parsed command line; prints the summary and returns the exit code (2 on a user error)."""
    bench.prepare_environment()
    wall = time.perf_counter()
    try:
        _check_args(args)
        result = run_quality(args, log)
    except QualityError as exc:
        print(f"sdtm quality: error: {exc}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    result["environment"] = {**bench.environment(args.device), **_versions()}
    result["command"] = shlex.join(["python", "-m", "sdtm_kernels", "quality", *argv])
    result["argv"] = argv
    result["wall_s"] = time.perf_counter() - wall
    paths = write_outputs(result, args.out)
    log(report.text_table(result["settings"]))
    for line in report.summary_lines(result):
        log(line)
    log(f"wall time {result['wall_s']:.1f}s; wrote {', '.join(paths.values())}, {len(result['grids'])} grid(s)")
    return 0


def main(argv=None, log=print):
    parser = add_arguments(argparse.ArgumentParser(prog="python -m sdtm_kernels quality",
                                                   description="SDTM speed and fidelity on a real pipeline"))
    args = parser.parse_args(argv)
    return run_args(args, argv, log)
