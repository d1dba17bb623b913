"""Speed side of the quality command: per-run timings and the FLOP-bound speedup.

Timing follows the main bench job (``sdtm_kernels/bench.py``): optional warm-up generations
before anything is timed, and on CUDA a synchronisation before every clock read. Two times
per generation: ``wall_s`` (the whole pipeline call: text encoders, denoising, VAE decode)
and ``transformer_s`` (the sum of the transformer's forward calls, from forward hooks).

FLOP-bound speedup: bench.py's FLOP model (``block_flops`` / ``call_overhead_flops``) over
the token counts each sub-layer really saw (``get_state(pipe).stats``), against the same
calls with N image tokens everywhere. Families: SD3 (joint blocks), PixArt, DiT (diffusers'
``DiTTransformer2DModel``: self-attention + MLP, no text: bench's "dit" formula) and Flux:
its double blocks are SD3-shaped joint blocks (none is ``context_pre_only``) and a single
block on the joint sequence costs ``8 L_a C^2 + 4 L_a^2 C + 4 r L_m C^2`` with
``L_a = n_a + T``, ``L_m = n_m + T`` (qkv + attention + proj_out's attention half, MLP in +
proj_out's MLP half), which is bench's "dit" formula on those lengths.
"""
import time

import torch

from .. import bench


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class TransformerTimer:
    """Seconds spent inside ``transformer.forward`` (and how many calls), from forward hooks."""

    def __init__(self, transformer, device):
        self.device = torch.device(device)
        self.seconds = 0.0
        self.calls = 0
        self._start = None
        self._handles = (transformer.register_forward_pre_hook(self._before),
                         transformer.register_forward_hook(self._after))

    def _before(self, module, args):
        sync(self.device)
        self._start = time.perf_counter()

    def _after(self, module, args, output):
        sync(self.device)
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.calls += 1
        self._start = None

    def reset(self):
        self.seconds, self.calls, self._start = 0.0, 0, None

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = ()


def family_of(transformer):
    """"sd3", "pixart", "flux", "dit" or None (no FLOP model) from the transformer's class."""
    name = type(getattr(transformer, "_sdtm_original_class", None) or transformer).__name__
    for prefix, family in (("SD3", "sd3"), ("PixArt", "pixart"), ("Flux", "flux"), ("DiT", "dit")):
        if name.startswith(prefix):
            return family
    return None


def flop_spec(transformer, grid, text_len):
    """bench.py's model spec for ``transformer`` on a token ``grid`` with ``text_len`` text tokens."""
    family = family_of(transformer)
    if family is None or grid is None:
        return None
    cfg = transformer.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    patch = getattr(cfg, "patch_size", 1) or 1
    text_dim = (getattr(cfg, "joint_attention_dim", None) or getattr(cfg, "caption_channels", None) or width)
    base_family = {"flux": "sd3"}.get(family, family)
    spec = bench.make_spec(base_family, layers=cfg.num_layers, width=width, head_dim=cfg.attention_head_dim,
                           latent=grid[0] * patch, patch=patch, in_channels=cfg.in_channels,
                           text_len=text_len or 0, text_dim=text_dim)
    spec.update(grid=tuple(grid), num_tokens=grid[0] * grid[1], quality_family=family)
    if family == "flux":
        spec["double_layers"] = cfg.num_layers
    return spec


def _record_flops(spec, rec):
    family = spec["quality_family"]
    if family != "flux":
        return bench.block_flops(spec, rec["layer"], rec.get("attn"), rec.get("mlp"), rec.get("cross"))
    n, t = spec["num_tokens"], spec["text_len"]
    if rec["layer"] < spec["double_layers"]:  # double block: an SD3 joint block that is never the last one
        return bench.block_flops(dict(spec, layers=spec["double_layers"] + 1), rec["layer"], rec.get("attn"),
                                 rec.get("mlp"))
    single = dict(spec, family="dit")  # see the module docstring
    return bench.block_flops(single, rec["layer"], (rec.get("attn") or n) + t, (rec.get("mlp") or n) + t)


def schedule_flops(spec, stats):
    """FLOPs per batch row of the calls in ``stats`` (blocks + per-call overhead)."""
    total = sum(_record_flops(spec, rec) for rec in stats)
    calls = len({(rec["step"], rec["call"]) for rec in stats})
    return total + calls * bench.call_overhead_flops(spec)


def speed_stats(transformer, state):
    """FLOP-bound speedup and mean image tokens per sub-layer of one SDTM generation (``state``
    = ``get_state(pipe)`` right after the call); ``{}`` when there is nothing to count."""
    stats = [dict(rec) for rec in state.stats if "layer" in rec]
    grid = state.grid
    if not stats or grid is None:
        return {}
    num_tokens = grid[0] * grid[1]
    rows = bench.tokens_per_step(stats, num_tokens)
    out = {"tokens_per_step": [round((r["attn"] + r["mlp"]) / 2, 2) for r in rows],
           "mean_tokens": sum((r["attn"] + r["mlp"]) / 2 for r in rows) / len(rows),
           "num_tokens": num_tokens, "steps_seen": len(rows)}
    spec = flop_spec(transformer, grid, state.text_len)
    if spec is not None:
        full = [{k: v for k, v in rec.items() if k not in ("attn", "mlp", "cross", "attn2")} for rec in stats]
        out["flop_bound_speedup"] = schedule_flops(spec, full) / schedule_flops(spec, stats)
    return out
