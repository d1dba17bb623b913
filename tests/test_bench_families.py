"""The FLOP bound per model family (``sdtm_kernels.bench.families``): schedule-only, exact arithmetic."""
import pytest

from sdtm_kernels.bench import families


def test_every_family_has_a_bound_between_one_and_the_ssm_stage():
    rows = families.report()
    assert {r["name"] for r in rows} == set(families.FAMILIES)
    for r in rows:
        stages = r["stage_bounds"]
        assert 1.0 < r["flop_bound"] < stages["ssm"], r
        assert stages.get("protected", 1.0) == pytest.approx(1.0)
    by = {(r["name"], r["preset"]): r["flop_bound"] for r in rows}
    for name in families.FAMILIES:
        assert by[name, "fast"] > by[name, "released"]  # "fast" merges more


def test_ratio_zero_schedule_has_no_saving(monkeypatch):
    original = families.schedule_rows
    monkeypatch.setattr(families, "schedule_rows", lambda *a, **k: original(*a, ratio=0.0, **k))
    assert families.family_bound("wan2.1-1.3b", "released")["flop_bound"] == 1.0


def test_block_models_count_what_merging_removes():
    c, f, t, n = 8, 32, 3, 16
    # merged rows only shrink the merged terms: the cross block's cross-attention keys stay at N
    full = families.block_flops("cross", n, n, n, t, c, f, 2)
    assert families.block_flops("cross", n, n - 4, n, t, c, f, 2) == full - 2 * 2 * 4 * c * f
    joint = families.block_flops("joint", n, n, n, t, c, f, 3)
    assert joint == 8 * (n + t) * c * c + 4 * (n + t) ** 2 * c + 2 * 3 * (n + t) * c * f
    with pytest.raises(ValueError, match="kind"):
        families.block_flops("mystery", n, n, n, t, c, f, 2)
    with pytest.raises(ValueError, match="name"):
        families.family_bound("no-such-model", "released")


def test_command_writes_its_table(tmp_path, capsys):
    assert families.main(["--out", str(tmp_path)]) == 0
    assert "Wan 2.1 1.3B" in capsys.readouterr().out
    assert (tmp_path / "families.json").exists() and (tmp_path / "families.md").read_text().startswith("| model")
