"""sdtm_kernels: fast SDTM (Structure-then-Detail Token Merging) for diffusion transformers.

Public API::

    ratio_schedule(step, num_steps, ratio, deviation) -> float
    plan_ssm(metric, grid, n_remove, ...) -> MergePlan   # structure stage
    plan_idm(metric, grid, n_remove, ...) -> MergePlan   # detail stage
    plan_tome(metric, grid, n_remove, ...) -> MergePlan  # ToMe baseline
    MergePlan.merge / .unmerge / .update_li
    sdtm_kernels.ops        drop-in merge / prune / unmerge
    sdtm_kernels.reference  the pure-PyTorch reference

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
from .planning import plan_idm, plan_ssm, plan_tome, ratio_schedule  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "MergePlan",
    "plan_idm",
    "plan_ssm",
    "plan_tome",
    "ratio_schedule",
    "__version__",
]
