"""The per-call buffers of ``SDTMState``: the ``li`` counters, the step's random dst draws and
their generator, the blocks' caches (``BlockSlot``: one block's view of them) and the stacked
rotary table.

Compile and CUDA graphs (docs/SEMANTICS.md, "Compiled models"): ``li`` lives in one static
``[B, N]`` buffer per call index, updated in place; the draws are made in place into a static
``[layers, B, G]`` buffer, one row per layer; the caches become static buffers (updated in place
by ``end_call``) once a compiled call wrote them.
"""
import operator

import torch

from ..reference import windows as ref_windows

DEFAULT_SEED = 0


class BlockSlot:
    """One patched block's view of the current call, written by ``SDTMState.begin_call``.

    ``mode``: the block's mode at this step before the block's own rule (``"protected"``,
    ``"layer"``, ``"ssm"``, ``"idm"``, or ``"exact"`` without a step context). ``draw``: this
    layer's row of the step's random dst draws (a view of a static buffer) or None. ``cache``:
    ``{sub-layer: gated output}`` of the last protected step of this call index. ``fresh``:
    what a protected step of the current call stored, adopted into ``cache`` by ``end_call``.
    ``traced``: the statistics record a compiled run of the block filled (collected by ``end_call``).
    """

    def __init__(self, layer: int):
        self.layer = layer
        self.mode = "exact"
        self.draw = None
        self.cache = {}
        self.fresh = {}
        self.traced = None
        self.plan = None  # keep_plans: the last plan (debugging)
        self._caches = {}  # call index -> cache (cleared at a new generation)
        self._static = {}  # (call index, sub-layer) -> static cache buffer (compiled calls; kept)

    def __getstate__(self):
        return {"layer": self.layer}

    def __setstate__(self, values):
        self.__init__(values["layer"])

    def __repr__(self):
        return f"BlockSlot(layer={self.layer}, mode={self.mode!r})"


class CallBuffers:
    """``SDTMState``'s ``li`` buffers, draws, generator, caches and rotary table. Kept across
    generations: ``_li_buffers`` (call index -> static int32 ``[B, N]`` buffer), ``_li_written``
    (call index -> whether its buffer may hold non-zero counters), ``_draw_buffer``; the rest is
    per generation (``_reset_buffers``)."""

    def _reset_buffers(self):
        """The buffers' state of a new generation (``SDTMState.reset``): fresh li, no draw, no cache."""
        self.li_now = None  # this call's li buffer
        self.li_fresh = True  # no block of this call index wrote li yet in this generation
        self._li_fresh = {}
        self._rotary = None
        self._draw_key = None
        self.generator = None
        for slot in getattr(self, "slots", ()):
            slot._caches = {}
            slot.cache = {}

    # -- li --------------------------------------------------------------------------------
    def _li_buffer(self, batch, num_tokens, device):
        """This call index's static li buffer, zeroed at the start of a generation (zeros and
        "no li" give the same structure plans; the detail stage tells them apart by ``li_fresh``)."""
        buf = self._li_buffers.get(self.call)
        if buf is None or tuple(buf.shape) != (batch, num_tokens) or buf.device != device:
            buf = torch.zeros(batch, num_tokens, dtype=torch.int32, device=device)
            _mark_static(buf)
            self._li_buffers[self.call] = buf
            self._li_fresh[self.call] = self.li_fresh = True
        elif self.li_fresh and self._li_written.get(self.call):
            buf.zero_()
        self._li_written[self.call] = not self.li_fresh
        return buf

    def reset_li(self):
        """A protected layer: the next blocks start without li."""
        if self.li_now is not None and self._li_written.get(self.call):
            self.li_now.zero_()
            self._li_written[self.call] = False
        self.li_fresh = True

    @property
    def li(self) -> dict:
        """``{call: li}`` of the call indices that have a counter in this generation (a view)."""
        return {call: buf for call, buf in self._li_buffers.items() if not self._li_fresh.get(call, True)}

    # -- random dst draws ------------------------------------------------------------------
    def _ensure_generator(self, device):
        if self.generator is None or self.generator.device != device:
            cfg = self.config
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(DEFAULT_SEED if cfg.seed is None else cfg.seed)

    def _draws_needed(self, batch: int) -> bool:
        cfg = self.config
        if not (cfg.random_dst and batch % 2 == 0 and cfg.ratio != 0.0):
            return False
        # IDM takes its dsts from li when this pass has one
        return self.mode == "ssm" or (self.mode == "idm" and self.li_fresh)

    def _draw_step(self, batch: int, device):
        """One ``randint(K, (layers, batch, G))`` for every block of this call, drawn in place into a
        static buffer (row ``l``: layer ``l``; a plan shared by the batch takes its first row)."""
        window = self.window
        shape = (max(self.num_layers, len(self.slots), 1), batch, ref_windows.num_windows(self.plan_grid, window))
        key = (self.step, self.call, shape, device)
        if self._draw_key == key:
            return
        self._block_plans = {}  # their draws are checked against the buffer
        buf = self._draw_buffer
        if buf is None or tuple(buf.shape) != shape or buf.device != device:
            buf = torch.empty(shape, dtype=torch.int64, device=device)
            _mark_static(buf)
            self._draw_buffer = buf
        if self.generator.device == device:
            torch.randint(ref_windows.window_size(window), shape, generator=self.generator, device=device, out=buf)
        else:
            buf.copy_(torch.randint(ref_windows.window_size(window), shape, generator=self.generator,
                                    device=self.generator.device))
        self._draw_key = key
        for slot in self.slots:
            slot.draw = buf[min(slot.layer, shape[0] - 1)]

    def _slot_draw(self, slot, metric):
        """The block's random dst positions ``[b, G]`` (its row of the step's draw)."""
        if torch.compiler.is_compiling():  # begin_call drew them (a compiled model has the hook)
            return slot.draw[: metric.shape[0]]
        if slot.draw is None or slot.draw.shape[0] < metric.shape[0] or slot.draw.device != metric.device \
                or self._draw_key is None or self._draw_key[:2] != (self.step, self.call):
            self._draw_step(metric.shape[0], metric.device)  # not drawn in begin_call (user models)
        return slot.draw[: metric.shape[0]]

    # -- cache -----------------------------------------------------------------------------
    @property
    def cache(self) -> dict:
        """``{(call, layer, sub-layer): cached gated output}`` (a read-only view of the slots)."""
        return {(call, slot.layer, name): value for slot in self.slots
                for call, entries in slot._caches.items() for name, value in entries.items()}

    def get_cache(self, layer, name: str, like: torch.Tensor):
        slot = self._slot_of(layer)
        cache = slot.cache.get(name)
        if cache is None or cache.shape != like.shape or cache.dtype != like.dtype or cache.device != like.device:
            return None
        return cache

    def set_cache(self, layer, name: str, value: torch.Tensor):
        slot = self._slot_of(layer)
        slot.fresh[name] = value.detach()  # adopted by end_call (a fresh dict: nothing to guard on)

    def _adopt_fresh(self, slot):
        """``end_call``: the caches a protected step of ``slot`` stored become its cache (copied into
        static buffers after a compiled call)."""
        compiled = slot.traced is not None
        for name, value in slot.fresh.items():
            if compiled:
                value = slot._static[(self.call, name)] = _adopt(slot._static.get((self.call, name)), value)
            slot.cache[name] = value
        slot.fresh = {}

    # -- rotary ----------------------------------------------------------------------------
    def stacked_rotary(self, rotary):
        """``torch.stack(rotary)`` (Flux's ``(cos, sin)`` table), computed once per transformer call
        in eager mode and reused by every block of the call (the blocks receive the same tensors);
        a compiled model stacks in its graph (no identity checks there)."""
        if torch.compiler.is_compiling():
            return torch.stack(rotary)
        cached = self._rotary
        if cached is None or len(cached[0]) != len(rotary) or not all(map(operator.is_, cached[0], rotary)):
            self._rotary = cached = (tuple(rotary), torch.stack(rotary))
        return cached[1]


def _mark_static(tensor):
    """A buffer updated in place at a fixed address (CUDA graphs need no copy of it)."""
    if torch.compiler.is_compiling():  # made inside a graph (a user model without batch/device)
        return
    try:
        torch._dynamo.mark_static_address(tensor)
    except Exception:  # noqa: BLE001 - an optional hint; a torch without it works the same
        pass


def _adopt(buffer, value):
    """The cache entry after a compiled protected step stored ``value`` (an output a CUDA graph
    may overwrite at its next replay): a copy into a static buffer, updated in place from then on."""
    if buffer is not None and buffer.shape == value.shape and buffer.dtype == value.dtype \
            and buffer.device == value.device and buffer.is_contiguous() and buffer is not value:
        return buffer.copy_(value)
    buffer = value.clone(memory_format=torch.contiguous_format)
    _mark_static(buffer)
    return buffer
