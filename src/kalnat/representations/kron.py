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
  largest entry on the layer). The variance bound is a congruence of each factor, capping
  ``G_ii`` at ``τ`` and ``A_jj`` at ``cap/τ``, ``τ`` chosen to shrink the layer's variances least
  (:func:`_split_cap`): every variance within the bound, some below it where several rows of
  both factors are over, so the bound is conservative, not tight; with one output it is the
  full covariance's bound (a vector bound acts by its smallest entry on the layer).
- **Gain.** ``δθ = P⁻ Hᵀ S⁻¹ e`` with ``P⁻ vec(M) = vec(G M A)``: the exact gain of this prior.
- **Posterior.** The precision ``Λ⁻ + Hᵀ R⁻¹ H`` is replaced by its nearest Kronecker product
  (Van Loan & Pitsianis 1993) in the prior's whitened coordinates, where it is
  ``I ⊗ I + Σ_j vec(M̂_j) vec(M̂_j)ᵀ`` (``M̂_j = L_Gᵀ M_j L_A``, ``M_j`` the rows of
  ``L_R⁻¹ H`` as matrices): the Frobenius-nearest ``U ⊗ V`` by alternating
  ``U ∝ ⟨V, I⟩ I + Σ M̂ V M̂ᵀ``, ``V ∝ ⟨U, I⟩ I + Σ M̂ᵀ U M̂`` (positive definite at every
  step). Where the updated precision *is* a Kronecker product, e.g. a layer with one output,
  or several outputs whose information is ``I ⊗ Σ āāᵀ`` (isotropic gaussian noise), the first
  pass finds it exactly and the filter is the exact one on the layer. Elsewhere the nearest
  product can lose part of the prior (its least eigenvalue below 1 in these coordinates, a
  ``P`` above ``P⁻`` in the directions the rows do not inform), so the two factors are then
  damped just enough to keep ``Λ⁺ ⪰ Λ⁻`` (:func:`_at_least_prior`).

**Outer-product rows.** A dense layer's Jacobian for one example is ``δ āᵀ`` in each output
row, whatever the network around it: its bias column is ``δ`` and ``ā`` its weight row of the
largest ``|δ_i|`` over ``δ_i``. When every row of ``H`` is of that form (checked each step, to a
few units of rounding), everything above is written with ``GΔ``, ``AĀ`` (``Δ``, ``Ā`` the rows'
factors) and ``k × k`` matrices, at O((n_out² + n_in²) k) instead of O(n_out n_in (n_out + n_in) k):
``δθ = vec(Σ_j s_j Gδ_j (Aā_j)ᵀ)`` (``s = S⁻¹e``), ``H P⁻ Hᵀ = ΔᵀGΔ ∘ ĀᵀAĀ``, the posterior reuses
the gain's factors, and in the whitened coordinates every alternating
pass stays ``U = αI + D W Dᵀ``, ``V = βI + Â Z Âᵀ`` (``D = L_GᵀΔ``; on the rows whitened
by ``L_R⁻¹``, which are outer products where ``R`` couples only rows of one ``ā``, as one
example's outputs, ``W = diag(ÂᵀVÂ)``, ``Z = diag(DᵀUD)``), whose factors follow by Woodbury
without a Cholesky factor of ``G`` or ``A``: ``L_G U⁻¹ L_Gᵀ = (G − FᵀF) / α`` with
``F = L_M⁻¹ W^{1/2} ΔᵀG``, ``M = αI + W^{1/2} ΔᵀGΔ W^{1/2}``. A model that says where its
dense layers are (:attr:`kalnat.models.Model.apply_tapped`, as :func:`kalnat.models.mlp`
does) gives the rows as ``Δ`` and ``Ā`` themselves (:class:`~kalnat.linearization.LayerRows`):
then there is nothing to check, and on one example a step ``H`` is never formed and the step
has no ``lax.cond`` (a minibatch's whitened rows are still checked, and a layer of one output
whitens its rows formed as a matrix). Rows that are
not outer products (a weight shared across time steps in RTRL, a layer used twice) take the
general path (so do a minibatch's rows in a group of :class:`Groups`, whose ``R`` couples
examples). Under ``vmap`` the cond becomes a select and both paths run: a bank's ``fit`` and
the predictive therefore map over members and rows (``branches``), but where one example's
rows come as factors, which branch nowhere (``Learner.branches_on``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kalnat import numerics
from kalnat.linearization import LayerRows
from kalnat.representations import moves
from kalnat.representations.base import Representation

__all__ = ["KronLayer", "KronCovariance", "KronCovarianceKernel", "KronCovarianceWeightsFirst",
           "KronCovarianceKernelFirst"]

# Alternating passes of the nearest Kronecker product: exact after one where it is exact; the
# second refines the factors where the information is not of that form.
PASSES = 2
# How far a row of H may be from an outer product δ āᵀ (relative Frobenius norm, in units of
# rounding) and still take the outer-product path: a dense layer's rows are that to rounding.
OUTER_TOL = 64


class KronCovariance(NamedTuple):
    """``P = g ⊗ a`` on the layer's ``vec([W | b])``: ``g (n_out, n_out)``, ``a (n_in + 1, n_in + 1)``.

    θ holds the layer as its bias, then ``W (n_out, n_in)`` row by row (:func:`kalnat.models`'
    layout). The subclasses below are the same form for the layer's other layouts in θ, which
    their type records (the layout is static, as the state's shapes are)."""

    g: jax.Array
    a: jax.Array

    bias_first = True    # the bias before the weights in θ
    transposed = False   # the weights stored (n_in, n_out), as flax's and haiku's kernels

    def _order(self):
        return _order(self.g.shape[0], self.a.shape[0] - 1, self.bias_first, self.transposed)

    def dense(self):
        """``P`` in θ's order (the layer's bias, then ``W`` row by row; or the subclass's layout)."""
        order = self._order()
        full = jnp.kron(self.g, self.a)
        inverse = np.argsort(order)
        return full[inverse][:, inverse]

    def with_dense(self, P):
        """The nearest Kronecker product of ``P`` (Van Loan & Pitsianis), in this form."""
        n_out, n_in1 = self.g.shape[0], self.a.shape[0]
        order = self._order()
        p = jnp.asarray(P, self.g.dtype)[order][:, order]
        r = p.reshape(n_out, n_in1, n_out, n_in1).transpose(0, 2, 1, 3).reshape(n_out * n_out, n_in1 * n_in1)
        u, s, vt = jnp.linalg.svd(r, full_matrices=False)
        g = (u[:, 0] * jnp.sqrt(s[0])).reshape(n_out, n_out)
        a = (vt[0] * jnp.sqrt(s[0])).reshape(n_in1, n_in1)
        sign = jnp.sign(_trace(g))
        return type(self)(numerics.symmetrize(g * sign), numerics.symmetrize(a * sign))

    def prior_movable(self, move):
        """Whether ``move`` moves this layer's rows ``[W_j | b_j]``, each in ``vec([W | b])``'s
        order (what :meth:`moved` moves exactly and :meth:`moved_with_prior` takes)."""
        n_out, n_in1 = self.g.shape[0], self.a.shape[0]
        return move.rows.shape == (n_out, n_in1) and np.array_equal(move.rows, self._order().reshape(n_out, n_in1))

    def moved(self, move):
        """After a :class:`~kalnat.representations.moves.LayerMove` of this layer's inputs:
        every output row ``[W_j, b_j]`` moves by the same ``Tᵀ``, so ``P' = G ⊗ Tᵀ A T``,
        exactly; a move of other rows goes through :meth:`with_dense`."""
        if not self.prior_movable(move):
            return self.with_dense(move.congruence(self.dense()))
        t = jnp.asarray(move.t, self.a.dtype)
        return self._replace(a=numerics.symmetrize(t.T @ self.a @ t))

    def moved_with_prior(self, move, theta, c):
        """``(θ', P')`` of :func:`kalnat.scaling.reexpress_with_prior` for this layer (``θ`` its
        ``d`` parameters, ``c = ρ/v``), without a ``d × d`` matrix: the information
        ``A⁻ᵀ P⁻¹ A⁻¹ + c (I − A⁻ᵀ A⁻¹)`` is ``G⁻¹ ⊗ X + I ⊗ Y`` (``X = T⁻¹ A⁻¹ T⁻ᵀ``,
        ``Y = c (I − T⁻¹ T⁻ᵀ)``), whose inverse, with ``G = U diag(γ) Uᵀ``, is
        ``Σ_j u_j u_jᵀ ⊗ B_j``, ``B_j = (X/γ_j + Y)⁻¹``. θ' is that inverse times the moved
        information vector, and P' its nearest Kronecker product (as :meth:`with_dense`): the
        ``u_j u_jᵀ`` are orthonormal, so it comes from the top eigenvector ``v`` of the ``n_out × n_out``
        matrix ``⟨B_i, B_j⟩``: ``√σ U diag(v) Uᵀ ⊗ Σ_j v_j B_j / √σ``. Where that information is
        not positive definite, the exact move (:meth:`moved`). For a move of this layer's rows
        (:meth:`prior_movable`)."""
        n_in1 = self.a.shape[0]
        dt = self.a.dtype
        tinv = jnp.asarray(move.inverse_t(), dt)
        gam, u = jnp.linalg.eigh(numerics.symmetrize(self.g))
        a_inv = numerics.spd_inverse(self.a)
        x = numerics.symmetrize(tinv @ a_inv @ tinv.T)
        y = move.prior_change(c, dt)
        info = x[None] / gam[:, None, None] + y[None]                        # (n_out, q, q)
        lower = jnp.linalg.cholesky(info)
        ok = jnp.all(jnp.isfinite(lower)) & jnp.all(gam > 0)
        eye = jnp.broadcast_to(jnp.eye(n_in1, dtype=dt), info.shape)
        b = jax.scipy.linalg.cho_solve((lower, True), eye)                  # B_j
        m = theta[move.rows]                                                  # [W | b]
        eta = ((u / gam) @ (u.T @ m) @ a_inv) @ tinv.T                        # A⁻ᵀ P⁻¹ θ as a matrix
        m_new = u @ jnp.einsum("jq,jqr->jr", u.T @ eta, b)                    # Σ_j u_j u_jᵀ N B_j
        gram = jnp.einsum("iqr,jqr->ij", b, b)
        lam, vecs = jnp.linalg.eigh(numerics.symmetrize(gram))
        v, root = vecs[:, -1], jnp.sqrt(jnp.sqrt(jnp.maximum(lam[-1], 0.0)))  # σ^{1/2}
        g = root * (u * v) @ u.T
        a = jnp.einsum("j,jqr->qr", v, b) / root
        sign = jnp.sign(_trace(g))
        new = (theta.at[move.rows].set(m_new), type(self)(numerics.symmetrize(g * sign), numerics.symmetrize(a * sign)))
        return moves.or_exact(ok, new, self, move, theta)


class KronCovarianceKernel(KronCovariance):
    """:class:`KronCovariance` of a layer held in θ as its bias, then its weights stored
    ``(n_in, n_out)`` (flax's ``{"bias", "kernel"}``, haiku's ``{"b", "w"}``)."""

    __slots__ = ()
    transposed = True


class KronCovarianceWeightsFirst(KronCovariance):
    """:class:`KronCovariance` of a layer held in θ as ``W (n_out, n_in)``, then its bias
    (equinox's ``Linear``)."""

    __slots__ = ()
    bias_first = False


class KronCovarianceKernelFirst(KronCovariance):
    """:class:`KronCovariance` of a layer held in θ as its weights stored ``(n_in, n_out)``, then
    its bias."""

    __slots__ = ()
    bias_first = False
    transposed = True


_COVARIANCE_TYPES = {(c.bias_first, c.transposed): c for c in
                     (KronCovariance, KronCovarianceKernel, KronCovarianceWeightsFirst, KronCovarianceKernelFirst)}


def _order(n_out: int, n_in: int, bias_first: bool = True, transposed: bool = False) -> np.ndarray:
    """θ's indices of the layer's parameters in the order of ``vec([W | b])``: θ holding the bias
    first (``bias_first``, as ``ravel_pytree`` orders ``{"b", "w"}``) or last, and ``W``
    row-major, or stored ``(n_in, n_out)`` (``transposed``)."""
    weights, bias = (n_out, 0) if bias_first else (0, n_out * n_in)
    index = np.arange(n_out * n_in)
    m = np.empty((n_out, n_in + 1), np.int64)
    m[:, :n_in] = weights + (index.reshape(n_in, n_out).T if transposed else index.reshape(n_out, n_in))
    m[:, n_in] = bias + np.arange(n_out)
    return m.reshape(-1)


def _trace(m):
    """``tr M`` from its diagonal (``jnp.trace`` masks the whole matrix: one more pass over it)."""
    return jnp.sum(jnp.diagonal(m))


def _balance(tg, n, ta, p):
    """``c`` such that ``c·G ⊗ A/c`` has both factors at the same mean variance, from their
    traces ``tg``, ``ta`` and sizes (keeps float32 in range)."""
    return jnp.sqrt((ta / p) / (tg / n))


def _split_cap(gd, ad, cap):
    """``τ``: the variance bound on ``G ⊗ A`` as the caps ``τ`` on ``G_ii`` and ``cap/τ`` on
    ``A_jj``, so that every ``G_ii A_jj`` is at most ``cap``.

    Of those splits, one that shrinks the layer's variances least: the largest
    ``Σ_ij log(min(G_ii, τ) min(A_jj, cap/τ))``, a concave function of ``x = log τ``, piecewise
    linear with its corners at ``τ = G_ii`` and ``τ = cap/A_jj`` (those are the candidates). So
    where one input is uninformed (a constant column: its ``A_jj`` keeps the prior's size while
    forgetting inflates ``G``), only its row of ``A`` is shrunk, as the full covariance's bound
    shrinks that input's variances alone; capping ``max_j A_jj · G_ii`` through ``G`` would shrink
    every weight of the layer with it and stop its learning. With one output it is the full
    covariance's bound exactly.

    Where the maximum is a flat stretch, ``x`` is its midpoint: a choice that moves continuously
    with ``G`` and ``A`` (picking one of its ends by rounding would not: two runs equal to
    rounding took different ends, P 10⁻³ apart). Nothing over the cap is such a stretch, from
    ``max G_ii`` to ``cap / max A_jj``, and its midpoint changes neither factor. The maximum is
    found from the slopes on either side of each corner, ``n_a #{G_ii > τ} − n_g #{A_jj > cap/τ}``
    (``n_g × n_a`` the layer's shape): counts of the sorted diagonals, exact, where comparing the
    sums' values would need a tolerance for their rounding."""
    n_g, n_a = gd.shape[0], ad.shape[0]
    log_g, log_a, log_c = jnp.log(gd), jnp.log(ad), jnp.log(cap)
    # each corner's two thresholds, its own the exact value (so a corner compares equal to itself)
    tg = jnp.concatenate([log_g, log_c - log_a])      # on log G_ii: x
    ta = jnp.concatenate([log_c - log_g, log_a])      # on log A_jj: log cap − x
    sg, sa = jax.lax.stop_gradient(jnp.sort(log_g)), jax.lax.stop_gradient(jnp.sort(log_a))
    tg0, ta0 = jax.lax.stop_gradient(tg), jax.lax.stop_gradient(ta)
    above = lambda s, t: s.shape[0] - jnp.searchsorted(s, t, side="right")   # noqa: E731  #{s > t}
    at_least = lambda s, t: s.shape[0] - jnp.searchsorted(s, t, side="left")  # noqa: E731  #{s ≥ t}
    right = n_a * above(sg, tg0) - n_g * at_least(sa, ta0)   # the slope just above x
    left = n_a * at_least(sg, tg0) - n_g * above(sa, ta0)    # and just below
    top = (left >= 0) & (right <= 0)
    lo, hi = jnp.min(jnp.where(top, tg, jnp.inf)), jnp.max(jnp.where(top, tg, -jnp.inf))
    return jnp.exp(0.5 * (lo + hi))


def _balanced(g, a):
    """The same ``g ⊗ a`` with both factors at the same mean variance."""
    c = _balance(_trace(g), g.shape[0], _trace(a), a.shape[0])
    return g * c, a / c


@dataclass(frozen=True)
class KronLayer(Representation):
    """``P = G ⊗ A`` for one dense layer of ``n_out`` outputs and ``n_in`` inputs with a bias,
    its parameters in θ's order ``b (n_out,)``, then ``W (n_out, n_in)`` row by row; with
    ``bias_first=False`` the weights come first, and with ``transposed=True`` they are stored
    ``(n_in, n_out)`` (flax's and haiku's kernels; :func:`~kalnat.representations.kronecker`
    reads the layout from the params). Layers given as their factors by a model
    (:class:`~kalnat.linearization.LayerRows`) are in the first layout."""

    n_out: int
    n_in: int
    bias_first: bool = True
    transposed: bool = False
    name = "kron"
    branches = True  # the outer-product path or the general one, row by row

    @property
    def state_type(self):
        return _COVARIANCE_TYPES[(bool(self.bias_first), bool(self.transposed))]

    @property
    def layer_rows(self):
        # kalnat.models' layers give their rows as factors in the first layout
        return bool(self.bias_first) and not self.transposed

    def _parts(self, H):
        """``H (k, d)`` → its rows' bias columns ``Δ (k, n_out)`` and weights ``(k, n_out, n_in)``,
        from θ's leaves in this layout. (XLA still writes the flat ``H`` out and slices it: it
        does not take a slice of the Jacobian's concatenated leaves back to the leaf.)"""
        n = self.n_out * self.n_in
        delta, w = (H[:, :self.n_out], H[:, self.n_out:]) if self.bias_first else (H[:, n:], H[:, :n])
        if self.transposed:
            return delta, jnp.swapaxes(w.reshape(-1, self.n_in, self.n_out), 1, 2)
        return delta, w.reshape(-1, self.n_out, self.n_in)

    def _flat(self, db, dw):
        """A change of the layer, bias ``(n_out,)`` and weights ``(n_out, n_in)``, as θ holds it."""
        dw = (dw.T if self.transposed else dw).reshape(-1)
        return jnp.concatenate([db, dw] if self.bias_first else [dw, db])

    def _join(self, delta, w):
        """``Δ (k, n_out)``, ``W (k, n_out, n_in)`` → the rows as ``(k, n_out, n_in + 1)`` ``[W | b]``."""
        return jnp.concatenate([w, delta[:, :, None]], axis=2)

    def init(self, hyper, d, dtype):
        if d != self.n_out * (self.n_in + 1):
            raise ValueError(f"KronLayer({self.n_out}, {self.n_in}) covers {self.n_out * (self.n_in + 1)} "
                             f"parameters, its group has {d}")
        v = jnp.asarray(hyper.prior_var, dtype)
        if v.ndim != 0:
            raise ValueError("KronLayer: the prior variance must be a scalar (v·I is G ⊗ A)")
        r = jnp.sqrt(v)
        return self.state_type(r * jnp.eye(self.n_out, dtype=dtype), r * jnp.eye(self.n_in + 1, dtype=dtype))

    def inflate(self, cov, t, lam, q, bound):
        g = cov.g / jnp.asarray(lam, cov.g.dtype)
        a = cov.a
        if q is not None:
            q = jnp.max(jnp.asarray(q, g.dtype))  # a vector q: its largest on the layer (never less)
            pi = 1.0 / _balance(_trace(g), self.n_out, _trace(a), self.n_in + 1)
            g = numerics.add_to_diagonal(g, jnp.sqrt(q) * pi)
            a = numerics.add_to_diagonal(a, jnp.sqrt(q) / pi)
        if bound is not None:
            cap = jnp.min(jnp.asarray(bound, g.dtype))
            tau = _split_cap(jnp.diagonal(g), jnp.diagonal(a), cap)
            f = numerics.variance_bound(jnp.diagonal(g), tau)
            h = numerics.variance_bound(jnp.diagonal(a), cap / tau)
            g = g * (f[:, None] * f[None, :])
            a = a * (h[:, None] * h[None, :])
        return type(cov)(g, a)

    def _factors(self, H):
        """``H (k, d)`` → ``(Δ (k, n_out), Ā (k, n_in + 1))``, row ``j`` of ``H`` being the matrix
        ``δ_j ā_jᵀ`` if it is an outer product: ``δ`` its bias column, ``ā`` the weight row of the
        largest ``|δ_i|`` divided by ``δ_i`` (exact to rounding for an outer product; a zero row
        has ``ā = 0``)."""
        delta, w = self._parts(H)
        pivot = jnp.argmax(jnp.abs(delta), axis=1)
        top = jnp.take_along_axis(delta, pivot[:, None], axis=1)[:, 0]
        safe = jnp.where(top != 0, top, 1.0)
        aw = jnp.take_along_axis(w, pivot[:, None, None], axis=1)[:, 0] / safe[:, None]
        return delta, jnp.concatenate([aw, (top != 0).astype(H.dtype)[:, None]], axis=1)

    @property
    def dense_layers(self):
        return ((self.n_out, self.n_in),)

    def _weights(self, H):
        """The rows' weights ``(k, n_out, n_in)``: ``H``'s, or formed from its factors."""
        return H.weights() if isinstance(H, LayerRows) else self._parts(H)[1]

    def _outer(self, H):
        """``(ok, Δ, Ā)``: :meth:`_factors`, and whether every row of ``H`` is ``δ_j ā_jᵀ`` (one
        pass over ``H``, the check's). Rows given as the layer's factors (:class:`LayerRows`)
        are outer products by construction: ``ok`` is then ``True`` itself, and the steps
        take the outer-product path without a ``lax.cond``."""
        if isinstance(H, LayerRows):
            return True, H.deltas[0], H.row_inputs()
        delta, abar = self._factors(H)
        w = self._parts(H)[1]
        res = w - delta[:, :, None] * abar[:, None, :-1]
        tol = OUTER_TOL * jnp.finfo(H.dtype).eps
        size = jnp.sum(delta * delta, axis=1) + jnp.sum(w * w, axis=(1, 2))
        ok = jnp.all((jnp.sum(res * res, axis=(1, 2)) <= tol * tol * size) & jnp.isfinite(size))
        return ok, delta, abar

    def quad(self, prior, h):
        return self.project(prior, h)[0]

    def project(self, prior, H):
        """``(H P⁻ Hᵀ, factors)``: ``factors = (ok, Δ, Ā, (GΔ)ᵀ, (AĀ)ᵀ)`` of the rows (zeros
        off the outer-product path), which the gain and the posterior reuse."""
        ok, delta, abar = self._outer(H)

        def by_factors():
            gd, aa = delta @ prior.g, abar @ prior.a        # rows (Gδ_j)ᵀ, (Aā_j)ᵀ
            return (delta @ gd.T) * (abar @ aa.T), gd, aa

        def general():  # ⟨M_i, G M_j A⟩
            m = self._join(delta, self._weights(H))
            return (jnp.einsum("kij,lij->kl", m, jnp.einsum("ij,kjl,lm->kim", prior.g, m, prior.a)),
                    jnp.zeros_like(delta), jnp.zeros_like(abar))
        hph, gd, aa = _branch(ok, by_factors, general)
        return hph, (ok, delta, abar, gd, aa)

    def gain(self, prior, H, R, e):
        return self.gain_projected(prior, H, R, e, None)

    def gain_projected(self, prior, H, R, e, projection):
        hph, factors = self.project(prior, H) if projection is None else projection
        ok, delta, _, gd, aa = factors
        s = numerics.chol_solve(hph + R, e)
        n = self.n_in

        # δθ = P⁻Hᵀ s = vec(G (Σ_j s_j M_j) A): one layer-sized matrix, never the k rows of P⁻Hᵀ
        # (on the outer-product path Σ_j s_j (Gδ_j)(Aā_j)ᵀ), made as its bias column and its
        # weights apart, which is how θ's leaves hold them
        def by_factors():
            gs = gd * s[:, None]
            return gs.T @ aa[:, n], gs.T @ aa[:, :n]

        def general():
            m = prior.g @ jnp.einsum("k,kij->ij", s, self._join(delta, self._weights(H))) @ prior.a
            return m[:, n], m[:, :n]
        db, dw = _branch(ok, by_factors, general)
        return self._flat(db, dw), hph, factors

    def posterior(self, prior, H, R, e, aux, rows):
        ok, chol, factors = self._whitened(prior, H, R, aux)

        def general():
            delta = H.deltas[0] if isinstance(H, LayerRows) else self._parts(H)[0]
            w = self._weights(H)
            return self._general_posterior(prior, self._join(
                numerics.solve_lower(chol, delta),
                numerics.solve_lower(chol, w.reshape(w.shape[0], -1)).reshape(w.shape)))
        return _branch(ok, lambda: self._outer_posterior(prior, *factors), general)

    def _whitened(self, prior, H, R, factors):
        """``(ok, L_R, (Δ̂, Ā, (GΔ̂)ᵀ, (AĀ)ᵀ))`` for the rows whitened by ``L_R⁻¹``, as the general
        path takes them (``R⁻¹`` itself would square ``R``'s condition number: a saturated
        softmax's ``R`` reaches 10⁶ in float32); ``ok``: they are outer products.

        Whitened row ``j`` is ``Σ_i L_ji δ_i ā_iᵀ`` (``L = L_R⁻¹``): the outer product
        ``(Σ_i L_ji δ_i) ā_jᵀ`` where every row it mixes in has ``ā_j``'s ``ā`` or is zero (one
        example's outputs). Its factors then follow from the gain's (``factors``, from
        :meth:`project`) in ``k × k`` terms, ``G Σ_i L_ji δ_i = Σ_i L_ji (Gδ_i)``, with no
        second pass over ``H``. A layer with one output has outer-product rows whatever ``R``
        mixes, and only ``n_in + 1`` parameters: its rows are whitened outright. The rows of one
        example given as the layer's factors share its ``ā``: whitened, they are outer
        products whatever ``R`` mixes, with no check."""
        chol = numerics.cholesky(R)
        rows = isinstance(H, LayerRows)
        one = rows and H.examples() == 1
        if self.n_out == 1 and not one:
            ok, delta, abar = self._outer(numerics.solve_lower(chol, H.flat() if rows else H))
            return ok, chol, (delta, abar, delta @ prior.g, abar @ prior.a)
        ok, delta, abar, gd, aa = self.project(prior, H)[1] if factors is None else factors
        white = numerics.solve_lower(chol, jnp.eye(R.shape[0], dtype=R.dtype))  # L_R⁻¹
        if not one:
            tol = OUTER_TOL * jnp.finfo(abar.dtype).eps
            apart = jnp.sum((abar[:, None, :] - abar[None, :, :]) ** 2, axis=2)      # (j, i)
            same = apart <= tol * tol * jnp.sum(abar * abar, axis=1)[:, None]
            zero = jnp.all(delta == 0, axis=1)[None, :]                             # row i is zero
            ok = ok & jnp.all((white == 0) | same | zero)
        return ok, chol, (white @ delta, abar, white @ gd, aa)

    def _general_posterior(self, prior, m):
        """The posterior from the whitened rows ``L_R⁻¹ H`` as matrices ``m (k, n_out, n_in + 1)``."""
        lg, la = numerics.cholesky(prior.g), numerics.cholesky(prior.a)
        mh = jnp.einsum("ji,kjl,lm->kim", lg, m, la)                   # M̂_j = L_Gᵀ M_j L_A
        v = None                                                        # V = I to start
        for _ in range(PASSES):
            if v is None:  # ⟨I, I⟩ I + Σ M̂ M̂ᵀ: the first pass without a product with I
                u = (self.n_in + 1) * jnp.eye(self.n_out, dtype=lg.dtype) + jnp.einsum("kij,kmj->im", mh, mh)
            else:
                u = _trace(v) * jnp.eye(self.n_out, dtype=v.dtype) + jnp.einsum("kij,jl,kml->im", mh, v, mh)
            u = u / jnp.sqrt(jnp.sum(u * u))
            v = _trace(u) * jnp.eye(self.n_in + 1, dtype=u.dtype) + jnp.einsum("kji,jl,klm->im", mh, u, mh)
        u, v = _at_least_prior(u, v, jnp.linalg.eigvalsh(u)[0], jnp.linalg.eigvalsh(v)[0])
        # Λ ≈ (L_G⁻ᵀ U L_G⁻¹) ⊗ (L_A⁻ᵀ V L_A⁻¹), so P = (L_G U⁻¹ L_Gᵀ) ⊗ (L_A V⁻¹ L_Aᵀ), each
        # formed as XᵀX with X = L_U⁻¹ L_Gᵀ (one triangular solve; symmetric by construction)
        xg = numerics.solve_lower(numerics.cholesky(numerics.symmetrize(u)), lg.T)
        xa = numerics.solve_lower(numerics.cholesky(numerics.symmetrize(v)), la.T)
        g, a = xg.T @ xg, xa.T @ xa
        return self.state_type(*_balanced(numerics.symmetrize(g), numerics.symmetrize(a)))

    def _outer_posterior(self, prior, delta, abar, gd, aa):
        """The passes of :meth:`_general_posterior` for whitened rows ``δ_j ā_jᵀ`` (``R = I``),
        given ``(GΔ)ᵀ``, ``(AĀ)ᵀ``, in ``k × k`` terms: ``U = αI + D diag(w) Dᵀ``,
        ``V = βI + Â diag(z) Âᵀ`` (the module's docstring, with ``R⁻¹ = I``)."""
        n, p = self.n_out, self.n_in + 1
        kd, ka = numerics.symmetrize(delta @ gd.T), numerics.symmetrize(abar @ aa.T)  # DᵀD = ΔᵀGΔ, ÂᵀÂ = ĀᵀAĀ
        beta, z = jnp.asarray(1.0, kd.dtype), jnp.zeros(ka.shape[0], ka.dtype)  # V = I to start
        for _ in range(PASSES):
            w = beta * jnp.diagonal(ka) + jnp.sum(ka * ka * z[None, :], axis=1)   # diag ÂᵀVÂ
            alpha = beta * p + jnp.sum(z * jnp.diagonal(ka))                      # tr V
            wk = w[:, None] * kd                                                  # W K
            f = jnp.sqrt(alpha * alpha * n + 2.0 * alpha * _trace(wk) + jnp.sum(wk * wk.T))  # ‖U‖_F
            alpha, w = alpha / f, w / f
            z = alpha * jnp.diagonal(kd) + jnp.sum(kd * kd * w[None, :], axis=1)  # diag DᵀUD
            beta = alpha * n + jnp.sum(w * jnp.diagonal(kd))                      # tr U
        (alpha, w), (beta, z) = _at_least_prior(
            (alpha, w), (beta, z), alpha + _least(kd, w, n), beta + _least(ka, z, p))
        fg, fa = _woodbury(gd, kd, alpha, w), _woodbury(aa, ka, beta, z)
        # (G − FᵀF)/α and (A − FᵀF)/β balanced, each in one pass over its factor: the traces
        # from the diagonals alone, and no symmetrisation (numerics.downdate of a symmetric
        # matrix is bitwise symmetric, and so is its product with a number)
        tg = jnp.sum(jnp.diagonal(prior.g) - jnp.sum(fg * fg, axis=0)) / alpha
        ta = jnp.sum(jnp.diagonal(prior.a) - jnp.sum(fa * fa, axis=0)) / beta
        c = _balance(tg, n, ta, p)
        return self.state_type(numerics.downdate(prior.g, fg.T) * (c / alpha),
                              numerics.downdate(prior.a, fa.T) / (c * beta))


def _branch(ok, by_factors, general):
    """``by_factors()`` where ``ok`` is ``True`` itself (rows known to be outer products), else
    a ``lax.cond`` on ``ok``."""
    return by_factors() if ok is True else jax.lax.cond(ok, by_factors, general)


def _at_least_prior(u, v, u_least, v_least):
    """The factors ``U ⊗ V`` of a whitened posterior precision, raised where needed so that
    ``U ⊗ V ⪰ I ⊗ I``, the prior's (``u_least``, ``v_least``: their least eigenvalues).

    The nearest Kronecker product of ``I ⊗ I + Σ_j vec(M̂_j) vec(M̂_j)ᵀ`` drops part of the prior
    when the rows' information dominates it: of ``I ⊗ I + D ⊗ ââᵀ`` (one example's rows) it
    keeps little more than ``D ⊗ ââᵀ``, whose precision in the directions the example does not
    inform is then far below the prior's. Such a step makes ``P`` larger than ``P⁻``, which no
    observation can (on a standardised 10-class softmax, ``tr P`` grew 3.5-fold in 50 rows
    and θ reached 10¹²). Here the factors are balanced to the same least eigenvalue ``r`` and,
    where ``r < 1``, both are raised by ``(1 − r) I``: the least equal raise of the balanced
    factors that restores ``Λ⁺ ⪰ Λ⁻`` (K-FAC damps its factors the same way). Other splits
    restore it too (raising V alone by ``(1/u − v) I``); none adds less precision in every
    direction, and each adds some where the data informed: on one softmax example the damped
    precision was up to 3 × the exact posterior's in some direction. Where the product already
    holds the prior, as where the information is a Kronecker product, nothing changes.
    ``u``, ``v``: matrices, or ``(α, w)`` pairs standing for ``αI + (…)`` (only ``α`` is raised)."""
    # Both positive in exact arithmetic; where rounding (float32, rows far larger than the
    # prior) makes one of them ≤ 0, each factor is raised by 1 − min(u, v) ≥ 1 instead, which
    # still leaves both least eigenvalues at least 1. The double where keeps the unused
    # branch's derivatives finite (√0's is infinite: jax.jvp would be NaN).
    both = (u_least > 0) & (v_least > 0)
    uv = jnp.where(both, u_least * v_least, 1.0)
    r = jnp.sqrt(uv)
    lift = ~both | (r < 1)
    c = jnp.where(both & lift, jnp.sqrt(jnp.where(both, v_least, 1.0) / jnp.where(both, u_least, 1.0)), 1.0)
    raise_by = jnp.where(both, jnp.where(lift, 1.0 - r, 0.0), 1.0 - jnp.minimum(u_least, v_least))
    if isinstance(u, tuple):
        return (u[0] * c + raise_by, u[1] * c), (v[0] / c + raise_by, v[1] / c)
    return (numerics.add_to_diagonal(u * c, raise_by), numerics.add_to_diagonal(v / c, raise_by))


def _least(k, w, n):
    """The least eigenvalue of ``D diag(w) Dᵀ`` (``n × n``) from ``K = DᵀD`` (``k × k``) and
    ``w ≥ 0``: ``0`` when ``k < n``, else ``diag(√w) K diag(√w)``'s eigenvalue at index ``k − n``
    counted from 0 in ascending order (its first ``k − n`` are its null space's zeros)."""
    if k.shape[0] < n:
        return jnp.zeros((), k.dtype)
    s = _root(w)
    return jnp.maximum(jnp.linalg.eigvalsh(s[:, None] * k * s[None, :])[k.shape[0] - n], 0.0)


def _root(w):
    """``√w``, with ``0`` and a zero derivative where ``w ≤ 0`` (:func:`_woodbury`)."""
    live = w > 0
    return jnp.where(live, jnp.sqrt(jnp.where(live, w, 1.0)), 0.0)


def _woodbury(y, k, alpha, w):
    """``F`` with ``L (αI + D diag(w) Dᵀ)⁻¹ Lᵀ = (G − FᵀF) / α`` for ``G = L Lᵀ``,
    ``Y = DᵀLᵀ (k, n)``, ``K = DᵀD``, ``w ≥ 0``: ``F = L_M⁻¹ S Y``, ``S = diag(√w)``,
    ``M = αI + S K S`` (Woodbury in its symmetric form: a Cholesky factor of a positive
    definite ``k × k`` matrix). A zero ``w_j`` (a zero row: a layer whose outputs the network
    ignores, as behind an output layer initialised to zero) gives ``√w_j = 0`` with a zero
    derivative, not ``√``'s infinite one, which made ``jax.grad`` of the evidence NaN (the
    double ``where`` keeps the unused branch's derivative finite too). That is the derivative
    only where ``w_j``'s own is zero, as it is for the step's weights: ``w_j = 0`` only where
    ``ā_j = 0`` exactly, and then its tangent is 0 too. A weight below 0 by rounding counts as 0."""
    s = _root(w)
    m = numerics.add_to_diagonal(s[:, None] * k * s[None, :], alpha)
    return numerics.solve_lower(numerics.cholesky(m), s[:, None] * y)
