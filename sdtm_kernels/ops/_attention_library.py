"""``torch.library`` registration of ``sdtm::attention_received`` (namespace ``sdtm``).

Takes an already resolved ``backend`` (``"reference"`` or ``"triton"``); the public wrapper in
``ops/attention.py`` validates and resolves it. Triton is imported inside the ``"triton"``
branch only. The fake implementation gives the shape for ``torch.compile`` and meta tensors.
"""
from typing import Optional

import torch
from torch import Tensor

from ..reference import attention as ref_attention
from ._score_library import _check_backend


@torch.library.custom_op("sdtm::attention_received", mutates_args=())
def attention_received(q: Tensor, k: Tensor, key_start: int, key_end: int, scale: Optional[float],
                       backend: str) -> Tensor:
    """float32 ``[B, end - start]`` = ``softmax(q @ k^T * scale, -1).mean((1, 2))[:, start:end]``."""
    _check_backend(backend)
    if backend == "triton":
        from ..csrc_triton import attention as kernels

        return kernels.attention_received(q, k, (key_start, key_end), scale=scale)
    return ref_attention.attention_received(q, k, (key_start, key_end), scale=scale, upcast=False).contiguous()


@attention_received.register_fake
def _(q, k, key_start, key_end, scale, backend):
    return q.new_empty((q.shape[0], key_end - key_start), dtype=torch.float32)
