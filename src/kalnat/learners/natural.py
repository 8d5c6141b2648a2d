"""Online natural gradient with a running Fisher estimate (PAPER.md §2c).

``J_t = (1 − γ_t) J_{t−1} + γ_t Hᵀ R⁻¹ H``, ``θ_t = θ_{t−1} + η_t (J_t + εI)⁻¹ Hᵀ R⁻¹ e``.

With the default Kalman schedule (``γ_t = η_t``, ``1/η_t = λ/η_{t−1} + 1``) and ``ε = 0`` this
is exactly the EKF with ``P_0 = η_0 J_0⁻¹`` and ``P_t = η_t J_t⁻¹`` (PAPER.md §3); see
:mod:`kalnat.schedules` for the translation. Each step solves a ``d × d`` system (O(d³)),
which the Kalman form avoids.

``max_variance`` bounds the variances of the filter's ``P⁻ = η_t ((1 − γ_t) J_{t−1})⁻¹`` as
:func:`kalnat.ekf`'s does, by ``J_{t−1} ← D⁻¹ J_{t−1} D⁻¹`` before the step: with the
translated settings it is the same bounded filter.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from kalnat import numerics, schedules
from kalnat.families import Family
from kalnat.learners.base import Learner, Rule, resolve_model
from kalnat.learners.ekf import check_bound_shape, check_max_variance
from kalnat.learners.information import fisher_terms

__all__ = ["NaturalGradientState", "natural_gradient"]


class NaturalGradientState(NamedTuple):
    """``params`` (pytree, θ), ``fisher`` ``(d, d)`` = J_t, ``lr`` = η_t, ``fisher_lr`` = γ_t,
    ``count`` = t."""

    params: Any
    fisher: jax.Array
    lr: jax.Array
    fisher_lr: jax.Array
    count: jax.Array


def natural_gradient(model, family: Family, *, learning_rate=None, fisher_rate=None,
                     eta0: float = 1.0, init_fisher=1.0, damping: float = 0.0,
                     max_variance=None, input_shape=None) -> Learner:
    """Online natural gradient (PAPER.md §2c).

    Args:
      model: a :class:`kalnat.models.Model` or a function ``apply(params, x) -> z``.
      family: the output family.
      learning_rate: η_t: a schedule from :mod:`kalnat.schedules`, a float (constant), or a
        function of ``t``. Default: the Kalman schedule ``1/η_t = 1/η_{t−1} + 1``.
      fisher_rate: γ_t, same forms; ``None`` means ``γ_t = η_t`` (what the filter does).
      eta0: η_0 (and γ_0), the rate before the first step, used by recursive schedules.
      init_fisher: J_0: scalar (``c·I``), ``(d,)`` diagonal or ``(d, d)``.
      damping: ε ≥ 0 added to the diagonal of J_t in the solve (Fisher regularisation).
      max_variance: ``None`` or a bound (scalar or ``(d,)``) on every variance of
        ``η_t ((1 − γ_t) J_{t−1})⁻¹``, the EKF's ``P⁻`` (see :func:`kalnat.ekf`).
      input_shape: shape of one ``x`` when ``model`` is a plain function (optional).
    """
    apply, input_shape = resolve_model(model, input_shape)
    lr_schedule = schedules.as_schedule(schedules.kalman() if learning_rate is None else learning_rate)
    fr_schedule = None if fisher_rate is None else schedules.as_schedule(fisher_rate)
    if not float(eta0) > 0:
        raise ValueError(f"eta0 must be positive, got {eta0}")
    if not float(damping) >= 0:
        raise ValueError(f"damping must be non-negative, got {damping}")
    max_variance = check_max_variance(max_variance)

    def init(theta):
        j0 = numerics.check_covariance(init_fisher, "init_fisher", theta.shape[0])
        check_bound_shape(max_variance, theta.shape[0])
        eta = jnp.asarray(eta0, theta.dtype)
        return jnp.asarray(j0, theta.dtype), eta, eta

    def regularised(fisher):
        return numerics.add_to_diagonal(fisher, damping) if damping else fisher

    def update(state, theta, H, R, e):
        t = state.count + 1
        eta = lr_schedule(t, state.lr)
        gamma = eta if fr_schedule is None else fr_schedule(t, state.fisher_lr)
        fisher_obs, grad = fisher_terms(H, R, e)
        prev = state.fisher
        if max_variance is not None:
            # The precision of P⁻ is (1 − γ)/η · J: bound J with the cap moved to its units.
            # At γ = 1 the step forgets J altogether and there is nothing to bound.
            cap = jnp.asarray(max_variance, prev.dtype) * (1.0 - gamma) / eta
            prev = jnp.where(gamma < 1.0, numerics.precision_bound(prev, cap), prev)
        fisher = numerics.symmetrize((1.0 - gamma) * prev + gamma * fisher_obs)
        theta = theta + eta * numerics.chol_solve(regularised(fisher), grad)
        return theta, (fisher, eta.astype(theta.dtype), jnp.asarray(gamma, theta.dtype))

    def quad(state, h):
        return state.lr * (h @ numerics.chol_solve(regularised(state.fisher), h.T))

    config = dict(learning_rate=lr_schedule, fisher_rate=fr_schedule, eta0=eta0,
                  init_fisher=init_fisher, damping=damping, max_variance=max_variance)
    return Learner("natural_gradient", apply, family,
                   Rule(init, update, quad, NaturalGradientState), input_shape, config)
