"""Patched pipelines (``apply_sdtm`` on anything with ``.transformer``): the generated subclass
whose ``__call__`` starts a new generation at every ``pipe(...)`` call and counts its steps in
scheduler steps (``_SchedulerSteps``), for ``pipe.transformer`` and a second transformer
(``transformer_2``, Wan 2.2 A14B) alike; the subclass pickles as its original class. The rules
are in ``sdtm_kernels.dit.patch``'s docstring."""
import copyreg
import functools
import inspect
import pickle

_PIPELINE_SUBCLASSES = {}


class _SchedulerSteps:
    """Counts ``scheduler.step`` calls during one pipeline call (the step rule of a patched
    pipeline, see ``SDTMState``): installed as an instance attribute over the scheduler's
    ``step`` and removed when the call ends."""

    def __init__(self, pipe, scheduler):
        self.pipe = pipe
        self.scheduler = scheduler
        self.evals = 0
        order = getattr(scheduler, "order", 1)
        self.order = order if isinstance(order, int) and not isinstance(order, bool) and order >= 1 else 1
        self._saved = scheduler.__dict__.get("step", _MISSING)
        original = scheduler.step

        @functools.wraps(original)
        def step(*args, **kwargs):
            self.evals += 1
            return original(*args, **kwargs)

        scheduler.step = step
        self._num_timesteps = vars(pipe).get("_num_timesteps", _MISSING)
        if self._num_timesteps is not _MISSING:  # set again by the pipeline before its loop
            pipe._num_timesteps = None

    @classmethod
    def attach(cls, pipe):
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None or not callable(getattr(scheduler, "step", None)):
            return None
        return cls(pipe, scheduler)

    def detach(self):
        if self._saved is _MISSING:
            self.scheduler.__dict__.pop("step", None)
        else:
            self.scheduler.step = self._saved
        if self._num_timesteps is not _MISSING and vars(self.pipe).get("_num_timesteps") is None:
            self.pipe._num_timesteps = self._num_timesteps  # the pipeline did not set it this time

    def num_steps(self):
        """Scheduler steps the pipeline runs (None when unknown): the timesteps of its loop
        (``pipe._num_timesteps``, else the scheduler's timesteps from its begin index) over
        the scheduler's order."""
        evals = vars(self.pipe).get("_num_timesteps")
        if not isinstance(evals, int) or evals <= 0:
            timesteps = getattr(self.scheduler, "timesteps", None)
            try:
                evals = len(timesteps)
            except TypeError:
                return None
            begin = getattr(self.scheduler, "begin_index", None)
            if isinstance(begin, int):
                evals -= begin
        if evals <= 0:
            return None
        return -(-evals // self.order)


_MISSING = object()


def _pipeline_call(self, *args, **kwargs):
    from .patch import _other_transformers, _split, _transformer_hook

    original = type(self)._sdtm_original_class
    try:
        transformers = [_split(self)[1]] + _other_transformers(self)
    except TypeError:  # the transformers were removed from the pipeline since apply_sdtm
        transformers = []
    patched = [(t, h) for t in transformers if t is not None and (h := _transformer_hook(t)) is not None]
    if not patched:
        return original.__call__(self, *args, **kwargs)
    arguments = inspect.signature(original.__call__).bind(self, *args, **kwargs)
    arguments.apply_defaults()
    values = arguments.arguments
    num_steps = None
    for name in ("timesteps", "sigmas"):
        if values.get(name) is not None:
            num_steps = len(values[name])
            break
    if num_steps is None:
        num_steps = values.get("num_inference_steps")
    driver = _SchedulerSteps.attach(self)  # one count of scheduler steps for every transformer
    previous = []
    for transformer, hook in patched:
        if not hasattr(transformer, "_reset_stateful_cache"):
            # no CacheMixin (SD3, PixArt): the pipeline never resets the cache hooks; start them with SDTM
            registry = getattr(transformer, "_diffusers_hook", None)
            if registry is not None:
                registry.reset_stateful_hooks(recurse=True)
        state = hook.state
        hook.pending_reset = False
        state.reset(num_steps=num_steps if num_steps is not None else state.num_steps)
        previous.append((state, state.driver))
        state.driver = driver
    try:
        return original.__call__(self, *args, **kwargs)
    finally:
        for state, earlier in previous:
            state.driver = earlier
        if driver is not None:
            driver.detach()


def pipeline_subclass(cls):
    if cls not in _PIPELINE_SUBCLASSES:
        def call(self, *args, **kwargs):
            return _pipeline_call(self, *args, **kwargs)

        call = functools.wraps(cls.__call__)(call)
        _PIPELINE_SUBCLASSES[cls] = type(cls.__name__, (cls,), {
            "__call__": call, "_sdtm_original_class": cls, "__reduce_ex__": _reduce_patched_pipeline})
    return _PIPELINE_SUBCLASSES[cls]


def _reduce_generated(obj, protocol, rebuild, args):
    """``object.__reduce_ex__`` with the generated class replaced by ``rebuild(*args)``."""
    reduced = object.__reduce_ex__(obj, max(protocol, 2))
    if reduced[0] is not copyreg.__newobj__ or reduced[1][0] is not type(obj):
        raise pickle.PicklingError(
            f"SDTM cannot pickle this patched {type(obj)._sdtm_original_class.__name__}: call "
            "sdtm_kernels.dit.remove_sdtm(...) before pickling and apply_sdtm(...) again after loading")
    return (rebuild, tuple(args) + tuple(reduced[1][1:])) + tuple(reduced[2:])


def _reduce_patched_pipeline(self, protocol):
    return _reduce_generated(self, protocol, _new_patched_pipeline, (type(self)._sdtm_original_class,))


def _new_patched_pipeline(original, *args):
    cls = pipeline_subclass(original)
    return cls.__new__(cls, *args)
