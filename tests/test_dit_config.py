"""SDTMConfig validation, presets and the lazy public exports (no diffusers needed)."""
import subprocess
import sys

import pytest

import sdtm_kernels as sk
from sdtm_kernels.dit.config import make_config


def test_defaults_are_the_released_settings():
    cfg = sk.SDTMConfig()
    # switch_step: the released step 20 of 50, as the fraction 0.4 so that it scales with the steps
    assert (cfg.ratio, cfg.deviation, cfg.switch_step, cfg.protect_steps, cfg.mcw, cfg.a_s) == (0.3, 0.2, 0.4, 3, 0.1, 0.05)
    assert (cfg.window, cfg.merge_mode, cfg.random_dst, cfg.protect_layers) == ((2, 2), "mean", True, None)
    assert cfg.switch_index(50) == 20 and cfg.switch_index(20) == 8
    assert cfg == make_config() == make_config("released")


def test_presets():
    released = make_config("released")
    assert (released.ratio, released.deviation, released.protect_steps, released.mcw) == (0.3, 0.2, 3, 0.1)
    assert released.switch_index(50) == 20 and released.switch_index(28) == 11
    fast = make_config("fast")
    assert fast.ratio == 0.6 and fast.ratio + fast.deviation < 1
    assert make_config("fast", mcw=0.5).mcw == 0.5  # a non-default option overrides the preset
    assert make_config("fast", ratio=0.3).ratio == 0.3  # so does one equal to the default
    assert set(sk.PRESETS) >= {"released", "fast"}
    with pytest.raises(ValueError, match="preset"):
        make_config("turbo")


@pytest.mark.parametrize("options, error, name", [
    (dict(ratio=1.0), ValueError, "ratio"),
    (dict(ratio=0.1, deviation=0.2), ValueError, "ratio"),
    (dict(ratio=0.7, deviation=0.3), ValueError, "deviation"),
    (dict(deviation=-0.1), ValueError, "deviation"),
    (dict(switch_step=-1), ValueError, "switch_step"),
    (dict(switch_step=1.5), ValueError, "switch_step"),
    (dict(switch_step="20"), TypeError, "switch_step"),
    (dict(protect_steps=-1), ValueError, "protect_steps"),
    (dict(protect_layers=2.0), TypeError, "protect_layers"),
    (dict(mcw=1.5), ValueError, "mcw"),
    (dict(merge_mode="max"), ValueError, "merge_mode"),
    (dict(random_dst=1), TypeError, "random_dst"),
    (dict(num_steps=0), ValueError, "num_steps"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(window=(1, 1)), ValueError, "window"),
    (dict(window=3), TypeError, "window"),
    (dict(merge_cross_attention="yes"), TypeError, "merge_cross_attention"),
])
def test_bad_options_name_the_argument(options, error, name):
    with pytest.raises(error, match=name):
        sk.SDTMConfig(**options)


def test_switch_step_int_or_fraction():
    assert sk.SDTMConfig(switch_step=0.5).switch_index(10) == 5
    assert sk.SDTMConfig(switch_step=1.0).switch_index(10) == 10
    assert sk.SDTMConfig(switch_step=7).switch_index(10) == 7
    assert sk.SDTMConfig(protect_steps=0).protect_steps is None


def test_ratio_zero_turns_merging_off():
    cfg = sk.SDTMConfig(ratio=0)  # the default deviation 0.2 is ignored, not rejected
    assert (cfg.ratio, cfg.deviation) == (0.0, 0.0)
    assert make_config("fast", ratio=0.0, deviation=0.1).deviation == 0.0
    with pytest.raises(ValueError, match="deviation"):
        sk.SDTMConfig(ratio=0, deviation=-0.1)


def test_lazy_exports_do_not_import_diffusers():
    code = ("import sys, sdtm_kernels as sk\n"
            "assert 'sdtm_kernels.dit' not in sys.modules\n"
            "print(callable(sk.apply_sdtm), callable(sk.remove_sdtm), sk.SDTMConfig().ratio, 'fast' in sk.PRESETS,"
            " 'diffusers' in sys.modules, 'triton' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=__file__.rsplit("/tests/", 1)[0])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "0.3", "True", "False", "False"]
    with pytest.raises(AttributeError):
        sk.no_such_name  # noqa: B018
