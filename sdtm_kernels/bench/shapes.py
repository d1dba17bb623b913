"""Few shapes (``ratio_levels``): distinct merged token counts per generation and the FLOP-bound
speedup with and without the level rule, from the schedule alone (no model run).

The FLOP model is the one of ``SDTMState.block_saving``: a DiT block ``F(n) = 24 n C^2 + 4 n^2 C``;
an SSM step runs the whole block on M rows, an IDM step attention on N and the MLP on M rows,
a protected or skipped step the whole block on N. Counts are what attention and MLP see (an
SSM step's M and an IDM step's MLP M are different shapes).
"""
import math

from ..dit.config import make_config
from ..dit.state import SDTMState, block_flops
from ..reference import schedule as ref_schedule

# SD3-medium / Flux at 1024²: 64 x 64 image tokens; hidden sizes
FAMILIES_1024 = {"sd3": (64, 64, 1536), "flux": (64, 64, 3072)}


def schedule_rows(preset: str, num_steps: int, grid, channels: int, ratio_levels=3, **options) -> list:
    """Per step ``(mode, rows)``: the rows the merged sub-layers see (``mode`` "ssm": attention and
    MLP, "idm": the MLP; ``rows == N`` and mode "full" where the step runs exactly, including
    stages ``min_saving`` skips). From the schedule alone, as ``SDTMState`` decides at run time."""
    config = make_config(preset, ratio_levels=ratio_levels, num_steps=num_steps, **options)
    state = SDTMState(config)
    state.grid = tuple(grid)
    n, c = math.prod(grid), channels
    out = []
    for step in range(num_steps):
        state.step = step
        mode = state.step_mode()
        state.removal = state.n_remove(n) if mode in ("ssm", "idm") else 0
        if mode not in ("ssm", "idm") or (config.min_saving and state.block_saving(mode, n, c) < config.min_saving):
            out.append(("full", n))
            continue
        out.append((mode, n - ref_schedule.tokens_removed(mode, state.removal, state.grid, state.window)))
    return out


def schedule_shapes(preset: str, num_steps: int, grid, channels: int, ratio_levels=3) -> dict:
    """``{"counts": sorted distinct (sub-layers, M), "flop_bound": unpatched / SDTM FLOPs}``."""
    n, c = math.prod(grid), channels
    base = total = 0
    counts = set()
    for mode, rows in schedule_rows(preset, num_steps, grid, channels, ratio_levels):
        base += block_flops(n, c)
        if mode == "ssm":
            total += block_flops(rows, c)
            counts.add(("attn+mlp", rows))
        elif mode == "idm":
            total += block_flops(n, c) - 16 * (n - rows) * c * c
            counts.add(("mlp", rows))
        else:
            total += block_flops(n, c)
    return {"counts": sorted(counts), "flop_bound": base / total}


def level_report(presets=("released", "fast"), steps=(28, 50), families=FAMILIES_1024, ratio_levels=3):
    """Rows ``{family, preset, steps, exact_counts, level_counts, exact_bound, level_bound}``."""
    rows = []
    for family, (height, width, channels) in families.items():
        for preset in presets:
            for num_steps in steps:
                exact = schedule_shapes(preset, num_steps, (height, width), channels, ratio_levels=None)
                levels = schedule_shapes(preset, num_steps, (height, width), channels, ratio_levels=ratio_levels)
                rows.append({"family": family, "preset": preset, "steps": num_steps,
                             "exact_counts": len(exact["counts"]), "level_counts": len(levels["counts"]),
                             "exact_bound": exact["flop_bound"], "level_bound": levels["flop_bound"]})
    return rows


def format_level_report(rows) -> str:
    lines = ["| family | preset | steps | token counts (exact -> levels) | FLOP bound exact | with levels | change |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        change = 100.0 * (r["level_bound"] / r["exact_bound"] - 1.0)
        lines.append(f"| {r['family']} 1024² | {r['preset']} | {r['steps']} | {r['exact_counts']} -> {r['level_counts']} "
                     f"| {r['exact_bound']:.3f}x | {r['level_bound']:.3f}x | {change:+.2f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_level_report(level_report()))
