"""Worker of tests/test_context_parallel.py: diffusers' context parallelism on 2 CPU processes
over gloo for Flux.1, Wan, Qwen-Image and Flux.2, with and without SDTM, and the single-process
runs they are compared with.

``python tests/cp_worker.py OUT_DIR`` runs rank 0 and spawns rank 1 (no torchrun: the rendezvous
is set in the environment); each writes ``OUT_DIR/rank{r}.pt``: ``{scenario: {"outputs", "stats", "collectives",
"warnings"} or {"error": message}}``. CPU specifics: ``torch.accelerator.device_count`` reports 1
(diffusers takes ``rank % device_count`` for the device), and Ring attention needs a backend that
returns the log-sum-exp, which no diffusers backend does on CPU ("native" refuses ``return_lse``,
"_native_flash" calls a CUDA-only aten op): the worker gives "_native_flash" a forward op built on
torch's CPU flash attention (``_scaled_dot_product_flash_attention_for_cpu``, out and LSE).
"""
import datetime
import os
import socket
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the checkout, not an installed copy

DEGREE = 2
GRID = (16, 16)  # image tokens; 8 x 16 per rank
TEXT = 6  # prompt tokens; 3 per rank
BATCH = 2
HEADS, HEAD_DIM = 2, 16
TIMESTEPS = [1.0, 0.85, 0.7, 0.55, 0.4, 0.25]
SDTM = dict(num_steps=len(TIMESTEPS), ratio=0.5, deviation=0.1, protect_steps=3, switch_step=0.4)
ODD_GRID = (5, 8)  # 40 tokens: 20 per rank, not whole rows
SMALL_GRID = (4, 8)  # 2 x 8 per rank: too small for the schedule to merge


def flux(seed=0):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)).eval()


def inputs(grid=GRID):
    generator = torch.Generator().manual_seed(1)
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None]
    return dict(hidden_states=torch.randn(BATCH, h * w, 16, generator=generator),
                encoder_hidden_states=torch.randn(BATCH, TEXT, 16, generator=generator),
                pooled_projections=torch.randn(BATCH, 8, generator=generator),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TEXT, 3))


def generation(model, grid=GRID, timesteps=TIMESTEPS):
    """An Euler loop over ``timesteps``: the transformer output of every step, the collectives of
    every call and the warnings raised."""
    kwargs = inputs(grid)
    outputs, collectives = [], []
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for i, t in enumerate(timesteps):
            RECORD.clear()
            out = model(timestep=torch.full((BATCH,), t), return_dict=False, **kwargs)[0]
            collectives.append(list(RECORD))
            outputs.append(out.clone())
            step = (timesteps[i + 1] if i + 1 < len(timesteps) else 0.0) - t
            kwargs["hidden_states"] = kwargs["hidden_states"] + step * out
    messages = sorted({str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                       and "SDTM" in str(w.message)})
    return outputs, collectives, messages


def stats(model):
    from sdtm_kernels.dit import get_state

    state = get_state(model)
    if state is None:
        return []
    return [(r["step"], r["layer"], r["mode"], r.get("attn"), r.get("mlp")) for r in state.stats]


# -- collectives, counted where diffusers calls them ------------------------------------------------
RECORD = []


def _count_collectives():
    import torch.distributed._functional_collectives as funcol
    from diffusers.models import attention_dispatch

    all_to_all, all_gather = attention_dispatch._all_to_all_single, funcol.all_gather_tensor

    def counted_all_to_all(x, group):
        RECORD.append(("all_to_all", tuple(x.shape)))
        return all_to_all(x, group)

    def counted_all_gather(x, *args, **kwargs):
        RECORD.append(("all_gather", tuple(x.shape)))
        return all_gather(x, *args, **kwargs)

    attention_dispatch._all_to_all_single = counted_all_to_all
    funcol.all_gather_tensor = counted_all_gather


def _cpu_flash_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' ``_native_flash`` forward op on CPU: ``(B, S, H, D)`` in, out and LSE ``(B, S, H)``."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p, is_causal, scale=scale)
    out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    return (out, lse) if return_lse else out


# -- scenarios -------------------------------------------------------------------------------------
def cp_config(attention, **extra):
    from diffusers import ContextParallelConfig

    degree = {"ulysses_degree": DEGREE} if attention == "ulysses" else {"ring_degree": DEGREE}
    return ContextParallelConfig(**degree, **extra)


def parallel_run(attention, order=None, extra_calls=False, **options):
    """Flux under context parallelism; ``order``: SDTM applied "before" / "after" enable_parallelism
    (None: no SDTM)."""
    import sdtm_kernels as sk
    from sdtm_kernels.dit import reset_sdtm

    model = flux()
    if attention == "ring":
        model.set_attention_backend("_native_flash")
    if order == "before":
        sk.apply_sdtm(model, **{**SDTM, **options})
    model.enable_parallelism(config=cp_config(attention))
    if order == "after":
        sk.apply_sdtm(model, **{**SDTM, **options})
    outputs, collectives, messages = generation(model)
    result = {"outputs": outputs, "stats": stats(model), "collectives": collectives, "warnings": messages}
    if extra_calls:  # grids SDTM cannot merge on under 2 ranks: warned, run exactly
        for name, grid in (("odd", ODD_GRID), ("small", SMALL_GRID)):
            reset_sdtm(model)
            result[name] = dict(zip(("outputs", "collectives", "warnings"), generation(model, grid, TIMESTEPS[:3])))
            result[name]["stats"] = stats(model)
    return result


def refusal(build):
    try:
        build()
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        return {"error": f"{type(error).__name__}: {error}"}
    return {"error": None}


def refuse_sd3(order):
    import diffusers
    from diffusers.models._modeling_parallel import ContextParallelInput

    import sdtm_kernels as sk

    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                            pos_embed_max_size=16)
    plan = {"transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)}}
    if order == "before":
        sk.apply_sdtm(model, num_steps=2)
    model.enable_parallelism(config=cp_config("ulysses"), cp_plan=plan)
    if order == "after":
        sk.apply_sdtm(model, num_steps=2)
    with torch.no_grad():
        model(hidden_states=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 4, 16),
              pooled_projections=torch.randn(1, 8), timestep=torch.ones(1))


def refuse_flux(**options):
    import sdtm_kernels as sk

    model = flux()
    cp_options = {"ulysses_anything": True} if options.pop("anything", False) else {}
    model.enable_parallelism(config=cp_config("ulysses", **cp_options))
    sk.apply_sdtm(model, **{**SDTM, **options})


def single_process(**options):
    """The same generation on one process (before the process group exists)."""
    import sdtm_kernels as sk

    model = flux()
    if options:
        sk.apply_sdtm(model, **{**SDTM, **options})
    outputs, _, messages = generation(model)
    result = {"outputs": outputs, "stats": stats(model), "warnings": messages}
    if not options:
        result["odd"] = {"outputs": generation(model, ODD_GRID, TIMESTEPS[:3])[0]}
        result["small"] = {"outputs": generation(model, SMALL_GRID, TIMESTEPS[:3])[0]}
    return result


# -- the families added after Flux.1: Wan, Qwen-Image, Flux.2 ----------------------------------------
# Tiny random models from the family test files, on grids whose 2-rank slabs merge at SSM and IDM
# steps. diffusers' plans split Flux.2 at the transformer's inputs (the hook reads the rank's slab
# from its img_ids rows) and Wan / Qwen-Image at their first block (the hook cuts the global grid).
FAMILY_SDTM = dict(num_steps=5, ratio=0.5, deviation=0.1, protect_steps=3, switch_step=0.4)
FAMILY_GRIDS = {"wan": (4, 8, 8), "qwen_image": (16, 16), "flux2": (16, 16)}  # tokens; 2 x 8 x 8 / 8 x 16 per rank
FAMILIES = tuple(FAMILY_GRIDS)
FAMILY_TEXT = 6  # prompt tokens: Qwen-Image and Flux.2 split them over the ranks
# inputs the plans split besides the sequence, merged as one process with shards=2: (family, grid, builder options)
VARIANTS = {
    # per-token timesteps ([B, N], split by Wan's plan), the first frame at 0: rank 0 holds only that frame
    "wan_ti2v_image": ("wan", (2, 16, 16), {"kind": "ti2v-image"}),
    "wan_i2v": ("wan", None, {"kind": "i2v"}),  # image-context keys in the (unsplit) cross-attention
    "qwen_image_mask": ("qwen_image", None, {"mask": True}),  # the text mask, split at every block
}
# calls SDTM cannot merge under 2 ranks (warned, run exactly): (family, grid, builder options)
UNMERGEABLE = {
    "wan_odd_frames": ("wan", (3, 8, 8), {}),  # 3 latent frames: no 2 equal slabs of whole frames
    "qwen_image_reference": ("qwen_image", None, {"references": [(4, 8)]}),  # [generated, reference] split
    "flux2_reference": ("flux2", None, {"references": [(4, 8)]}),  # rank 1: generated rows and the reference
    "flux2_reference_only": ("flux2", None, {"references": [(16, 16)]}),  # rank 1: the reference alone
}


def family(name, grid=None, **options):
    """``(model, call(t) -> output, timesteps)`` of a tiny ``name`` transformer on ``grid`` (tokens;
    ``FAMILY_GRIDS`` by default); ``options`` go to the family's test builder."""
    grid = grid or FAMILY_GRIDS[name]
    if name == "wan":
        from test_dit_wan import TIMESTEPS, build_wan

        frames, height, width = grid
        model, run = build_wan(frames=frames, height=2 * height, width=2 * width, **options)  # patch (1, 2, 2)
        return model, run.call, TIMESTEPS
    if name == "qwen_image":
        from test_dit_qwen_image import TIMESTEPS, build_qwen

        model, run = build_qwen(grid=grid, text_len=FAMILY_TEXT, **options)
        return model, lambda t: run([t])[0], TIMESTEPS
    from test_dit_flux2 import TIMESTEPS, build_flux2

    model, run = build_flux2(*grid, text_len=FAMILY_TEXT, **options)
    batch = run.inputs["hidden_states"].shape[0]
    # [B, S, 4] ids: diffusers' Flux.2 plan splits img_ids / txt_ids only as 3-D tensors (expected_dims=3)
    ids = {key: run.inputs[key].unsqueeze(0).expand(batch, -1, -1) for key in ("img_ids", "txt_ids")}
    return model, lambda t: run([t], **ids)[0], TIMESTEPS


def family_generation(model, call, timesteps):
    """The output, collectives (``(kind, numel)``) and SDTM warnings of one call per timestep;
    ``row``: the elements an attention all-to-all moves per token (batch * heads * head_dim)."""
    outputs, collectives = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in timesteps:
            RECORD.clear()
            outputs.append(call(t).clone())
            collectives.append([(kind, torch.Size(shape).numel()) for kind, shape in RECORD])
    messages = sorted({str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                       and "SDTM" in str(w.message)})
    row = outputs[0].shape[0] * model.config.num_attention_heads * model.config.attention_head_dim
    return {"outputs": outputs, "stats": stats(model), "collectives": collectives, "warnings": messages, "row": row}


def family_single(name, grid=None, builder=None, **options):
    """One process; ``options``: SDTM's (none: the model as diffusers runs it)."""
    import sdtm_kernels as sk

    model, call, timesteps = family(name, grid, **(builder or {}))
    if options:
        sk.apply_sdtm(model, **{**FAMILY_SDTM, **options})
    return family_generation(model, call, timesteps)


def family_parallel(name, order=None, attention="ulysses", grid=None, builder=None, **options):
    """``name`` under context parallelism, SDTM applied "before" / "after" enable_parallelism (None: no SDTM)."""
    import sdtm_kernels as sk

    model, call, timesteps = family(name, grid, **(builder or {}))
    # set_attention_backend also sets diffusers' global default: name the backend of every run
    model.set_attention_backend("_native_flash" if attention == "ring" else "native")
    if order == "before":
        sk.apply_sdtm(model, **{**FAMILY_SDTM, **options})
    model.enable_parallelism(config=cp_config(attention))
    if order == "after":
        sk.apply_sdtm(model, **{**FAMILY_SDTM, **options})
    return family_generation(model, call, timesteps)


def agreement_cases(rank):
    """``parallel.agree`` on hand-made per-rank grids and Flux.2 ids (t, h, w, l): what each rank
    keeps. ``slabs``: rows 0-3 / 4-7 of one image; ``restart``: rank 1's rows start again at 0
    (a second image, t = 0); ``reference``: rank 1 holds a t = 10 image; ``one_none``: rank 1 read no grid;
    ``flux1_*``: the same with Flux.1's 2-D ids."""
    from sdtm_kernels.dit import parallel

    def ids(t, first_row, flux1=False):  # Flux.1: [N, 3] (t, h, w); Flux.2: [B, N, 4] (t, h, w, l)
        axes = [torch.tensor([t]), torch.arange(first_row, first_row + 4), torch.arange(6)]
        return torch.cartesian_prod(*axes) if flux1 else torch.cartesian_prod(*axes, torch.arange(1)).unsqueeze(0)

    context = parallel.ContextParallel(degree=DEGREE, ring_degree=1, ulysses_degree=DEGREE, root_split=True,
                                       uneven=False, mesh=MESH[0])
    cases = {"slabs": ((4, 6), ids(0, 4 * rank)), "restart": ((4, 6), ids(0, 0)),
             "reference": ((4, 6), ids(10 * rank, 0)), "one_none": ((4, 6) if rank == 0 else None, ids(0, 4 * rank)),
             "flux1_slabs": ((4, 6), ids(0, 4 * rank, flux1=True)),
             "flux1_reference": ((4, 6), ids(rank, 0, flux1=True))}  # Flux.1 Kontext: the reference at t = 1
    return {name: parallel.agree(grid, None, context, {"img_ids": img_ids}, "cpu")
            for name, (grid, img_ids) in cases.items()}


MESH = []  # the 2-rank device mesh, set by run_rank


def run_rank(rank, out_dir, port):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(DEGREE))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)  # funcol's "not yet awaited" notes
    import diffusers.models.attention_dispatch as attention_dispatch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    results = {}
    if rank == 0:  # the single-process references, split over the two processes
        results["single_plain"] = single_process()
    else:
        results["single_shards2"] = single_process(shards=DEGREE)
        results["single_shards1"] = single_process(shards=1)
    for name in FAMILIES:  # split so that both processes reach the process group at about the same time
        if rank == 0:
            results[f"{name}_single_shards2"] = family_single(name, shards=DEGREE)
        else:
            results[f"{name}_single_plain"] = family_single(name)
            results[f"{name}_single_shards1"] = family_single(name, shards=1)
    for case in UNMERGEABLE if rank == 0 else ():
        results[f"{case}_single_plain"] = family_single(*UNMERGEABLE[case])
    for case in VARIANTS if rank == 1 else ():
        results[f"{case}_single_shards2"] = family_single(*VARIANTS[case], shards=DEGREE)
    torch.accelerator.device_count = lambda: 1  # diffusers: device = rank % device_count
    attention_dispatch._native_flash_attention_forward_op = _cpu_flash_forward_op
    _count_collectives()
    dist.init_process_group("gloo", rank=rank, world_size=DEGREE, timeout=datetime.timedelta(seconds=60))
    try:
        results["ulysses_plain"] = parallel_run("ulysses")
        results["ulysses_after"] = parallel_run("ulysses", "after", extra_calls=True)
        results["ulysses_before"] = parallel_run("ulysses", "before")
        results["ulysses_ratio0"] = parallel_run("ulysses", "after", ratio=0.0)
        results["ring_plain"] = parallel_run("ring")
        results["ring_after"] = parallel_run("ring", "after")
        results["ring_before"] = parallel_run("ring", "before")
        for name in FAMILIES:
            results[f"{name}_plain"] = family_parallel(name)
            results[f"{name}_after"] = family_parallel(name, "after")
            results[f"{name}_before"] = family_parallel(name, "before")
            results[f"{name}_ring_after"] = family_parallel(name, "after", "ring")
            results[f"{name}_ratio0"] = family_parallel(name, "after", ratio=0.0)
        for case, (name, grid, builder) in {**VARIANTS, **UNMERGEABLE}.items():
            results[case] = family_parallel(name, "after", grid=grid, builder=builder)
        MESH.append(init_device_mesh("cpu", (DEGREE,)))
        results["agreement"] = agreement_cases(rank)
        results["refuse_sd3_after"] = refusal(lambda: refuse_sd3("after"))
        results["refuse_sd3_before"] = refusal(lambda: refuse_sd3("before"))
        results["refuse_reweight"] = refusal(lambda: refuse_flux(prompt_reweight=True))
        results["refuse_anything"] = refusal(lambda: refuse_flux(anything=True))
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    import multiprocessing

    # this process is rank 0 and starts rank 1 (one interpreter less to start than mp.spawn)
    out_dir, port = sys.argv[1], free_port()
    other = multiprocessing.get_context("spawn").Process(target=run_rank, args=(1, out_dir, port))
    other.start()
    try:
        run_rank(0, out_dir, port)
    finally:
        other.join(timeout=120)
    sys.exit(other.exitcode or 0)
