"""Pure-PyTorch reference of SDTM (Structure-then-Detail Token Merging).

Readable, unoptimised and free of Triton: the source of truth that the Triton kernels in
``sdtm_kernels.csrc_triton`` are tested against. Installed as ``sdtm_kernels.reference``.

Modules:
    schedule    ratio schedule and the rounding rules of the released code
    windows     token <-> window index arithmetic for any H x W or T x H x W grid
    similarity  cosine normalisation, window scores, bipartite matching
    plans       SSM, IDM and ToMe plan builders returning ``PlanTensors``
    attention   attention received by keys (explicit softmax), the paper's IDM score
    merge       merge (mean), prune, unmerge with the fused epilogue, ``li`` update
"""
from .attention import attention_received, idm_attention_score, inattention_priority
from .merge import merge_mean, prune, unmerge, update_li
from .plans import PlanTensors, assemble_plan, idm_attention_plan, idm_plan, ssm_plan, tome_plan
from .schedule import (
    idm_tokens_to_merge,
    ratio_schedule,
    ssm_windows_to_merge,
    tokens_removed,
    tokens_requested,
)
from .similarity import bipartite_match, normalize_tokens, window_scores
from .windows import grid_3d, num_windows, window_grid, window_size, window_token_index

__all__ = [
    "PlanTensors",
    "assemble_plan",
    "attention_received",
    "bipartite_match",
    "grid_3d",
    "idm_attention_plan",
    "idm_attention_score",
    "idm_plan",
    "idm_tokens_to_merge",
    "inattention_priority",
    "merge_mean",
    "normalize_tokens",
    "num_windows",
    "prune",
    "ratio_schedule",
    "ssm_plan",
    "ssm_windows_to_merge",
    "tokens_removed",
    "tokens_requested",
    "tome_plan",
    "unmerge",
    "update_li",
    "window_grid",
    "window_scores",
    "window_size",
    "window_token_index",
]
