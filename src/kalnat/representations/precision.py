"""The precision ``Λ = P⁻¹``: the information filter (docs/method.md §2b).

``Λ_t = Λ⁻ + Hᵀ R⁻¹ H``, ``δθ = Λ_t⁻¹ Hᵀ R⁻¹ e``, with ``Λ⁻ = λ_t Λ_{t−1}`` under forgetting.
It solves a ``d × d`` system each step (O(d³)); it exists to show the equivalence and for
problems where the information matrix is the natural object (sparse priors, pooling evidence).
Additive noise ``q I`` needs ``(Λ⁻¹/λ + qI)⁻¹``: the covariance form's prediction step between
two inverses.

One factorisation per step: with ``Λ⁻ = C Cᵀ``, ``P⁻ Hᵀ = Λ⁻⁻¹ Hᵀ`` and ``H P⁻ Hᵀ`` (the
predictive) come from ``C``, and ``δθ = Λ_t⁻¹ Hᵀ R⁻¹ e`` is computed as the same vector
``P⁻ Hᵀ S⁻¹ e`` (the matrix inversion lemma), so ``Λ_t`` itself is only summed, never
factored. The variance bound is the covariance form's congruence written on ``Λ⁻``:
``D⁻¹ Λ⁻ D⁻¹``, the inverse of ``D P⁻ D`` (:func:`kalnat.numerics.precision_bound`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kalnat import numerics
from kalnat.representations.base import Representation
from kalnat.representations.full import inflate_dense

__all__ = ["Precision", "PrecisionForm", "fisher_terms"]


class Precision(NamedTuple):
    """``info (d, d)``: the precision ``Λ = P⁻¹``."""

    info: jax.Array

    def dense(self):
        return numerics.spd_inverse(self.info)

    def with_dense(self, P):
        return Precision(numerics.spd_inverse(jnp.asarray(P, self.info.dtype)))


def fisher_terms(H, R, e):
    """``(Hᵀ R⁻¹ H, Hᵀ R⁻¹ e)``: the Fisher information and the negative loss gradient."""
    rinv_h = numerics.chol_solve(R, H)
    return H.T @ rinv_h, rinv_h.T @ e


def precision_gain(prior_info, H, R, e, weight):
    """``(δθ, H P⁻ Hᵀ, Λ_t)`` for ``Λ_t = Λ⁻ + w Hᵀ R⁻¹ H`` and ``δθ = Λ_t⁻¹ Hᵀ R⁻¹ e``, with one
    Cholesky factorisation, of ``Λ⁻``: ``δθ = P⁻ Hᵀ (H P⁻ Hᵀ + R/w)⁻¹ e / w`` (``P⁻ = Λ⁻⁻¹``)."""
    ph = numerics.chol_solve(prior_info, H.T)            # P⁻ Hᵀ (d, k)
    hph = H @ ph
    w, v = numerics.whiten(hph + R / weight, ph, e)
    fisher, _ = fisher_terms(H, R, e)
    return (w @ v) / weight, hph, numerics.symmetrize(prior_info + weight * fisher)


@dataclass(frozen=True)
class PrecisionForm(Representation):
    """The information form."""

    name = "precision"
    state_type = Precision

    def init(self, hyper, d, dtype):
        return Precision(numerics.spd_inverse(numerics.prior_matrix(hyper.prior_var, d, dtype)))

    def inflate(self, cov, t, lam, q, bound):
        if q is not None:  # P⁻ is needed: the covariance form's prediction step, bound included
            prior = inflate_dense(numerics.spd_inverse(cov.info), lam, q, bound)
            return Precision(numerics.spd_inverse(prior.matrix()))
        info = cov.info * jnp.asarray(lam, cov.info.dtype)
        if bound is not None:
            info = numerics.precision_bound(info, jnp.asarray(bound, info.dtype))
        return Precision(info)

    def quad(self, prior, h):
        return h @ numerics.chol_solve(prior.info, h.T)

    def gain(self, prior, H, R, e):
        return precision_gain(prior.info, H, R, e, 1.0)

    def posterior(self, prior, H, R, e, aux, rows):
        return Precision(aux)
