"""Building blocks every patched DiT block uses: the per-block decision (``block_context``)
and the merge / unmerge of one sub-layer with the release's gated-cache rule.

A block calls ``ctx = block_context(state, layer, metric)`` once, with its attention-input
metric (the modulated ``norm1`` output), then for each sub-layer::

    inp = ctx.merge("attn", inp)                 # [B, M, C] when this sub-layer merges
    out = ctx.finish("attn", sublayer(inp), residual=x, gate=gate)   # x + gate * value, [B, N, C]

``attn``-like sub-layers ("attn", "attn2", "cross") merge on SSM steps only; "mlp" merges on
SSM and IDM steps (SPEC 3.5). On protected steps ``finish`` stores ``gate * value`` (full
length) as the layer's cache; on merged steps the blend uses it.

Dtypes (also under ``torch.autocast``): a sub-layer that does not merge computes exactly the
stock expression, operands in the stock order (``residual_first``), so its output is bit-identical
to the unpatched block's, memory layout included (the layout decides the rounding of the next
matmul). A merged sub-layer returns the dtype the stock ``residual + gate * value`` has
(PyTorch type promotion of gate, value and residual: PixArt's fp32 gates keep an fp32 residual
stream when autocast makes the sub-layer outputs bf16). Plans are built with autocast disabled,
so a plan depends on the metric only.
"""
import math
from typing import Optional

import torch

from .state import ATTENTION_SUBLAYERS, BlockSlot, SDTMState


class BlockContext:
    """What one block does at the current step: ``mode`` in ``"exact"``, ``"layer"``,
    ``"protected"``, ``"skip"``, ``"ssm"``, ``"idm"``; ``plan`` (``MergePlan`` or None).

    ``slot`` is the block's ``BlockSlot``. Statistics: in eager mode the record goes straight to
    ``state.stats``; in a compiled block it is a fresh dict filled in the graph and handed to
    ``end_call`` through the slot (no Python state the graph would have to guard on)."""

    def __init__(self, state: Optional[SDTMState], slot: Optional[BlockSlot], mode: str, plan=None,
                 num_tokens: int = 0):
        if state is not None and not isinstance(slot, BlockSlot):
            slot = state.slot(slot)  # a layer index
        self.state = state
        self.slot = slot
        self.mode = mode
        self.plan = plan
        self.num_tokens = num_tokens
        self.record = {}
        if state is not None:
            if torch.compiler.is_compiling():
                self.record = {"mode": mode}
                slot.traced = self.record
            else:
                self.record = {"step": state.step, "call": state.call, "layer": slot.layer, "mode": mode}
                if state.keep_plans:
                    self.record["plan"] = plan
                state.stats.append(self.record)

    @property
    def layer(self) -> int:
        return self.slot.layer

    @property
    def num_rows(self) -> int:
        return self.plan.num_rows if self.plan is not None else self.num_tokens

    def merges(self, sublayer: str) -> bool:
        """Whether ``sublayer`` runs on the merged rows at this step."""
        if self.plan is None or self.plan.num_rows == self.num_tokens:
            return False
        if sublayer in ATTENTION_SUBLAYERS:
            return self.mode == "ssm"
        return self.mode in ("ssm", "idm")

    def note(self, sublayer: str, tokens: int):
        self.record[sublayer] = tokens

    def merge(self, sublayer: str, x: torch.Tensor, prefix: int = 0, suffix: int = 0) -> torch.Tensor:
        """``x`` [B, N, C] -> the rows ``sublayer`` runs on ([B, M, C] when merging, else ``x``).
        ``prefix`` / ``suffix``: ``x`` is a joint sequence with that many rows (text tokens) before
        and after the image tokens; they are kept, in the same launch as the merge."""
        if self.merges(sublayer):
            self.note(sublayer, self.plan.num_rows)
            cfg = self.state.config
            return self.plan.merge(x, mode=cfg.merge_mode, backend=cfg.backend, prefix=prefix, suffix=suffix)
        self.note(sublayer, x.shape[1] - prefix - suffix)
        return x

    def unmerge(self, sublayer: str, y: torch.Tensor) -> torch.Tensor:
        """Plain copy back to full length (no residual, gate or cache), for side outputs."""
        if self.merges(sublayer):
            return self.plan.unmerge(y, backend=self.state.config.backend)
        return y

    def finish(self, sublayer: str, y: torch.Tensor, residual: torch.Tensor, gate=None,
               cache_names=None, residual_first: bool = True, prefix: int = 0, suffix: int = 0,
               addend=None) -> torch.Tensor:
        """``residual + gate * value`` at full length, ``value`` unmerged from ``y``.

        ``gate`` is ``[B, C]``, ``[B, 1, C]`` or None. With a cache (non-protected steps after a
        protected one) merged tokens take ``mcw * gate * value + (1 - mcw) * cache``: the
        release caches and blends *gated* outputs, so the unmerge epilogue gates the gathered rows
        before the blend (``gate_first``), in the same single pass. ``cache_names`` (default ``(sublayer,)``) names the
        caches whose sum is blended, for a merged output made of several cached parts.

        Without merging this is the stock expression: ``residual + gate * y``, or
        ``gate * y + residual`` with ``residual_first=False`` (diffusers' ``BasicTransformerBlock``),
        bit for bit. Merged, the result has the dtype of that expression (type promotion of
        ``gate``, ``y`` and ``residual``), whatever autocast made ``y``.

        ``prefix`` / ``suffix``: ``y`` and ``residual`` are joint sequences with that many rows
        around the image tokens (``[B, gate]`` gates only): those rows get ``residual + gate * y``
        in the same launch; caches cover the image tokens.

        ``addend`` (shaped like ``residual``): a second full-length output term of the block, gated
        too and never blended: ``residual + gate * addend + [the above]``, in the same launch when
        merging (else ``addcmul(residual, gate, addend)`` first: the residual the stock block adds).
        """
        if self.merges(sublayer):
            cfg = self.state.config
            gate2 = gate if gate is None or gate.dim() == 2 else gate.reshape(gate.shape[0], gate.shape[-1])
            # The cache holds the protected step's ``gate * value``: the gated dtype, which is not
            # the residual's when autocast makes ``y`` bf16 under an fp32 gate.
            span = residual if not (prefix or suffix) else residual.narrow(1, prefix, self.num_tokens)
            gated_dtype = y.dtype if gate is None or gate.dtype is y.dtype else torch.promote_types(gate.dtype, y.dtype)
            like = _like(span, gated_dtype)
            cache = None
            for name in cache_names or (sublayer,):
                part = self.state.get_cache(self.slot, name, like)
                if part is None:
                    cache = None
                    break
                cache = part if cache is None else cache + part
            return unmerge_sublayer(self.plan, y, residual, gate2, cache, cfg.mcw, cfg.backend, prefix, suffix,
                                    addend)
        if addend is not None:
            residual = residual + addend if gate is None else torch.addcmul(
                residual, gate.unsqueeze(1) if gate.dim() == 2 else gate, addend)
        gated = y if gate is None else gate_times(gate, y)
        if self.mode == "protected":
            self.state.set_cache(self.slot, sublayer, gated.narrow(1, prefix, gated.shape[1] - prefix - suffix)
                                 if prefix or suffix else gated)
        return residual + gated if residual_first else gated + residual


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype is dtype else t.to(dtype)


def _like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A storage-free stand-in with ``t``'s shape and device and ``dtype`` (for cache checks)."""
    if t.dtype == dtype:
        return t
    return torch.empty((), dtype=dtype, device=t.device).expand(t.shape)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``: it is disabled while plans are built (autocast
    would run the reference scores' matmuls in bf16/fp16, so the plan would depend on the
    autocast region)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type without autocast
        return False


def gate_times(gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``gate * y`` with the diffusers broadcasting: ``[B, C]`` gates are unsqueezed."""
    if gate.dim() == 2:
        return gate.unsqueeze(1) * y
    return gate * y


def gather_entries(table, dim: int, rep, prefix: int, end: int):
    """``cat([table[:prefix], table[prefix:end][rep], table[end:]])`` along ``dim``: per-token entries
    (rotary tables, attention masks) for ``[prefix, merged rows, rest]``, ``rep`` the merged rows'
    representative tokens. Eager inference: one launch, a gather into a buffer that holds
    the fixed entries, made once per ``table`` (a tensor of this call) and merged length and reused
    by every block: each block's gather overwrites the merged part before its attention reads it."""
    middle = table.narrow(dim, prefix, end - prefix)
    rows, tail = rep.shape[0], table.shape[dim] - end
    if not prefix and not tail:
        return middle.index_select(dim, rep)
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        parts = (table.narrow(dim, 0, prefix), middle.index_select(dim, rep), table.narrow(dim, end, tail))
        return torch.cat([part for part in parts if part.shape[dim]], dim=dim)
    buffers = getattr(table, "_sdtm_gathered", None)  # lives and dies with the call's tensor
    if buffers is None:
        buffers = table._sdtm_gathered = {}
    buffer = buffers.get((prefix, end, rows))
    if buffer is None:  # one launch: the fixed entries around any `rows` entries the gathers overwrite
        parts = (table.narrow(dim, 0, prefix), middle.narrow(dim, 0, rows), table.narrow(dim, end, tail))
        buffer = buffers[prefix, end, rows] = torch.cat([part for part in parts if part.shape[dim]], dim=dim)
    torch.index_select(middle, dim, rep, out=buffer.narrow(dim, prefix, rows))
    return buffer


def block_context(state: Optional[SDTMState], layer, metric: torch.Tensor, *, shared: bool = False,
                  received=None):
    """Decide what the block does now and build its plan from ``metric`` [B, N, C].

    ``layer`` is the block's ``BlockSlot`` (patched diffusers blocks: ``block._sdtm_slot``) or its
    layer index. The decision reads only what ``SDTMState.begin_call`` prepared for this call
    (the slot's mode, the call's removal count), never the step index: a compiled block meets
    the same values at every step of the same kind.
    ``shared=True`` builds one plan for the whole batch from the batch-mean metric (models
    whose positional embeddings are shared across the batch, e.g. Flux's rotary tables).
    ``received``: a callable returning the float32 ``[B, N]`` attention each image token
    receives from the prompt (``JointAttention.received``), called only on IDM steps with
    ``idm_score="attention"`` (batch-averaged for a shared plan).
    """
    num_tokens = metric.shape[1]
    if state is None or not state.active:
        return BlockContext(None, None, "exact", num_tokens=num_tokens)
    slot = layer if isinstance(layer, BlockSlot) else state.slot(layer)
    if state.grid is None or math.prod(state.grid) != num_tokens:
        return BlockContext(state, slot, "exact", num_tokens=num_tokens)
    mode = slot.mode
    if mode == "layer":
        state.reset_li()
    if mode not in ("ssm", "idm"):
        return BlockContext(state, slot, mode, num_tokens=num_tokens)
    if state.config.min_saving and state.block_saving(mode, num_tokens, metric.shape[-1]) < state.config.min_saving:
        return BlockContext(state, slot, "skip", num_tokens=num_tokens)  # would not pay for its plan
    batch = metric.shape[0]
    source = metric.detach()
    if shared and batch > 1:
        source = source.mean(dim=0, keepdim=True)
    statistic = None
    if mode == "idm" and state.config.idm_score == "attention":
        if received is None:
            raise ValueError("idm_score='attention' needs a block with joint text-image attention (SD3, Flux); "
                             "this block has none")
        statistic = received().detach()
        if statistic.shape[0] != source.shape[0]:
            statistic = statistic.mean(dim=0, keepdim=True)
    device_type = "cuda" if source.is_cuda else source.device.type
    if _autocast_on(device_type):
        with torch.autocast(device_type, enabled=False):
            plan = state.build_plan(source, mode, batch, received=statistic, layer=slot)
    else:
        plan = state.build_plan(source, mode, batch, received=statistic, layer=slot)
    ctx = BlockContext(state, slot, mode, plan, num_tokens=num_tokens)
    if statistic is not None and state.keep_plans:
        ctx.record["received"] = statistic
    return ctx


def unmerge_sublayer(plan, y, residual, gate=None, cache=None, mcw: float = 1.0, backend=None, prefix: int = 0,
                     suffix: int = 0, addend=None):
    """``residual + unmerge(gate * y)`` (``gate`` ``[B, C]`` or None) with the gated-cache blend
    when ``cache`` (the full-length ``gate * value``) is given. The result has the dtype of the
    stock ``residual + gate * value`` (type promotion of the three: under autocast ``y`` is bf16
    while a gate, and then the residual stream, may stay fp32); the epilogue computes in fp32."""
    y_dtype, residual_dtype = y.dtype, residual.dtype  # dtype promotion only where the dtypes differ
    gated_dtype = y_dtype if gate is None or gate.dtype is y_dtype else torch.promote_types(gate.dtype, y_dtype)
    out_dtype = gated_dtype if residual_dtype is gated_dtype else torch.promote_types(gated_dtype, residual_dtype)
    if residual_dtype is not out_dtype:
        residual = residual.to(out_dtype)
    if y_dtype is not out_dtype:
        y = y.to(out_dtype)
    if addend is not None:
        addend = _to(addend, out_dtype)
    if cache is None:
        return plan.unmerge(y, residual=residual, gate=gate, backend=backend, prefix=prefix, suffix=suffix,
                            addend=addend)
    # The cache holds gated values: one fused pass gates the gathered rows, then blends.
    return plan.unmerge(y, residual=residual, gate=gate, cache=_to(cache, out_dtype), mcw=mcw, gate_first=True,
                        backend=backend, prefix=prefix, suffix=suffix, addend=addend)


def run_merged(plan, fn, inp, residual, gate=None, cache=None, mcw: float = 1.0, mode: str = "mean",
               backend=None):
    """One merged sub-layer as a pure function (no state): ``residual + unmerge(gate * fn(merge(inp)))``
    with the gated-cache blend, in the dtype of the stock ``residual + gate * value``.
    ``torch.compile(fullgraph=True)`` traces it without breaks."""
    y = fn(plan.merge(inp, mode=mode, backend=backend))
    return unmerge_sublayer(plan, y, residual, gate=gate, cache=cache, mcw=mcw, backend=backend)
