"""Kronecker factors for one dense layer: the K-FAC form of the Fisher matrix as the filter's
precision, O(n_out² + n_in²) memory for the layer's n_out (n_in + 1) parameters.

A dense layer ``z = W a + b`` (``W (n_out, n_in)``) has the weight matrix ``M = [W | b]``; its
covariance is held as ``P = G ⊗ A`` on ``vec(M)`` (row-major), ``G (n_out, n_out)`` over the
outputs and ``A (n_in + 1, n_in + 1)`` over the inputs (the bias as a constant input 1). One
observation row of the layer is ``vec(δ āᵀ)`` (``δ`` the output's sensitivity to ``z``, ``ā =
[a; 1]``), so each observation's information is itself a Kronecker product, ``δδᵀ ⊗ āāᵀ / r``:
the approximation of K-FAC (Martens & Grosse 2015) is the sum of them.

- **Prediction.** ``P/λ`` scales ``G`` (exact). Additive noise ``q I`` becomes
  ``(G + α I) ⊗ (A + β I)`` with ``αβ = q`` split by the factors' mean variances as K-FAC splits
  its damping: ``≥ P + q I``, never less uncertain than asked (a vector ``q`` acts by its
  largest entry on the layer). The variance bound scales ``G`` by the congruence that caps
  ``max_j A_jj · G_ii``: every variance within the bound, some below it, so the bound is
  conservative, not tight (a vector bound acts by its smallest entry on the layer).
- **Gain.** ``δθ = P⁻ Hᵀ S⁻¹ e`` with ``P⁻ vec(M) = vec(G M A)``: the exact gain of this prior.
- **Posterior.** The precision ``Λ⁻ + Hᵀ R⁻¹ H`` is replaced by its nearest Kronecker product
  (Van Loan & Pitsianis 1993) in the prior's whitened coordinates, where it is
  ``I ⊗ I + Σ_j vec(M̂_j) vec(M̂_j)ᵀ`` (``M̂_j = L_Gᵀ M_j L_A``, ``M_j`` the rows of
  ``L_R⁻¹ H`` as matrices): the Frobenius-nearest ``U ⊗ V`` by alternating
  ``U ∝ ⟨V, I⟩ I + Σ M̂ V M̂ᵀ``, ``V ∝ ⟨U, I⟩ I + Σ M̂ᵀ U M̂`` (positive definite at every
  step). Where the updated precision *is* a Kronecker product, e.g. a layer with one output,
  or several outputs whose information is ``I ⊗ Σ āāᵀ`` (isotropic gaussian noise), the first
  pass finds it exactly and the filter is the exact one on the layer.

**Outer-product rows.** A dense layer's Jacobian for one example is ``δ āᵀ`` in each output
row, whatever the network around it: its bias column is ``δ`` and ``ā = Mᵀδ / δᵀδ``. When every
row of ``H`` is of that form (checked each step, to a few units of rounding), everything above
is written with ``GΔ``, ``AĀ`` (``Δ``, ``Ā`` the rows' factors) and ``k × k`` matrices, at
O((n_out² + n_in²) k) instead of O(n_out n_in (n_out + n_in) k): the gain's rows are
``vec(Gδ (Aā)ᵀ)``, ``H P⁻ Hᵀ = ΔᵀGΔ ∘ ĀᵀAĀ``, and in the whitened coordinates every alternating
pass stays ``U = αI + D W Dᵀ``, ``V = βI + Â Z Âᵀ`` (``D = L_GᵀΔ``; on the rows whitened
by ``L_R⁻¹``, which are outer products where ``R`` couples only rows of one ``ā``, as one
example's outputs, ``W = diag(ÂᵀVÂ)``, ``Z = diag(DᵀUD)``), whose factors follow by Woodbury
without a Cholesky factor of ``G`` or ``A``: ``L_G U⁻¹ L_Gᵀ = (G − FᵀF) / α`` with
``F = L_M⁻¹ W^{1/2} ΔᵀG``, ``M = αI + W^{1/2} ΔᵀGΔ W^{1/2}``. Rows that are
not outer products (a weight shared across time steps in RTRL, a layer used twice) take the
general path (so do a minibatch's rows in a group of :class:`Groups`, whose ``R`` couples
examples). Under ``vmap`` the cond becomes a select and both paths run: a bank's ``fit`` and
the predictive therefore map over members and rows (``branches``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kalnat import numerics
from kalnat.representations.base import Representation

__all__ = ["KronLayer", "KronCovariance"]

# Alternating passes of the nearest Kronecker product: exact after one where it is exact; the
# second refines the factors where the information is not of that form.
PASSES = 2
# How far a row of H may be from an outer product δ āᵀ (relative Frobenius norm, in units of
# rounding) and still take the outer-product path: a dense layer's rows are that to rounding.
OUTER_TOL = 64


class KronCovariance(NamedTuple):
    """``P = g ⊗ a`` on the layer's ``vec([W | b])``: ``g (n_out, n_out)``, ``a (n_in + 1, n_in + 1)``."""

    g: jax.Array
    a: jax.Array

    def dense(self):
        """``P`` in θ's order (the layer's bias, then ``W`` row by row)."""
        n_out, n_in1 = self.g.shape[0], self.a.shape[0]
        order = _order(n_out, n_in1 - 1)
        full = jnp.kron(self.g, self.a)
        inverse = np.argsort(order)
        return full[inverse][:, inverse]

    def with_dense(self, P):
        """The nearest Kronecker product of ``P`` (Van Loan & Pitsianis), in this form."""
        n_out, n_in1 = self.g.shape[0], self.a.shape[0]
        order = _order(n_out, n_in1 - 1)
        p = jnp.asarray(P, self.g.dtype)[order][:, order]
        r = p.reshape(n_out, n_in1, n_out, n_in1).transpose(0, 2, 1, 3).reshape(n_out * n_out, n_in1 * n_in1)
        u, s, vt = jnp.linalg.svd(r, full_matrices=False)
        g = (u[:, 0] * jnp.sqrt(s[0])).reshape(n_out, n_out)
        a = (vt[0] * jnp.sqrt(s[0])).reshape(n_in1, n_in1)
        sign = jnp.sign(jnp.trace(g))
        return KronCovariance(_sym(g * sign), _sym(a * sign))


def _sym(m):
    return 0.5 * (m + m.T)


def _order(n_out: int, n_in: int) -> np.ndarray:
    """θ's indices (bias first, then ``W`` row-major, as ``ravel_pytree`` orders ``{"b", "w"}``)
    in the order of ``vec([W | b])``."""
    m = np.empty((n_out, n_in + 1), np.int64)
    m[:, :n_in] = n_out + np.arange(n_out * n_in).reshape(n_out, n_in)
    m[:, n_in] = np.arange(n_out)
    return m.reshape(-1)


def _balanced(g, a):
    """The same ``g ⊗ a`` with both factors at the same mean variance (keeps float32 in range)."""
    c = jnp.sqrt((jnp.trace(a) / a.shape[0]) / (jnp.trace(g) / g.shape[0]))
    return g * c, a / c


@dataclass(frozen=True)
class KronLayer(Representation):
    """``P = G ⊗ A`` for one dense layer of ``n_out`` outputs and ``n_in`` inputs with a bias,
    its parameters in θ's order ``b (n_out,)``, then ``W (n_out, n_in)`` row by row."""

    n_out: int
    n_in: int
    name = "kron"
    state_type = KronCovariance
    branches = True  # the outer-product path or the general one, row by row

    def _m(self, H):
        """``H (k, d)`` → its rows as ``(k, n_out, n_in + 1)`` matrices ``[W | b]``."""
        w = H[:, self.n_out:].reshape(-1, self.n_out, self.n_in)
        return jnp.concatenate([w, H[:, :self.n_out, None]], axis=2)

    def _vec(self, m):
        """``(k, n_out, n_in + 1)`` matrices → ``(d, k)`` in θ's order (the inverse of ``_m``)."""
        return jnp.concatenate([m[:, :, self.n_in], m[:, :, :self.n_in].reshape(m.shape[0], -1)], axis=1).T

    def init(self, hyper, d, dtype):
        if d != self.n_out * (self.n_in + 1):
            raise ValueError(f"KronLayer({self.n_out}, {self.n_in}) covers {self.n_out * (self.n_in + 1)} "
                             f"parameters, its group has {d}")
        v = jnp.asarray(hyper.prior_var, dtype)
        if v.ndim != 0:
            raise ValueError("KronLayer: the prior variance must be a scalar (v·I is G ⊗ A)")
        r = jnp.sqrt(v)
        return KronCovariance(r * jnp.eye(self.n_out, dtype=dtype), r * jnp.eye(self.n_in + 1, dtype=dtype))

    def inflate(self, cov, t, lam, q, bound):
        g = cov.g / jnp.asarray(lam, cov.g.dtype)
        a = cov.a
        if q is not None:
            q = jnp.max(jnp.asarray(q, g.dtype))  # a vector q: its largest on the layer (never less)
            pi = jnp.sqrt((jnp.trace(g) / self.n_out) / (jnp.trace(a) / (self.n_in + 1)))
            g = numerics.add_to_diagonal(g, jnp.sqrt(q) * pi)
            a = numerics.add_to_diagonal(a, jnp.sqrt(q) / pi)
        if bound is not None:
            f = numerics.variance_bound(jnp.diagonal(g) * jnp.max(jnp.diagonal(a)),
                                        jnp.min(jnp.asarray(bound, g.dtype)))
            g = g * (f[:, None] * f[None, :])
        return KronCovariance(g, a)

    def _outer(self, H):
        """``H (k, d)`` → ``(ok, Δ (k, n_out), Ā (k, n_in + 1))`` with row ``j`` of ``H`` the
        matrix ``δ_j ā_jᵀ`` wherever ``ok``: ``δ`` its bias column, ``ā = Mᵀδ / δᵀδ``."""
        delta = H[:, :self.n_out]
        w = H[:, self.n_out:].reshape(-1, self.n_out, self.n_in)
        dd = jnp.sum(delta * delta, axis=1)
        safe = jnp.where(dd > 0, dd, 1.0)
        # (HIGHEST: an accelerator's default float32 products are too coarse for the check)
        aw = jnp.einsum("kij,ki->kj", w, delta, precision=jax.lax.Precision.HIGHEST) / safe[:, None]
        res = w - delta[:, :, None] * aw[:, None, :]
        tol = OUTER_TOL * jnp.finfo(H.dtype).eps
        size = jnp.sum(H * H, axis=1)
        ok = jnp.all((jnp.sum(res * res, axis=(1, 2)) <= tol * tol * size) & jnp.isfinite(size))
        return ok, delta, jnp.concatenate([aw, (dd / safe)[:, None]], axis=1)

    def quad(self, prior, h):
        return self.project(prior, h)[0]

    def project(self, prior, H):
        ok, delta, abar = self._outer(H)

        def by_factors():
            gd, aa = delta @ prior.g, abar @ prior.a        # rows (Gδ_j)ᵀ, (Aā_j)ᵀ
            return (delta @ gd.T) * (abar @ aa.T), self._vec(gd[:, :, None] * aa[:, None, :])

        def general():
            ph = self._vec(jnp.einsum("ij,kjl,lm->kim", prior.g, self._m(H), prior.a))
            return H @ ph, ph
        return jax.lax.cond(ok, by_factors, general)

    def gain(self, prior, H, R, e):
        return self.gain_projected(prior, H, R, e, None)

    def gain_projected(self, prior, H, R, e, projection):
        hph, ph = self.project(prior, H) if projection is None else projection
        # δθ = P⁻Hᵀ S⁻¹ e: the small solve first, then one pass over the d rows
        return ph @ numerics.chol_solve(hph + R, e), hph, None

    def posterior(self, prior, H, R, e, aux, rows):
        # The rows whitened by L_R⁻¹ first, as the general path does (R⁻¹ itself would square
        # R's condition number: a saturated softmax's R reaches 10⁶ in float32). They are outer
        # products where R couples only rows with the same ā: one example's outputs.
        info = numerics.solve_lower(numerics.cholesky(R), H)           # L_R⁻¹ H (k, d)
        ok, delta, abar = self._outer(info)
        return jax.lax.cond(ok, lambda: self._outer_posterior(prior, delta, abar),
                            lambda: self._general_posterior(prior, info))

    def _general_posterior(self, prior, info):
        """The posterior from the whitened rows ``info = L_R⁻¹ H (k, d)``."""
        lg, la = numerics.cholesky(prior.g), numerics.cholesky(prior.a)
        mh = jnp.einsum("ji,kjl,lm->kim", lg, self._m(info), la)      # M̂_j = L_Gᵀ M_j L_A
        v = None                                                        # V = I to start
        for _ in range(PASSES):
            if v is None:  # ⟨I, I⟩ I + Σ M̂ M̂ᵀ: the first pass without a product with I
                u = (self.n_in + 1) * jnp.eye(self.n_out, dtype=lg.dtype) + jnp.einsum("kij,kmj->im", mh, mh)
            else:
                u = jnp.trace(v) * jnp.eye(self.n_out, dtype=v.dtype) + jnp.einsum("kij,jl,kml->im", mh, v, mh)
            u = u / jnp.sqrt(jnp.sum(u * u))
            v = jnp.trace(u) * jnp.eye(self.n_in + 1, dtype=u.dtype) + jnp.einsum("kji,jl,klm->im", mh, u, mh)
        # Λ ≈ (L_G⁻ᵀ U L_G⁻¹) ⊗ (L_A⁻ᵀ V L_A⁻¹), so P = (L_G U⁻¹ L_Gᵀ) ⊗ (L_A V⁻¹ L_Aᵀ), each
        # formed as XᵀX with X = L_U⁻¹ L_Gᵀ (one triangular solve; symmetric by construction)
        xg = numerics.solve_lower(numerics.cholesky(_sym(u)), lg.T)
        xa = numerics.solve_lower(numerics.cholesky(_sym(v)), la.T)
        g, a = xg.T @ xg, xa.T @ xa
        return KronCovariance(*_balanced(_sym(g), _sym(a)))

    def _outer_posterior(self, prior, delta, abar):
        """The passes of :meth:`_general_posterior` for whitened rows ``δ_j ā_jᵀ`` (``R = I``),
        in ``k × k`` terms: ``U = αI + D diag(w) Dᵀ``, ``V = βI + Â diag(z) Âᵀ`` (the module's
        docstring, with ``R⁻¹ = I``)."""
        n, p = self.n_out, self.n_in + 1
        gd, aa = delta @ prior.g, abar @ prior.a                 # (GΔ)ᵀ, (AĀ)ᵀ
        kd, ka = _sym(delta @ gd.T), _sym(abar @ aa.T)           # DᵀD = ΔᵀGΔ, ÂᵀÂ = ĀᵀAĀ
        beta, z = jnp.asarray(1.0, kd.dtype), jnp.zeros(ka.shape[0], ka.dtype)  # V = I to start
        for _ in range(PASSES):
            w = beta * jnp.diagonal(ka) + jnp.sum(ka * ka * z[None, :], axis=1)   # diag ÂᵀVÂ
            alpha = beta * p + jnp.sum(z * jnp.diagonal(ka))                      # tr V
            wk = w[:, None] * kd                                                  # W K
            f = jnp.sqrt(alpha * alpha * n + 2.0 * alpha * jnp.trace(wk) + jnp.sum(wk * wk.T))  # ‖U‖_F
            alpha, w = alpha / f, w / f
            z = alpha * jnp.diagonal(kd) + jnp.sum(kd * kd * w[None, :], axis=1)  # diag DᵀUD
            beta = alpha * n + jnp.sum(w * jnp.diagonal(kd))                      # tr U
        return KronCovariance(*_balanced(_sym(_woodbury(prior.g, gd, kd, alpha, w)),
                                         _sym(_woodbury(prior.a, aa, ka, beta, z))))


def _woodbury(g, y, k, alpha, w):
    """``L (αI + D diag(w) Dᵀ)⁻¹ Lᵀ`` for ``G = L Lᵀ``, ``Y = DᵀLᵀ (k, n)``, ``K = DᵀD``,
    ``w ≥ 0``: ``(G − FᵀF) / α`` with ``F = L_M⁻¹ S Y``, ``S = diag(√w)``, ``M = αI + S K S``
    (Woodbury in its symmetric form: a Cholesky factor of a positive definite ``k × k`` matrix,
    and the downdate as a sum of outer products, bitwise symmetric)."""
    s = jnp.sqrt(w)
    m = numerics.add_to_diagonal(s[:, None] * k * s[None, :], alpha)
    f = numerics.solve_lower(numerics.cholesky(m), s[:, None] * y)
    return numerics.downdate(g, f.T) / alpha
