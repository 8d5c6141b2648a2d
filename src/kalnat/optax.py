"""Online natural gradient as an optax transformation (docs/method.md §2c, §3).

    >>> tx = kalnat.optax.natural_gradient(family=kalnat.families.Bernoulli())   # doctest: +SKIP
    >>> state = tx.init(params)                                                   # doctest: +SKIP
    >>> grads = jax.grad(loss)(params, x, y)          # loss = −log p(y | x, θ)  # doctest: +SKIP
    >>> updates, state = tx.update(grads, state, params, jacobian=H, prediction=yhat)  # doctest: +SKIP
    >>> params = optax.apply_updates(params, updates)                            # doctest: +SKIP

The Fisher information of one observation is ``Hᵀ R⁻¹ H`` with ``H = ∂ŷ/∂θ`` the Jacobian of
the family's mean parameter and ``R = Cov(T(y))`` (docs/method.md §1): the extra arguments
carry them, ``jacobian`` (``jax.jacrev`` of ŷ with respect to the params: every leaf with a
leading axis of the ``m`` outputs) and either ``obs_cov`` (R, ``(m, m)``) or ``prediction``
(ŷ, from which the family gives R). Per step ``t``::

    J_t = (1 − γ_t) J_{t−1} + γ_t Hᵀ R⁻¹ H,        update = −η_t (J_t + εI)⁻¹ g

with ``g`` the incoming gradient of ``−log p(y | θ)``. On the Kalman schedule (the default:
``1/η_t = λ/η_{t−1} + 1``, ``γ_t = η_t``, ε = 0) and ``J_0 = η_0 P_0⁻¹`` it is the extended
Kalman filter with prior ``P_0`` and forgetting λ (docs/method.md §3): the same θ_t as
:func:`kalnat.ekf`, step by step, with ``P_t = η_t J_t⁻¹``
(:func:`kalnat.schedules.kalman_to_natural` gives the settings).

It is an ``optax.GradientTransformationExtraArgs``: ``optax.chain`` passes the extra arguments
to it, and transformations before it (clipping) change the gradient it preconditions. Each
step solves a ``d × d`` system (O(d³)): for models of up to a few thousand parameters.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from kalnat import numerics, schedules

__all__ = ["NaturalGradientState", "natural_gradient", "fisher_matrix", "covariance"]


class NaturalGradientState(NamedTuple):
    """``count`` steps taken, ``fisher`` J_t ``(d, d)`` over the flat params, ``lr`` η_t and
    ``fisher_lr`` γ_t (η_0, γ_0 before the first step)."""

    count: jax.Array
    fisher: jax.Array
    lr: jax.Array
    fisher_lr: jax.Array


def fisher_matrix(jacobian, obs_cov, d: int):
    """``Hᵀ R⁻¹ H (d, d)`` from a Jacobian pytree (leaves ``(m,) + leaf shape``) and ``R (m, m)``."""
    R = jnp.atleast_2d(obs_cov)
    m = R.shape[0]
    H = jnp.concatenate([jnp.reshape(a, (m, -1)) for a in jax.tree_util.tree_leaves(jacobian)], axis=1)
    if H.shape[1] != d:
        raise ValueError(f"jacobian: {H.shape[1]} parameters per output, the params have {d}; give "
                         "jax.jacrev of the prediction with respect to the params")
    return H.T @ numerics.chol_solve(R, H)


def _rate(rate, name):
    """A rate as ``(t, previous) -> value``: ``None`` the Kalman rate, a number constant, a
    kalnat schedule as it is, another callable an optax schedule of the 0-based step count."""
    if rate is None:
        return schedules.kalman()
    if isinstance(rate, (schedules.Kalman, schedules.Constant, schedules.Function)):
        return rate
    if callable(rate):
        return schedules.Function(lambda t: rate(t - 1))  # optax schedules count from 0
    if _traced(rate):
        return schedules.Constant(rate)
    if not float(rate) > 0:
        raise ValueError(f"{name} must be positive, got {rate}")
    return schedules.constant(rate)


def _traced(value) -> bool:
    """Whether a setting is a JAX tracer: ``optax.inject_hyperparams`` calls the factory again
    inside a jitted update with its numbers traced. Such a value is checked where it was given
    (``init``, outside ``jit``), not on each call, where it has no value to check."""
    return isinstance(value, jax.core.Tracer)


def natural_gradient(learning_rate: Union[None, float, Callable, Any] = None, *, fisher_rate=None,
                     forgetting: float = 1.0, eta0: float = 1.0, init_fisher=1.0, damping: float = 0.0,
                     family=None) -> optax.GradientTransformationExtraArgs:
    """Online natural gradient (docs/method.md §2c) as an optax transformation.

    Args:
      learning_rate: η_t. ``None`` (default): the Kalman schedule ``1/η_t = λ/η_{t−1} + 1``;
        a number: constant; an optax schedule (a function of the step count from 0); or a
        :mod:`kalnat.schedules` schedule.
      fisher_rate: γ_t, the same forms; ``None``: ``γ_t = η_t`` (the filter's choice).
      forgetting: λ of the default Kalman schedule (fading memory, docs/method.md §3).
      eta0: η_0 (and γ_0), the rate before the first step.
      init_fisher: J_0: a scalar (``c·I``), ``(d,)`` diagonal or ``(d, d)``; the EKF with prior
        ``P_0`` is ``init_fisher = η_0 P_0⁻¹``.
      damping: ε ≥ 0 added to J_t's diagonal in the solve.
      family: a :mod:`kalnat.families` family, to compute R from ``prediction`` (else pass
        ``obs_cov``).

    The update's extra arguments: ``jacobian`` (required) and ``prediction`` or ``obs_cov``.
    A minibatch's ``prediction`` (``(B,)`` or ``(B, m)``, with ``jacobian`` of it) gives ``R``
    block-diagonal, one block a row.
    """
    if not _traced(eta0) and not float(eta0) > 0:
        raise ValueError(f"eta0 must be positive, got {eta0}")
    if not _traced(damping) and not float(damping) >= 0:
        raise ValueError(f"damping must be non-negative, got {damping}")
    if not _traced(forgetting) and not 0 < float(forgetting) <= 1:
        raise ValueError(f"forgetting must lie in (0, 1], got {forgetting}")
    if learning_rate is None:
        lr = schedules.kalman(forgetting if _traced(forgetting) else float(forgetting))
    else:
        lr = _rate(learning_rate, "learning_rate")
    fr = None if fisher_rate is None else _rate(fisher_rate, "fisher_rate")
    j0 = init_fisher if _traced(init_fisher) else numerics.check_covariance(init_fisher, "init_fisher", None)

    def init_fn(params):
        theta, _ = ravel_pytree(params)
        d, dtype = theta.shape[0], theta.dtype
        if not _traced(j0):
            numerics.check_covariance(j0, "init_fisher", d)
        eta = jnp.asarray(eta0, dtype)
        return NaturalGradientState(jnp.zeros((), jnp.int32), numerics.prior_matrix(j0, d, dtype), eta, eta)

    def update_fn(updates, state, params=None, *, jacobian=None, prediction=None, obs_cov=None, **extra):
        del params, extra  # other transformations' extra arguments
        if jacobian is None:
            raise ValueError("natural_gradient needs the extra argument jacobian (jax.jacrev of the prediction "
                             "with respect to the params)")
        g, unravel = ravel_pytree(updates)
        dtype = g.dtype
        if obs_cov is None:
            if prediction is None or family is None:
                raise ValueError("natural_gradient needs obs_cov (R), or prediction with the family given "
                                 "at construction")
            # in the updates' dtype: the family's default floor on R is a few units of its rounding;
            # a minibatch's predictions (rows of the family's m values) give R block by block
            pred = jnp.reshape(jnp.asarray(prediction, dtype), (-1,))
            if pred.shape[0] % family.m:
                raise ValueError(f"prediction: {pred.shape[0]} values, not rows of the family's {family.m} "
                                 "(one row's, or a minibatch's)")
            obs_cov = numerics.block_diag(jax.vmap(family.cov)(pred.reshape(-1, family.m)))
        t = state.count + 1
        eta = jnp.asarray(lr(t, state.lr), dtype)
        gamma = eta if fr is None else jnp.asarray(fr(t, state.fisher_lr), dtype)
        F = fisher_matrix(jacobian, jnp.asarray(obs_cov, dtype), g.shape[0])
        J = numerics.symmetrize((1.0 - gamma) * state.fisher + gamma * F)
        A = numerics.add_to_diagonal(J, damping) if _traced(damping) or damping else J
        step = -eta * numerics.chol_solve(A, g)
        return unravel(step), NaturalGradientState(t, J, eta, gamma)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def covariance(state: NaturalGradientState) -> np.ndarray:
    """``P_t = η_t J_t⁻¹ (d, d)``: the filter's covariance on the Kalman schedule (docs/method.md §3)."""
    return np.asarray(state.lr * numerics.spd_inverse(state.fisher), np.float64)

