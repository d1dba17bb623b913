"""Drop-in ops on plan tensors: ``merge``, ``prune``, ``unmerge``.

Each takes a ``backend`` (``None``/``"auto"``, ``"reference"``, ``"triton"``); see
``sdtm_kernels.backend``. ``MergePlan.merge`` / ``MergePlan.unmerge`` call these.
"""
from .apply import merge, prune, unmerge

__all__ = ["merge", "prune", "unmerge"]
