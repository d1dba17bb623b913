"""Few shapes (``ratio_levels``): at most 8 merged token counts per generation at the default
settings, 28 and 50 steps, SD3 and Flux at 1024², every preset, with the FLOP-bound speedup within
2% of the exact schedule's (docs/SEMANTICS.md, "Few shapes")."""
import pytest

from sdtm_kernels.bench.shapes import FAMILIES_1024, level_report, schedule_shapes
from sdtm_kernels.dit.config import PRESETS, make_config
from sdtm_kernels.dit.state import SDTMState, nearest_level, stage_levels


@pytest.mark.parametrize("row", level_report(presets=tuple(PRESETS)), ids=lambda r: f"{r['family']}-{r['preset']}-{r['steps']}")
def test_few_token_counts_and_the_same_flop_bound(row):
    assert row["level_counts"] <= 8
    assert row["exact_counts"] > row["level_counts"]
    assert abs(row["level_bound"] / row["exact_bound"] - 1.0) < 0.02


def test_exact_schedule_counts_of_the_release():
    """ratio_levels=0 is the release's schedule: 15 / 27 token counts (released, 28 / 50 steps)."""
    height, width, channels = FAMILIES_1024["sd3"]
    counts = [len(schedule_shapes("released", steps, (height, width), channels, ratio_levels=0)["counts"])
              for steps in (28, 50)]
    assert counts == [15, 27]


def test_levels_span_each_stage_and_steps_take_the_nearest():
    config = make_config(num_steps=28)
    levels = stage_levels(config, 28)
    assert len(levels["ssm"]) == len(levels["idm"]) == 3
    state = SDTMState(config, num_steps=28)
    for stage, steps in (("ssm", range(1, 12)), ("idm", range(12, 28))):
        for step in steps:
            if step % 3 == 0:
                continue  # protected
            assert state.step_ratio(step) in levels[stage]
    assert nearest_level(0.5, (0.2, 0.4, 0.6)) == 0.4  # a tie: the lower level
    assert nearest_level(0.33, ()) == 0.33
    one = stage_levels(make_config(num_steps=28, ratio_levels=1), 28)
    assert len(one["ssm"]) == len(one["idm"]) == 1


def test_bad_ratio_levels():
    with pytest.raises(TypeError, match="ratio_levels"):
        make_config(ratio_levels=2.5)
    with pytest.raises(ValueError, match="ratio_levels"):
        make_config(ratio_levels=-1)
