"""Model sizes and the FLOP model of the bench job (formulas in ``sdtm_kernels.bench``)."""
import math
import statistics
from collections import defaultdict

import torch

from .common import BenchError

# -- model specs and the FLOP model ------------------------------------------------------------
def default_spec(family, device, quick=False):
    """The model size the bench uses by default on ``device`` (see the module docstring)."""
    if torch.device(device).type == "cuda":
        spec = dict(layers=24, width=1536, head_dim=64, latent=128, patch=2, in_channels=16, text_len=333,
                    text_dim=4096, pooled_dim=2048, steps=50, dtype="bfloat16")
        if quick:
            spec.update(layers=8, latent=64, steps=20)
    else:
        spec = dict(layers=6, width=384, head_dim=64, latent=64, patch=2, in_channels=16, text_len=77,
                    text_dim=256, pooled_dim=128, steps=20, dtype="float32")
        if quick:
            spec.update(layers=2, width=128, latent=32, steps=6)
    if family == "pixart":
        spec.update(in_channels=4, text_len=120, text_dim=4096 if torch.device(device).type == "cuda" else 256,
                    head_dim=72 if spec["width"] % 72 == 0 else spec["head_dim"])
    spec.update(family=family, mlp_ratio=4)
    if family == "wan":  # Wan 2.1 1.3B at 480p / 81 frames on CUDA (21 latent frames of 60 x 104)
        if torch.device(device).type == "cuda":
            spec.update(layers=30, width=1536, head_dim=128, latent=(60, 104), frames=21, text_len=512,
                        text_dim=4096, ffn_dim=8960, steps=50)
            if quick:
                spec.update(layers=8, latent=(30, 52), steps=20)
        else:
            spec.update(layers=2, width=128, head_dim=64, latent=16, frames=3, text_len=16, text_dim=64,
                        ffn_dim=256, steps=12)
            if quick:
                spec.update(layers=2, latent=16, frames=2, steps=6)
        spec.update(in_channels=16, patch=2, pooled_dim=0)
    if family == "qwen":  # Qwen-Image at 1328² on CUDA (60 blocks of C = 3072)
        if torch.device(device).type == "cuda":
            spec.update(layers=60 if not quick else 8, width=3072, head_dim=128, latent=166 if not quick else 128,
                        text_len=256, text_dim=3584, steps=50 if not quick else 20)
        spec.update(in_channels=16, patch=2, pooled_dim=0)
    if family == "flux":  # Flux.1-dev at 1024² on CUDA: 19 double + 38 single blocks (FluxPipeline: 28 steps)
        if torch.device(device).type == "cuda":
            spec.update(layers=57 if not quick else 9, width=3072, head_dim=128, latent=128 if not quick else 64,
                        text_len=512, text_dim=4096, pooled_dim=768, steps=28 if not quick else 20)
        else:
            spec.update(layers=2, width=128, head_dim=64, latent=32, text_len=16, text_dim=64, pooled_dim=32,
                        steps=6 if quick else 12)
        spec.update(in_channels=16, patch=2)
    if family == "flux2":  # Flux.2-dev at 1024² on CUDA: 8 double + 48 single blocks, SwiGLU MLPs of 3 C
        if torch.device(device).type == "cuda":  # 32.2 B parameters: 60 GiB in bf16
            spec.update(layers=56 if not quick else 7, width=6144, head_dim=128, latent=128 if not quick else 64,
                        text_len=512, text_dim=15360, steps=50 if not quick else 20)
        else:
            spec.update(layers=2, width=128, head_dim=64, latent=32, text_len=16, text_dim=64,
                        steps=6 if quick else 12)
        spec.update(in_channels=32, patch=2, pooled_dim=0, mlp_ratio=3)  # 32 latent channels, packed 2 x 2
    if family == "hunyuan":  # HunyuanVideo 720p / 129 frames on CUDA (20 double + 40 single blocks)
        if torch.device(device).type == "cuda":
            spec.update(layers=60, width=3072, head_dim=128, latent=(90, 160), frames=33, text_len=256,
                        text_dim=4096, pooled_dim=768, steps=50)
            if quick:
                spec.update(layers=8, latent=(44, 80), frames=9, steps=20)  # 352 x 640: packs 2 x 2
        else:
            spec.update(layers=2, width=128, head_dim=64, latent=16, frames=2 if quick else 3, text_len=16,
                        text_dim=64, pooled_dim=32, steps=6 if quick else 12)
        spec.update(in_channels=16, patch=2)
    return spec


SIZES = {
    "sd3-medium": dict(family="sd3", layers=24, width=1536, head_dim=64, in_channels=16, text_len=333,
                       text_dim=4096, pooled_dim=2048),
    "pixart-alpha": dict(family="pixart", layers=28, width=1152, head_dim=72, in_channels=4, text_len=120,
                         text_dim=4096, pooled_dim=0),
    "wan2.1-1.3b": dict(family="wan", layers=30, width=1536, head_dim=128, in_channels=16, text_len=512,
                        text_dim=4096, pooled_dim=0, ffn_dim=8960, frames=21),
    "flux.1-dev": dict(family="flux", layers=57, width=3072, head_dim=128, in_channels=16, text_len=512,
                       text_dim=4096, pooled_dim=768),
    "flux.2-dev": dict(family="flux2", layers=56, width=6144, head_dim=128, in_channels=32, text_len=512,
                       text_dim=15360, pooled_dim=0, mlp_ratio=3),
}


def double_block_count(family, layers):
    """How many of ``layers`` blocks are double-stream blocks (the rest are single-stream), split
    as the real models are: Flux.1 19 + 38, HunyuanVideo 20 + 40, Flux.2 8 + 48; at least one."""
    if family in ("flux", "hunyuan"):
        return min(layers, max(1, layers // 3))
    if family == "flux2":
        return min(layers, max(1, layers // 7))
    return layers  # one kind of block


def make_spec(family, *, layers, width, latent, head_dim=64, patch=2, in_channels=16, text_len=77, text_dim=256,
              pooled_dim=128, mlp_ratio=4, frames=None, ffn_dim=None, **_ignored):
    """Sizes of a bench model. ``latent`` is the latent's side or ``(height, width)``; ``frames``
    (video families) the latent frames (time patch 1): the grid is then ``(frames, H, W)``.
    ``double_layers``: the leading double-stream blocks (``double_block_count``)."""
    if width % head_dim:
        head_dim = 64 if width % 64 == 0 else 32
    if width % head_dim:
        raise BenchError(f"--width {width} must be a multiple of 32 (heads of 64 or 32 channels)")
    height, side = (latent, latent) if isinstance(latent, int) else (int(latent[0]), int(latent[1]))
    if height % patch or side % patch:
        raise BenchError(f"latent size {latent} must be a multiple of the patch size {patch}")
    if family == "dit":
        text_len = 0  # the package's DiT takes a pooled condition (adaLN), no text tokens
    grid = (height // patch, side // patch) if frames is None else (int(frames), height // patch, side // patch)
    noise_shape = (in_channels, height, side) if frames is None else (in_channels, int(frames), height, side)
    return dict(family=family, layers=int(layers), width=int(width), head_dim=int(head_dim), heads=width // head_dim,
                latent=latent if isinstance(latent, int) else (height, side), patch=int(patch), grid=grid,
                num_tokens=math.prod(grid), noise_shape=noise_shape, in_channels=int(in_channels),
                text_len=int(text_len), text_dim=int(text_dim), pooled_dim=int(pooled_dim), mlp_ratio=int(mlp_ratio),
                ffn_dim=int(ffn_dim or mlp_ratio * width), double_layers=double_block_count(family, int(layers)))


def grid_text(spec) -> str:
    """``64x64`` or ``21x30x52``: the token grid for logs and tables."""
    return "x".join(str(g) for g in spec["grid"])


# bench families whose FLOPs are bench.families' block models: (kind of the double-stream blocks,
# kind of the single-stream blocks after them, MLP matrices: 2 GELU, 3 SwiGLU). qwen / flux / flux2 /
# hunyuan: text joined in attention; wan: cross-attention to the prompt, its query side merged only
# with merge_cross_attention.
FAMILY_BLOCKS = {"qwen": ("joint", None, 2), "hunyuan": ("joint", "single", 2), "wan": ("cross", None, 2),
                 "flux": ("joint", "single", 2), "flux2": ("joint", "single", 3)}


def block_flops(spec, layer, attn=None, mlp=None, cross=None):
    """FLOPs of one block call for one batch row (module docstring); token counts default to N."""
    n = spec["num_tokens"]
    c, t, r = spec["width"], spec["text_len"], spec["mlp_ratio"]
    na = n if attn is None else attn
    nm = n if mlp is None else mlp
    nx = n if cross is None else cross
    family = spec["family"]
    if family == "sd3":
        last = layer == spec["layers"] - 1
        flops = 6 * (na + t) * c * c + 2 * na * c * c + 4 * (na + t) ** 2 * c + 4 * r * nm * c * c
        if not last:
            flops += 2 * t * c * c + 4 * r * t * c * c
        return flops
    if family in FAMILY_BLOCKS:  # the block models of bench.families (an MLP of ffn_dim)
        from .families import block_flops as family_block_flops

        double, single, mats = FAMILY_BLOCKS[family]
        kind = double if layer < spec.get("double_layers", spec["layers"]) else single
        return family_block_flops(kind, na, nm, nx, t, c, spec["ffn_dim"], mats)
    flops = 8 * na * c * c + 4 * na * na * c + 4 * r * nm * c * c
    if family == "pixart":
        flops += 4 * nx * c * c + 4 * t * c * c + 4 * nx * t * c
    return flops


def call_overhead_flops(spec):
    """FLOPs of one model call outside the blocks (patch embedding, output and text projections)."""
    n, c, p = spec["num_tokens"], spec["width"], spec["patch"]
    out_channels = spec["in_channels"] * (2 if spec["family"] == "pixart" else 1)
    return 2 * n * c * p * p * (spec["in_channels"] + out_channels) + 2 * spec["text_len"] * spec["text_dim"] * c


def schedule_flops(spec, stats=None, steps=None, calls_per_step=1):
    """FLOPs of a whole schedule per batch row: from ``stats`` (SDTM) or with N tokens everywhere."""
    if stats is None:
        per_call = sum(block_flops(spec, layer) for layer in range(spec["layers"])) + call_overhead_flops(spec)
        return per_call * steps * calls_per_step
    total = 0
    calls = set()
    for rec in stats:
        total += block_flops(spec, rec["layer"], rec.get("attn"), rec.get("mlp"), rec.get("cross"))
        calls.add((rec["step"], rec["call"]))
    return total + len(calls) * call_overhead_flops(spec)


def tokens_per_step(stats, num_tokens):
    """Per step (first call): the majority mode and the mean image tokens the attention and MLP
    sub-layers saw over the blocks."""
    by_step = defaultdict(list)
    for rec in stats:
        if rec["call"] == 0:
            by_step[rec["step"]].append(rec)
    rows = []
    for step in sorted(by_step):
        recs = by_step[step]
        modes = [r["mode"] for r in recs]
        rows.append({
            "step": step,
            "mode": max(set(modes), key=modes.count),
            "attn": statistics.fmean(r.get("attn", num_tokens) for r in recs),
            "mlp": statistics.fmean(r.get("mlp", num_tokens) for r in recs),
        })
    return rows
