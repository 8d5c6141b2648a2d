"""What every learner shares: the public boundary, validation and the hyperparameters' checks.

A core learner is a :class:`Learner`: a model, a family, a representation of θ's uncertainty
(:mod:`kalnat.representations`) and default hyperparameters (:class:`~kalnat.filter.Hyper`),
run by the filter written once in :mod:`kalnat.filter`. Its pure pieces compose with ``jit``,
``scan``, ``vmap`` and ``grad``:

- ``init(params, hyper=None) -> State`` (validated on the host);
- ``step(hyper, state, xs, ys, mask) -> (State, Predictive, log_likelihood)``: predict, then
  condition on a minibatch (``fit`` scans it);
- ``predict_batch(hyper, state, xs) -> Predictive``: the one-step predictive, from the prior.

The public ``update`` and ``predict`` validate their input on the host, then run a jitted
step; ``update`` *donates* the state's buffers, so the ``d × d`` matrix is updated in place:
the state passed in is consumed (use the returned one; passing a consumed state again raises a
``ValueError`` that says so). On bad input nothing is donated and the state is untouched.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kalnat import filter as _filter
from kalnat import linearization as _lin
from kalnat import models, numerics, programs, saved
from kalnat.families import Family
from kalnat.filter import Hyper, Predictive, State, check_live
from kalnat.models import Model
from kalnat.programs import once
from kalnat.representations import Representation
from kalnat.validation import positive_int

__all__ = ["Learner", "Predictive", "Boundary", "check_hyper", "make_hyper"]


class Boundary:
    """The validated, jitted, donating public methods of a learner (core learners and banks).

    Needs ``hyper``, ``family``, ``step(hyper, state, xs, ys, mask)``,
    ``predict_batch(hyper, state, xs)``, ``check_x(state, x)``, ``_check_state(state)`` and
    ``_dtype(state)``.
    """

    @functools.cached_property
    def _update_jit(self):
        def fn(hyper, state, xs, ys, single):
            state, pred, _ = self.step(hyper, state, xs, ys)
            return state, unbatch(pred, single)
        return once(self, "update one", lambda: jax.jit(fn, donate_argnums=1, static_argnums=4))

    @functools.cached_property
    def _predict_jit(self):
        # (compiled quickly for kalnat predict on a short stream: cli_predict)
        return programs.jit(self, "predict one", lambda hyper, state, xs, single: unbatch(
            self.predict_batch(hyper, state, xs), single), static_argnums=3)

    def _hyper(self, hyper, dtype):
        return device_hyper(self, hyper, dtype)

    def check_given_hyper(self, hyper, state):
        """Host checks of hyperparameters given to a call (a learner's own were checked when it
        was built and at ``init``)."""
        if hyper is not None:
            check_hyper(self, hyper, ravel_pytree(state.params)[0].shape[0])

    def update(self, state, x, y, hyper=None):
        """Learns one observation (``x`` of the model's input shape, ``y`` of the family's
        event shape) or a minibatch (a leading batch axis on both).

        Returns ``(state, prediction)``: the new state and the prediction of ``y`` made before
        learning it, from the prior. The state's buffers are donated: use the returned state.
        """
        self._check_state(state)
        self.check_given_hyper(hyper, state)
        xs, single = self.check_x(state, x)
        dtype = self._dtype(state)
        ys = check_targets(self.family, y, dtype, xs.shape[0], "rows")
        if xs.shape[0] == 0:  # nothing to learn: no step, the state as it is
            return state, None
        # NumPy arguments go to the jitted step as they are: its C++ dispatch moves them to the
        # device several times faster than jnp.asarray does, per row.
        return self._update_jit(self._hyper(hyper, dtype), state, np.asarray(xs, dtype), ys, single)

    def predict(self, state, x, hyper=None):
        """The one-step predictive at ``x`` (one row or a batch): mean, ``H P⁻ Hᵀ``,
        ``H P⁻ Hᵀ + R`` and class probabilities. The state is not changed."""
        self._check_state(state)
        self.check_given_hyper(hyper, state)
        xs, single = self.check_x(state, x)
        dtype = self._dtype(state)
        return self._predict_jit(self._hyper(hyper, dtype), state, np.asarray(xs, dtype), single)


def device_hyper(learner, hyper, dtype):
    """``hyper``, or ``learner.hyper`` as device arrays of the state's dtype, converted once per
    learner (Python floats would be converted again at every call of a jitted step)."""
    if hyper is not None:
        return hyper
    cache = learner.__dict__.setdefault("_hyper_on_device", {})
    if dtype not in cache:
        # converted on the host: jnp.asarray with a dtype is a compiled program per leaf
        cache[dtype] = jax.device_put(jax.tree_util.tree_map(
            lambda a: np.asarray(a, np.int32 if np.asarray(a).dtype.kind in "iu" else dtype), learner.hyper))
    return cache[dtype]


def check_targets(family, y, dtype, n: int, unit: str):
    """``y`` validated on the host (the family's domain, the state's float range) as ``(n, …)``
    for ``n`` rows of ``x`` (a single observation gets its leading axis)."""
    ys = family.check(y)
    check_range(ys, dtype, "y")
    ys = ys[None] if ys.ndim == len(family.event_shape) else ys
    if ys.shape[0] != n:
        raise ValueError(f"x has {n} {unit} but y has {ys.shape[0]}")
    return ys


def unbatch(pred, single):
    """A prediction of one row (``single``) without its leading batch axis."""
    return jax.tree_util.tree_map(lambda a: a[0], pred) if single else pred


@dataclass(frozen=True, eq=False)
class Learner(Boundary):
    """An online learner: a model, a family and a representation, run by :mod:`kalnat.filter`.

    Built by :func:`kalnat.ekf`, :func:`kalnat.sqrt_ekf`, :func:`kalnat.information_filter`,
    :func:`kalnat.natural_gradient`, :func:`kalnat.iterated_ekf`, :func:`kalnat.nig_filter`.

    Attributes:
      name: the learner's name.
      apply: ``apply(params, x) -> z``, the model.
      family: the output family.
      representation: how θ's uncertainty is stored (:mod:`kalnat.representations`).
      hyper: the default hyperparameters (:class:`~kalnat.filter.Hyper`), used when a call
        gives none.
      max_iterations: linearisations per update the step is built for (1: the EKF).
      moderated: classifiers' probabilities (and their log-likelihoods) averaged over the
        posterior (:mod:`kalnat.predictive`) instead of plug-in.
      schedule: ``t -> λ_t`` when forgetting was given as a function of the step (then
        ``hyper.forgetting`` is not used).
      input_shape: shape of one ``x``.
      config: the settings it was built with.
      apply_tapped: the model's :attr:`~kalnat.models.Model.apply_tapped` where the
        representation takes ``H`` as its dense layers' factors (``layer_rows``: the Kronecker
        form, alone or under the normal–inverse-gamma filter, and the full covariance given the
        layers, as :func:`kalnat.ekf_bank` gives a linear model's iterated members); else
        ``None`` (``H`` as a matrix).
    """

    name: str
    apply: Callable
    family: Family
    representation: Representation
    hyper: Hyper = Hyper()
    max_iterations: int = 1
    moderated: bool = False
    schedule: Optional[Callable] = None
    input_shape: Optional[tuple] = None
    config: dict = field(default_factory=dict)
    apply_tapped: Optional[Callable] = None
    _shapes: dict = field(default_factory=dict, repr=False)

    #: the fields a compiled program does not depend on (:meth:`program_key`): ``hyper`` is an
    #: argument of every program; ``config`` a record of how the learner was built, read on the
    #: host (what in it shapes a step is in ``representation``, ``max_iterations`` or
    #: ``schedule``); ``_shapes`` a cache of the host's checks
    NOT_IN_PROGRAMS = frozenset({"hyper", "config", "_shapes"})

    def program_key(self):
        """What this learner's compiled programs depend on besides their arguments
        (:func:`kalnat.programs.once`): its type and every field but :attr:`NOT_IN_PROGRAMS`
        (a subclass's own fields too).
        Learners of equal keys share their programs. ``None`` (nothing shared) for a learner
        whose programs are saved across processes (:func:`kalnat.saved.describe`: its programs
        are found by its recipe), whose representation is not made of plain values (equal is
        not interchangeable there: ``np.float64(1) == 1.0``, but their arrays' dtypes differ),
        or whose fields cannot be hashed."""
        if saved.described(self) or not _filter._by_value(self.representation):
            return None
        key = (type(self),) + tuple((f.name, getattr(self, f.name)) for f in fields(self)
                                    if f.name not in self.NOT_IN_PROGRAMS)
        try:
            hash(key)
        except TypeError:
            return None
        return key

    # ---- pure functions (compose with jit / scan / vmap / grad) ------------------------

    def init(self, params, hyper: Optional[Hyper] = None) -> State:
        """Initial state around ``params`` (any pytree of float arrays) with the prior of
        ``hyper`` (default: the learner's). Validated on the host; the parameters are copied, so
        the caller's arrays survive the in-place updates."""
        d, _ = check_params(params)
        hyper = self.hyper if hyper is None else hyper
        check_hyper(self, hyper, d)
        self.check_outputs(params)
        self.check_layer_rows(params)
        return _filter.fresh(self, hyper, params)

    def check_outputs(self, params):
        """That the model, given ``params`` and one ``x`` of its input shape, gives the raw
        outputs the family takes (a ``ValueError`` naming both, where the step would fail deep in
        JAX, or a categorical family would read the wrong number of classes): once per shape of
        ``params``, on the host, where the input shape is known."""
        leaves = jax.tree_util.tree_leaves(params)
        if self.input_shape is None or any(isinstance(a, jax.core.Tracer) for a in leaves):
            return
        key = ("outputs", jax.tree_util.tree_structure(params), tuple(np.shape(a) for a in leaves))
        if key in self._shapes:
            return
        dtype = jnp.result_type(*leaves) if leaves else jnp.float32
        try:
            out = jax.eval_shape(self.apply, params, jax.ShapeDtypeStruct(tuple(self.input_shape), dtype))
        except Exception as err:  # the params are another model's, or the model is broken
            raise ValueError(f"{self.name}: the model cannot be applied to these params and one x of shape "
                             f"{tuple(self.input_shape)} ({type(err).__name__}: {err}); are they this "
                             "model's params?") from None
        shape = getattr(out, "shape", None)
        # any shape of as many numbers (a (1, 1) for one output): the linearisation reshapes it
        if shape is None or math.prod(shape) not in {math.prod(s) for s in _raw_shapes(self.family)}:
            expected = " or ".join(str(s) for s in sorted(_raw_shapes(self.family), key=len))
            raise ValueError(f"{self.name}: the model gives raw outputs of shape {shape} for one x of shape "
                             f"{tuple(self.input_shape)}; the {self.family.name} family takes {expected}")
        self._shapes[key] = True

    def check_layer_rows(self, params):
        """Where the step takes ``H`` as the dense layers' factors from a model's own
        ``apply_tapped`` (not :func:`kalnat.models.linear`'s or ``mlp``'s with their own
        ``apply``), that they are the rows of ``apply``'s Jacobian
        (:func:`kalnat.linearization.check_layer_rows`): once per shape of ``params``, on the
        host (not where ``init`` is traced)."""
        if self.apply_tapped is None or models.own_layer_rows(self.apply_tapped, self.apply):
            return
        leaves = jax.tree_util.tree_leaves(params)
        if any(isinstance(a, jax.core.Tracer) for a in leaves):
            return
        key = ("layer rows", jax.tree_util.tree_structure(params),
               tuple((np.shape(a), np.dtype(a.dtype) if hasattr(a, "dtype") else np.result_type(a)) for a in leaves))
        if key not in self._shapes:
            _lin.check_layer_rows(self.apply, self.apply_tapped, self.representation.dense_layers, self.family,
                                  params, self.input_shape)
            self._shapes[key] = True

    def linearize_at(self, state, xs, ys=None, mask=None):
        """``θ -> Linearization`` of the minibatch ``xs (b, …)`` (and ``ys``), at any θ."""
        _, unravel = ravel_pytree(state.params)
        if self.apply_tapped is not None:
            layers = self.representation.dense_layers
            return lambda theta: _lin.linearize_layers(self.apply_tapped, layers, self.family, unravel(theta),
                                                       xs, ys, mask)
        apply_flat = lambda th, x: self.apply(unravel(th), x)
        return lambda theta: _lin.linearize(apply_flat, self.family, theta, xs, ys, mask)

    def branches_on(self, examples: int) -> bool:
        """Whether a step on minibatches of ``examples`` rows branches on the data (a
        ``lax.cond``, which ``vmap`` would turn into running every branch): where the
        representation does (``Representation.branches``), except on one example whose rows
        come as its layers' factors, where the Kronecker form has nothing to check."""
        return bool(self.representation.branches) and not (self.apply_tapped is not None and examples == 1)

    def step(self, hyper, state, xs, ys, mask=None):
        """Predict, then condition on a minibatch: one linearisation at θ for all ``b`` rows
        (docs/method.md §2d). Returns ``(State, Predictive, log_likelihood (b,))``."""
        # (the filter masks the rows of every linearisation itself: not here as well)
        return _filter.step(self, hyper, state, self.linearize_at(state, xs, ys), mask)

    def predict_batch(self, hyper, state, xs) -> Predictive:
        """The one-step predictive of the rows ``xs (b, …)``, from the prior."""
        prior = _filter.predict(self, hyper, state)
        theta, _ = ravel_pytree(prior.params)
        return _filter.predictive(self, hyper, prior, self.linearize_at(prior, xs)(theta))

    # ---- validation -------------------------------------------------------------------

    @staticmethod
    def _dtype(state):
        return jax.tree_util.tree_leaves(state.params)[0].dtype

    @property
    def _cov_type(self):
        return self.representation.state_type

    def _check_state(self, state):
        if not isinstance(state, State) or type(state.cov) is not self._cov_type:
            got = type(state).__name__ + (f" holding a {type(state.cov).__name__}" if isinstance(state, State) else "")
            raise ValueError(f"{self.name}: expected a State holding a {self._cov_type.__name__}, got a {got}")
        check_live(state, self.name)

    def check_x(self, state, x):
        """Validates inputs on the host: returns ``(xs (b, …), single)``."""
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise ValueError(f"x must be numeric, got dtype {x.dtype}")
        check_values(x, self._dtype(state), "x")
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if x.shape == shape:
                return x[None], True
            if x.shape[1:] == shape and x.ndim == len(shape) + 1:
                return x, False
            raise ValueError(f"x must have shape {shape} or (batch,) + {shape}, got {x.shape}")
        # A plain function: one observation iff the model maps x to one raw output vector.
        single = self._output_shape(state, x.shape, x.dtype) is not None
        if not single and (x.ndim == 0 or self._output_shape(state, x.shape[1:], x.dtype) is None):
            raise ValueError(
                f"x of shape {x.shape} is neither one observation nor a batch the model accepts "
                f"(it must produce {self.family.n_outputs} raw outputs per row)"
            )
        return (x[None], True) if single else (x, False)

    def _output_shape(self, state, shape, dtype):
        key = (tuple(shape), str(dtype), jax.tree_util.tree_structure(state.params))
        cache = self._shapes
        if key not in cache:
            try:
                out = jax.eval_shape(self.apply, state.params, jax.ShapeDtypeStruct(shape, dtype))
                ok = getattr(out, "shape", None) in _raw_shapes(self.family)
            except Exception:  # a shape the model cannot take: reported by the caller
                ok = False
            cache[key] = True if ok else None
        return cache[key]


def build(name, model, family, representation, *, input_shape=None, iterations=1,
          moderated=False, config=None, **hyper) -> Learner:
    """A :class:`Learner` from a constructor's arguments: the model resolved, the
    hyperparameters checked (:func:`make_hyper`), a callable forgetting kept as the schedule."""
    apply, input_shape = resolve_model(model, input_shape)
    if not isinstance(family, Family):
        raise ValueError(f"family must be a kalnat family, got {type(family).__name__}")
    forgetting = hyper.get("forgetting", 1.0)
    hyper = make_hyper(iterations=iterations, **hyper)
    if hyper.process_noise is not None and not representation.process_noise:
        raise ValueError(f"{name}: additive process noise q·I has no form here; use forgetting instead")
    tapped = getattr(model, "apply_tapped", None) if isinstance(model, Model) else None
    if not representation.layer_rows:
        tapped = None
    return Learner(name, apply, family, representation, hyper, int(iterations), bool(moderated),
                   forgetting if callable(forgetting) else None, input_shape, dict(config or {}), tapped)


def make_hyper(*, prior_var=1.0, forgetting=1.0, process_noise=None, max_variance=None,
               iterations=1, noise_shape=None, noise_scale=None):
    """A :class:`~kalnat.filter.Hyper` from a constructor's arguments, checked where they do not
    depend on the model's size (a callable forgetting is the learner's schedule, not data)."""
    for name, value in (("prior_var", prior_var), ("forgetting", forgetting), ("process_noise", process_noise),
                        ("max_variance", max_variance)):
        if value is None and name in ("process_noise", "max_variance") or callable(value) and name == "forgetting":
            continue
        # numbers, or arrays of them (a traced one too: a derivative in it): a string ('1', read
        # by float() here and refused by JAX's tracing elsewhere), a bool or None is a mistake
        if isinstance(value, jax.core.Tracer) or isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            continue
        if isinstance(value, (str, bytes, bool, np.bool_)) or value is None \
                or not jnp.issubdtype(np.asarray(value).dtype, jnp.number):
            what = "a number in (0, 1] or a schedule (a function of t)" if name == "forgetting" else \
                "a number or an array of numbers"
            raise ValueError(f"{name} must be {what}, got {value!r}")
    if not callable(forgetting) and not 0 < float(forgetting) <= 1:
        raise ValueError(f"forgetting must lie in (0, 1], got {forgetting}")
    if process_noise is not None:
        q = np.asarray(process_noise, dtype=np.float64)
        if q.ndim > 1 or not np.all(np.isfinite(q)) or np.any(q < 0):
            raise ValueError("process_noise must be a non-negative scalar or (d,) vector")
        process_noise = None if not np.any(q != 0) else (float(q) if q.ndim == 0 else q)
    if max_variance is not None:
        cap = np.asarray(max_variance, dtype=np.float64)
        if cap.ndim > 1 or not np.all(np.isfinite(cap)) or np.any(cap <= 0):
            raise ValueError(f"max_variance must be None or a positive scalar or (d,) vector, got {max_variance}")
        max_variance = float(cap) if cap.ndim == 0 else cap
    iterations = positive_int(iterations, "iterations")
    return Hyper(prior_var, 1.0 if callable(forgetting) else float(forgetting), process_noise, max_variance,
                 int(iterations), noise_shape, noise_scale)


def check_hyper(learner, hyper: Hyper, d: int):
    """Host validation of concrete hyperparameters for a model of ``d`` parameters (traced
    ones, inside a transformation, are the caller's to keep valid)."""
    if not isinstance(hyper, Hyper):
        raise ValueError(f"{learner.name}: hyper must be a kalnat Hyper, got {type(hyper).__name__}")
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(hyper)):
        return
    numerics.check_covariance(hyper.prior_var, learner.config.get("prior_name", "prior_var"), d, dense=False)
    lam = np.asarray(hyper.forgetting, np.float64)
    if lam.shape != () or not 0 < float(lam) <= 1:
        raise ValueError(f"forgetting must be a scalar in (0, 1], got {hyper.forgetting}")
    for name in ("process_noise", "max_variance"):
        v = getattr(hyper, name)
        if v is not None:
            v = np.asarray(v, np.float64)
            if v.shape not in ((), (d,)):
                raise ValueError(f"{name} must be a scalar or ({d},), got shape {v.shape}")
            if not np.all(np.isfinite(v)) or np.any(v < 0) or (name == "max_variance" and np.any(v <= 0)):
                raise ValueError(f"{name} must be finite and {'positive' if name == 'max_variance' else 'non-negative'}")
    if hyper.process_noise is not None and not learner.representation.process_noise:
        raise ValueError(f"{learner.name}: additive process noise has no form in this representation "
                         "(use forgetting, noise proportional to P)")
    check_forgetting_used(learner.name, lam, not forgetting_is_data(learner))
    if learner.representation.noise_prior:
        for name in ("noise_shape", "noise_scale"):
            v = getattr(hyper, name)
            if v is None or np.ndim(v) or not np.isfinite(float(v)) or not float(v) > 0:
                raise ValueError(f"{learner.name}: {name} must be a positive number, got {v}")
    it = np.asarray(hyper.iterations)
    if it.shape != () or it.dtype.kind not in "iu" or not 1 <= int(it) <= learner.max_iterations:
        raise ValueError(f"iterations must be an integer in 1..{learner.max_iterations} for this learner, "
                         f"got {hyper.iterations}")


def check_forgetting_used(name: str, lam, fixed_schedule: bool):
    """A ``hyper.forgetting`` other than 1 given to a learner that forgets on a fixed schedule
    of t (or does not read λ) would be silently ignored: a ``ValueError`` instead."""
    if float(lam) != 1.0 and fixed_schedule:
        raise ValueError(f"{name}: its forgetting (or learning rate) is a fixed schedule of t; "
                         f"hyper.forgetting = {float(lam)} would be ignored")


def forgetting_is_data(learner) -> bool:
    """Whether ``hyper.forgetting`` is what the learner forgets with (not a fixed schedule of t)."""
    return learner.schedule is None and learner.representation.uses_forgetting


def check_params(params) -> tuple[int, np.dtype]:
    """Host check of a params pytree: non-empty, float leaves, finite values. Returns the
    length and dtype of the flat θ (as ``ravel_pytree`` would give them, without its array
    operations)."""
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params: the pytree has no arrays")
    for leaf in leaves:
        a = np.asarray(leaf)
        if a.dtype.kind != "f":
            raise ValueError(f"params: every leaf must be a float array, got dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError("params contain NaN or inf")
    return sum(int(np.size(leaf)) for leaf in leaves), jnp.result_type(*leaves)


def representable(a, dtype) -> np.ndarray:
    """Elementwise: finite, and within the range of ``dtype`` (the state's float type: 1e39 is
    finite in float64 but inf in float32). What a stream may skip as bad."""
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return np.ones(a.shape, bool)
    with np.errstate(invalid="ignore"):
        return np.isfinite(a) & (np.abs(a) <= np.finfo(dtype).max)


def check_values(a, dtype, name):
    """``a`` (numeric) finite and within the range of the state's ``dtype``, or a ``ValueError``
    naming ``name``. One BLAS call when it is (:func:`~kalnat.numerics.all_within`): this runs
    on every row of ``update``."""
    if a.dtype.kind == "f" and a.size and not numerics.all_within(a, _top(a.dtype, dtype)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf")
        check_range(a, dtype, name)


def check_range(a, dtype, name):
    """Finite values that would overflow to inf in the state's dtype (1e39 in float32)."""
    if a.dtype.kind != "f" or not a.size:
        return
    top = _top(a.dtype, dtype)
    if not math.isinf(top) and not numerics.all_within(a, top) and np.abs(a).max() > top:
        raise ValueError(f"{name} has values beyond the range of {np.dtype(dtype).name} "
                         f"(the state's dtype), e.g. {np.abs(a).max():g}")


@functools.lru_cache(maxsize=None)
def _top(src, dtype) -> float:
    """The largest magnitude an array of float dtype ``src`` may hold for a state of ``dtype``:
    the state's range where ``src``'s is wider (1e39 is finite in float64, inf in float32), else
    no bound beyond being finite (``inf``)."""
    top = np.finfo(dtype).max
    return float(top) if np.finfo(src).max > top else math.inf


def _raw_shapes(family):
    shapes = {(family.n_outputs,)}
    if family.name == "categorical":
        shapes.add((family.num_classes,))
    if family.n_outputs == 1:
        shapes.add(())
    return shapes


def resolve_model(model, input_shape):
    """``(apply, input_shape)`` from a :class:`~kalnat.models.Model` or a plain function."""
    if isinstance(model, Model):
        return model.apply, tuple(model.input_shape) if input_shape is None else tuple(input_shape)
    if not callable(model):
        raise ValueError(f"model must be a kalnat Model or a function apply(params, x), got {type(model).__name__}")
    return model, None if input_shape is None else tuple(input_shape)
