"""Real-time recurrent learning and natural-gradient RTRL with state correction (docs/method.md §4).

RTRL carries the Jacobian of the hidden state with respect to the parameters forward in time:

```
s_t = f(s_{t−1}, θ, x_t)
G_t = ∂f/∂s · G_{t−1} + ∂f/∂θ                (n × d)
H_t = ∂ŷ/∂s · G_t + ∂ŷ/∂θ                     (m × d), the Jacobian of ŷ_t through the past
```

Natural-gradient RTRL hands ``H_t`` (with ``R_t`` and ``e_t = T(y_t) − ŷ_t``) to any core
learner — the EKF by default, its square-root, information, natural-gradient, iterated or
normal–inverse-gamma forms — through the filter's step (:func:`kalnat.filter.step`), which
returns ``δθ = θ_t − θ_{t−1}``; then the state is corrected to first order for the parameter
change, ``s_t ← s_t + G_t δθ``. The model the core learner sees at step t is
``θ ↦ g(s_t + G_t (θ − θ_{t−1}), θ)`` — the readout at the state corrected to first order —
whose Jacobian at θ_{t−1} is ``H_t``; an iterated core relinearises it at its iterates. With the
correction, this is exactly the joint EKF on ``(s, θ)`` of :mod:`kalnat.recurrent.joint`
(docs/method.md §4, theorem), at O(n² d + d² m) per step instead of the joint filter's O(n d²).
Without it (``correct_state=False``) it is plain RTRL driven by natural gradient, which the
theorem does not cover.

Cost per step: the Jacobians of ``f`` by ``n`` reverse-mode products, O(n d); the product
``∂f/∂s · G``, O(n² d); the core learner's update, O(d² m) for the EKF.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kalnat import filter as _filter
from kalnat.families import Family
from kalnat.learners import (
    Learner, ekf, information_filter, iterated_ekf, natural_gradient, nig_filter, sqrt_ekf,
)
from kalnat.learners.base import check_hyper, check_params
from kalnat.linearization import Linearization
from kalnat.recurrent import base
from kalnat.recurrent.cells import RecurrentModel

__all__ = ["RTRLState", "rtrl", "rtrl_forward", "rtrl_jacobian_step"]

_CORES = {
    "ekf": ekf,
    "information": information_filter,
    "information_filter": information_filter,
    "natural_gradient": natural_gradient,
    "sqrt_ekf": sqrt_ekf,
    "iterated_ekf": iterated_ekf,
    "nig_filter": nig_filter,
}


class RTRLState(NamedTuple):
    """State of natural-gradient RTRL for ``B`` parallel sequences.

    Attributes:
      core: the core learner's state (a :class:`~kalnat.State`) holding θ and its
        covariance-like matrix (P_t for the EKF) and the step count.
      s: ``(B, n)`` hidden states s_t.
      jac: ``(B, n, d)`` RTRL Jacobians G_t = ∂s_t/∂θ.
    """

    core: Any
    s: jax.Array
    jac: jax.Array

    @property
    def params(self):
        return self.core.params

    @property
    def count(self):
        return self.core.count


def rtrl_jacobian_step(cell: RecurrentModel, unravel):
    """``(θ, s (n,), G (n, d), x) -> (s', G')``: one RTRL step for one sequence (docs/method.md §4)."""
    trans = base.transition_jacobians(cell, unravel)

    def fn(theta, s, g, x):
        s_new, a, b = trans(theta, s, x)
        return s_new, a @ g + b

    return fn


def rtrl_forward(cell: RecurrentModel, params, xs, s0=None, jac0=None):
    """Runs RTRL at a fixed θ over one sequence ``xs (T, …)``: no learning.

    Returns ``(s (T, n), G (T, n, d))``: every state and its Jacobian with respect to the flat
    θ (``jax.flatten_util.ravel_pytree`` order). ``G_t`` is the Jacobian of the unrolled
    recurrence ``θ ↦ s_t``.
    """
    theta, unravel = ravel_pytree(params)
    n, d = cell.n_state, theta.shape[0]
    s = cell.init_state(params) if s0 is None else jnp.asarray(s0, theta.dtype)
    g = jnp.zeros((n, d), theta.dtype) if jac0 is None else jnp.asarray(jac0, theta.dtype)
    step = rtrl_jacobian_step(cell, unravel)

    def body(carry, x):
        carry = step(theta, *carry, x)
        return carry, carry

    return jax.lax.scan(body, (s, g), jnp.asarray(xs, theta.dtype))[1]


def rtrl(cell: RecurrentModel, family: Family, *, learner="ekf", correct_state: bool = True,
         **options) -> base.RecurrentLearner:
    """Natural-gradient RTRL (docs/method.md §4) on any core learner.

    Args:
      cell: a :class:`~kalnat.recurrent.cells.RecurrentModel` (``elman``, ``gru``, your own).
      family: the output family.
      learner: the core learner taking ``H_t``: ``"ekf"`` (default), ``"information"``,
        ``"natural_gradient"``, ``"sqrt_ekf"`` (the Cholesky-factor form: use it in float32
        with forgetting, where the covariance form loses positive definiteness within a few
        thousand steps), ``"iterated_ekf"`` (``iterations=k`` relinearisations of the readout
        at the corrected state), ``"nig_filter"`` (unknown noise scale), or one of the
        constructors :func:`kalnat.ekf`, … itself.
      correct_state: apply ``s_t ← s_t + G_t δθ`` after each update (the theorem's form).
        ``False`` gives plain RTRL driven by natural gradient.
      **options: the core learner's own settings (``prior_var``, ``forgetting``,
        ``process_noise``, ``joseph`` for the EKF; ``learning_rate``, ``init_fisher``, … for
        natural gradient, ``kalnat.schedules.kalman_to_natural(...)._asdict()`` translates;
        ``max_variance`` for every one of them; ``representation``, a structured covariance of
        :mod:`kalnat.representations`, for the EKF).

    Returns:
      A :class:`~kalnat.recurrent.base.RecurrentLearner` whose state is :class:`RTRLState`.
    """
    base.check_cell(cell, family)
    if isinstance(learner, str):
        if learner not in _CORES:
            raise ValueError(f"unknown learner {learner!r}; expected one of {sorted(_CORES)}")
        build = _CORES[learner]
    elif callable(learner):
        build = learner
    else:
        raise ValueError(f"learner must be a name or a learner constructor, got {type(learner).__name__}")
    # The core learner sees the readout as its model; its filter runs on H_t built here
    # through the recurrence.
    core: Learner = build(cell.readout, family, input_shape=(cell.n_state,), **options)
    if not isinstance(core, Learner):
        raise ValueError("learner must build a kalnat Learner (kalnat.ekf, kalnat.natural_gradient, …)")

    fits = base.fit_checker(cell)

    def init(params, hyper=None, *, batch: int = 1, s0=None, jac0=None) -> RTRLState:
        """State around ``params`` (the core's prior from ``hyper``, default its own) for
        ``batch`` sequences, ``s_0`` and ``G_0`` (zeros)."""
        check_params(params)
        fits(params, with_init_state=s0 is None)
        core_state = core.init(params, hyper)
        theta, _ = ravel_pytree(core_state.params)
        s = base.initial_states(cell, core_state.params, batch, s0, theta.dtype)
        g = base.initial_jacobians(jac0, batch, cell.n_state, theta.shape[0], theta.dtype)
        return RTRLState(core_state, s, g)

    def forward(state, xs, ys):
        """``(θ, s_t, G_t, linearize_at)``: the transition at θ_{t−1}, and the readout's
        linearisation at any θ through the state corrected to first order."""
        theta, unravel = ravel_pytree(state.core.params)
        step = rtrl_jacobian_step(cell, unravel)
        read = base.readout_jacobians(cell, family, unravel)
        s, g = jax.vmap(step, (None, 0, 0, 0))(theta, state.s, state.jac, xs)

        def linearize_at(th):
            yhat, hs, ht = jax.vmap(read, (None, 0))(th, s + g @ (th - theta))
            h = jnp.einsum("bmn,bnd->bmd", hs, g) + ht
            e = jnp.zeros_like(yhat) if ys is None else jax.vmap(family.innovation)(yhat, ys)
            return Linearization(yhat, h, jax.vmap(family.cov)(yhat), e, ys)

        return theta, s, g, linearize_at

    def step(hyper, state: RTRLState, xs, ys, mask):
        theta, s, g, linearize_at = forward(state, xs, ys)
        core_state, pred, ll = _filter.step(core, hyper, state.core, linearize_at, mask)
        # A frozen sequence (past its end, or a skipped step) does not advance ...
        s = jnp.where(mask[:, None], s, state.s)
        g = jnp.where(mask[:, None, None], g, state.jac)
        if correct_state:
            # ... but is still corrected: its state depends on θ through its G, and the joint
            # EKF moves it by the same G δθ through its covariance with θ.
            s = s + g @ (ravel_pytree(core_state.params)[0] - theta)
        return RTRLState(core_state, s, g), pred, ll

    def propagate(hyper, state: RTRLState, xs):
        theta, s, g, linearize_at = forward(state, xs, None)
        prior = _filter.predict(core, hyper, state.core)
        return RTRLState(state.core, s, g), _filter.predictive(core, hyper, prior, linearize_at(theta))

    config = dict(learner=core.name, correct_state=correct_state, core=core, **options)
    # step and propagate close over the cell, the family, the core learner's programs and
    # correct_state: equal recipes, equal programs (the core's hyperparameters are an argument)
    core_key = core.program_key()
    if core_key is not None:
        step, propagate = base.with_recipe((cell, family, core_key, bool(correct_state)), step, propagate)
    return base.RecurrentLearner("rtrl", cell, family, init, step, propagate, RTRLState, core.hyper,
                                 lambda hyper, d: check_hyper(core, hyper, d), config)
