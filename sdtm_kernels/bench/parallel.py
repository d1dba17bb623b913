"""Bytes the context-parallel collectives move per step, with and without SDTM, counted from shapes.

Under diffusers' context parallelism each of ``degree`` ranks holds ``N / degree`` image tokens
and ``T / degree`` prompt tokens (Flux's plan splits both). Every attention call then moves:

* Ulysses: four all-to-alls (query, key, value, then the output) of the rank's
  ``[B, S, heads, head_dim]`` tensors, ``S`` = the rank's prompt tokens plus its image rows;
  a rank keeps ``1 / degree`` of each and receives the rest: ``4 * B*S*heads*head_dim *
  itemsize * (degree - 1) / degree`` bytes.
* Ring: one all-gather of the rank's keys and values: ``2 * B*S*heads*head_dim * itemsize *
  (degree - 1)`` bytes received.

SDTM shrinks ``S`` in the attention of SSM steps (IDM steps attend at full length and merge the
MLP only; protected steps and layers run exactly). The output all-gather after ``proj_out``
(``B * N/degree * out_channels`` per rank, ``(degree - 1)`` times received) runs at full length
with or without SDTM and is reported apart. Counts are the bytes each rank receives per
transformer call (one call per step; CFG as a batch of 2).
"""
import math

from ..dit.config import make_config
from ..dit.parallel import shard_grid
from ..dit.state import SDTMState
from ..reference import schedule as ref_schedule

ATTENTION_KINDS = ("ulysses", "ring")

# Flux.1-dev: 19 double + 38 single blocks, 24 heads of 128, 64 output channels, 512 prompt tokens
FLUX_DEV = dict(heads=24, head_dim=128, layers=57, out_channels=64, text_len=512)


def received_bytes(attention: str, elements: int, degree: int, itemsize: int) -> float:
    """Bytes one rank receives for one attention call whose local q (= k = v) tensor has ``elements``."""
    if attention == "ulysses":
        return 4 * elements * itemsize * (degree - 1) / degree
    if attention == "ring":
        return 2 * elements * itemsize * (degree - 1)
    raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")


def attention_rows(config, num_steps: int, grid, degree: int, layers: int, channels: int):
    """``[(step, mode, [image rows each layer's attention sees on one rank])]`` for a generation:
    the schedule of ``SDTMState`` on one rank's slab (``grid`` cut into ``degree`` slabs) of a
    model of ``channels`` hidden channels (``min_saving`` reads them)."""
    if grid[0] % degree:
        raise ValueError(f"grid {tuple(grid)}: its first axis must be divisible by degree={degree}")
    state = SDTMState(config, num_steps=num_steps, num_layers=layers)
    state.grid = shard_grid(tuple(grid), degree)
    tokens = math.prod(state.grid)
    out = []
    for step in range(num_steps):
        state.step = step
        mode = state.step_mode()
        state.removal = state.n_remove(tokens // config.shards) if mode in ("ssm", "idm") else 0
        removed = config.shards * ref_schedule.tokens_removed("ssm", state.removal, state.plan_grid, state.window)
        rows = []
        for layer in range(layers):
            merged = mode == "ssm" and not state.layer_protected(layer)
            if merged and config.min_saving and state.block_saving(mode, tokens, channels) < config.min_saving:
                merged = False  # the block would not pay for its plan: exact
            rows.append(tokens - removed if merged else tokens)
        out.append((step, mode, rows))
    return out


def collective_bytes(*, grid, degree, num_steps, heads, head_dim, layers, text_len, batch=2, attention="ulysses",
                     itemsize=2, out_channels=None, preset=None, **options):
    """Per step ``{"step", "mode", "image_rows", "bytes", "bytes_exact", "output_gather"}``: the bytes
    one rank receives through the attention collectives with SDTM (``preset`` / ``options`` as for
    ``apply_sdtm``) and without, for a transformer of ``layers`` attention layers of ``heads`` x
    ``head_dim`` on a ``grid`` of image tokens plus ``text_len`` prompt tokens, split over ``degree``
    ranks. ``output_gather``: the all-gather of the output (the same with and without SDTM)."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    if degree < 2 or text_len % degree:
        raise ValueError(f"degree must be >= 2 and divide text_len={text_len}, got {degree}")
    config = make_config(preset, num_steps=num_steps, **options)
    local_text, per_row = text_len // degree, batch * heads * head_dim
    tokens = math.prod(grid) // degree
    gather = 0 if not out_channels else batch * tokens * out_channels * itemsize * (degree - 1)
    exact = layers * received_bytes(attention, (local_text + tokens) * per_row, degree, itemsize)
    rows = []
    for step, mode, image_rows in attention_rows(config, num_steps, grid, degree, layers, heads * head_dim):
        moved = sum(received_bytes(attention, (local_text + r) * per_row, degree, itemsize) for r in image_rows)
        rows.append({"step": step, "mode": mode, "image_rows": image_rows, "bytes": moved, "bytes_exact": exact,
                     "output_gather": gather})
    return rows


def generation_bytes(rows) -> dict:
    """Totals of ``collective_bytes`` over a generation: ``{"bytes", "bytes_exact", "saving"}``
    (``saving``: the fraction of the attention collectives' bytes SDTM removes)."""
    moved = sum(r["bytes"] for r in rows)
    exact = sum(r["bytes_exact"] for r in rows)
    return {"bytes": moved, "bytes_exact": exact, "saving": 1.0 - moved / exact if exact else 0.0}


def flux_report(degrees=(2, 4, 8), presets=("released", "fast"), num_steps=28, grid=(64, 64)):
    """Rows for Flux.1-dev at 1024² (64 x 64 image tokens), bf16, CFG off (batch 1)."""
    out = []
    for attention in ATTENTION_KINDS:
        for degree in degrees:
            for preset in presets:
                rows = collective_bytes(grid=grid, degree=degree, num_steps=num_steps, batch=1, attention=attention,
                                        preset=preset, **FLUX_DEV)
                total = generation_bytes(rows)
                out.append({"attention": attention, "degree": degree, "preset": preset,
                            "gib_exact": total["bytes_exact"] / 2**30, "gib_sdtm": total["bytes"] / 2**30,
                            "saving": total["saving"]})
    return out


def format_flux_report(rows) -> str:
    lines = ["| attention | ranks | preset | GiB / rank / generation (no SDTM) | with SDTM | saved |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['attention']} | {r['degree']} | {r['preset']} | {r['gib_exact']:.2f} | "
                     f"{r['gib_sdtm']:.2f} | {100 * r['saving']:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_flux_report(flux_report()))
