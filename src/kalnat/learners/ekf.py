"""Extended Kalman filter on the parameters, covariance form (PAPER.md §2a).

Per step, with ``P⁻ = P_{t−1}/λ_t + q I`` and the linearisation at θ_{t−1}:
``S = H P⁻ Hᵀ + R``, ``K = P⁻ Hᵀ S⁻¹``, ``θ_t = θ_{t−1} + K e``, ``P_t = P⁻ − K H P⁻``.

With ``S = L Lᵀ`` and ``W = P⁻ Hᵀ L⁻ᵀ`` the update is ``θ += W (L⁻¹ e)``, ``P = P⁻ − W Wᵀ``:
symmetric by construction, O(d² m) per step, no ``d × d`` inverse and no identity. The
Joseph form ``(I − KH) P⁻ (I − KH)ᵀ + K R Kᵀ`` is an option (more robust to rounding, ~2×
the work).

Forgetting inflates ``P`` in every direction, also in those the data never excite (a feature
that stays 0, a hidden unit that never turns on): there ``P`` grows as ``λ^−t`` and overflows
after ``log(max float)/log(1/λ)`` rows (λ = 0.95: ~1 700 in float32, ~14 000 in float64), the
classic covariance wind-up. ``max_variance`` bounds it: ``P⁻`` is replaced by ``D P⁻ D`` with
``D`` the diagonal of :func:`kalnat.numerics.variance_bound`, so no parameter is ever more
uncertain than the bound. The prior variance sets its scale: a coordinate the data stopped
informing falls back to being about as uncertain as before any data (:func:`kalnat.auto`
uses 100 × the prior variance, which leaves weakly informed coordinates room to move).
Coordinates within the bound are untouched, so the filter is exact until then; beyond it the
filter is no longer the fixed-schedule natural gradient of PAPER.md §3, so the bound is off
by default.
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

__all__ = ["EKFState", "ekf", "Predicted", "predicted"]


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


def check_max_variance(max_variance):
    """``None``, or a positive bound (scalar or ``(d,)``; a traced value, as in a bank, as is)."""
    if max_variance is None or isinstance(max_variance, jax.core.Tracer):
        return max_variance
    cap = np.asarray(max_variance, dtype=np.float64)
    if cap.ndim > 1 or not np.all(np.isfinite(cap)) or np.any(cap <= 0):
        raise ValueError(f"max_variance must be None or a positive scalar or (d,) vector, got {max_variance}")
    return cap if cap.ndim else float(cap)


def check_bound_shape(max_variance, d):
    if np.ndim(max_variance) == 1 and np.shape(max_variance) != (d,):
        raise ValueError(f"max_variance must be a scalar or ({d},), got shape {np.shape(max_variance)}")


class Predicted(NamedTuple):
    """``P⁻ = c · (s sᵀ) ∘ p``, held in pieces so that it is never written as a new matrix.

    ``p (d, d)`` is the stored ``P`` (or ``P/λ + qI`` with additive noise, then ``c = 1``),
    ``c = 1/λ_t`` the forgetting, ``s (d,)`` the variance bound's factors (``None``: no
    bound). The products that use ``P⁻`` fold ``c`` and ``s`` in, so a step reads ``P`` once
    for ``P⁻ Hᵀ`` and once for the rank-m update, which writes it back in place.
    """

    p: jax.Array
    c: Any
    s: Any

    def times(self, ht):
        """``P⁻ Hᵀ`` for ``Hᵀ (d, m)``."""
        if self.s is None:
            return (self.p @ ht) * self.c
        return (self.p @ (ht * self.s[:, None])) * (self.c * self.s[:, None])

    def matrix(self):
        """``P⁻`` as an expression (XLA fuses it into the update that consumes it)."""
        if self.s is None:
            return self.p * self.c
        # s_i s_j first: the factor is then bitwise symmetric. Forgetting multiplies any
        # asymmetry of P by 1/λ at every step and the update never removes it.
        return self.p * (self.c * (self.s[:, None] * self.s[None, :]))


def predicted(cov, count, forgetting, process_noise, max_variance=None) -> Predicted:
    """The prediction step of the filter: forgetting, additive noise and the variance bound."""
    if np.any(process_noise != 0):
        p, c = predict_cov(cov, count, forgetting, process_noise), 1.0
    else:
        p, c = cov, 1.0 / forgetting_at(forgetting, count + 1)
    s = None
    if max_variance is not None:
        s = numerics.variance_bound(c * jnp.diagonal(p), jnp.asarray(max_variance, p.dtype))
    return Predicted(p, c, s)


def ekf(model, family: Family, *, prior_var=1.0, forgetting: Forgetting = 1.0,
        process_noise=0.0, joseph: bool = False, max_variance=None, input_shape=None) -> Learner:
    """Extended Kalman filter on the flat parameter θ (PAPER.md §2a).

    Args:
      model: a :class:`kalnat.models.Model` or a function ``apply(params, x) -> z``.
      family: the output family (``kalnat.families``).
      prior_var: prior covariance ``P_0``: scalar (``v·I``), ``(d,)`` diagonal or ``(d, d)``.
      forgetting: λ in (0, 1] or a function ``t -> λ_t``: ``P⁻ = P/λ`` (Q = μP, fading memory;
        equals natural gradient with ``1/η_t = λ/η_{t−1} + 1``).
      process_noise: additive ``q`` (scalar or ``(d,)``): ``P⁻ = P + q I``, a random walk on θ.
      joseph: use the Joseph-form covariance update.
      max_variance: ``None`` (exact filter) or a bound (scalar or ``(d,)``, e.g. the prior
        variance) on every variance of ``P⁻``: stops covariance wind-up under forgetting.
      input_shape: shape of one ``x`` when ``model`` is a plain function (optional).

    Returns:
      A :class:`~kalnat.learners.base.Learner` whose state is :class:`EKFState`.
    """
    apply, input_shape = resolve_model(model, input_shape)
    check_forgetting(forgetting)
    q = check_process_noise(process_noise)
    max_variance = check_max_variance(max_variance)

    def init(theta):
        p0 = check_prior(prior_var, theta.shape[0])
        check_bound_shape(max_variance, theta.shape[0])
        return (jnp.asarray(p0, theta.dtype),)

    def update(state, theta, H, R, e):
        prior = predicted(state.cov, state.count, forgetting, q, max_variance)
        ph = prior.times(H.T)
        s = H @ ph + R
        if joseph:
            gain = numerics.chol_solve(s, ph.T).T
            return theta + gain @ e, (numerics.joseph_update(prior.matrix(), gain, ph.T, s),)
        w, v = numerics.whiten(s, ph, e)
        return theta + w @ v, (numerics.downdate(prior.matrix(), w),)

    def quad(state, h):
        return h @ state.cov @ h.T

    config = dict(prior_var=prior_var, forgetting=forgetting, process_noise=process_noise, joseph=joseph,
                  max_variance=max_variance)
    return Learner("ekf", apply, family, Rule(init, update, quad, EKFState), input_shape, config)
