"""``SDTMConfig``: the options of the DiT wrapper (SPEC 3.5), validated, and named presets."""
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from .._validation import check_extent, check_float, check_int, check_ratio_deviation
from ..backend import BACKENDS

MERGE_MODES = ("mean", "prune")
IDM_SCORES = ("similarity", "attention")


@dataclass(frozen=True)
class SDTMConfig:
    """Options of ``apply_sdtm`` (defaults: the released sample scripts, SPEC 3.5).

    ratio, deviation     fraction of image tokens removed follows
                         ``(ratio - deviation) + 2 * deviation * cos(progress * pi / 2)``;
                         ``ratio - deviation >= 0`` and ``ratio + deviation < 1``.
                         ``ratio=0`` turns merging off: ``deviation`` is then ignored (set to 0).
    switch_step          last step of the structure stage (SSM): an int step index, or a
                         float fraction of the steps in [0, 1] (``0.4`` of 50 steps = step 20;
                         the default, the released step 20 of 50 scaled to any step count).
    protect_steps        steps ``s % protect_steps == 0`` run exactly and refresh the cache
                         (None or 0: no protected steps, no cache).
    protect_layers       layers ``l % protect_layers == 0`` and the last layer never merge
                         and reset ``li`` (None: no protected layers).
    mcw                  cache blend weight: merged tokens take ``mcw * value + (1 - mcw) * cache``.
    a_s                  SSM frequency bonus weight.
    merge_mode           "mean" (average the members) or "prune" (keep the representative).
    random_dst           random dst positions (forced off for odd batches).
    seed                 seed of the per-generation generator (None: 0). The global RNG is never used.
    num_steps            number of denoising steps; read from the pipeline call when a pipeline
                         is patched, required for a bare transformer.
    backend              None/"auto", "reference" or "triton" for plans and merges.
    merge_cross_attention  PixArt: also merge the query side of cross-attention (SSM steps).
    window               merge window (wh, ww).
    idm_score            IDM candidate ranking: "similarity" (released: best cosine to a dst) or
                         "attention" (paper: ``P_ina + a_d * P_fre``, tokens the prompt attends
                         to least merged first; SD3 / Flux joint attention only).
    a_d                  weight of the frequency term ``P_fre`` in the attention score.
    prompt_reweight      proportional attention for merged image keys (``+log(size)``) and a
                         per-stage prompt-key weight (``+log(a_p)``) on merged steps (SD3 / Flux).
    a_p                  prompt-key weight: a float for both stages or ``(structure, detail)``; > 0.
    min_saving           a merged block must save at least this fraction of a block's FLOPs at
                         the step's token count, else it runs exactly (the stage would not pay
                         for its bookkeeping; in [0, 1); 0: always merge, as the release).
    ratio_levels         few shapes: each stage's removal fraction is rounded to the nearest of
                         this many evenly spaced levels between the stage's lowest and highest
                         scheduled fraction, so a generation has at most ``2 * ratio_levels``
                         merged token counts (one compiled graph / CUDA graph each; the exact
                         schedule has 13-27 at 1024²). None or 0: the release's exact per-step
                         schedule. docs/SEMANTICS.md, "Few shapes".
    shards               plan in this many equal slabs of the token grid, cut along its first
                         axis (rows of ``(H, W)``, frames of ``(T, H, W)``), each planned on
                         its own with the same merge count, so that no window or merge group
                         spans two slabs. Under context parallelism every rank plans on its own
                         slab (docs/PARALLEL.md); ``shards=k`` on one process merges exactly as a
                         k-rank run does. 1: one plan over the whole grid.
    """

    ratio: float = 0.3
    deviation: float = 0.2
    switch_step: Union[int, float] = 0.4
    protect_steps: Optional[int] = 3
    protect_layers: Optional[int] = None
    mcw: float = 0.1
    a_s: float = 0.05
    merge_mode: str = "mean"
    random_dst: bool = True
    seed: Optional[int] = None
    num_steps: Optional[int] = None
    backend: Optional[str] = None
    merge_cross_attention: bool = False
    window: Tuple[int, int] = (2, 2)
    idm_score: str = "similarity"
    a_d: float = 0.05
    prompt_reweight: bool = False
    a_p: Union[float, Tuple[float, float]] = 1.0
    min_saving: float = 0.0
    ratio_levels: Optional[int] = 3
    shards: int = 1

    def __post_init__(self):
        ratio, deviation = check_float("ratio", self.ratio), check_float("deviation", self.deviation)
        if ratio == 0.0 and deviation >= 0.0:
            deviation = 0.0  # ratio 0: merging off, whatever the deviation
        ratio, deviation = check_ratio_deviation(ratio, deviation)
        switch = self.switch_step
        if isinstance(switch, bool) or not isinstance(switch, numbers.Real):
            raise TypeError(f"switch_step must be an int step or a float fraction, got {type(switch).__name__}")
        if isinstance(switch, numbers.Integral):
            switch = check_int("switch_step", switch, minimum=0)
        else:
            switch = check_float("switch_step", switch)
            if not 0.0 <= switch <= 1.0:
                raise ValueError(f"switch_step as a fraction of the steps must be in [0, 1], got {switch}")
        protect_steps = self.protect_steps
        if protect_steps is not None:
            protect_steps = check_int("protect_steps", protect_steps, minimum=0) or None
        protect_layers = self.protect_layers
        if protect_layers is not None:
            protect_layers = check_int("protect_layers", protect_layers, minimum=0) or None
        mcw = check_float("mcw", self.mcw)
        if not 0.0 <= mcw <= 1.0:
            raise ValueError(f"mcw must be in [0, 1], got {mcw}")
        a_s = check_float("a_s", self.a_s)
        if self.merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode must be one of {MERGE_MODES}, got {self.merge_mode!r}")
        if not isinstance(self.random_dst, bool):
            raise TypeError(f"random_dst must be a bool, got {type(self.random_dst).__name__}")
        seed = None if self.seed is None else check_int("seed", self.seed)
        num_steps = None if self.num_steps is None else check_int("num_steps", self.num_steps, minimum=1)
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of None, {', '.join(map(repr, BACKENDS))}; got {self.backend!r}")
        if not isinstance(self.merge_cross_attention, bool):
            raise TypeError(f"merge_cross_attention must be a bool, got {type(self.merge_cross_attention).__name__}")
        window = check_extent("window", self.window)  # (wh, ww), or (wt, wh, ww) for video grids
        if math.prod(window) < 2:
            raise ValueError(f"window must hold at least 2 tokens, got {window}")
        if self.idm_score not in IDM_SCORES:
            raise ValueError(f"idm_score must be one of {IDM_SCORES}, got {self.idm_score!r}")
        a_d = check_float("a_d", self.a_d)
        if not isinstance(self.prompt_reweight, bool):
            raise TypeError(f"prompt_reweight must be a bool, got {type(self.prompt_reweight).__name__}")
        a_p = self.a_p
        if isinstance(a_p, (tuple, list)):
            if len(a_p) != 2:
                raise TypeError(f"a_p must be a float or a pair (structure, detail), got {a_p!r}")
            a_p = (check_float("a_p[0]", a_p[0]), check_float("a_p[1]", a_p[1]))
        else:
            a_p = (check_float("a_p", a_p),) * 2
        if min(a_p) <= 0.0:
            raise ValueError(f"a_p must be > 0 (its log is added to the prompt logits), got {self.a_p!r}")
        min_saving = check_float("min_saving", self.min_saving)
        if not 0.0 <= min_saving < 1.0:
            raise ValueError(f"min_saving must be in [0, 1), got {min_saving}")
        ratio_levels = self.ratio_levels
        if ratio_levels is not None:
            ratio_levels = check_int("ratio_levels", ratio_levels, minimum=0) or None
        shards = check_int("shards", self.shards, minimum=1)
        for name, value in (("a_d", a_d), ("a_p", a_p), ("ratio", ratio), ("deviation", deviation), ("switch_step", switch),
                            ("protect_steps", protect_steps), ("protect_layers", protect_layers), ("mcw", mcw),
                            ("a_s", a_s), ("seed", seed), ("num_steps", num_steps), ("window", window),
                            ("min_saving", min_saving), ("ratio_levels", ratio_levels),
                            ("shards", shards)):
            object.__setattr__(self, name, value)

    def switch_index(self, num_steps: int) -> int:
        """The last SSM step for ``num_steps`` steps (a fraction f gives ``floor(f * num_steps)``)."""
        if isinstance(self.switch_step, int):
            return self.switch_step
        return int(math.floor(self.switch_step * num_steps + 1e-9))

    def replace(self, **changes) -> "SDTMConfig":
        return dataclasses.replace(self, **changes)


# Named presets. "released" is the released sample scripts' setting (switch at step 20 of 50,
# stored as the fraction 0.4 so that it scales with the step count) and equals the defaults of
# SDTMConfig and apply_sdtm; "fast" removes twice as many.
PRESETS = {
    "released": dict(ratio=0.3, deviation=0.2, switch_step=0.4, protect_steps=3, mcw=0.1),
    # "fast" skips merged blocks that would save under 3% of a block's FLOPs (MIN_SAVING_FAST);
    # "released" stays faithful to the release and always merges.
    "fast": dict(ratio=0.6, deviation=0.2, switch_step=0.4, protect_steps=3, mcw=0.1, min_saving=0.03),
}
DEFAULT_PRESET = "released"

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SDTMConfig)}
OPTION_NAMES = tuple(_DEFAULTS)


def make_config(preset=None, **options) -> SDTMConfig:
    """Config from a preset name (None: ``"released"``, the defaults) and options. Every option
    passed wins over the preset, also one equal to the default (``make_config("fast", ratio=0.3)``
    has ratio 0.3); options not passed take the preset's value."""
    if preset is None:
        preset = DEFAULT_PRESET
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {preset!r}")
    unknown = set(options) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown SDTM option(s): {sorted(unknown)}")
    values = dict(_DEFAULTS)
    values.update(PRESETS[preset])
    values.update(options)
    if isinstance(values["window"], list):
        values["window"] = tuple(values["window"])
    return SDTMConfig(**values)
