"""What every learner shares: the public boundary, flattening, linearisation and prediction.

A learner is three pure functions in the style of optax's ``GradientTransformation``
(``init(params) -> state``, ``update(state, x, y) -> state``, ``predict(state, x) ->
Predictive``) plus the batched pure ``step`` that ``fit`` scans. Each concrete learner gives
only what differs between them, a :class:`Rule`: its initial state, its update of θ and of
its covariance-like matrix from a stacked linearisation, and the quadratic form ``H P Hᵀ``.

The public ``update`` validates its input on the host, then runs a jitted step that
*donates* the state's buffers, so the ``d × d`` matrix is updated in place. The state passed
in must not be used again (use the returned one); on bad input nothing is donated and a
``ValueError`` is raised with the state untouched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kalnat import linearize as _lin
from kalnat.families import Family
from kalnat.models import Model

__all__ = ["Learner", "Predictive", "Rule"]


class Predictive(NamedTuple):
    """Linearised predictive distribution (PAPER.md §5).

    Shapes are for a minibatch of ``b`` rows; a single observation drops the ``b`` axis.

    Attributes:
      mean: ``(b, m)`` predicted mean parameter ŷ.
      mean_cov: ``(b, m, m)`` uncertainty of ŷ from the parameters, ``H P Hᵀ``.
      obs_cov: ``(b, m, m)`` covariance of a new T(y), ``H P Hᵀ + R``.
      probs: ``(b, K)`` class probabilities for classifiers, ``None`` otherwise.
    """

    mean: jax.Array
    mean_cov: jax.Array
    obs_cov: jax.Array
    probs: Optional[jax.Array] = None


class Rule(NamedTuple):
    """The part of a learner that differs between learners.

    Attributes:
      init: ``(theta (d,), dtype) -> extra`` the learner's own state fields (a tuple).
      update: ``(state, theta, H (k, d), R (k, k), e (k,)) -> (theta', extra')``.
      quad: ``(state, H (k, d)) -> H P Hᵀ (k, k)`` with ``P`` the posterior covariance.
      state_cls: the NamedTuple of the state: ``state_cls(params, *extra, count)``.
    """

    init: Callable
    update: Callable
    quad: Callable
    state_cls: type


@dataclass(frozen=True, eq=False)
class Learner:
    """An online learner: ``init`` / ``update`` / ``predict`` over a model and a family.

    Built by :func:`kalnat.ekf`, :func:`kalnat.information_filter` or
    :func:`kalnat.natural_gradient`; not constructed directly.
    """

    name: str
    apply: Callable
    family: Family
    rule: Rule
    input_shape: Optional[tuple] = None
    config: dict = field(default_factory=dict)
    _shapes: dict = field(default_factory=dict, repr=False)

    # ---- pure functions (compose with jit / scan / vmap) -------------------------------

    def init(self, params) -> Any:
        """Initial state around ``params`` (any pytree of float arrays).

        The parameters are copied, so the caller's arrays survive the in-place updates.
        """
        check_params(params)
        theta, _ = ravel_pytree(params)
        state = self.rule.state_cls(params, *self.rule.init(theta), jnp.zeros((), jnp.int32))
        # Distinct buffers, none shared with the caller: updates donate (overwrite) them.
        return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), state)

    def linearize(self, state, xs, ys=None, mask=None):
        """``(θ, unravel, Linearization)`` of a minibatch ``xs (b, …)`` at the state's θ."""
        theta, unravel = ravel_pytree(state.params)
        apply_flat = lambda th, x: self.apply(unravel(th), x)
        return theta, unravel, _lin.linearize(apply_flat, self.family, theta, xs, ys, mask)

    def update_from(self, state, theta, unravel, lin):
        """New state from a linearisation already computed at the state's θ."""
        H, R, e = _lin.stack(lin)
        theta, extra = self.rule.update(state, theta, H, R, e)
        return self.rule.state_cls(unravel(theta), *extra, state.count + 1)

    def predictive_from(self, state, lin) -> Predictive:
        mean_cov = jax.vmap(lambda h: self.rule.quad(state, h))(lin.H)
        probs = self.family.probs(lin.yhat) if self.family.is_classifier else None
        return Predictive(lin.yhat, mean_cov, mean_cov + lin.R, probs)

    def step(self, state, xs, ys, mask=None):
        """Pure minibatch update: one linearisation at θ for all ``b`` rows (PAPER.md §3)."""
        theta, unravel, lin = self.linearize(state, xs, ys, mask)
        return self.update_from(state, theta, unravel, lin)

    def step_and_predict(self, state, xs, ys, mask=None):
        """Progressive validation in one linearisation: the prediction *before* learning."""
        theta, unravel, lin = self.linearize(state, xs, ys, mask)
        return self.update_from(state, theta, unravel, lin), self.predictive_from(state, lin)

    def predict_batch(self, state, xs) -> Predictive:
        _, _, lin = self.linearize(state, xs)
        return self.predictive_from(state, lin)

    # ---- public boundary: validated, jitted, state donated ---------------------------

    @functools.cached_property
    def _update_jit(self):
        return jax.jit(self.step, donate_argnums=0)

    @functools.cached_property
    def _predict_jit(self):
        return jax.jit(self.predict_batch)

    def update(self, state, x, y):
        """Learns one observation (``x`` of the model's input shape, ``y`` of the family's
        event shape) or a minibatch (a leading batch axis on both); returns the new state.

        The state's buffers are donated: use the returned state, not the one passed in.
        """
        self._check_state(state)
        xs, single = self.check_x(state, x)
        ys = self.family.check(y)
        check_range(ys, self._dtype(state), "y")
        ys = ys[None] if ys.ndim == len(self.family.event_shape) else ys
        if ys.shape[0] != xs.shape[0]:
            raise ValueError(f"x has {xs.shape[0]} rows but y has {ys.shape[0]}")
        if xs.shape[0] == 0:  # nothing to learn: no step, the state as it is
            return state
        # NumPy arguments go to the jitted step as they are: its C++ dispatch moves them to the
        # device several times faster than jnp.asarray does, per row.
        return self._update_jit(state, np.asarray(xs, self._dtype(state)), ys)

    def predict(self, state, x) -> Predictive:
        """Predictive mean, ``H P Hᵀ``, ``H P Hᵀ + R`` and class probabilities at ``x``."""
        self._check_state(state)
        xs, single = self.check_x(state, x)
        pred = self._predict_jit(state, np.asarray(xs, self._dtype(state)))
        if single:
            pred = jax.tree_util.tree_map(lambda a: a[0], pred)
        return pred

    # ---- validation -------------------------------------------------------------------

    @staticmethod
    def _dtype(state):
        return jax.tree_util.tree_leaves(state.params)[0].dtype

    def _check_state(self, state):
        if not isinstance(state, self.rule.state_cls):
            raise ValueError(
                f"{self.name}: expected a {self.rule.state_cls.__name__}, got {type(state).__name__}"
            )

    def check_x(self, state, x):
        """Validates inputs on the host: returns ``(xs (b, …), single)``."""
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise ValueError(f"x must be numeric, got dtype {x.dtype}")
        if not np.all(np.isfinite(x)):
            raise ValueError("x contains NaN or inf")
        check_range(x, self._dtype(state), "x")
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


def check_params(params):
    """Host check of a params pytree: non-empty, float leaves, finite values."""
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params: the pytree has no arrays")
    for leaf in leaves:
        a = np.asarray(leaf)
        if a.dtype.kind != "f":
            raise ValueError(f"params: every leaf must be a float array, got dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError("params contain NaN or inf")


def representable(a, dtype) -> np.ndarray:
    """Elementwise: finite, and within the range of ``dtype`` (the state's float type: 1e39 is
    finite in float64 but inf in float32). What a stream may skip as bad."""
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return np.ones(a.shape, bool)
    with np.errstate(invalid="ignore"):
        return np.isfinite(a) & (np.abs(a) <= np.finfo(dtype).max)


def check_range(a, dtype, name):
    """Finite values that would overflow to inf in the state's dtype (1e39 in float32)."""
    top = np.finfo(dtype).max
    if a.dtype.kind == "f" and a.size and np.finfo(a.dtype).max > top and np.abs(a).max() > top:
        raise ValueError(f"{name} has values beyond the range of {np.dtype(dtype).name} "
                         f"(the state's dtype), e.g. {np.abs(a).max():g}")


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
