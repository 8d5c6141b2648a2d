"""What the recurrent learners share: Jacobians of a cell, the learner bundle and its boundary.

A recurrent learner is, like a core :class:`~kalnat.learners.base.Learner`, a bundle of pure
functions over a ``NamedTuple`` state and a hyperparameter pytree, plus a validated, jitted,
donating public boundary with the same conventions as the core learners':

- ``init(params, *, batch=1, s0=None, …) -> state``  (host-validated)
- ``step(hyper, state, xs (B, …), ys (B, …), mask (B,)) -> (state', Predictive, log_lik (B,))``:
  one time step of ``B`` parallel sequences, the prediction made *before* learning y_t (from
  the prior);
- ``propagate(hyper, state, xs) -> (state', Predictive)``: one time step without an observation;
- public: ``update(state, x, y) -> (state', Predictive)``, ``predict(state, x) -> Predictive``
  (nothing changes) and ``advance(state, x) -> (state', Predictive)`` (through time, no learning).

``B`` independent sequences share one θ: each has its own hidden state (and RTRL Jacobian),
and their observations at a time step form one minibatch update at one linearisation point
(stacked ``H``, block-diagonal ``R``, docs/method.md §2d). A single stream is ``B = 1``. A sequence
whose ``mask`` is false at a step (padding after its end) is frozen: it does not advance and
contributes nothing to the update; its state is only corrected for the change of θ (``G δθ``
in RTRL, through its covariance with θ in the joint EKF: the same filter).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kalnat.families import Family
from kalnat.filter import Hyper
from kalnat.learners.base import check_live, check_range, check_targets, device_hyper, unbatch
from kalnat.programs import once
from kalnat.recurrent.cells import RecurrentModel
from kalnat.validation import positive_int

__all__ = ["RecurrentLearner", "transition_jacobians", "readout_jacobians"]


def transition_jacobians(cell: RecurrentModel, unravel):
    """``(θ (d,), s (n,), x) -> (s', ∂f/∂s (n, n), ∂f/∂θ (n, d))`` at ``(s, θ)`` (docs/method.md §4).

    Reverse mode: ``n`` vector-Jacobian products give both blocks at once, O(n d), the cheap
    side since a recurrent model has more parameters than states.
    """

    def fn(theta, s, x):
        def f(s_, th):
            out = cell.transition(unravel(th), s_, x)
            return out, out

        (a, b), s_new = jax.jacrev(f, argnums=(0, 1), has_aux=True)(s, theta)
        return s_new, a, b

    return fn


def readout_jacobians(cell: RecurrentModel, family: Family, unravel):
    """``(θ (d,), s (n,)) -> (ŷ (m,), ∂ŷ/∂s (m, n), ∂ŷ/∂θ (m, d))``: readout and link."""

    def fn(theta, s):
        def g(s_, th):
            yhat = jnp.reshape(family.mean(cell.readout(unravel(th), s_)), (family.m,))
            return yhat, yhat

        (hs, ht), yhat = jax.jacrev(g, argnums=(0, 1), has_aux=True)(s, theta)
        return yhat, hs, ht

    return fn


def check_cell(cell, family):
    if not isinstance(cell, RecurrentModel):
        raise ValueError(f"cell must be a kalnat.recurrent.RecurrentModel, got {type(cell).__name__}")
    if not isinstance(family, Family):
        raise ValueError(f"family must be a kalnat family, got {type(family).__name__}")
    ok = {family.n_outputs}
    if family.name == "categorical":
        ok.add(family.num_classes)
    if cell.n_outputs not in ok:
        raise ValueError(
            f"the cell has {cell.n_outputs} outputs but the {family.name} family needs "
            f"{family.n_outputs}" + (f" or {family.num_classes}" if family.name == "categorical" else "")
        )


def fit_checker(cell: RecurrentModel):
    """``check(params, *, with_init_state)``: that ``params`` fit ``cell`` (its ``transition``
    takes ``s (n,)`` and one ``x`` of ``input_shape`` and gives ``(n,)``, its ``readout`` gives
    ``n_outputs`` numbers, and, where used, its ``init_state`` gives ``(n,)``), or a
    ``ValueError`` naming what does not fit, before a step would fail deep in JAX (a missing
    key, a mismatched product). Traced abstractly (``jax.eval_shape``: nothing runs), once per
    shape of ``params``."""
    seen = set()
    n, in_shape = cell.n_state, tuple(cell.input_shape)

    def call(what, fn, *args):
        try:
            return jax.eval_shape(fn, *args)
        except Exception as err:  # another cell's params, or a broken cell
            raise ValueError(f"the cell's {what} cannot run on these params, a state of shape ({n},) and one "
                             f"x of shape {in_shape} ({type(err).__name__}: {err}); are they this cell's "
                             "params?") from None

    def check(params, *, with_init_state=True):
        leaves = jax.tree_util.tree_leaves(params)
        key = (jax.tree_util.tree_structure(params), tuple((np.shape(a), jnp.result_type(a)) for a in leaves),
               bool(with_init_state))
        if key in seen:
            return
        dtype = jnp.result_type(*leaves)
        s = jax.ShapeDtypeStruct((n,), dtype)
        if with_init_state:
            s0 = call("init_state", cell.init_state, params)
            if getattr(s0, "shape", None) != (n,):
                raise ValueError(f"the cell's init_state gives shape {getattr(s0, 'shape', None)}, not "
                                 f"({n},) (n_state = {n})")
        s1 = call("transition", cell.transition, params, s, jax.ShapeDtypeStruct(in_shape, dtype))
        if getattr(s1, "shape", None) != (n,):
            raise ValueError(f"the cell's transition gives a state of shape {getattr(s1, 'shape', None)} from "
                             f"one of shape ({n},); it must keep ({n},) (n_state = {n})")
        z = call("readout", cell.readout, params, s)
        if int(np.prod(getattr(z, "shape", (-1,)))) != cell.n_outputs:
            raise ValueError(f"the cell's readout gives shape {getattr(z, 'shape', None)}; it must give "
                             f"({cell.n_outputs},) (n_outputs = {cell.n_outputs})")
        seen.add(key)

    return check


def initial_states(cell, params, batch, s0, dtype):
    """``s_0`` as ``(B, n)``: the cell's initial state, or ``s0`` given as ``(n,)`` / ``(B, n)``."""
    batch = positive_int(batch, "batch")
    n = cell.n_state
    if s0 is None:
        s0 = jnp.broadcast_to(cell.init_state(params), (batch, n))
    s0 = np.asarray(s0, dtype=np.float64)
    if s0.shape == (n,):
        s0 = np.broadcast_to(s0, (batch, n))
    if s0.shape != (batch, n):
        raise ValueError(f"s0 must have shape ({n},) or ({batch}, {n}), got {s0.shape}")
    if not np.all(np.isfinite(s0)):
        raise ValueError("s0 contains NaN or inf")
    return jnp.array(s0, dtype=dtype)


def initial_jacobians(jac0, batch, n, d, dtype):
    """``G_0`` as ``(B, n, d)``: zeros, or ``jac0`` given as ``(n, d)`` / ``(B, n, d)``."""
    if jac0 is None:
        return jnp.zeros((batch, n, d), dtype)
    g = np.asarray(jac0, dtype=np.float64)
    if g.shape == (n, d):
        g = np.broadcast_to(g, (batch, n, d))
    if g.shape != (batch, n, d):
        raise ValueError(f"jac0 must have shape ({n}, {d}) or ({batch}, {n}, {d}), got {g.shape}")
    if not np.all(np.isfinite(g)):
        raise ValueError("jac0 contains NaN or inf")
    return jnp.array(g, dtype=dtype)


@dataclass(frozen=True, eq=False)
class RecurrentLearner:
    """An online learner of a recurrent model: pure functions plus a validated boundary.

    Built by :func:`kalnat.recurrent.rtrl` or :func:`kalnat.recurrent.joint_ekf`.

    Attributes:
      name: ``"rtrl"`` or ``"joint_ekf"``.
      cell: the :class:`~kalnat.recurrent.cells.RecurrentModel`.
      family: the output family.
      init: ``(params, *, batch=1, s0=None, …) -> state`` (validated on the host: params
        that do not fit the cell's transition, readout or init_state are a ``ValueError``
        naming which, :func:`fit_checker`).
      step: pure ``(hyper, state, xs (B, …), ys (B, …), mask (B,)) -> (state', Predictive,
        log_likelihood (B,))``.
      propagate: pure ``(hyper, state, xs (B, …)) -> (state', Predictive)``, no learning.
      state_cls: the state's ``NamedTuple`` type.
      hyper: the default hyperparameters (:class:`~kalnat.filter.Hyper`).
      check_hyper: ``(hyper, d)``: host checks of hyperparameters given to a call.
      config: the settings it was built with.

    ``rtrl`` and ``joint_ekf`` mark their ``step`` and ``propagate`` with what those close
    over (:func:`with_recipe`): learners of equal recipes share their compiled programs
    (:meth:`program_key`); a learner given other functions (``dataclasses.replace``, one's own)
    has programs of its own.
    """

    name: str
    cell: RecurrentModel
    family: Family
    init: Callable
    step: Callable
    propagate: Callable
    state_cls: type
    hyper: Hyper = Hyper()
    check_hyper: Callable = None
    config: dict = field(default_factory=dict)

    def program_key(self):
        """What this learner's compiled programs depend on besides their arguments
        (:func:`kalnat.programs.once`): its type, ``name`` and the recipe its ``step`` and
        ``propagate`` were made from (:func:`with_recipe`). Learners of equal keys (the same
        cell object, or one that compares equal, other hyperparameters) share their programs.
        ``None`` (nothing shared) where the two functions carry no recipe or different ones, or
        where the key cannot be hashed."""
        recipe = getattr(self.step, RECIPE, None)
        if recipe is None or getattr(self.propagate, RECIPE, None) is not recipe:
            return None
        key = (type(self), self.name, recipe)
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def check_given_hyper(self, hyper, state):
        if hyper is not None and self.check_hyper is not None:
            self.check_hyper(hyper, ravel_pytree(state.params)[0].shape[0])

    @functools.cached_property
    def _update_jit(self):
        def fn(h, s, xs, ys, single):
            s, pred, _ = self.step(h, s, xs, ys, jnp.ones(xs.shape[0], bool))
            return s, unbatch(pred, single)
        return once(self, "update one", lambda: jax.jit(fn, donate_argnums=1, static_argnums=4))

    @functools.cached_property
    def _advance_jit(self):
        def fn(h, s, xs, single):
            s, pred = self.propagate(h, s, xs)
            return s, unbatch(pred, single)
        return once(self, "advance one", lambda: jax.jit(fn, donate_argnums=1, static_argnums=3))

    @functools.cached_property
    def _predict_jit(self):
        return once(self, "predict one", lambda: jax.jit(
            lambda h, s, xs, single: unbatch(self.propagate(h, s, xs)[1], single), static_argnums=3))

    def update(self, state, x, y, hyper=None):
        """Learns one time step: ``x`` (``input_shape``, or ``(B,) + input_shape``) and ``y``.

        Validated on the host first: ``ValueError`` (the state untouched) on NaN/inf, a value
        beyond the range of the state's dtype (1e39 for float32), a ``y`` outside the
        family's domain or a wrong shape. Returns ``(state', Predictive)``, the prediction of
        ``y`` made before learning it. The state's buffers are donated: use the returned
        state, not the one passed in.
        """
        self.check_state(state)
        self.check_given_hyper(hyper, state)
        xs, single = self.check_step_x(state, x)
        ys = check_targets(self.family, y, self.dtype(state), xs.shape[0], "sequences")
        # NumPy arguments as they are: the jitted step's dispatch moves them (see Learner.update).
        dtype = self.dtype(state)
        return self._update_jit(device_hyper(self, hyper, dtype), state, np.asarray(xs, dtype), ys, single)

    def predict(self, state, x, hyper=None):
        """The prediction of ``y_t`` at input ``x_t`` from the current hidden state, without
        learning and without changing the state."""
        self.check_state(state)
        self.check_given_hyper(hyper, state)
        xs, single = self.check_step_x(state, x)
        dtype = self.dtype(state)
        return self._predict_jit(device_hyper(self, hyper, dtype), state, np.asarray(xs, dtype), single)

    def advance(self, state, x, hyper=None):
        """Runs one time step *without* learning (``y_t`` unknown, e.g. forecasting ahead).

        Returns ``(state', Predictive)``: the hidden state (and RTRL Jacobian, or the joint
        covariance's state rows, with the joint EKF's ``state_noise``) moves through the
        transition; θ and its covariance do not (no forgetting, no ``process_noise``: both
        belong to learned steps, which ``count`` counts and an advance does not add to), so
        :func:`~kalnat.recurrent.rtrl` and :func:`~kalnat.recurrent.joint_ekf` stay equal. The
        prediction is the one :meth:`update` would make at this step. Donates the state like
        :meth:`update`.
        """
        self.check_state(state)
        self.check_given_hyper(hyper, state)
        xs, single = self.check_step_x(state, x)
        dtype = self.dtype(state)
        return self._advance_jit(device_hyper(self, hyper, dtype), state, np.asarray(xs, dtype), single)

    # ---- validation -------------------------------------------------------------------

    def check_state(self, state):
        if not isinstance(state, self.state_cls):
            raise ValueError(f"{self.name}: expected a {self.state_cls.__name__}, got {type(state).__name__}")
        check_live(state, self.name)

    # the names the shared stream driver and the bank use
    _check_state = check_state

    def _dtype(self, state):
        return self.dtype(state)

    @staticmethod
    def dtype(state):
        return state.s.dtype

    def check_step_x(self, state, x):
        """``(xs (B, …), single)`` for one time step of the state's ``B`` sequences."""
        x = _check_numeric(x, "x")
        check_range(x, self.dtype(state), "x")
        b = state.s.shape[0]
        shape = tuple(self.cell.input_shape)
        if x.shape == shape and b == 1:
            return x[None], True
        if x.shape == (b,) + shape:
            return x, False
        raise ValueError(f"x must have shape ({b},) + {shape}" + (f" or {shape}" if b == 1 else "")
                         + f" for this state of {b} sequence(s), got {x.shape}")


RECIPE = "kalnat_recipe"  # the attribute of a step and a propagate made by with_recipe


def with_recipe(recipe: tuple, step: Callable, propagate: Callable):
    """``(step, propagate)`` marked with ``recipe``: everything the two functions close over
    that is not an argument of the programs they run in (the cell, the family, a core
    learner's program key, constants of the step). Equal recipes must make the same programs:
    a learner's :meth:`~RecurrentLearner.program_key` is its recipe."""
    setattr(step, RECIPE, recipe)
    setattr(propagate, RECIPE, recipe)
    return step, propagate


def _check_numeric(a, name):
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a

