"""FLOP-bound speedup of SDTM per model family at the sizes users run (no model run).

``python -m sdtm_kernels.bench.families [--out DIR]`` prints (and writes) a table: for each family
its real size (blocks, hidden size, image / video token grid, prompt tokens) and, per preset, the
whole-transformer FLOPs unpatched over SDTM's, from the step schedule alone (``shapes.schedule_rows``,
the rule ``SDTMState`` applies at run time, ``ratio_levels`` included). The bound ignores the
plan's cost and the work outside the blocks: a wall-clock speedup stays below it.

Block FLOP models per batch row (n image rows in attention, m in the MLP, T prompt tokens, C hidden,
F feed-forward inner size; a multiply-add is 2 FLOPs):

* ``joint`` (SD3, Flux / Flux.2 / HunyuanVideo double blocks, Qwen-Image): image and text streams,
  joint attention: ``8 (n + T) C^2 + 4 (n + T)^2 C + 2 k (m + T) C F`` (k = 2 for a GELU MLP,
  3 for SwiGLU);
* ``single`` (Flux / Flux.2 / HunyuanVideo single blocks, parallel attention + MLP on the joint
  sequence): ``8 (n + T) C^2 + 4 (n + T)^2 C + 2 k (m + T) C F``, the same terms (the fused input and
  output projections split into their attention and MLP parts; IDM steps merge the MLP part);
* ``cross`` (PixArt, Wan): self-attention on the image, cross-attention to the prompt (query side
  not merged, the default), an MLP: ``8 n C^2 + 4 n^2 C + 4 N C^2 + 4 T C^2 + 4 N T C + 2 k m C F``.
"""
import argparse
import datetime
import json
import math
import os

from .shapes import schedule_rows

# name: (family, blocks [(kind, count)], C, F, MLP matrices k, grid, prompt tokens, steps, what)
FAMILIES = {
    "sd3-medium": ("sd3", [("joint", 24)], 1536, 6144, 2, (64, 64), 333, 28, "SD3-medium 1024²"),
    "pixart-sigma": ("pixart", [("cross", 28)], 1152, 4608, 2, (64, 64), 300, 20, "PixArt-Σ 1024²"),
    "flux.1-dev": ("flux", [("joint", 19), ("single", 38)], 3072, 12288, 2, (64, 64), 512, 28, "Flux.1-dev 1024²"),
    "flux.2-dev": ("flux2", [("joint", 8), ("single", 48)], 6144, 18432, 3, (64, 64), 512, 50, "Flux.2-dev 1024²"),
    "qwen-image": ("qwen", [("joint", 60)], 3072, 12288, 2, (83, 83), 256, 50, "Qwen-Image 1328²"),
    "wan2.1-1.3b": ("wan", [("cross", 30)], 1536, 8960, 2, (21, 30, 52), 512, 50, "Wan 2.1 1.3B 480p, 81 frames"),
    "wan2.1-14b": ("wan", [("cross", 40)], 5120, 13824, 2, (21, 45, 80), 512, 50, "Wan 2.1 14B 720p, 81 frames"),
    "hunyuanvideo": ("hunyuan", [("joint", 20), ("single", 40)], 3072, 12288, 2, (33, 45, 80), 256, 50,
                     "HunyuanVideo 720p, 129 frames"),
}


def block_flops(kind: str, n: int, m: int, full: int, text: int, channels: int, ffn: int, mats: int) -> int:
    """FLOPs of one block (module docstring) with ``n`` rows in attention, ``m`` in the MLP."""
    c, t = channels, text
    mlp = 2 * mats * (m + (0 if kind == "cross" else t)) * c * ffn
    if kind == "cross":
        return 8 * n * c * c + 4 * n * n * c + 4 * full * c * c + 4 * t * c * c + 4 * full * t * c + mlp
    if kind in ("joint", "single"):
        return 8 * (n + t) * c * c + 4 * (n + t) ** 2 * c + mlp
    raise ValueError(f"kind must be 'joint', 'single' or 'cross', got {kind!r}")


def family_bound(name: str, preset: str, steps=None, ratio_levels=3) -> dict:
    """``{"name", "family", "what", "tokens", "steps", "preset", "flop_bound", "stage_bounds"}``."""
    if name not in FAMILIES:
        raise ValueError(f"name must be one of {sorted(FAMILIES)}, got {name!r}")
    family, blocks, c, ffn, mats, grid, text, default_steps, what = FAMILIES[name]
    steps = steps or default_steps
    n = math.prod(grid)
    base = total = 0
    per_stage = {}
    for mode, rows in schedule_rows(preset, steps, grid, c, ratio_levels):
        attn_rows = rows if mode == "ssm" else n
        full_step = sum(count * block_flops(kind, n, n, n, text, c, ffn, mats) for kind, count in blocks)
        step = sum(count * block_flops(kind, attn_rows, rows, n, text, c, ffn, mats) for kind, count in blocks)
        base += full_step
        total += step
        stage = per_stage.setdefault(mode, [0, 0])
        stage[0] += full_step
        stage[1] += step
    return {"name": name, "family": family, "what": what, "tokens": n, "grid": list(grid), "text_tokens": text,
            "steps": steps, "preset": preset, "flop_bound": base / total,
            "stage_bounds": {mode: a / b for mode, (a, b) in per_stage.items()}}


def report(presets=("released", "fast"), names=None) -> list:
    return [family_bound(name, preset) for name in (names or FAMILIES) for preset in presets]


def format_report(rows) -> str:
    lines = ["| model | family | image tokens | prompt | steps | preset | FLOP bound | SSM steps | IDM steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stages = r["stage_bounds"]
        lines.append(f"| {r['what']} | {r['family']} | {r['tokens']} ({'x'.join(map(str, r['grid']))}) | "
                     f"{r['text_tokens']} | {r['steps']} | {r['preset']} | {r['flop_bound']:.3f}x | "
                     f"{stages.get('ssm', 1.0):.2f}x | {stages.get('idm', 1.0):.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for families.json and families.md")
    args = parser.parse_args(argv)
    rows = report()
    text = format_report(rows)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "families.json"), "w") as fh:
            json.dump({"command": "python -m sdtm_kernels.bench.families --out " + args.out,
                       "date": datetime.date.today().isoformat(),
                       "device": "none: schedule arithmetic only, no model runs", "rows": rows}, fh, indent=1)
        with open(os.path.join(args.out, "families.md"), "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
