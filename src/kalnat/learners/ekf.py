"""Extended Kalman filter on the parameters, covariance form (PAPER.md §2a).

Per step, with ``P⁻ = P_{t−1}/λ_t + q I`` and the linearisation at θ_{t−1}:
``S = H P⁻ Hᵀ + R``, ``K = P⁻ Hᵀ S⁻¹``, ``θ_t = θ_{t−1} + K e``, ``P_t = P⁻ − K H P⁻``.

With ``S = L Lᵀ`` and ``W = P⁻ Hᵀ L⁻ᵀ`` the update is ``θ += W (L⁻¹ e)``, ``P = P⁻ − W Wᵀ``:
symmetric by construction, O(d² m) per step, no ``d × d`` inverse and no identity. The
Joseph form ``(I − KH) P⁻ (I − KH)ᵀ + K R Kᵀ`` is an option (more robust to rounding, ~2×
the work).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kalnat import numerics
from kalnat.families import Family
from kalnat.learners.base import Learner, Rule, resolve_model
from kalnat.schedules import Forgetting, forgetting_at

__all__ = ["EKFState", "ekf"]


class EKFState(NamedTuple):
    """``params`` (pytree, θ), ``cov`` ``(d, d)`` = P_t, ``count`` = t."""

    params: Any
    cov: jax.Array
    count: jax.Array


def check_prior(prior_var, d, name="prior_var"):
    return numerics.check_covariance(prior_var, name, d)


def check_forgetting(forgetting):
    if not callable(forgetting) and not 0 < float(forgetting) <= 1:
        raise ValueError(f"forgetting must lie in (0, 1], got {forgetting}")


def check_process_noise(q):
    q = np.asarray(q, dtype=np.float64)
    if q.ndim > 1 or not np.all(np.isfinite(q)) or np.any(q < 0):
        raise ValueError("process_noise must be a non-negative scalar or (d,) vector")
    return q


def predict_cov(cov, count, forgetting, process_noise):
    """``P⁻ = P/λ_t + q I``: forgetting is a scalar multiply, noise writes the diagonal."""
    lam = forgetting_at(forgetting, count + 1)
    p = cov if (not callable(forgetting) and forgetting == 1.0) else cov / lam
    if np.any(process_noise != 0):
        p = numerics.add_to_diagonal(p, jnp.asarray(process_noise, p.dtype))
    return p


def ekf(model, family: Family, *, prior_var=1.0, forgetting: Forgetting = 1.0,
        process_noise=0.0, joseph: bool = False, input_shape=None) -> Learner:
    """Extended Kalman filter on the flat parameter θ (PAPER.md §2a).

    Args:
      model: a :class:`kalnat.models.Model` or a function ``apply(params, x) -> z``.
      family: the output family (``kalnat.families``).
      prior_var: prior covariance ``P_0``: scalar (``v·I``), ``(d,)`` diagonal or ``(d, d)``.
      forgetting: λ in (0, 1] or a function ``t -> λ_t``: ``P⁻ = P/λ`` (Q = μP, fading memory;
        equals natural gradient with ``1/η_t = λ/η_{t−1} + 1``).
      process_noise: additive ``q`` (scalar or ``(d,)``): ``P⁻ = P + q I``, a random walk on θ.
      joseph: use the Joseph-form covariance update.
      input_shape: shape of one ``x`` when ``model`` is a plain function (optional).

    Returns:
      A :class:`~kalnat.learners.base.Learner` whose state is :class:`EKFState`.
    """
    apply, input_shape = resolve_model(model, input_shape)
    check_forgetting(forgetting)
    q = check_process_noise(process_noise)

    def init(theta):
        p0 = check_prior(prior_var, theta.shape[0])
        return (jnp.asarray(p0, theta.dtype),)

    def update(state, theta, H, R, e):
        if np.any(q != 0):
            p, c = predict_cov(state.cov, state.count, forgetting, q), 1.0
        else:
            # P⁻ = c·P is never materialised: c is folded into P Hᵀ and into the rank-m update,
            # so P is read once and rewritten once, in place.
            p, c = state.cov, 1.0 / forgetting_at(forgetting, state.count + 1)
        ph = (p @ H.T) * c
        s = H @ ph + R
        if joseph:
            gain = numerics.chol_solve(s, ph.T).T
            return theta + gain @ e, (numerics.joseph_update(p * c, gain, ph.T, s),)
        w, v = numerics.whiten(s, ph, e)
        return theta + w @ v, (p * c - w @ w.T,)

    def quad(state, h):
        return h @ state.cov @ h.T

    config = dict(prior_var=prior_var, forgetting=forgetting, process_noise=process_noise, joseph=joseph)
    return Learner("ekf", apply, family, Rule(init, update, quad, EKFState), input_shape, config)
