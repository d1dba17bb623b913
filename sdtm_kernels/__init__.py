"""sdtm_kernels: fast SDTM (Structure-then-Detail Token Merging) for diffusion transformers.

Public API::

    ratio_schedule(step, num_steps, ratio, deviation) -> float
    plan_ssm(metric, grid, n_remove, ...) -> MergePlan   # structure stage
    plan_idm(metric, grid, n_remove, ...) -> MergePlan   # detail stage
    plan_idm_attention(metric, grid, n_remove, received, ...) -> MergePlan  # paper's IDM
    plan_tome(metric, grid, n_remove, ...) -> MergePlan  # ToMe baseline
    MergePlan.merge / .unmerge / .update_li
    sdtm_kernels.ops        drop-in merge / prune / unmerge
    sdtm_kernels.reference  the pure-PyTorch reference
    apply_sdtm(pipe_or_model, ...) / remove_sdtm(...)   DiT wrapper (sdtm_kernels.dit; lazy)
    SDTMConfig, PRESETS

Importing this package imports neither triton nor diffusers.
"""
import os as _os

# In a source checkout ``reference/`` and ``csrc_triton/`` sit beside this folder; installed,
# setup.py puts them inside it. Let ``sdtm_kernels.reference`` resolve in both layouts.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "reference")):
    _checkout = _os.path.dirname(_here)
    if _os.path.isfile(_os.path.join(_checkout, "reference", "__init__.py")):
        __path__.append(_checkout)  # noqa: F821 - package __path__

from .backend import BackendUnavailableError  # noqa: E402
from .plan import MergePlan  # noqa: E402
from .planning import plan_idm, plan_idm_attention, plan_ssm, plan_tome, ratio_schedule  # noqa: E402

__version__ = "0.1.0"

# The DiT wrapper is loaded on first use so that ``import sdtm_kernels`` stays light.
_LAZY_DIT = ("apply_sdtm", "remove_sdtm", "summary", "SDTMConfig", "PRESETS")


def __getattr__(name):
    if name in _LAZY_DIT:
        from . import dit

        return getattr(dit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "PRESETS",
    "SDTMConfig",
    "apply_sdtm",
    "MergePlan",
    "plan_idm",
    "plan_idm_attention",
    "plan_ssm",
    "plan_tome",
    "ratio_schedule",
    "remove_sdtm",
    "summary",
    "__version__",
]
