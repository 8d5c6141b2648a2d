"""Gaussian targets with an unknown noise scale: the normal–inverse-gamma filter.

Model: ``y = f(θ, x) + ε``, ``ε ~ N(0, σ² R₀)`` with ``R₀`` the family's covariance (1 for a
plain Gaussian) and σ² unknown. Prior ``θ | σ² ~ N(θ₀, σ² V₀)``, ``σ² ~ InvGamma(a₀, b₀)``.
The posterior stays in that conjugate family (DeGroot 1970 §9.10; West & Harrison 1997
§4.5, the "unknown observational variance" filter); per row, linearised at θ_{t−1}:

    S = H V⁻ Hᵀ + R₀,   θ_t = θ_{t−1} + V⁻ Hᵀ S⁻¹ e,   V_t = V⁻ − V⁻ Hᵀ S⁻¹ H V⁻
    a_t = a⁻ + m/2,     b_t = b⁻ + ½ eᵀ S⁻¹ e

with ``V⁻ = V/λ`` and, for forgetting, ``a⁻ = λ a``, ``b⁻ = λ b`` (discounting the noise
information at the same rate). The θ-update is the EKF's with ``R₀``: σ² cancels from the
gain, so the noise scale only moves the predictive, a Student-t with ``2a`` degrees of freedom,
location ŷ and scale matrix ``(b/a) S``. For a linear-Gaussian model it is the exact batch
conjugate posterior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kalnat import numerics
from kalnat.families import Family
from kalnat.learners.base import Learner, Predictive, Rule, resolve_model
from kalnat.learners.ekf import (
    check_bound_shape, check_forgetting, check_max_variance, check_prior, predicted,
)
from kalnat.predictive import student_t_log_prob
from kalnat.schedules import Forgetting, forgetting_at

__all__ = ["NIGState", "NIGFilter", "nig_filter"]


class NIGState(NamedTuple):
    """``params`` (θ), ``cov`` ``(d, d)`` = V (θ's covariance in units of σ²), ``shape`` a and
    ``scale`` b of the inverse-gamma on σ², ``count``."""

    params: Any
    cov: jax.Array
    shape: jax.Array
    scale: jax.Array
    count: jax.Array


@dataclass(frozen=True, eq=False)
class NIGFilter(Learner):
    """Learner with a Student-t predictive (``obs_cov`` is its scale matrix ``(b/a) S``)."""

    def predictive_from(self, state, lin) -> Predictive:
        s2 = state.scale / state.shape  # E-mode of σ² used for the scale: b/a
        hvh = jax.vmap(lambda h: h @ state.cov @ h.T)(lin.H)
        return Predictive(lin.yhat, s2 * hvh, s2 * (hvh + lin.R), None)

    def row_log_prob(self, state, pred, ys):
        """``(b,)`` Student-t predictive log-likelihoods, ``ν = 2a``."""
        dof = 2.0 * state.shape
        fam = self.family
        return jax.vmap(lambda m, o, y: student_t_log_prob(fam.stat(y).astype(m.dtype), m, o, dof))(
            pred.mean, pred.obs_cov, ys)

    def noise_var(self, state):
        """Posterior mean of σ², ``b / (a − 1)`` (for a > 1)."""
        return state.scale / (state.shape - 1.0)


def nig_filter(model, family: Family, *, prior_var=1.0, noise_shape: float = 1.0,
               noise_scale: float = 1.0, forgetting: Forgetting = 1.0, max_variance=None,
               input_shape=None) -> Learner:
    """Normal–inverse-gamma filter for a Gaussian family with unknown noise scale.

    Args:
      model: a :class:`kalnat.models.Model` or ``apply(params, x) -> z``.
      family: :class:`kalnat.families.Gaussian` (its ``cov`` is R₀, the noise shape).
      prior_var: ``V₀`` (scalar, ``(d,)`` or ``(d, d)``): θ's prior covariance in units of σ².
      noise_shape, noise_scale: ``a₀``, ``b₀`` of the inverse-gamma prior on σ².
      forgetting: λ in (0, 1] or ``t -> λ_t``: ``V⁻ = V/λ``, ``a⁻ = λa``, ``b⁻ = λb``.
      max_variance: ``None`` or a bound on every variance of ``V⁻`` (in units of σ², like
        ``prior_var``), as :func:`kalnat.ekf`'s: stops wind-up under forgetting.

    Returns:
      A :class:`NIGFilter` whose state is :class:`NIGState`.
    """
    if family.name != "gaussian":
        raise ValueError(f"nig_filter needs a Gaussian family, got {family.name}")
    if not (float(noise_shape) > 0 and float(noise_scale) > 0):
        raise ValueError("noise_shape and noise_scale must be positive")
    apply, input_shape = resolve_model(model, input_shape)
    check_forgetting(forgetting)
    max_variance = check_max_variance(max_variance)
    m = family.m

    def init(theta):
        check_bound_shape(max_variance, theta.shape[0])
        v0 = jnp.asarray(check_prior(prior_var, theta.shape[0]), theta.dtype)
        return (v0, jnp.asarray(noise_shape, theta.dtype), jnp.asarray(noise_scale, theta.dtype))

    def update(state, theta, H, R, e):
        lam = forgetting_at(forgetting, state.count + 1)
        prior = predicted(state.cov, state.count, forgetting, 0.0, max_variance)
        ph = prior.times(H.T)
        w, v = numerics.whiten(H @ ph + R, ph, e)
        # Masked rows arrive with H = 0 and e = 0: they add no noise information.
        a = lam * state.shape + 0.5 * jnp.sum(jnp.any(H != 0, axis=1))
        b = lam * state.scale + 0.5 * (v @ v)
        return theta + w @ v, (numerics.downdate(prior.matrix(), w), a, b)

    def quad(state, h):
        return (state.scale / state.shape) * (h @ state.cov @ h.T)

    config = dict(prior_var=prior_var, noise_shape=noise_shape, noise_scale=noise_scale,
                  forgetting=forgetting, max_variance=max_variance, m=m)
    return NIGFilter("nig_filter", apply, family, Rule(init, update, quad, NIGState), input_shape, config)
