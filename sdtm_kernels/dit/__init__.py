"""SDTM for diffusion transformers: ``apply_sdtm`` / ``remove_sdtm`` for diffusers pipelines
and transformers (DiT, PixArt, SD3/SD3.5, Flux.1, Flux.2, Qwen-Image, Wan, HunyuanVideo; other DiTs by
``describe_block``), and ``SDTMBlockWrapper`` for your own DiT
blocks. Importing this package does not import diffusers (only ``apply_sdtm`` looks for it).

Modules: ``config`` (SDTMConfig, PRESETS), ``state`` (SDTMState: steps, schedule, li, cache,
statistics; its parts in ``steps``, ``buffers``, ``block_plans``), ``core`` (per-block decisions, merged
sub-layers), ``generic`` (user blocks), ``describe`` (other DiTs from a few-line block description:
``describe_block``), ``basic`` / ``sd3`` / ``flux`` / ``flux2`` / ``wan`` / ``qwen_image`` / ``hunyuan_video``
(diffusers block forwards), ``patch`` (apply/remove), ``registry`` (which blocks and token grids: the
families), ``pipelines`` (patched pipeline calls), ``parallel`` (context parallelism), ``hooks`` (the
diffusers hooks ``apply_sdtm`` registers; imports diffusers), ``summarize`` (``summary``: what is patched
and what the last generation did), ``adapters`` (LoRA weights).
"""
from .config import PRESETS, SDTMConfig
from .core import BlockContext, block_context, run_merged
from .describe import BlockDescription, attach_described, describe_block, described_blocks, forget_block
from .generic import SDTMBlockWrapper, attach_state, modulate, unwrap_dit_blocks, wrap_dit_blocks
from .patch import apply_sdtm, get_state, remove_sdtm, reset_sdtm
from .state import SDTMState
from .summarize import Summary, summary

__all__ = [
    "PRESETS",
    "BlockContext",
    "BlockDescription",
    "SDTMBlockWrapper",
    "SDTMConfig",
    "SDTMState",
    "Summary",
    "apply_sdtm",
    "attach_described",
    "attach_state",
    "block_context",
    "describe_block",
    "described_blocks",
    "forget_block",
    "get_state",
    "modulate",
    "remove_sdtm",
    "reset_sdtm",
    "run_merged",
    "summary",
    "unwrap_dit_blocks",
    "wrap_dit_blocks",
]
