"""Iterated extended Kalman filter: relinearise at the updated θ (Gauss–Newton on the MAP).

The EKF linearises once, at θ_{t−1}. The iterated EKF (Bell & Cathey 1993, "The iterated
Kalman filter update as a Gauss–Newton method") repeats the update from the same prior
``N(θ_{t−1}, P⁻)``, each time linearising at the latest iterate θ_i:

    H_i, R_i, e_i at θ_i,   S_i = H_i P⁻ H_iᵀ + R_i,   K_i = P⁻ H_iᵀ S_i⁻¹
    θ_{i+1} = θ_{t−1} + K_i (e_i + H_i (θ_i − θ_{t−1}))

A fixed point satisfies ``P⁻⁻¹ (θ − θ_{t−1}) = H_iᵀ R_i⁻¹ e_i = −∇ℓ_t(θ)`` (the exponential-
family identity of PAPER.md §1), the stationarity condition of the one-step MAP
``½ (θ − θ_{t−1})ᵀ P⁻⁻¹ (θ − θ_{t−1}) + ℓ_t(θ)``. The covariance is ``P⁻ − K H P⁻`` at the
last linearisation. One iteration is the EKF exactly (the same operations as
:func:`kalnat.ekf`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from kalnat import linearize as _lin
from kalnat import numerics
from kalnat.families import Family
from kalnat.learners.base import Learner, Rule, resolve_model
from kalnat.learners.ekf import (
    EKFState, check_bound_shape, check_forgetting, check_max_variance, check_prior, check_process_noise,
    predicted,
)
from kalnat.schedules import Forgetting

__all__ = ["IteratedEKF", "iterated_ekf"]


@dataclass(frozen=True, eq=False)
class IteratedEKF(Learner):
    """An EKF whose update relinearises ``iterations`` times (state: :class:`EKFState`).

    ``active`` (``None``: all) is how many of them count, possibly a traced scalar: the
    members of a bank (:func:`kalnat.ekf_bank`) then differ in it inside one vmapped step.
    """

    iterations: int = 1
    forgetting: object = 1.0
    process_noise: object = 0.0
    active: object = None
    max_variance: object = None

    def _update(self, state, theta0, unravel, lin0, xs, ys, mask):
        # As in the EKF: P⁻ is folded into P Hᵀ and the rank-m update, never written.
        prior = predicted(state.cov, state.count, self.forgetting, self.process_noise, self.max_variance)
        apply_flat = lambda th, x: self.apply(unravel(th), x)

        def solve(theta_i, lin):
            H, R, e = _lin.stack(lin)
            e = e + H @ (theta_i - theta0)  # zero on the first pass: θ_0 = θ_{t−1}
            ph = prior.times(H.T)
            w, v = numerics.whiten(H @ ph + R, ph, e)
            return theta0 + w @ v, w

        theta, w = solve(theta0, lin0)
        for i in range(self.iterations - 1):  # small static count: unrolled
            lin = _lin.linearize(apply_flat, self.family, theta, xs, ys, mask)
            theta_next, w_next = solve(theta, lin)
            if self.active is None:
                theta, w = theta_next, w_next
            else:
                use = i + 2 <= self.active
                theta, w = jnp.where(use, theta_next, theta), jnp.where(use, w_next, w)
        return EKFState(unravel(theta), numerics.downdate(prior.matrix(), w), state.count + 1)

    def step(self, state, xs, ys, mask=None):
        theta, unravel, lin = self.linearize(state, xs, ys, mask)
        return self._update(state, theta, unravel, lin, xs, ys, mask)

    def step_and_predict(self, state, xs, ys, mask=None):
        theta, unravel, lin = self.linearize(state, xs, ys, mask)
        return (self._update(state, theta, unravel, lin, xs, ys, mask),
                self.predictive_from(state, lin))


def iterated_ekf(model, family: Family, *, iterations: int = 2, prior_var=1.0,
                 forgetting: Forgetting = 1.0, process_noise=0.0, max_variance=None,
                 input_shape=None, active=None) -> Learner:
    """Iterated EKF on the flat parameter θ: ``iterations`` Gauss–Newton steps per update.

    Args:
      model, family, prior_var, forgetting, process_noise, max_variance, input_shape: as
        :func:`kalnat.ekf`.
      iterations: linearisations per update (1 is the EKF).
      active: use only the first ``active`` (≤ ``iterations``) of them; may be traced.

    Returns:
      A :class:`~kalnat.learners.base.Learner` whose state is
      :class:`~kalnat.learners.ekf.EKFState`.
    """
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations}")
    apply, input_shape = resolve_model(model, input_shape)
    check_forgetting(forgetting)
    q = check_process_noise(process_noise)
    max_variance = check_max_variance(max_variance)

    def init(theta):
        check_bound_shape(max_variance, theta.shape[0])
        return (jnp.asarray(check_prior(prior_var, theta.shape[0]), theta.dtype),)

    def update(state, theta, H, R, e):  # the single-linearisation rule (first iterate)
        prior = predicted(state.cov, state.count, forgetting, q, max_variance)
        ph = prior.times(H.T)
        w, v = numerics.whiten(H @ ph + R, ph, e)
        return theta + w @ v, (numerics.downdate(prior.matrix(), w),)

    def quad(state, h):
        return h @ state.cov @ h.T

    config = dict(prior_var=prior_var, forgetting=forgetting, process_noise=process_noise,
                  iterations=int(iterations), max_variance=max_variance)
    return IteratedEKF("iterated_ekf", apply, family, Rule(init, update, quad, EKFState),
                       input_shape, config, iterations=int(iterations), forgetting=forgetting,
                       process_noise=q, active=active, max_variance=max_variance)
