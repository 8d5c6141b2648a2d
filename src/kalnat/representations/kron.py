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

    def _m(self, ht):
        """``Hᵀ (d, k)`` → the rows as ``(k, n_out, n_in + 1)`` matrices."""
        return ht[_order(self.n_out, self.n_in)].T.reshape(-1, self.n_out, self.n_in + 1)

    def _vec(self, m):
        """``(k, n_out, n_in + 1)`` matrices → ``(d, k)`` in θ's order."""
        flat = m.reshape(m.shape[0], -1).T
        return flat[np.argsort(_order(self.n_out, self.n_in))]

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

    def _times(self, prior, ht):
        m = self._m(ht)
        return self._vec(jnp.einsum("ij,kjl,lm->kim", prior.g, m, prior.a))

    def quad(self, prior, h):
        return self.project(prior, h)[0]

    def project(self, prior, H):
        ph = self._times(prior, H.T)
        return H @ ph, ph

    def gain(self, prior, H, R, e):
        return self.gain_projected(prior, H, R, e, None)

    def gain_projected(self, prior, H, R, e, projection):
        hph, ph = self.project(prior, H) if projection is None else projection
        # δθ = P⁻Hᵀ S⁻¹ e: the small solve first, then one pass over the d rows
        return ph @ numerics.chol_solve(hph + R, e), hph, None

    def posterior(self, prior, H, R, e, aux, rows):
        lg, la = numerics.cholesky(prior.g), numerics.cholesky(prior.a)
        inv = numerics.solve_lower(numerics.cholesky(R), jnp.eye(R.shape[0], dtype=R.dtype))
        info = inv @ H                                                  # L_R⁻¹ H (k, d)
        mh = jnp.einsum("ji,kjl,lm->kim", lg, self._m(info.T), la)      # M̂_j = L_Gᵀ M_j L_A
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
