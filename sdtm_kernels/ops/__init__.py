"""Drop-in ops: ``window_scores``, ``bipartite_match``, ``merge``, ``prune``, ``unmerge``,
``attention_received``.

Each takes a ``backend`` (``None``/``"auto"``, ``"reference"``, ``"triton"``); see
``sdtm_kernels.backend``. ``MergePlan.merge`` / ``MergePlan.unmerge`` call these.

``set_debug(True)`` (or the environment variable ``SDTM_DEBUG=1``) turns on the value checks
of plan indices on every device; they always run on CPU tensors (see ``ops.apply``).
"""
from .._validation import debug_enabled, set_debug  # noqa: F401 - public, not ops (not in __all__)
from .apply import merge, prune, unmerge
from .attention import attention_received
from .scores import bipartite_match, window_scores

__all__ = ["attention_received", "bipartite_match", "merge", "prune", "unmerge", "window_scores"]
