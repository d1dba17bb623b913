"""One SD3-medium-sized joint block, unpatched and patched per step kind (step 3; step 1 uses
the same harness to compare the Triton and reference backends on the block).

The block is block 0 of a random-weight diffusers ``SD3Transformer2DModel`` with 2 layers (the
single block of a 1-layer model is ``context_pre_only``, i.e. not a typical block), built by
``bench.BenchModel``; without diffusers the package's own DiT (``small_dit``) stands in. The
block's inputs are captured from one model call and the block is then called on its own. A step
kind is entered by driving the SDTM state through the released preset's schedule
(``state.begin_call`` per step, one block call per step so that the cache and ``li`` are real).
At 28 steps: step 0 is protected, step 1 the heaviest SSM step, step 13 the first IDM step.
"""
import time

import torch

from .. import bench
from .timing import is_cuda, sync

PRESET = "released"  # switch after 0.4 of the steps; steps 0, 3, 6, ... protected


def step_of_kind(schedule_steps):
    """The first step of each kind in the preset's schedule: protected (0), SSM, IDM."""
    from ..dit.config import make_config

    config = make_config(PRESET, num_steps=schedule_steps)
    switch = config.switch_index(schedule_steps)
    merged = [s for s in range(schedule_steps) if s % config.protect_steps]
    return {"protected": 0, "ssm": merged[0], "idm": next(s for s in merged if s > switch)}


RANGE_NAME = "gpu_check::block"


def _detach_clone(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def image_output(out):
    """The image-token output of a block call (SD3 blocks return ``(text, image)``)."""
    return out[1] if isinstance(out, tuple) else out


class BlockHarness:
    """A model whose block 0 is called on its own with captured inputs, patched or not."""

    def __init__(self, block_spec, device, dtype, schedule_steps, seed=0):
        spec_args = dict(block_spec)
        if spec_args["family"] == "sd3" and not bench.have_diffusers():
            spec_args["family"] = "dit"
        self.spec = bench.make_spec(**spec_args)
        self.device = torch.device(device)
        self.bm = bench.BenchModel(self.spec, device, dtype, batch=1, seed=seed)
        model = self.bm.model
        self.sd3 = self.spec["family"] == "sd3"
        self.blocks = model.transformer_blocks if self.sd3 else model.blocks
        self.text_len = self.spec["text_len"] if self.sd3 else None
        self.args, self.kwargs = self._capture_inputs(seed)
        self.state = None
        self.schedule_steps = schedule_steps
        self.step_of_kind = step_of_kind(schedule_steps)

    def _capture_inputs(self, seed):
        captured = {}

        def hook(module, args, kwargs):
            captured["args"] = tuple(_detach_clone(a) for a in args)
            captured["kwargs"] = {k: _detach_clone(v) for k, v in kwargs.items()}

        gen = torch.Generator().manual_seed(seed + 1)
        latent = self.spec["latent"]
        noise = torch.randn(1, self.spec["in_channels"], latent, latent, generator=gen)
        noise = noise.to(self.device, self.bm.dtype)
        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.bm.forward(torch.cat([noise, noise]), torch.full((2,), 999.0, device=self.device))
        finally:
            handle.remove()
        return captured["args"], captured["kwargs"]

    @property
    def num_tokens(self):
        return self.spec["num_tokens"]

    def call(self):
        with torch.no_grad():
            return self.blocks[0](*self.args, **self.kwargs)  # the list entry: patching may replace it

    def patch(self, backend=None):
        self.state = self.bm.patch(PRESET, backend, self.schedule_steps)
        return self.state

    def unpatch(self):
        self.bm.unpatch()
        self.state = None

    def run_schedule(self, until_kind, outputs=None):
        """Run the schedule from step 0 up to ``until_kind``'s step, one block call per step
        (``outputs[kind]``: the image output at each kind's step on the way). The state stays on
        that step, so every later ``call()`` runs that step kind again."""
        state = self.state
        state.reset(num_steps=self.schedule_steps)
        kind_at = {step: kind for kind, step in self.step_of_kind.items()}
        for step in range(self.step_of_kind[until_kind] + 1):
            state.begin_call(1000.0 - step, self.spec["grid"], text_len=self.text_len)
            out = self.call()
            if outputs is not None and step in kind_at:
                outputs[kind_at[step]] = image_output(out).float()
        state.stats.clear()


# -- step 3 ------------------------------------------------------------------------------------
def _profile(call, iterations, device):
    """Kernels launched, their GPU time and the host time per call, from ``torch.profiler``."""
    from torch.autograd import DeviceType

    activities = [torch.profiler.ProfilerActivity.CPU]
    if is_cuda(device):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iterations):
            with torch.profiler.record_function(RANGE_NAME):
                call()
        sync(device)
    events = prof.events()
    device_events = [e for e in events if e.device_type != DeviceType.CPU and e.name != RANGE_NAME
                     and not getattr(e, "is_user_annotation", False)]  # kernels, memcpy, memset
    ranges = [e for e in events if e.name == RANGE_NAME and e.device_type == DeviceType.CPU]
    aten = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    copies = [e for e in device_events if e.name.lower().startswith(("memcpy", "memset"))]
    return {
        "kernels_per_block": len(device_events) / iterations,
        "memcpy_memset_per_block": len(copies) / iterations,
        "kernel_gpu_us_per_block": sum(e.time_range.elapsed_us() for e in device_events) / iterations,
        "profiled_cpu_us_per_block": sum(e.time_range.elapsed_us() for e in ranges) / max(len(ranges), 1),
        "aten_ops_per_block": len(aten) / iterations,
    }


def _time(call, iterations, device):
    """Host time to issue one call (no sync inside the loop) and device time per call (CUDA events
    around back-to-back calls); on CPU both are the wall time."""
    sync(device)
    start_event = end_event = None
    if is_cuda(device):
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_event.record()
    t0 = time.perf_counter()
    for _ in range(iterations):
        call()
    host_us = (time.perf_counter() - t0) / iterations * 1e6
    if end_event is not None:
        end_event.record()
        end_event.synchronize()
        device_us = start_event.elapsed_time(end_event) * 1e3 / iterations
    else:
        device_us = host_us
    return {"host_us_per_block": host_us, "device_us_per_block": device_us}


def block_profile(sizes, device, deadline):
    """Step 3: unpatched vs patched (protected, SSM, IDM) block: kernels, GPU and CPU time."""
    harness = BlockHarness(sizes.block, device, sizes.dtype, sizes.schedule_steps)
    iterations = sizes.block_iterations
    result = {"model": f"{harness.spec['family']} block 0 of {harness.spec['layers']}, C={harness.spec['width']}, "
                       f"{harness.spec['heads']} heads, N={harness.num_tokens} image + {harness.text_len or 0} text "
                       f"tokens, batch 2 (CFG), {str(sizes.dtype).replace('torch.', '')}",
              "iterations": iterations, "preset": PRESET, "schedule_steps": harness.schedule_steps,
              "step_of_kind": harness.step_of_kind, "runs": {}}
    for _ in range(2):
        harness.call()  # warm-up (cuBLAS handles, SDPA kernel choice) outside the numbers
    runs = result["runs"]
    runs["unpatched"] = {**_time(harness.call, iterations, device), **_profile(harness.call, iterations, device)}
    harness.patch(None)  # the default backend: Triton on CUDA
    result["backend"] = bench.resolved_backend(None, device)
    try:
        for kind in harness.step_of_kind:
            if time.perf_counter() > deadline:
                runs[kind] = {"skipped": "step budget spent"}
                continue
            harness.run_schedule(kind)
            harness.call()  # warm-up of this kind's kernels (JIT) outside the numbers
            record = {**_time(harness.call, iterations, device), **_profile(harness.call, iterations, device)}
            stats = harness.state.stats[-1] if harness.state.stats else {}
            record.update(mode=stats.get("mode"), attn_tokens=stats.get("attn"), mlp_tokens=stats.get("mlp"))
            runs[kind] = record
    finally:
        harness.unpatch()
    base = runs["unpatched"]
    for kind in harness.step_of_kind:
        run = runs[kind]
        if "skipped" in run:
            continue
        run["added_kernels"] = run["kernels_per_block"] - base["kernels_per_block"]
        run["gpu_time_ratio"] = run["kernel_gpu_us_per_block"] / max(base["kernel_gpu_us_per_block"], 1e-9)
        run["host_time_ratio"] = run["host_us_per_block"] / max(base["host_us_per_block"], 1e-9)
        run["speedup_device"] = base["device_us_per_block"] / max(run["device_us_per_block"], 1e-9)
    return result
