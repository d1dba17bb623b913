"""Public plan builders: ``ratio_schedule``, ``plan_ssm``, ``plan_idm``, ``plan_tome``.

They validate arguments, pick the backend and wrap the plan tensors in a ``MergePlan``.
Building a plan reads no tensor values on the host (no ``.item()``): plan sizes follow
from the shapes and ``n_remove``, which are Python ints.
"""
from ._validation import (
    check_float,
    check_float_tokens,
    check_generator,
    check_grid,
    check_int,
    check_li,
)
from .backend import resolve_backend
from .plan import MergePlan
from .reference import plans as ref_plans
from .reference import schedule as ref_schedule

SCORE_VARIANTS = ("released", "paper")


def ratio_schedule(step: int, num_steps: int, ratio: float, deviation: float) -> float:
    """Fraction of image tokens to remove at ``step`` (SPEC 3.1).

    Equivalent to ``(ratio - deviation) + 2 * deviation * cos(step / (num_steps - 1) * pi / 2)``
    (progress 0 when ``num_steps == 1``). ``ratio - deviation`` must be >= 0 and
    ``ratio + deviation`` < 1 so that every step's fraction lies in [0, 1).
    Multiply by N and floor for ``n_remove``.
    """
    num_steps = check_int("num_steps", num_steps, minimum=1)
    step = check_int("step", step, minimum=0)
    if step >= num_steps:
        raise ValueError(f"step must be < num_steps={num_steps}, got {step}")
    ratio = check_float("ratio", ratio)
    deviation = check_float("deviation", deviation)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if deviation < 0.0:
        raise ValueError(f"deviation must be >= 0, got {deviation}")
    if ratio - deviation < 0.0 or ratio + deviation >= 1.0:
        raise ValueError(
            f"ratio +/- deviation must stay in [0, 1): ratio={ratio}, deviation={deviation} "
            f"give [{ratio - deviation}, {ratio + deviation}]"
        )
    return ref_schedule.ratio_schedule(step, num_steps, ratio, deviation)


def _common_checks(metric, grid, n_remove, window, li=None, generator=None):
    check_float_tokens("metric", metric)
    grid, window = check_grid(grid, window, metric.shape[1])
    n_remove = check_int("n_remove", n_remove, minimum=0)
    check_li(li, metric)
    check_generator(generator)
    return grid, window, n_remove


def _wrap(tensors: ref_plans.PlanTensors, num_tokens: int) -> MergePlan:
    return MergePlan(
        tensors.row_of_token, tensors.members, tensors.row_start, tensors.rep_token, tensors.blend,
        num_tokens=num_tokens, num_rows=tensors.num_rows,
    )


def plan_ssm(metric, grid, n_remove, *, window=(2, 2), li=None, a_s=0.05, score="released",
             random_dst=False, generator=None, backend=None) -> MergePlan:
    """Structure-stage plan (SSM, SPEC 3.2): collapse the best-scoring windows.

    Plain PyTorch meaning, per batch row::

        score[g] = cos_gram(metric[window g]).mean() + a_s * mean(li[window g]) / (li.mean() + 1e-6)
        R = min(n_remove // ((K - 1) * 16) * 16, G)          # released rounding, clamped
        selected = sort(score, descending, stable)[:R]         # ties: lower window index
        each selected window -> one row (mean of its K tokens); other tokens stay alone

    ``score="paper"`` uses the off-diagonal Gram mean. ``li`` is the ``[B, N]`` frequency
    counter (None: no bonus). ``random_dst`` draws each selected window's dst position
    (``randint(K, (B, R), generator=generator)``), which matters for ``prune`` and ``li``.
    """
    grid, window, n_remove = _common_checks(metric, grid, n_remove, window, li, generator)
    a_s = check_float("a_s", a_s)
    if score not in SCORE_VARIANTS:
        raise ValueError(f"score must be one of {SCORE_VARIANTS}, got {score!r}")
    resolve_backend(backend, metric.device, "plan_ssm")
    tensors = ref_plans.ssm_plan(metric, grid, n_remove, window=window, li=li, a_s=a_s, score=score,
                                 random_dst=bool(random_dst), generator=generator)
    return _wrap(tensors, metric.shape[1])


def plan_idm(metric, grid, n_remove, *, window=(2, 2), li=None, random_dst=False, generator=None,
             backend=None) -> MergePlan:
    """Detail-stage plan (IDM, the released "FIDM", SPEC 3.3): bipartite merging.

    Plain PyTorch meaning, per batch row::

        dst[g]  = window g's token with the largest li (first max), else random / position 0
        cand    = every other token, ascending (tokens outside whole windows included)
        best, match = (normalize(metric[cand]) @ normalize(metric[dst]).T).max(-1)
        r = min(N - G, n_remove) // 16 * 16
        the r candidates with the largest best (ties: lower token) join their dst's row
    """
    grid, window, n_remove = _common_checks(metric, grid, n_remove, window, li, generator)
    resolve_backend(backend, metric.device, "plan_idm")
    tensors = ref_plans.idm_plan(metric, grid, n_remove, window=window, li=li, random_dst=bool(random_dst),
                                 generator=generator)
    return _wrap(tensors, metric.shape[1])


def plan_tome(metric, grid, n_remove, *, window=(2, 2), random_dst=True, generator=None,
              backend=None) -> MergePlan:
    """ToMe baseline plan (tomesd style) for comparison.

    Like ``plan_idm`` but the dst position of each window is drawn once and shared by the
    whole batch (``randint(K, (G,))``, or 0 without randomness) and exactly
    ``min(n_remove, N - G)`` tokens are merged (no rounding to 16).
    """
    grid, window, n_remove = _common_checks(metric, grid, n_remove, window, None, generator)
    resolve_backend(backend, metric.device, "plan_tome")
    tensors = ref_plans.tome_plan(metric, grid, n_remove, window=window, random_dst=bool(random_dst),
                                  generator=generator)
    return _wrap(tensors, metric.shape[1])
