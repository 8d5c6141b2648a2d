"""Low rank plus diagonal precision: O(d k) memory and O(d k² + k³) work per step, no d × d array.

θ's uncertainty is held as its precision ``Λ = P⁻¹ = diag(υ) + W Wᵀ`` with ``υ (d,) > 0`` and
``W (d, k)``, the form of LoFi (Chang, Duran-Martin, Shestopaloff, Jones & Murphy 2023,
"Low-rank extended Kalman filtering for online learning of neural networks from streaming
data"). It is positive definite by construction in any precision. Its choices, made here:

- **The prediction step is exact.** With ``A = υ^{-1/2} W = U diag(s) Vᵀ`` (a thin SVD),
  ``P⁻ = P/λ + q I`` is again diagonal plus rank ``k`` in precision:
  ``υ⁻ = υ / (1/λ + q υ)`` and ``W⁻ = υ^{1/2} D⁻¹ U σ^{1/2} L⁻ᵀ / √λ`` with
  ``D = diag(1/λ + q υ)``, ``σ = s²/(1 + s²)`` and ``L Lᵀ = I − σ^{1/2} Uᵀ D⁻¹ U σ^{1/2} / λ``
  (formed as a sum of positive terms)
  (Woodbury twice; ``L`` exists since ``D ≥ 1/λ``). With ``q = 0`` it is ``Λ⁻ = λ Λ``. The
  variance bound's congruence ``P⁻ → S P⁻ S`` is ``υ → υ/s²``, ``W → W/s``, also exact.
- **The mean moves by the exact Kalman gain of that prior**, ``δθ = P⁻ Hᵀ S⁻¹ e`` with
  ``P⁻ = υ^{-1/2} (I − U diag(1 − c) Uᵀ) υ^{-1/2}``, ``c = 1/(1 + s²)``; ``H P⁻ Hᵀ`` is formed
  as a sum of squares (``‖(I − UUᵀ) g‖² + ‖c^{1/2} Uᵀ g‖²``), so it is never negative in
  float32.
- **The precision gains the observation's information and is re-projected to rank k** in the
  metric of the prior's diagonal: ``Λ⁻ + Hᵀ R⁻¹ H = υ⁻^{1/2} (I + Ã Ãᵀ) υ⁻^{1/2}`` with
  ``Ã = υ⁻^{-1/2} [W⁻, Hᵀ L_R⁻ᵀ]`` (``d × (k + m)``); the top ``k`` singular directions of
  ``Ã`` stay in ``W`` and the rest's diagonal is added to ``υ``, so the diagonal of ``Λ`` is
  kept exactly (as LoFi does; only the floor on ``υ`` below can raise it) and what is dropped is the least informative direction relative
  to each parameter's own scale (invariant to rescaling a parameter, unlike a plain SVD of
  ``[W⁻, Hᵀ L_R⁻ᵀ]``).

**Cost.** One factorisation of a tall matrix per step (two with process noise): the
prediction step's thin SVD is a Householder QR of ``υ^{-1/2} W`` and an SVD of its ``k × k``
``R``; the re-projection's SVD of ``Ã`` needs none of its own, since
``Ã = [u, Q_ρ] [[diag(s) Vᵀ, b̂], [0, R_ρ]]`` from the prior's factors and the gain's
projections of ``ĝ = υ⁻^{-1/2} Hᵀ L_R⁻ᵀ``, ``b̂ = uᵀ ĝ`` and ``ρ̂ = ĝ − u b̂ = Q_ρ R_ρ``: the SVD of that small matrix gives Ã's
right singular vectors ``V``, and ``Ã V`` is one product.

Not differentiable in the hyperparameters: the SVDs' derivatives divide by differences of
singular values, which repeat (all zero at the prior); :func:`kalnat.log_evidence`'s gradient
needs another representation.

With ``k ≥ d`` nothing is ever dropped and it is the exact EKF (up to a floor on υ, ``√ε Λ_ii``, which
keeps it from underflowing under forgetting and never binds in a short stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kalnat import numerics
from kalnat.representations.base import Representation

__all__ = ["LowRank", "LowRankPrecision", "LowRankPrior"]


def _factors(ups, w):
    """``Q (d, r)`` orthonormal, ``U_R (r, r)`` orthogonal, ``s (r,)`` and ``S Vᵀ (r, k)`` with
    ``υ^{-1/2} W = U diag(s) Vᵀ``, ``U = Q U_R``, ``r = min(d, k)``.

    A Householder QR of the tall ``A = υ^{-1/2} W = Q R``, then the SVD of the small ``R =
    U_R diag(s) Vᵀ``: ``U = Q U_R`` is the thin SVD's ``U`` (up to a rotation among equal
    singular values, which leaves ``P⁻`` unchanged), as backward stable, and orthonormal also
    where ``A`` is rank deficient (``W = 0`` at the start), at a fraction of the cost of an SVD
    of the tall matrix. ``U`` is kept as the pair: a product with it is two thin ones.
    """
    q, r = jnp.linalg.qr(w / jnp.sqrt(ups)[:, None])
    ur, s, vt = jnp.linalg.svd(r, full_matrices=False)
    return q, ur, s, s[:, None] * vt


def _pad(w, k):
    """``w (d, r)`` with zero columns up to ``k`` (when ``k > d``)."""
    return w if w.shape[1] == k else jnp.pad(w, ((0, 0), (0, k - w.shape[1])))


class LowRankPrecision(NamedTuple):
    """``Λ = diag(ups) + w wᵀ``: ``ups (d,)`` positive, ``w (d, k)``."""

    ups: jax.Array
    w: jax.Array

    def dense(self):
        q, ur, s, sv = _factors(self.ups, self.w)
        return LowRankPrior(self.ups, self.w, q, ur, 1.0 / (1.0 + s * s), sv).dense()

    def with_dense(self, P):
        """``P⁻¹`` in this form: its top ``k`` eigen-directions in ``w``, the rest's diagonal in
        ``ups`` (unweighted, unlike the update's re-projection; for re-expressing a state)."""
        lam = jnp.linalg.inv(jnp.asarray(P, self.ups.dtype))
        lam = 0.5 * (lam + lam.T)
        vals, vecs = jnp.linalg.eigh(lam)
        k = self.w.shape[1]
        r = min(k, vals.shape[0])
        w = vecs[:, -r:] * jnp.sqrt(jnp.maximum(vals[-r:], 0.0))
        ups = jnp.diagonal(lam) - jnp.sum(w * w, axis=1)
        floor = jnp.finfo(ups.dtype).eps * jnp.diagonal(lam)
        return LowRankPrecision(jnp.maximum(ups, floor), _pad(w, k))


class LowRankPrior(NamedTuple):
    """The prior ``Λ⁻ = diag(ups) + w wᵀ`` with the factors of ``P⁻ = Λ⁻⁻¹``:
    ``P⁻ = υ^{-1/2} (I − u diag(1 − c) uᵀ) υ^{-1/2}``, ``u = q ur (d, r)`` orthonormal (``q (d, r)``
    orthonormal, ``ur (r, r)`` orthogonal; ``u`` itself is never formed in a step), ``c (r,)``,
    and ``sv = uᵀ υ^{-1/2} w (r, k)`` (``diag(s) Vᵀ`` of the thin SVD ``υ^{-1/2} w = u diag(s) Vᵀ``)."""

    ups: jax.Array
    w: jax.Array
    q: jax.Array
    ur: jax.Array
    c: jax.Array
    sv: jax.Array

    @property
    def u(self):
        """``u (d, r)``, formed."""
        return self.q @ self.ur

    def whitened(self, ht):
        """For ``Hᵀ (d, m)``: ``(ρ, b)`` with ``g = υ^{-1/2} Hᵀ``, ``b = uᵀ g``, ``ρ = g − u b``."""
        g = ht / jnp.sqrt(self.ups)[:, None]
        b = self.q.T @ g                                 # u and q span the same columns
        rho = g - self.q @ b
        # Projected twice: in a well-determined direction ρ ≈ 0 while c b is tiny too, and one
        # pass leaves ρ a rounding error of order ε‖g‖ along u, which the gain would then carry.
        back = self.q.T @ rho
        return rho - self.q @ back, self.ur.T @ (b + back)

    def along(self, b):
        """``u b`` for ``b (r, …)``."""
        return self.q @ (self.ur @ b)

    def times(self, ht):
        """``P⁻ Hᵀ`` for ``Hᵀ (d, m)``."""
        rho, b = self.whitened(ht)
        return (rho + self.along(self.c[:, None] * b)) / jnp.sqrt(self.ups)[:, None]

    def variances(self):
        """``diag(P⁻) (d,)``."""
        u2 = self.u * self.u
        return jnp.maximum(1.0 - jnp.sum(u2, axis=1), 0.0) / self.ups + (u2 @ self.c) / self.ups

    def dense(self):
        d = self.ups.shape[0]
        return self.times(jnp.eye(d, dtype=self.ups.dtype))


@dataclass(frozen=True)
class LowRank(Representation):
    """Diagonal plus rank-``rank`` precision (docs/method.md §6): LoFi's form, with the exact
    prediction step and the diagonal-whitened re-projection described in the module."""

    rank: int = 10
    name = "lowrank"
    state_type = LowRankPrecision

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LowRank: rank must be a positive integer, got {self.rank!r}")

    def init(self, hyper, d, dtype):
        v = jnp.asarray(hyper.prior_var, dtype)
        if v.ndim == 2:
            raise ValueError("LowRank: the prior variance must be a scalar or a (d,) diagonal, "
                             "not a (d, d) matrix")
        return LowRankPrecision(1.0 / jnp.broadcast_to(v, (d,)), jnp.zeros((d, self.rank), dtype))

    def inflate(self, cov, t, lam, q, bound):
        ups, w = cov.ups, cov.w
        # A parameter whose information lies in W keeps a diagonal part that forgetting shrinks
        # as λ^t, nothing renews, and that would underflow (then υ^{-1/2} is infinite): υ_i is
        # kept at least √ε Λ_ii (ε the dtype's rounding): then diag(P⁻), computed through
        # 1 − ‖u_i‖² ≈ 0 for such a parameter, is still accurate to ~√ε of itself.
        floor = jnp.sqrt(jnp.finfo(ups.dtype).eps)
        ups = jnp.maximum(ups, floor * (ups + jnp.sum(w * w, axis=1)))
        lam = jnp.asarray(lam, ups.dtype)
        if q is None:  # P/λ: Λ⁻ = λ Λ, and υ^{-1/2} W is unchanged
            ups, w = lam * ups, jnp.sqrt(lam) * w
        else:
            qm, ur, s, _ = _factors(ups, w)
            lq = lam * jnp.asarray(q, ups.dtype) * ups
            dinv = lam / (1.0 + lq)                                              # D⁻¹ (d,)
            us = qm @ (ur * jnp.sqrt(s * s / (1.0 + s * s))[None, :])            # U σ^{1/2}
            # N = I − σ^{1/2} Uᵀ (D⁻¹/λ) U σ^{1/2} = diag(1 − σ) + σ^{1/2} Uᵀ diag(ε) U σ^{1/2}
            # with ε = 1 − D⁻¹/λ (UᵀU = I): a sum of positive terms, where I − (…) cancels in
            # float32 once s is large (a well-determined direction) and q υ small.
            ue = us * jnp.sqrt(lq / (1.0 + lq))[:, None]
            lower = numerics.cholesky(jnp.diag(1.0 / (1.0 + s * s)) + ue.T @ ue)
            w = (jnp.sqrt(ups) * dinv)[:, None] * numerics.solve_lower(lower, us.T).T / jnp.sqrt(lam)
            ups, w = ups * dinv, _pad(w, self.rank)
        qm, ur, s, sv = _factors(ups, w)
        prior = LowRankPrior(ups, w, qm, ur, 1.0 / (1.0 + s * s), sv)
        if bound is not None:  # S P⁻ S: υ/s², W/s; υ^{-1/2} W and so u, c are unchanged
            f = numerics.variance_bound(prior.variances(), jnp.asarray(bound, ups.dtype))
            prior = prior._replace(ups=ups / (f * f), w=w / f[:, None])
        return prior

    def quad(self, prior, h):
        return self.project(prior, h)[0]

    def project(self, prior, H):
        rho, b = prior.whitened(H.T)
        cb = jnp.sqrt(prior.c)[:, None] * b
        return rho.T @ rho + cb.T @ cb, (rho, b)         # H P⁻ Hᵀ, a sum of squares

    def gain(self, prior, H, R, e):
        return self.gain_projected(prior, H, R, e, None)

    def gain_projected(self, prior, H, R, e, projection):
        hph, (rho, b) = self.project(prior, H) if projection is None else projection
        ph = (rho + prior.along(prior.c[:, None] * b)) / jnp.sqrt(prior.ups)[:, None]
        # δθ = P⁻Hᵀ S⁻¹ e: the small solve first, then one pass over the d rows
        return ph @ numerics.chol_solve(hph + R, e), hph, (rho, b)

    def posterior(self, prior, H, R, e, aux, rows):
        # Ã = [υ^{-1/2} W⁻, ĝ] with ĝ = υ^{-1/2} Hᵀ L_R⁻ᵀ (d × (k + m)). Its SVD is found from
        # the prior's factors without a factorisation of Ã itself: ĝ = u b̂ + ρ̂ (the gain's
        # projections, ρ̂ ⟂ u), ρ̂ = Q_ρ R_ρ, so Ã = [u, Q_ρ] K with the small
        # K = [[diag(s) Vᵀ, b̂], [0, R_ρ]], [u, Q_ρ] orthonormal: ÃᵀÃ = KᵀK, and Ã's
        # right singular vectors are K's. Then Ã V = U diag(s) is one product with [u, ρ̂],
        # where Q_ρ is never formed (it is undefined where ρ̂ ≈ 0, ĝ within the span of u).
        rho, b = prior.whitened(H.T) if aux is None else aux
        inv = numerics.solve_lower(numerics.cholesky(R), jnp.eye(R.shape[0], dtype=R.dtype)).T   # L_R⁻ᵀ
        rho, b = rho @ inv, b @ inv                                     # ρ̂ (d, m), b̂ (r, m)
        r, m = b.shape
        if m == 1:
            r_rho = jnp.sqrt(jnp.sum(rho * rho)).reshape(1, 1)
        else:
            r_rho = jnp.linalg.qr(rho, mode="r")                        # ρ̂ᵀρ̂ = R_ρᵀ R_ρ
        top = jnp.concatenate([prior.sv, b], axis=1)                    # (r, k + m)
        kmat = jnp.concatenate([top, jnp.concatenate(
            [jnp.zeros((m, prior.sv.shape[1]), r_rho.dtype), r_rho], axis=1)], axis=0)
        _, _, vt = jnp.linalg.svd(kmat, full_matrices=False)            # V of Ã (k + m, n)
        v = vt.T
        us = prior.along(top @ v) + rho @ v[prior.sv.shape[1]:]          # Ã V = U diag(s) (d, n)
        k = self.rank
        root = jnp.sqrt(prior.ups)[:, None]
        w = root * us[:, :k]
        dropped = jnp.sum(us[:, k:] ** 2, axis=1)                       # diag of what leaves W
        return LowRankPrecision(prior.ups * (1.0 + dropped), _pad(w, k))
