"""A diagonal covariance: the variational-diagonal EKF, O(d) memory and O(d k) work per step.

θ's uncertainty is ``P = diag(p)``, never a ``d × d`` matrix. The prediction step is the
covariance form's on a diagonal: ``p⁻ = s² (p/λ + q)`` with the bound's factors ``s``, i.e.
``p⁻ = min(p/λ + q, cap)``. The mean moves by the Kalman gain of the diagonal prior,
``δθ = P⁻ Hᵀ S⁻¹ e`` with ``S = H P⁻ Hᵀ + R`` (the full update's, given ``P⁻``), and the
precision by the diagonal of the observation's Fisher information,

    1/p = 1/p⁻ + diag(Hᵀ R⁻¹ H),

the variational diagonal Gaussian closest to the updated one (Chang, Jones & Murphy 2022,
"Diagonal Gaussian approximations of the extended Kalman filter"). It is positive by
construction in any precision, and it is the exact filter whenever P stays diagonal: when each
observation's Fisher information ``Hᵀ R⁻¹ H`` is diagonal (every row of H touches one
parameter), the exact covariance update is this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kalnat import numerics
from kalnat.representations.base import Representation

__all__ = ["DiagonalCovariance", "Diagonal"]


class DiagonalCovariance(NamedTuple):
    """``p (d,)``: the variances of θ, ``P = diag(p)`` (also the prior's ``p⁻``)."""

    p: jax.Array

    def dense(self):
        return jnp.diag(self.p)

    def with_dense(self, P):
        return DiagonalCovariance(jnp.asarray(jnp.diagonal(jnp.asarray(P)), self.p.dtype))


@dataclass(frozen=True)
class Diagonal(Representation):
    """The variational-diagonal form (docs/method.md §6)."""

    name = "diagonal"
    state_type = DiagonalCovariance

    def init(self, hyper, d, dtype):
        v = jnp.asarray(hyper.prior_var, dtype)
        return DiagonalCovariance(jnp.diagonal(v) if v.ndim == 2 else jnp.broadcast_to(v, (d,)))

    def inflate(self, cov, t, lam, q, bound):
        p = cov.p * (1.0 / jnp.asarray(lam, cov.p.dtype))   # 1/λ once, then a product a coordinate
        if q is not None:
            p = p + jnp.asarray(q, p.dtype)
        if bound is not None:  # the congruence D P⁻ D on a diagonal
            p = p * numerics.variance_bound(p, jnp.asarray(bound, p.dtype)) ** 2
        return DiagonalCovariance(p)

    def quad(self, prior, h):
        return (h * prior.p) @ h.T

    def gain(self, prior, H, R, e):
        ph = prior.p[:, None] * H.T                      # P⁻ Hᵀ (d, k)
        hph = H @ ph
        # δθ = P⁻Hᵀ S⁻¹ e: the small solve first, then one pass over the d rows
        return ph @ numerics.chol_solve(hph + R, e), hph, None

    def posterior(self, prior, H, R, e, aux, rows):
        # diag(Hᵀ R⁻¹ H) (d,) as the column sums of squares of L_R⁻¹ H, L_R⁻¹ formed (m × m)
        # so that H is read once
        inv = numerics.solve_lower(numerics.cholesky(R), jnp.eye(R.shape[0], dtype=R.dtype))
        white = inv @ H
        fisher_diag = jnp.sum(white * white, axis=0)
        # (1/p⁻ + f)⁻¹ as written: p⁻/(1 + p⁻ f) saves a division but overflows to 0 where
        # p⁻ f passes the float range (a huge p⁻ in float32), which would stop that parameter
        return DiagonalCovariance(1.0 / (1.0 / prior.p + fisher_diag))
