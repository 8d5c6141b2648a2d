"""A lower Cholesky factor of P: the square-root extended Kalman filter (docs/method.md §2a).

The state keeps a lower-triangular ``L`` with ``P = L Lᵀ`` and a positive diagonal, never
``P`` itself, so ``P`` is symmetric positive semi-definite by construction in any precision
and ``H P Hᵀ = |Lᵀ Hᵀ|² ≥ 0``: ``S = H P Hᵀ + R`` stays positive definite whenever ``R`` is.
This is the form that survives long float32 streams and ill-scaled features, where the
covariance form's ``P⁻ − W Wᵀ`` can lose positive definiteness to rounding.

One step, for ``k`` stacked observations ``H (k, d)``, ``R (k, k)``, ``e (k,)``:

1. Prediction: ``L⁻ = L/√λ_t`` (forgetting, a scalar multiply); with additive noise ``q``,
   ``L⁻ = triangular factor of [L/√λ; diag(√q)]ᵀ`` from one QR (O(d³), only then).
2. Whitening: ``R = C Cᵀ``, ``H̃ = C⁻¹ H``, ``ẽ = C⁻¹ e``: ``k`` independent unit-variance
   scalar observations of the same linearised model.
3. ``k`` scalar updates in sequence, each O(d²) without any square root of a difference
   (Carlson's triangular update, written for a lower factor): with ``φ = L⁻ᵀ h̃``,
   ``c_j = 1 + Σ_{i≥j} φ_i²`` (so ``c_1 = S``, ``c_{d+1} = 1``) and
   ``g_j = Σ_{i>j} φ_i L⁻[:, i]``,

   ``L⁺[:, j] = L⁻[:, j] √(c_{j+1}/c_j) − φ_j g_j / √(c_j c_{j+1})``,   ``K = L⁻ φ / c_1``,

   evaluated as ``L⁻ − (small correction)`` so that late in a stream, when the correction is
   ~1/t of ``L``, rounding stays at ``eps·|L|`` per step.

   This is ``L⁺ = L⁻ chol(I − φφᵀ/c_1)`` with the factor of the rank-one downdate in closed
   form; every ``c_j`` is a sum of positive terms, so no cancellation and ``L⁺`` keeps a
   positive diagonal. The sequence of rank-one updates equals the joint rank-k update of
   docs/method.md §2a exactly (and the minibatch rule of §2d); θ moves by the joint gain,
   ``δθ = L⁻ (H L⁻)ᵀ S⁻¹ e``.

4. Compensated summation: ``L⁺ = L⁻ + step`` is a Kahan sum, the part of ``step`` that
   rounding drops is kept in ``err`` and added at the next step. Late in a stream the
   step is a few units in the last place of ``L``, and without this a biased share of it is
   lost: over 10⁶ float32 rows ``P`` drifted ~1e-3 above the float64 run; with it, ~1e-7
   (benchmarks/long_stream_float32.py).

Cost O(d² k) per step like the covariance form; the same θ_t and ``P_t = L Lᵀ`` as
:func:`kalnat.ekf` (to rounding, tested at 1e-10 in float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kalnat import numerics
from kalnat.representations.base import Representation

__all__ = ["CholeskyFactor", "Cholesky", "chol_rank_one_downdate"]


class CholeskyFactor(NamedTuple):
    """``chol (d, d)`` lower-triangular ``L`` with ``P_t = L Lᵀ``; ``err (d, d)`` the rounding
    error of ``chol`` carried to the next step (compensated summation: ``L + err`` is the
    factor to twice the working precision)."""

    chol: jax.Array
    err: jax.Array

    def dense(self):
        full = self.chol + self.err
        return full @ full.T

    def with_dense(self, P):
        chol = jnp.linalg.cholesky(jnp.asarray(P, self.chol.dtype))
        return CholeskyFactor(chol, jnp.zeros_like(chol))


def _reverse_cumsum_exclusive(a, axis=-1):
    """``out_j = Σ_{i>j} a_i`` along ``axis``.

    Summed directly, never as an inclusive sum minus ``a_j``: that difference cancels (XLA may
    associate a cumulative sum in any order) and would leave rounding noise where the exact
    value is small or zero (the last ``c_{d+1} = r``, the diagonal of ``g``).
    """
    a = jnp.moveaxis(a, axis, -1)
    shifted = jnp.concatenate([a[..., 1:], jnp.zeros_like(a[..., :1])], axis=-1)
    out = jnp.flip(jnp.cumsum(jnp.flip(shifted, -1), axis=-1), -1)
    return jnp.moveaxis(out, -1, axis)


def chol_rank_one_downdate(chol, h, r=1.0, err=None):
    """One scalar observation ``h (d,)`` with noise variance ``r > 0`` on ``P = L Lᵀ``.

    Returns ``(L⁺ (d, d), k (d,))``: the factor of ``P − P h hᵀ P / (hᵀ P h + r)`` and the
    Kalman gain ``k = P h / (hᵀ P h + r)``; see the module docstring for the formula. With
    ``err`` (the rounding error carried from earlier steps) it returns ``(L⁺, err⁺, k)``.
    """
    phi = chol.T @ h                                   # (d,)
    sq = phi * phi
    c_next = _reverse_cumsum_exclusive(sq) + r         # c_{j+1} = r + Σ_{i>j} φ_i²
    c = c_next + sq                                    # c_j     = r + Σ_{i≥j} φ_i²
    g = _reverse_cumsum_exclusive(chol * phi[None, :], axis=1)   # g_j = Σ_{i>j} φ_i L[:, i]
    # √(c_{j+1}/c_j) = 1/√(1 + a_j) with a_j = φ_j²/c_{j+1}. Late in a stream a_j ~ 1/t is
    # tiny: the new column is written as L − (small correction), the correction computed
    # without cancellation (1 − 1/√(1+a) = a / (√(1+a) (1 + √(1+a)))), so rounding costs
    # eps·|L| per step as in the covariance form, not eps/a.
    # When a_j ≥ 1 (a very informative row, e.g. early on) the direct factor 1/√(1+a) is
    # used instead: it stays positive however large a_j is, and so does the diagonal (g has
    # no diagonal entries, L being triangular).
    a = sq / c_next
    root_a = jnp.sqrt(1.0 + a)
    small = a < 1.0
    shrink = jnp.where(small, a / (root_a * (1.0 + root_a)), 0.0)
    scale = jnp.where(small, 1.0, 1.0 / root_a)
    coef = phi / jnp.sqrt(c * c_next)
    base = chol * scale[None, :]
    step = -(chol * shrink[None, :] + g * coef[None, :])
    gain = (chol @ phi) / c[0]
    if err is None:
        # Only the lower triangle is meaningful; rounding must not leak into the upper one.
        return jnp.tril(base + step), gain
    # Late in a stream the step is a few units in the last place of L, and rounding L + step
    # loses a biased share of it (a step under half a unit is lost entirely), so P drifts up
    # (~1e-3 relative over 10⁶ float32 rows). Kahan's compensated sum keeps what rounding
    # dropped in ``err`` and adds it back at the next step.
    step = step + err
    new = base + step
    err = step - (new - base)
    return jnp.tril(new), jnp.tril(err), gain


def _noise_factor(chol, q):
    """Lower factor of ``L Lᵀ + diag(q)`` from a QR of ``[Lᵀ; diag(√q)]`` (O(d³))."""
    d = chol.shape[0]
    stacked = jnp.concatenate([chol.T, jnp.diag(jnp.broadcast_to(jnp.sqrt(q), (d,)))], axis=0)
    upper = jnp.linalg.qr(stacked, mode="r")
    sign = jnp.where(jnp.diag(upper) < 0, -1.0, 1.0).astype(upper.dtype)
    return (upper * sign[:, None]).T


@dataclass(frozen=True)
class Cholesky(Representation):
    """The square-root form: ``P = L Lᵀ`` positive definite by construction in any precision."""

    name = "cholesky"
    state_type = CholeskyFactor

    def init(self, hyper, d, dtype):
        chol = jnp.linalg.cholesky(numerics.prior_matrix(hyper.prior_var, d, dtype))
        return CholeskyFactor(chol, jnp.zeros_like(chol))

    def inflate(self, cov, t, lam, q, bound):
        f = jax.lax.rsqrt(jnp.asarray(lam, cov.chol.dtype))
        chol, err = cov.chol * f, cov.err * f
        if q is not None:
            chol = _noise_factor(chol + err, jnp.asarray(q, chol.dtype))
            err = jnp.zeros_like(chol)
        if bound is not None:  # D L⁻ is the factor of D P⁻ D
            s = numerics.variance_bound(jnp.sum(chol * chol, axis=1), jnp.asarray(bound, chol.dtype))
            chol, err = chol * s[:, None], err * s[:, None]
        return CholeskyFactor(chol, err)

    def quad(self, prior, h):
        hl = h @ prior.chol
        return hl @ hl.T

    def gain(self, prior, H, R, e):
        hl = H @ prior.chol                        # (k, d): H L⁻
        hph = hl @ hl.T
        w, v = numerics.whiten(hph + R, prior.chol @ hl.T, e)
        return w @ v, hph, None

    def posterior(self, prior, H, R, e, aux, rows):
        # Whitening turns the k observations into independent unit-variance ones, learned
        # one after the other by Carlson's triangular update.
        c_r = numerics.cholesky(R)
        h_w = numerics.solve_lower(c_r, H)

        def one(carry, h):
            chol, err, _ = chol_rank_one_downdate(carry[0], h, err=carry[1])
            return (chol, err), None

        carry = (prior.chol, prior.err)
        if H.shape[0] <= numerics.SMALL:
            for i in range(H.shape[0]):
                carry, _ = one(carry, h_w[i])
        else:
            carry, _ = jax.lax.scan(one, carry, h_w)
        return CholeskyFactor(*carry)
