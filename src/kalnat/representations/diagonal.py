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

The variances are stored padded with zeros to a multiple of :data:`kalnat.numerics.LANES`
entries (``H``'s columns there are zero, so they neither move θ nor are moved): over an odd d,
XLA's CPU code ran the step's passes over them up to three times as long (:mod:`kalnat.numerics`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from kalnat import numerics
from kalnat.representations import moves
from kalnat.representations.base import Representation

__all__ = ["DiagonalCovariance", "Diagonal"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["p"], meta_fields=["d"])
@dataclass(frozen=True)
class DiagonalCovariance:
    """``P = diag(p[:d])`` (also the prior's ``p⁻``): ``p`` the variances of θ's ``d``
    coordinates, then zeros to a multiple of :data:`kalnat.numerics.LANES` entries (``d`` is
    static)."""

    p: jax.Array
    d: int

    def dense(self):
        return jnp.diag(self.p[:self.d])

    def with_dense(self, P):
        """``P``'s diagonal, of any size (a model grown by new features has a larger one)."""
        p = jnp.asarray(jnp.diagonal(jnp.asarray(P)), self.p.dtype)
        return DiagonalCovariance(numerics.pad_lanes(p), p.shape[-1])

    def moved(self, move):
        """``diag(A P Aᵀ)`` for a :class:`~kalnat.representations.moves.LayerMove`: each moved
        row's variances ``(T ∘ T)ᵀ p``, in O(d) (what :meth:`with_dense` keeps of ``A P Aᵀ``)."""
        t = jnp.asarray(move.t, self.p.dtype)
        return self._replace(p=self.p.at[move.rows].set(self.p[move.rows] @ (t * t)))

    def prior_movable(self, move):
        """:meth:`moved_with_prior` applies to every move."""
        return True

    def moved_with_prior(self, move, theta, c):
        """``(θ', P')`` of :func:`kalnat.scaling.reexpress_with_prior` (``c = ρ/v``) in O(d q²):
        the information ``A⁻ᵀ P⁻¹ A⁻¹ + c (I − A⁻ᵀ A⁻¹)`` is block-diagonal, one
        ``T⁻¹ diag(1/p_j) T⁻ᵀ + c (I − T⁻¹ T⁻ᵀ)`` per moved row, so its inverse, θ' (that inverse
        times the moved information vector) and P' (its diagonal) come from ``q × q`` solves.
        Where a block is not positive definite, the exact move (:meth:`moved`)."""
        p = self.p[:self.d]
        pj = p[move.rows]                                                          # (n_out, q)
        info, lower, ok = move.information_blocks(1.0 / pj, c)
        tinv = jnp.asarray(move.inverse_t(), self.p.dtype)
        eta = (theta[move.rows] / pj) @ tinv.T                                     # rows T⁻¹ (θ_j / p_j)
        eye = jnp.broadcast_to(jnp.eye(info.shape[1], dtype=info.dtype), info.shape)
        cov = jax.scipy.linalg.cho_solve((lower, True), eye)
        new = (theta.at[move.rows].set(jnp.einsum("jqr,jr->jq", cov, eta)),
               self._replace(p=self.p.at[move.rows].set(jnp.diagonal(cov, axis1=1, axis2=2))))
        return moves.or_exact(ok, new, self, move, theta)

    def _replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Diagonal(Representation):
    """The variational-diagonal form (docs/method.md §6)."""

    name = "diagonal"
    state_type = DiagonalCovariance

    def init(self, hyper, d, dtype):
        v = jnp.asarray(hyper.prior_var, dtype)
        p = jnp.diagonal(v) if v.ndim == 2 else jnp.broadcast_to(v, (d,))
        return DiagonalCovariance(numerics.pad_lanes(p, d), d)

    def inflate(self, cov, t, lam, q, bound):
        d = cov.d
        p = cov.p * (1.0 / jnp.asarray(lam, cov.p.dtype))   # 1/λ once, then a product a coordinate
        if q is not None:
            q = jnp.asarray(q, p.dtype)
            p = p + (numerics.pad_lanes(q, d) if q.ndim else q)
        if bound is not None:  # the congruence D P⁻ D on a diagonal
            bound = jnp.asarray(bound, p.dtype)
            # a cap of +inf never binds: the padding's entries (q entered them) keep s = 1, and a
            # zero gradient (a cap of 0 there would bind, and sqrt's derivative at 0 is infinite)
            p = p * numerics.variance_bound(p, numerics.pad_lanes(bound, d, jnp.inf) if bound.ndim else bound) ** 2
        return DiagonalCovariance(p, d)

    def quad(self, prior, h):
        return (h * prior.p[:prior.d]) @ h.T

    def gain(self, prior, H, R, e):
        H = numerics.pad_lanes(H, prior.d)
        ph = prior.p[:, None] * H.T                      # P⁻ Hᵀ (d, k), padded
        hph = H @ ph
        # δθ = P⁻Hᵀ S⁻¹ e: the small solve first, then one pass over the d rows
        return (ph @ numerics.chol_solve(hph + R, e))[:prior.d], hph, None

    def posterior(self, prior, H, R, e, aux, rows):
        # diag(Hᵀ R⁻¹ H) (d,) as the column sums of squares of L_R⁻¹ H, L_R⁻¹ formed (m × m)
        # so that H is read once
        inv = numerics.solve_lower(numerics.cholesky(R), jnp.eye(R.shape[0], dtype=R.dtype))
        white = inv @ numerics.pad_lanes(H, prior.d)
        fisher_diag = jnp.sum(white * white, axis=0)
        # (1/p⁻ + f)⁻¹ as written: p⁻/(1 + p⁻ f) saves a division but overflows to 0 where
        # p⁻ f passes the float range (a huge p⁻ in float32), which would stop that parameter.
        # The padding's entries are zero again (the noise q entered them), through no 1/0
        # (whose gradient would be NaN).
        real = jnp.arange(prior.p.shape[-1]) < prior.d
        p = jnp.where(real, prior.p, 1)
        return DiagonalCovariance(jnp.where(real, 1.0 / (1.0 / p + fisher_diag), 0), prior.d)
