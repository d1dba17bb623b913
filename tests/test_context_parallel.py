"""SDTM under diffusers' context parallelism (docs/PARALLEL.md): 2 CPU processes over gloo
(``tests/cp_worker.py``, one run for the whole file) for Flux.1, Wan, Qwen-Image and Flux.2, the
``shards`` rule on one process, the rank-consistency of the slab rule, and the byte count of
``sdtm_kernels.bench.parallel``."""
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

import cp_worker as worker  # noqa: E402  (tests/ is on sys.path, as for helpers)

from sdtm_kernels import plan_idm, plan_ssm  # noqa: E402
from sdtm_kernels.bench import parallel as bench  # noqa: E402
from sdtm_kernels.dit.config import make_config  # noqa: E402
from sdtm_kernels.dit.parallel import ContextParallel, local_grid  # noqa: E402
from sdtm_kernels.dit.state import SDTMState  # noqa: E402
from sdtm_kernels.plan import join_shards  # noqa: E402

P = worker.DEGREE
LOCAL_TEXT = worker.TEXT // P
SDTM_RUNS = ("ulysses_after", "ulysses_before", "ring_after", "ring_before")
SCHEDULE = {name: value for name, value in worker.SDTM.items() if name != "num_steps"}
FAMILY_RUNS = ("after", "before", "ring_after")  # Ulysses (SDTM after / before enable_parallelism), Ring
LOCAL_FAMILY_TEXT = {"wan": 0, "qwen_image": worker.FAMILY_TEXT // P, "flux2": worker.FAMILY_TEXT // P}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, worker.__file__, str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    files = [out / f"rank{r}.pt" for r in range(P)]
    if done.returncode != 0 or not all(f.exists() for f in files):
        pytest.fail(f"cp_worker failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return [torch.load(f, weights_only=False) for f in files]


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def reference(ranks, name):
    """The single-process runs were split over the two processes."""
    return next(r[name] for r in ranks if name in r)


# -- 2 processes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SDTM_RUNS)
def test_cp_sdtm_equals_one_process_planning_in_shards(ranks, name):
    """Ulysses and Ring, SDTM applied before or after enable_parallelism: the output of every step
    equals one process with shards=2 up to the rounding of attention, and SDTM changed it."""
    sharded, plain = reference(ranks, "single_shards2"), reference(ranks, "single_plain")
    for rank in ranks:
        assert max_diff(rank[name]["outputs"], sharded["outputs"]) < 1e-5
        assert max_diff(rank[name]["outputs"], plain["outputs"]) > 1e-3  # it merged
        assert rank[name]["warnings"] == []
    # the rank-local rule is not the global plan
    assert max_diff(reference(ranks, "single_shards1")["outputs"], sharded["outputs"]) > 1e-3


@pytest.mark.parametrize("name", SDTM_RUNS)
def test_every_rank_merges_the_same_count_as_its_shard(ranks, name):
    """Per step and block each rank sees half the tokens one process sees with shards=2, the same
    on both ranks (Ulysses needs equal lengths), SSM steps merging attention and MLP, IDM the MLP."""
    sharded = reference(ranks, "single_shards2")["stats"]
    expected = [(step, layer, mode, attn // P, mlp // P) for step, layer, mode, attn, mlp in sharded]
    assert ranks[0][name]["stats"] == ranks[1][name]["stats"] == expected
    local = worker.GRID[0] * worker.GRID[1] // P
    modes = {(mode, attn < local, mlp < local) for _, _, mode, attn, mlp in expected}
    assert modes == {("protected", False, False), ("ssm", True, True), ("idm", False, True)}


def test_ratio_zero_equals_cp_without_sdtm(ranks):
    for rank in ranks:
        assert max_diff(rank["ulysses_ratio0"]["outputs"], rank["ulysses_plain"]["outputs"]) < 1e-6
        for name in ("ulysses_plain", "ring_plain"):  # diffusers' CP itself matches one process
            assert max_diff(rank[name]["outputs"], reference(ranks, "single_plain")["outputs"]) < 1e-5


def test_unmergeable_slabs_warn_and_run_exactly(ranks):
    """5 x 8 tokens on 2 ranks: 20 tokens each, not whole rows -> warned, exact on every rank.
    4 x 8: 2 x 8 per rank, too small for the schedule to merge -> warned (nothing merges)."""
    plain = reference(ranks, "single_plain")
    for rank in ranks:
        odd, small = rank["ulysses_after"]["odd"], rank["ulysses_after"]["small"]
        assert len(odd["warnings"]) == 1 and "not one block of whole rows" in odd["warnings"][0]
        assert {mode for _, _, mode, _, _ in odd["stats"]} == {"exact"}
        assert max_diff(odd["outputs"], plain["odd"]["outputs"]) < 1e-5
        assert len(small["warnings"]) == 1 and "(2, 8), is too small" in small["warnings"][0]
        assert all(attn == mlp == 16 for _, _, _, attn, mlp in small["stats"])
        assert max_diff(small["outputs"], plain["small"]["outputs"]) < 1e-5


@pytest.mark.parametrize("name, match", [
    ("refuse_sd3_after", "no context-parallel plan"), ("refuse_sd3_before", "no context-parallel plan"),
    ("refuse_reweight", "prompt_reweight"), ("refuse_anything", "ulysses_anything")])
def test_refusals(ranks, name, match):
    """SD3 (no diffusers CP plan; here with a hand-made one), in both orders; SDTM's own attention
    options; uneven chunks: SDTMError on every rank, before any collective."""
    errors = [rank[name]["error"] for rank in ranks]
    assert errors[0] == errors[1] and errors[0].startswith("SDTMError") and match in errors[0]


@pytest.mark.parametrize("attention", ["ulysses", "ring"])
def test_collectives_match_the_byte_count(ranks, attention):
    """The shapes diffusers' collectives really moved, per step and attention layer, are those
    ``bench.parallel.collective_bytes`` counts (fp32: itemsize 4)."""
    run = ranks[0][f"{attention}_after"]
    per_row = worker.BATCH * worker.HEADS * worker.HEAD_DIM
    counted = bench.collective_bytes(grid=worker.GRID, degree=P, num_steps=len(worker.TIMESTEPS), heads=worker.HEADS,
                                     head_dim=worker.HEAD_DIM, layers=2, text_len=worker.TEXT, batch=worker.BATCH,
                                     attention=attention, itemsize=4, out_channels=16, **SCHEDULE)
    for calls, row in zip(run["collectives"], counted):
        sizes = [torch.Size(shape).numel() for kind, shape in calls if len(shape) != 3]
        if attention == "ulysses":  # q, k, v, out per layer
            assert len(sizes) == 8 and all(s == sizes[0] for s in sizes[:4]) and all(s == sizes[4] for s in sizes[4:])
            rows = [sizes[0] // per_row - LOCAL_TEXT, sizes[4] // per_row - LOCAL_TEXT]
        else:  # keys and values of each layer in one all-gather
            assert len(sizes) == 2
            rows = [s // (2 * per_row) - LOCAL_TEXT for s in sizes]
        assert rows == row["image_rows"]
        moved = sum(bench.received_bytes(attention, s // (4 if attention == "ulysses" else 2), P, 4)
                    for s in sizes)
        assert moved == pytest.approx(row["bytes"])
        (output,) = [shape for _, shape in calls if len(shape) == 3]
        assert torch.Size(output).numel() * 4 * (P - 1) == row["output_gather"]
    assert any(r["bytes"] < r["bytes_exact"] for r in counted)


# -- Wan, Qwen-Image, Flux.2 on 2 processes -----------------------------------------------------------
@pytest.mark.parametrize("family", worker.FAMILIES)
def test_family_cp_sdtm_equals_one_process_planning_in_shards(ranks, family):
    """Wan and Qwen-Image (split at the first block: the global grid cut in slabs) and Flux.2 (split
    at its inputs: the slab read from the rank's img_ids): every step's output under Ulysses (SDTM
    applied after or before enable_parallelism) and Ring equals one process with shards=2."""
    sharded, plain = reference(ranks, f"{family}_single_shards2"), reference(ranks, f"{family}_single_plain")
    for name in FAMILY_RUNS:
        for rank in ranks:
            run = rank[f"{family}_{name}"]
            assert max_diff(run["outputs"], sharded["outputs"]) < 1e-5, name
            assert max_diff(run["outputs"], plain["outputs"]) > 1e-3, name  # it merged
            assert run["warnings"] == [], name
    assert max_diff(reference(ranks, f"{family}_single_shards1")["outputs"], sharded["outputs"]) > 1e-3


@pytest.mark.parametrize("family", worker.FAMILIES)
def test_family_ranks_merge_the_same_counts_below_their_slab(ranks, family):
    """Each rank keeps half the rows one process keeps with shards=2, the same on both ranks, fewer
    than its slab's tokens (SSM: attention and MLP; IDM: the MLP); Ulysses' all-to-alls (q, k, v and
    out of every layer) moved exactly the merged rows and the rank's prompt tokens."""
    expected = [(step, layer, mode, attn // P, mlp // P)
                for step, layer, mode, attn, mlp in reference(ranks, f"{family}_single_shards2")["stats"]]
    for name in FAMILY_RUNS:
        assert ranks[0][f"{family}_{name}"]["stats"] == ranks[1][f"{family}_{name}"]["stats"] == expected, name
    local = math.prod(worker.FAMILY_GRIDS[family]) // P
    modes = {(mode, attn < local, mlp < local) for _, _, mode, attn, mlp in expected}
    assert modes == {("protected", False, False), ("ssm", True, True), ("idm", False, True)}
    for rank in ranks:
        for step, calls in enumerate(rank[f"{family}_after"]["collectives"]):
            row = rank[f"{family}_after"]["row"]
            rows = sorted(numel // row for kind, numel in calls if kind == "all_to_all")
            attention = [attn + LOCAL_FAMILY_TEXT[family] for s, _, _, attn, _ in expected if s == step]
            assert rows == sorted(attention * 4), step


@pytest.mark.parametrize("family", worker.FAMILIES)
def test_family_ratio_zero_equals_cp_without_sdtm(ranks, family):
    plain = reference(ranks, f"{family}_single_plain")
    for rank in ranks:
        assert max_diff(rank[f"{family}_ratio0"]["outputs"], rank[f"{family}_plain"]["outputs"]) < 1e-6
        assert max_diff(rank[f"{family}_plain"]["outputs"], plain["outputs"]) < 1e-5  # diffusers' CP itself


@pytest.mark.parametrize("case", worker.VARIANTS)
def test_family_variants_under_cp_equal_one_process_planning_in_shards(ranks, case):
    """Wan 2.2 TI2V with a conditioned first frame: the plan splits the per-token timestep, and
    rank 0 holds that frame alone (timestep 0 at every step); the ranks count steps by the largest
    timestep of all ranks (before that, rank 0 counted one long protected step while rank 1 merged:
    a collective size mismatch). Wan 2.1 I2V (image-context keys). Qwen-Image with a padded text
    mask (split at every block)."""
    name, grid, _ = worker.VARIANTS[case]
    sharded = reference(ranks, f"{case}_single_shards2")
    expected = [(step, layer, mode, attn // P, mlp // P) for step, layer, mode, attn, mlp in sharded["stats"]]
    assert ranks[0][case]["stats"] == ranks[1][case]["stats"] == expected
    local = math.prod(grid or worker.FAMILY_GRIDS[name]) // P
    assert {(mode, attn < local) for _, _, mode, attn, _ in expected} >= {("ssm", True), ("protected", False)}
    for rank in ranks:
        assert max_diff(rank[case]["outputs"], sharded["outputs"]) < 1e-5
        assert rank[case]["warnings"] == []


@pytest.mark.parametrize("case, rank0, rank1", [
    ("wan_odd_frames", "(3, 8, 8) cannot be cut into 2 slabs", "(3, 8, 8) cannot be cut into 2 slabs"),
    ("qwen_image_reference", "holds 288 image tokens, of which the token grid (16, 16) covers 256",
     "holds 288 image tokens, of which the token grid (16, 16) covers 256"),
    # rank 0 holds generated rows only and would merge them: the ranks' agreement stops it
    ("flux2_reference", "not the equal, consecutive slabs of one token grid", "(7, 16) cannot be cut into 2 slabs"),
    # each rank holds one whole image (generated / reference) of the same shape
    ("flux2_reference_only", "not the equal, consecutive slabs of one token grid",
     "not the equal, consecutive slabs of one token grid")])
def test_family_calls_sdtm_cannot_merge_under_cp_warn_and_run_exactly(ranks, case, rank0, rank1):
    """Wan with 3 latent frames (no 2 slabs of whole frames); Qwen-Image and Flux.2 with a reference
    image (diffusers splits [generated, reference] tokens together, so a rank's chunk is no slab of
    the generated grid; before the ranks' agreement, Flux.2 crashed gloo with a collective size
    mismatch, or merged the reference tokens): one warning per rank, every block exact on both
    ranks, the output of one process without SDTM."""
    plain = reference(ranks, f"{case}_single_plain")
    for rank, match in zip(ranks, (rank0, rank1)):
        run = rank[case]
        assert len(run["warnings"]) == 1 and match in run["warnings"][0], run["warnings"]
        assert {mode for _, _, mode, _, _ in run["stats"]} == {"exact"}
        assert max_diff(run["outputs"], plain["outputs"]) < 1e-5
    assert ranks[0][case]["stats"] == ranks[1][case]["stats"]


def test_ranks_agree_on_slabs_of_one_image(ranks):
    """``parallel.agree`` over the 2 processes: a grid survives only as consecutive slabs of one
    image (same t, rank 1's rows after rank 0's) read on every rank; otherwise no rank keeps it."""
    unlike = "not the equal, consecutive slabs of one token grid"
    for rank in ranks:
        cases = rank["agreement"]
        assert cases["slabs"] == cases["flux1_slabs"] == ((4, 6), None)
        for name in ("restart", "reference", "flux1_reference"):
            assert cases[name][0] is None and unlike in cases[name][1], name
    assert ranks[0]["agreement"]["one_none"][0] is None and unlike in ranks[0]["agreement"]["one_none"][1]
    assert ranks[1]["agreement"]["one_none"] == (None, None)  # its own reason (here none given)


# -- one process -----------------------------------------------------------------------------------
def test_pixart_refuses_context_parallelism():
    """No diffusers CP plan: SDTMError from the check ``apply_sdtm`` and every generation's first
    call run (it reads the model's parallel config only: no process group needed)."""
    import diffusers
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    from sdtm_kernels.dit.hooks import SDTMError, check_combinations

    pixart = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                                cross_attention_dim=16, caption_channels=12,
                                                use_additional_conditions=False)
    pixart._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    with pytest.raises(SDTMError, match="context parallelism on PixArtTransformer2DModel: diffusers has no"):
        check_combinations(pixart, [], make_config())


def sharded_state(shards, grid=(16, 16), **options):
    config = make_config(num_steps=6, ratio=0.5, deviation=0.1, protect_steps=3, switch_step=0.4, shards=shards,
                         **options)
    state = SDTMState(config, num_layers=1)
    for t in (1.0, 0.8):  # step 0 is protected, step 1 a structure step
        state.begin_call(t, grid, batch=2, device="cpu")
    return state


@pytest.mark.parametrize("mode", ["ssm", "idm"])
def test_shards_plan_each_slab_on_its_own(mode):
    """``shards=2``: one plan that is the two slabs' own plans side by side (what each rank builds)."""
    torch.manual_seed(0)
    state = sharded_state(2, random_dst=False)
    metric, x = torch.randn(2, 256, 8), torch.randn(2, 256, 4)
    plan = state.build_plan(metric, mode, 2)
    planner = plan_ssm if mode == "ssm" else plan_idm
    halves = [planner(metric[:, s * 128:(s + 1) * 128], (8, 16), state.removal, window=(2, 2)) for s in range(2)]
    assert halves[0].num_rows < 128 and plan.num_rows == 2 * halves[0].num_rows == 2 * halves[1].num_rows
    plan.check()
    expected = torch.cat([h.merge(x[:, s * 128:(s + 1) * 128]) for s, h in enumerate(halves)], dim=1)
    torch.testing.assert_close(plan.merge(x), expected, rtol=0, atol=0)
    rows = torch.cat([halves[0].row_of_token, halves[1].row_of_token + halves[0].num_rows], dim=1)
    assert torch.equal(plan.row_of_token, rows)
    assert torch.equal(plan.li_next, torch.cat([h.li_next for h in halves], dim=1))
    assert plan.li_next.data_ptr() == state.li_now.data_ptr()  # written in place into the call's li buffer


def test_join_shards_checks_its_input():
    plan = plan_ssm(torch.randn(3, 64, 8), (8, 8), 48)
    with pytest.raises(ValueError, match="not a multiple of shards=2"):
        join_shards(plan, 2)
    assert join_shards(plan, 1) is plan
    joined = join_shards(plan, 3)
    assert (joined.batch_size, joined.num_tokens, joined.num_rows) == (1, 192, 3 * plan.num_rows)
    joined.check()


def test_shards_option_is_validated():
    with pytest.raises(ValueError, match="shards must be >= 1"):
        make_config(shards=0)
    with pytest.raises(TypeError, match="shards must be an int"):
        make_config(shards=2.0)
    with pytest.warns(RuntimeWarning, match="shards=3 must divide the first axis of the token grid"):
        state = sharded_state(3)  # a 3-rank run of these slabs would warn and run exactly too
    assert state.grid is None and state.mode == "exact"
    assert sharded_state(4, grid=(16, 8)).plan_grid == (4, 8)


def test_slab_rule_is_the_same_on_every_rank(monkeypatch):
    """For every grid and degree, the grid each rank reads from its own chunk of Flux img_ids
    (diffusers' equal split of the sequence) leads every rank to the same decision: the same slab
    when the height splits into whole slabs of >= 2 rows, else no merging on any rank. No rank can
    merge while another does not (which would hang Ulysses' all-to-all)."""
    from sdtm_kernels.dit import patch

    class Transformer(torch.nn.Module):
        pass

    monkeypatch.setitem(patch._GRID_READERS, Transformer, None)  # no family reader: the img_ids rule
    model = Transformer()
    for degree in (2, 3, 4):
        context = ContextParallel(degree=degree, ring_degree=1, ulysses_degree=degree, root_split=True, uneven=False)
        for height in range(1, 10):
            for width in (1, 3, 4, 8):
                if height * width % degree:
                    continue  # diffusers refuses to split such a sequence
                ids = torch.zeros(height, width, 3)
                ids[..., 1], ids[..., 2] = torch.arange(height)[:, None], torch.arange(width)[None]
                chunks = ids.reshape(-1, 3).chunk(degree)
                state = SDTMState(make_config(num_steps=2))
                seen = [local_grid(patch._token_grid(state, model, {"img_ids": c}), context, len(c))[0]
                        for c in chunks]
                whole = height % degree == 0 and height // degree >= 2
                assert seen == [(height // degree, width) if whole else None] * degree, (degree, height, width)


def test_global_grids_are_cut_along_their_first_axis():
    """A plan that splits at the first block (Wan, Qwen-Image): the hook reads the global grid."""
    context = ContextParallel(degree=2, ring_degree=2, ulysses_degree=1, root_split=False, uneven=False)
    assert local_grid((4, 6, 8), context, None) == ((2, 6, 8), None)
    assert local_grid((16, 16), context, 256) == ((8, 16), None)
    grid, reason = local_grid((3, 6, 8), context, None)
    assert grid is None and "cannot be cut into 2 slabs" in reason
    grid, reason = local_grid((16, 16), context, 288)  # + a 4 x 8 reference image (Qwen-Image edit)
    assert grid is None and "holds 288 image tokens, of which the token grid (16, 16) covers 256" in reason


def test_byte_count_rules():
    common = dict(grid=(64, 64), num_steps=28, heads=24, head_dim=128, layers=57, text_len=512, batch=1)
    ulysses = bench.collective_bytes(degree=2, attention="ulysses", **common)
    ring = bench.collective_bytes(degree=2, attention="ring", **common)
    assert [r["bytes"] for r in ulysses] == [r["bytes"] for r in ring]  # 4 (P-1)/P == 2 (P-1) at P = 2
    for r in ulysses:
        assert (r["bytes"] < r["bytes_exact"]) == (r["mode"] == "ssm")
    exact = 57 * 4 * (256 + 2048) * 24 * 128 * 2 / 2  # q, k, v, out; half of each crosses to the other rank
    assert ulysses[0]["bytes_exact"] == exact
    fast = bench.generation_bytes(bench.collective_bytes(degree=4, attention="ring", preset="fast", **common))
    released = bench.generation_bytes(bench.collective_bytes(degree=4, attention="ring", **common))
    assert 0 < released["saving"] < fast["saving"] < 1
    with pytest.raises(ValueError, match="attention must be one of"):
        bench.collective_bytes(degree=2, attention="alltoall", **common)
    with pytest.raises(ValueError, match="first axis must be divisible by degree=3"):
        bench.collective_bytes(degree=3, **dict(common, text_len=513))
    assert "| ring | 8 | fast |" in bench.format_flux_report(bench.flux_report())
