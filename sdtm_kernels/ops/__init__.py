"""Drop-in ops: ``window_scores``, ``bipartite_match``, ``merge``, ``prune``, ``unmerge``,
``attention_received``.

Each takes a ``backend`` (``None``/``"auto"``, ``"reference"``, ``"triton"``); see
``sdtm_kernels.backend``. ``MergePlan.merge`` / ``MergePlan.unmerge`` call these.
"""
from .apply import merge, prune, unmerge
from .attention import attention_received
from .scores import bipartite_match, window_scores

__all__ = ["attention_received", "bipartite_match", "merge", "prune", "unmerge", "window_scores"]
