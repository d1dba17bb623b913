"""Argument checks shared by the public API. Each error names the offending argument.

Two kinds of checks:

* argument checks (types, ranks, shapes, dtypes, devices, Python numbers): always, they read
  no tensor values;
* value checks (index ranges of plan tensors): they read tensor values, which on a GPU is a
  host synchronisation. They run on CPU tensors outside ``torch.compile``, and on other
  devices only in debug mode (``set_debug(True)`` or the environment variable
  ``SDTM_DEBUG=1``). The kernels never read out of bounds whatever the values, so skipping
  a value check never crashes; it only leaves a bad index's result to the documented
  defined fallback (see ``docs/SEMANTICS.md``, "Index contract").

The blocks of a patched model check their planner arguments once per transformer call and their
plans' contents in debug mode only (``ops._block_path``); they read ``SDTM_DEBUG`` once per call
(``read_call_flags`` in ``SDTMState.begin_call``), ``set_debug`` at once.
"""
import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_DEBUG = None  # None: follow the SDTM_DEBUG environment variable


def set_debug(enabled) -> None:
    """Turn the debug value checks on or off for every device (``None``: follow ``SDTM_DEBUG``).

    With debug on, the index values of plan tensors are checked on GPUs too (a host
    synchronisation per call: not for production, and not inside CUDA-graph capture)."""
    global _DEBUG
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
    _DEBUG = enabled


def debug_enabled() -> bool:
    """``set_debug``'s value, else ``SDTM_DEBUG`` (``1``/``true``/``yes``/``on``)."""
    if _DEBUG is not None:
        return _DEBUG
    return _env_debug()


def _env_debug() -> bool:
    return os.environ.get("SDTM_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


_CALL_ENV_DEBUG = False  # SDTM_DEBUG as read by read_call_flags, at the start of a transformer call


def read_call_flags() -> None:
    """Read ``SDTM_DEBUG`` for one transformer call (``SDTMState.begin_call``): the blocks of the
    call ask ``call_debug`` instead of reading the environment once per plan."""
    global _CALL_ENV_DEBUG
    _CALL_ENV_DEBUG = _env_debug()


def call_debug() -> bool:
    """``debug_enabled()`` inside a transformer call: ``set_debug``'s value (it takes effect at
    once), else ``SDTM_DEBUG`` as it was when the call began."""
    return _DEBUG if _DEBUG is not None else _CALL_ENV_DEBUG


def values_checked(tensor) -> bool:
    """Whether value checks run for tensors on ``tensor``'s device: CPU tensors always, others
    in debug mode; never while ``torch.compile`` traces (the kernels stay in bounds)."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or debug_enabled()


def check_index_values(name, value, upper, what):
    """Every entry of ``value`` in ``[0, upper)`` (reads values: call under ``values_checked``)."""
    if value.numel() and bool(((value < 0) | (value >= upper)).any()):
        low, high = int(value.min()), int(value.max())
        raise ValueError(f"{name} has values outside [0, {what}={upper}) (min {low}, max {high})")


def check_row_start_values(name, row_start, num_tokens):
    """CSR offsets: ``row_start[:, 0] == 0``, ``row_start[:, -1] == num_tokens``, nondecreasing."""
    if row_start.numel() == 0:
        return
    if bool((row_start[:, 0] != 0).any()) or bool((row_start[:, -1] != num_tokens).any()):
        raise ValueError(f"{name} must start at 0 and end at N={num_tokens} in every batch row")
    if bool((row_start[:, 1:] < row_start[:, :-1]).any()):
        raise ValueError(f"{name} must be nondecreasing (CSR row offsets)")


def check_choice(name, value, choices):
    """``value`` if it is one of ``choices``, else a ValueError naming ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_int(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_ratio_deviation(ratio, deviation):
    """``ratio`` and ``deviation`` such that every scheduled fraction lies in [0, 1)."""
    ratio = check_float("ratio", ratio)
    deviation = check_float("deviation", deviation)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if deviation < 0.0:
        raise ValueError(f"deviation must be >= 0, got {deviation}")
    if ratio - deviation < 0.0 or ratio + deviation >= 1.0:
        raise ValueError(
            f"ratio +/- deviation must stay in [0, 1) (rho is a fraction of the tokens): ratio={ratio}, "
            f"deviation={deviation} give [{ratio - deviation}, {ratio + deviation}]"
        )
    return ratio, deviation


def check_pair(name, value):
    """A pair of positive ints such as ``grid=(H, W)`` or ``window=(wh, ww)``."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair of ints (height, width), got {value!r}")
    return tuple(check_int(f"{name}[{i}]", v, minimum=1) for i, v in enumerate(value))


def check_tensor(name, value, ndim=None, dtypes=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has unsupported dtype {value.dtype}; expected one of {names}")
    return value


def check_float_tokens(name, value):
    """A ``[B, N, C]`` floating tensor with a unit stride in C."""
    check_tensor(name, value, ndim=3, dtypes=FLOAT_DTYPES)
    return value


def check_same_device(name, value, reference_name, reference):
    if value.device != reference.device:
        raise ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}")


def check_extent(name, value):
    """A token grid or window extent: 2 positive ints ``(height, width)`` or 3
    ``(frames, height, width)``, e.g. ``grid=(T, H, W)``, ``window=(wt, wh, ww)``."""
    if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
        raise TypeError(f"{name} must be a pair (height, width) or a triple (frames, height, width) of ints, "
                        f"got {value!r}")
    return tuple(check_int(f"{name}[{i}]", v, minimum=1) for i, v in enumerate(value))


def _dims(extent):
    return "x".join(str(v) for v in extent)


def check_grid(grid, window, num_tokens):
    """Validate ``grid`` against N and ``window`` against the grid; return both as tuples.

    ``grid`` is ``(H, W)`` or ``(T, H, W)`` (frame-major raster order), ``window`` ``(wh, ww)`` or
    ``(wt, wh, ww)`` of the same length; the returned tuples keep the given length."""
    grid = check_extent("grid", grid)
    size = 1
    for v in grid:
        size *= v
    if size != num_tokens:
        raise ValueError(f"grid {_dims(grid)} has {size} tokens but the metric has N={num_tokens}")
    window = check_extent("window", window)
    if len(window) != len(grid):
        example = "(1, 2, 2) for 2x2 windows in each frame" if len(grid) == 3 else "(2, 2)"
        raise TypeError(f"window {window} has {len(window)} entries but grid {grid} has {len(grid)}: pass a window "
                        f"of the grid's length, e.g. window={example}")
    window_tokens = 1
    for v in window:
        window_tokens *= v
    if window_tokens < 2:
        raise ValueError(f"window must hold at least 2 tokens, got {_dims(window)}")
    if any(w > g for w, g in zip(window, grid)):
        raise ValueError(f"window {_dims(window)} is larger than the grid {_dims(grid)}")
    return grid, window


def check_li(li, metric):
    """``li``: integer ``[B, N]`` counter on the metric's device (or None)."""
    if li is None:
        return None
    check_tensor("li", li, ndim=2)
    if li.dtype.is_floating_point or li.dtype == torch.bool or li.is_complex():
        raise TypeError(f"li must be an integer tensor (int32 counter), got {li.dtype}")
    if tuple(li.shape) != tuple(metric.shape[:2]):
        raise ValueError(f"li must have shape [B, N] = {tuple(metric.shape[:2])}, got {tuple(li.shape)}")
    check_same_device("li", li, "metric", metric)
    return li


def check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator
