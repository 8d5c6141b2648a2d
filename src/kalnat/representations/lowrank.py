"""Low rank plus diagonal precision: O(d k) memory and O(d k² + k³) work per step, no d × d array.

θ's uncertainty is held as its precision ``Λ = P⁻¹ = diag(υ) + W Wᵀ`` with ``υ (d,) > 0`` and
``W (d, k)``, the form of LoFi (Chang, Duran-Martin, Shestopaloff, Jones & Murphy 2023,
"Low-rank extended Kalman filtering for online learning of neural networks from streaming
data"). It is positive definite by construction in any precision. Its choices, made here:

- **The prediction step is exact.** With ``A = υ^{-1/2} W`` and its Gram matrix
  ``G = AᵀA = V diag(s²) Vᵀ`` (``k × k``), ``P⁻ = P/λ + q I`` is again diagonal plus rank ``k``
  in precision: ``υ⁻ = υ / (1/λ + q υ)`` and ``W⁻ = D⁻¹ W Z L⁻ᵀ / √λ`` with
  ``D = diag(1/λ + q υ)``, ``Z = V (I + diag(s²))^{-1/2}`` and
  ``L Lᵀ = (I + diag(s²))⁻¹ + Zᵀ Aᵀ (I − D⁻¹/λ) A Z`` (a sum of positive terms; Woodbury
  twice). With ``q = 0`` it is ``Λ⁻ = λ Λ``. The variance bound's congruence
  ``P⁻ → S P⁻ S`` is ``υ → υ/s²``, ``W → W/s``, also exact (``A`` is unchanged).
- **The mean moves by the exact Kalman gain of that prior**, ``δθ = P⁻ Hᵀ S⁻¹ e`` with
  ``P⁻ = υ^{-1/2} (I + A Aᵀ)⁻¹ υ^{-1/2}`` applied by Woodbury through the Cholesky factor of
  the small ``M = I + G``: with ``g = υ^{-1/2} Hᵀ``, ``c = M⁻¹ Aᵀ g`` and
  ``r = g − A c = (I + AAᵀ)⁻¹ g``, ``P⁻ Hᵀ = υ^{-1/2} r`` and ``H P⁻ Hᵀ = rᵀr + cᵀc``
  (``Aᵀ r = c``): a sum of squares, never negative in float32.
- **The precision gains the observation's information and is re-projected to rank k** in the
  metric of the prior's diagonal: ``Λ⁻ + Hᵀ R⁻¹ H = υ⁻^{1/2} (I + Ã Ãᵀ) υ⁻^{1/2}`` with
  ``Ã = υ⁻^{-1/2} [W⁻, Hᵀ L_R⁻ᵀ]`` (``d × (k + m)``); the top ``k`` singular directions of
  ``Ã`` stay in ``W`` and the rest's diagonal is added to ``υ``, so the diagonal of ``Λ`` is
  kept exactly (as LoFi does; only the floor on ``υ`` below can raise it) and what is dropped
  is the least informative direction relative to each parameter's own scale (invariant to
  rescaling a parameter, unlike a plain SVD of ``[W⁻, Hᵀ L_R⁻ᵀ]``).

**Cost: no factorisation of a tall matrix.** Every ``d``-long operation is a product: the
prior's Gram matrix ``G`` (``d k²``) with the gain's ``Aᵀ g`` (``d k m``), one product where no
variance bound needs ``G`` before the rows come (:class:`LowRankPrior`), the gain's ``A c``, and the
re-projection's ``[W⁻, Hᵀ L_R⁻ᵀ] V`` (``d (k + m)²``), where ``V``, the right singular vectors
of ``Ã``, are the eigenvectors of its ``(k + m) × (k + m)`` Gram matrix
``[[G, Aᵀĝ], [ĝᵀA, ĝᵀĝ]]``, built from ``G`` and the gain's projections. The factorisations
(a Cholesky factor and a symmetric eigendecomposition) are ``k × k`` and ``(k + m)²``. The
Gram matrix squares the condition of ``Ã``: in float32 a direction whose singular value is
below ``√ε`` of the largest is found only roughly, which moves which weak direction is kept, not
the precision's diagonal (kept exactly whatever ``V``) nor its positive definiteness; and
``P⁻ Hᵀ`` through ``I + G`` is accurate to ~``ε s²_max`` relative (a QR of ``A`` would keep
~``ε``, at the price of a tall factorisation a step),
while ``H P⁻ Hᵀ``, a sum of squares, stays accurate to ~``ε``. Sums over
``d`` are all the step needs between the rows of ``W``: sharded by parameter (:mod:`kalnat.sharded`),
a step all-reduces ``k × k`` and ``k × m`` pieces and never gathers ``W``.

**A derivative in the hyperparameters** (``jax.grad`` or ``jax.jvp`` of
:func:`kalnat.log_evidence` in forgetting, the prior variance, the variance bound) goes through
the re-projection's eigendecomposition, whose eigenvalues repeat (all zero at the prior), where
JAX's own derivative divides by their differences and is NaN. The step depends on it only
through two eigenspaces, the ``m`` directions dropped and the ``k`` kept (``W Wᵀ`` and the
dropped diagonal are functions of their projectors), so the derivative rotates no eigenvector
within its own group: only pairs across the two groups, whose eigenvalues differ wherever the
truncation is differentiable, enter it (:func:`_eigenspaces`). The prediction step with
additive process noise uses every eigenvector and its eigenvalue, and there a repeated
eigenvalue leaves JAX's derivative NaN: a derivative through it is refused, a ``ValueError``
saying so. First derivatives only: a second derivative with reverse mode through the stream's
``lax.scan`` (``jax.hessian`` of the evidence) does not take this rule and is NaN.

With ``k ≥ d`` nothing is ever dropped (``Ã`` has rank at most ``d``) and it is the exact EKF,
to rounding while υ stays well above its floor ``√ε Λ_ii`` (which keeps it from underflowing).
Under forgetting υ, which no observation renews once W holds the information, decays as ``λ^t``
while ``Λ_ii`` does not: on a long stream the floor binds, and the ``ε s²`` accuracy of the
Woodbury solve above, ``s²`` growing as ``Λ_ii / υ_i``, sets the error, which grows with the
stream (in float64 small; in float32 the filter is then only roughly the exact one).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from kalnat import numerics
from kalnat.representations import moves
from kalnat.representations.base import Representation
from kalnat.validation import positive_int

__all__ = ["LowRank", "LowRankPrecision", "LowRankPrior"]


@jax.custom_jvp
def _eigh(a):
    """``jnp.linalg.eigh(a)``, whose derivative is an error: see the module's docstring."""
    return jnp.linalg.eigh(a)


@_eigh.defjvp
def _eigh_jvp(primals, tangents):
    raise ValueError("the low-rank form's prediction step with additive process noise (LowRank, wherever it is "
                     "used) refuses a derivative: JAX's derivative of its eigendecomposition divides by "
                     "differences of eigenvalues, which repeat (all zero at the prior), and would be NaN; "
                     "differentiate log_evidence without process_noise, or through another representation "
                     "(full, diagonal, Kronecker, …)")


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _eigenspaces(a, m):
    """``jnp.linalg.eigh(a)`` (eigenvalues ascending) for a use that depends only on the span of
    the first ``m`` eigenvectors and on the span of the rest.

    Its derivative is the eigenvectors' (``dV = V (F ∘ Vᵀ dA V)``, ``F_ij = 1/(λ_j − λ_i)``) with
    ``F`` zero for every pair within one group: a rotation within a group changes neither
    projector, and leaving it out avoids the division by a repeated eigenvalue that makes JAX's
    derivative NaN. Pairs across the groups whose gap is below ``10 n ε`` of the largest
    eigenvalue are left out as well: where those are zero (directions the step's ``Ã`` does not excite, as at the prior),
    ``Ã`` takes both eigenvectors to zero and the rotation changes nothing; elsewhere the
    truncation itself has no derivative."""
    return jnp.linalg.eigh(a)


@_eigenspaces.defjvp
def _eigenspaces_jvp(m, primals, tangents):
    (a,), (da,) = primals, tangents
    out = _eigenspaces(a, m)  # itself, so that forward over forward also takes this rule
    w, v = out
    n = a.shape[0]
    e = v.T @ da @ v
    kept = jnp.arange(n) >= m
    gap = w[None, :] - w[:, None]                                     # λ_j − λ_i
    tol = 10 * n * jnp.finfo(a.dtype).eps * jnp.max(jnp.abs(w))
    across = (kept[:, None] != kept[None, :]) & (jnp.abs(gap) > tol)
    f = jnp.where(across, 1.0 / jnp.where(across, gap, 1.0), 0.0)
    return out, type(out)(jnp.diagonal(e), v @ (f * e))


def _row_squares(w):
    """``Σ_j w_ij² (d,)`` for ``w (d, k)``, as a sum of ``k`` columns: one fused elementwise pass,
    where XLA's CPU reduction along a short last axis is slower (beyond 32 columns, the reduction:
    the unrolled sum's program grows with ``k``)."""
    if w.shape[1] > 32:
        return jnp.sum(w * w, axis=1)
    return sum(w[:, j] * w[:, j] for j in range(w.shape[1]))


def _row_squares_lower(w, m):
    """``‖(W Mᵀ)_i‖² (d,)`` for ``w (d, k)`` and a lower-triangular ``m (k, k)``.

    Up to 16 columns, ``(W Mᵀ)_il = Σ_{j ≤ l} W_ij M_lj`` is summed column by column in one
    fused elementwise pass over W, the product never formed: XLA's CPU product of a ``(d, k)``
    by a ``(k, k)`` matrix wrote all ``d k`` numbers, and with the pass reading them again took
    0.91 ms a step against the fused pass's 0.56 (d = 120 901, k = 10, float32;
    ``benchmarks/profile_step.py --max-variance 10``). Beyond 16 columns, the
    product: the fused pass's program grows as k²."""
    k = w.shape[1]
    if k > 16:
        return _row_squares(w @ m.T)
    return sum(jnp.square(sum(w[:, j] * m[l, j] for j in range(l + 1))) for l in range(k))


def _gram(ups, w):
    """``G = Wᵀ diag(1/υ) W (k, k)``: ``AᵀA`` for ``A = υ^{-1/2} W``."""
    return (w / ups[:, None]).T @ w


def _rows(root, x):
    """``diag(root) x`` for ``x (d, …)``: ``root`` a scalar or ``(d,)``."""
    return root * x if jnp.ndim(root) == 0 else root.reshape(root.shape + (1,) * (x.ndim - 1)) * x


def _prior(ups, w, gram=None, root=None):
    """The prior ``diag(ups) + R w wᵀ R``, ``R = diag(root)`` (``root`` a scalar or ``(d,)``,
    default 1)."""
    gram = _gram(ups, w) if gram is None else gram
    eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
    root = jnp.ones((), ups.dtype) if root is None else root
    return LowRankPrior(ups, w, root, gram, numerics.cholesky(eye + 0.5 * (gram + gram.T)))


def _floored(ups, w):
    """The state ``(υ, W)`` with ``υ_i`` at least ``√ε Λ_ii`` (``ε`` the dtype's rounding).

    A parameter whose information lies in W keeps a diagonal part that forgetting shrinks as
    ``λ^t``, nothing renews, and that would underflow (then ``υ^{-1/2}`` is infinite); with the
    floor, ``diag(P⁻)``, computed through ``1 − ‖(A L⁻ᵀ)_i‖² ≈ 0`` for such a parameter, is still
    accurate to ~``√ε`` of itself, and ``I + WᵀΥ⁻¹W`` is far from singular. Forgetting scales
    ``υ`` and ``Λ_ii`` alike, so the floor is kept where the ratio changes: after each update
    and additive noise, and on a state made by ``with_dense``."""
    floor = jnp.sqrt(jnp.finfo(ups.dtype).eps)
    return LowRankPrecision(jnp.maximum(ups, floor * (ups + _row_squares(w))), w)


def _without(base, h, v, root=1.0):
    """``(W', dropped)``: ``[W, h] (d, k + 1)``, ``W = diag(root) base``, less its direction
    ``v (k + 1,)`` (unit), as ``d × k``.

    What is kept is ``[W, h] (I − v vᵀ) [W, h]ᵀ``, and ``I − v vᵀ = B Bᵀ`` for ``B`` the
    Householder reflection taking ``v`` to ``±e_{k+1}`` without its last column, so
    ``W' = [W, h] B`` is ``W`` less a rank-one term: O(d k), where a rotation by the ``k`` kept
    directions is O(d k²). ``u = v + sign(v_{k+1}) e_{k+1}`` keeps the reflection accurate
    whatever ``v_{k+1}`` (``v = −e_{k+1}``, the row's own direction dropped, would make
    ``v + e_{k+1}`` zero). ``dropped = z²``, ``z = [W, h] v``, is the diagonal of what leaves.

    One product over the ``d`` rows: ``[W, h] u = z + sign · h``, so the reflection's ``y`` comes
    from ``z``, not from a second product (nor from one with a ``(k, 2)`` matrix, which XLA's CPU
    dot takes by its slower general path)."""
    k = base.shape[1]
    root = jnp.asarray(root, base.dtype)
    sign = jnp.where(v[k] < 0, -1.0, 1.0)
    u = v.at[k].add(sign)
    z = _rows(root, base @ v[:k]) + h * v[k]
    y = (z + sign * h) * (2.0 / (u @ u))
    return _rows(root, base) - y[:, None] * u[None, :k], z * z


def _pad(w, k):
    """``w (d, r)`` with zero columns up to ``k`` (when ``k > d``)."""
    return w if w.shape[1] == k else jnp.pad(w, ((0, 0), (0, k - w.shape[1])))


class LowRankPrecision(NamedTuple):
    """``Λ = diag(ups) + w wᵀ``: ``ups (d,)`` positive, ``w (d, k)``."""

    ups: jax.Array
    w: jax.Array

    def dense(self):
        return _prior(self.ups, self.w).dense()

    def with_dense(self, P):
        """``P⁻¹`` in this form: its top ``k`` eigen-directions in ``w``, the rest's diagonal in
        ``ups`` (unweighted, unlike the update's re-projection; for re-expressing a state)."""
        lam = jnp.linalg.inv(jnp.asarray(P, self.ups.dtype))
        lam = 0.5 * (lam + lam.T)
        vals, vecs = jnp.linalg.eigh(lam)
        k = self.w.shape[1]
        r = min(k, vals.shape[0])
        w = vecs[:, -r:] * jnp.sqrt(jnp.maximum(vals[-r:], 0.0))
        # υ at least √ε Λ_ii, as after every update: a step's Woodbury solve through I + WᵀΥ⁻¹W
        # assumes it (with υ near ε Λ_ii that matrix is singular to the dtype's precision)
        return _floored(jnp.diagonal(lam) - _row_squares(w), _pad(w, k))

    def moved(self, move):
        """After a :class:`~kalnat.representations.moves.LayerMove` (``θ' = A θ``, so
        ``Λ' = A⁻ᵀ Λ A⁻¹``): the low-rank part ``A⁻ᵀ W`` exactly, and the diagonal of
        ``A⁻ᵀ diag(υ) A⁻¹`` (each moved row's ``T⁻¹ diag(υ_j) T⁻ᵀ`` less the coupling of its
        bias and weights, dropped as the update drops what leaves the rank), in O(d k). With
        ``k ≥ d`` the form holds any precision, and the move is exact, through :meth:`with_dense`
        (``d ≤ k``: a small matrix)."""
        if self.w.shape[1] >= self.w.shape[0]:
            return self.with_dense(move.congruence(self.dense()))
        inv = jnp.asarray(move.inverse_t(), self.ups.dtype)
        w = move.apply(self.w, inv.T)                              # rows T⁻¹ W_j
        ups = self.ups.at[move.rows].set(self.ups[move.rows] @ (inv * inv).T)
        return _floored(ups, w)

    def prior_movable(self, move):
        """Whether :meth:`moved_with_prior` applies: ``k < d``. With ``k ≥ d`` the dense
        computation, exact in this form then and small, is used."""
        return self.w.shape[1] < self.w.shape[0]

    def moved_with_prior(self, move, theta, c):
        """``(θ', Λ')`` of :func:`kalnat.scaling.reexpress_with_prior` (``c = ρ/v``) in this form,
        for ``k < d`` (:meth:`prior_movable`), in O(d (k² + q²)).

        The new information is ``Λ' = B + W'W'ᵀ`` with ``W' = A⁻ᵀ W`` and ``B`` block-diagonal:
        ``T⁻¹ diag(υ_j) T⁻ᵀ + c (I − T⁻¹ T⁻ᵀ)`` for each moved row, ``υ`` elsewhere. θ' is
        ``Λ'⁻¹`` times the moved information vector ``A⁻ᵀ Λ θ``, exactly (Woodbury through the
        ``q × q`` blocks' Cholesky factors), as the dense computation gives it. The form keeps
        ``W'`` and the diagonal of ``B`` (the data's ``diag(A⁻ᵀ (υ − c) A⁻¹)`` plus the prior
        ``c`` afresh; the blocks' coupling of a bias and its weights dropped, as :meth:`moved`
        drops it). Where a block is not positive definite, the exact move (:meth:`moved`)."""
        dt = self.ups.dtype
        c = jnp.asarray(c, dt)
        inv = jnp.asarray(move.inverse_t(), dt)
        eta = move.apply(self.ups * theta + self.w @ (self.w.T @ theta), inv.T)   # A⁻ᵀ Λ θ
        w = move.apply(self.w, inv.T)                                               # W' = A⁻ᵀ W
        _, lower, ok = move.information_blocks(self.ups[move.rows], c)              # B's blocks

        def solve_b(x):  # B⁻¹ x for x (d, r)
            out = x / self.ups[:, None]
            return out.at[move.rows].set(jax.scipy.linalg.cho_solve((lower, True), x[move.rows]))

        bw, be = solve_b(w), solve_b(eta[:, None])[:, 0]
        small = jnp.eye(w.shape[1], dtype=dt) + w.T @ bw
        theta_new = be - bw @ numerics.chol_solve(0.5 * (small + small.T), w.T @ be)
        data = jnp.maximum(self.ups - c, 0.0)
        new = (theta_new, _floored(self.ups.at[move.rows].set(data[move.rows] @ (inv * inv).T + c), w))
        return moves.or_exact(ok, new, self, move, theta)


class LowRankPrior(NamedTuple):
    """The prior ``Λ⁻ = diag(ups) + w wᵀ``, ``w = diag(root) base`` (forgetting scales ``W`` by
    ``√λ``, a scalar ``root``, and the variance bound's congruence by a ``(d,)`` one: each a
    factor applied where ``W`` is read, not a pass writing ``d × k`` numbers), with what applying
    ``P⁻ = Λ⁻⁻¹`` needs: ``gram = wᵀ diag(1/ups) w (k, k)`` (``AᵀA``, ``A = υ^{-1/2} w``) and
    ``lower``, the lower Cholesky factor of ``I + gram``, so that
    ``P⁻ = υ^{-1/2} (I − A (I + AᵀA)⁻¹ Aᵀ) υ^{-1/2}``. ``gram`` and ``lower`` are ``None``
    (:meth:`filled` computes them) until the rows ``H`` come (:meth:`projections`), where no
    variance bound reads ``P⁻`` before them: then one product over the ``d`` rows
    gives both ``gram`` and ``Aᵀ g``, where two took 0.86–0.94 ms a step against 0.49–0.52
    (d = 120 901, k = 10, float32; ``benchmarks/networks.py --part 2 --structures lowrank:10``,
    its ``G with Aᵀg`` line; XLA's CPU product ``xᵀ W (1, k)`` alone took as long as ``gram``)."""

    ups: jax.Array
    base: jax.Array
    root: jax.Array
    gram: Optional[jax.Array]
    lower: Optional[jax.Array]

    @property
    def w(self):
        """``W⁻ (d, k)``, formed."""
        return _rows(self.root, self.base)

    def filled(self):
        """This prior with ``gram`` and ``lower`` computed."""
        if self.gram is not None:
            return self
        return _prior(self.ups, self.base, _gram(self._metric(), self.base), self.root)

    def _metric(self):
        """``ups / root² (d,)``: ``gram = baseᵀ diag(root² / ups) base``."""
        return self.ups / jnp.broadcast_to(self.root * self.root, self.ups.shape)

    def projections(self, ht):
        """For ``Hᵀ (d, m)``: ``(P⁻ Hᵀ, H P⁻ Hᵀ, b, gg, gram)`` with ``b = Aᵀ g (k, m)``,
        ``gg = gᵀ g (m, m)``, ``g = υ^{-1/2} Hᵀ``, and ``gram = AᵀA`` (what the re-projection's
        Gram matrix needs)."""
        x = ht / self.ups[:, None]
        if self.gram is None:  # [baseᵀ diag(root²/υ), (root x)ᵀ] base: gram's k rows, bᵀ's m
            k = self.base.shape[1]
            both = jnp.concatenate([self.base / self._metric()[:, None], _rows(self.root, x)], axis=1).T @ self.base
            prior, b = _prior(self.ups, self.base, both[:k], self.root), both[k:].T
        else:
            prior = self
            b = (_rows(self.root, x).T @ self.base).T  # Aᵀ g as xᵀW: for Wᵀ x XLA's CPU copies W transposed
        c = numerics.solve_lower(prior.lower.T[::-1, ::-1], numerics.solve_lower(prior.lower, b)[::-1])[::-1]
        ph = x - _rows(self.root, self.base @ c) / self.ups[:, None]  # υ^{-1/2} r, r = g − A c
        # ph's rows (m, d), so that the product contracts their contiguous axis: XLA's CPU
        # reduction of the (d, 1) product over its leading axis took 0.49 ms a step against 0.07
        # (d = 120 901, float32; benchmarks/profile_step.py)
        pt = ph.T
        return ph, (pt * self.ups) @ pt.T + c.T @ c, b, ht.T @ x, prior.gram

    def times(self, ht):
        """``P⁻ Hᵀ`` for ``Hᵀ (d, m)``."""
        return self.projections(ht)[0]

    def variances(self):
        """``diag(P⁻) (d,)``: ``(1 − ‖(A L⁻ᵀ)_i‖²) / υ_i``."""
        # through the small L⁻¹ (k, k): one pass over the d rows up to k = 16 (_row_squares_lower),
        # where the triangular solve with d right-hand sides (numerics.solve_lower's loop) makes
        # k passes over them
        lower = self.filled().lower
        inv = numerics.solve_lower(lower, jnp.eye(lower.shape[0], dtype=self.ups.dtype))
        squares = _rows(self.root * self.root, _row_squares_lower(self.base, inv))
        return jnp.maximum(1.0 - squares / self.ups, 0.0) / self.ups

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
        object.__setattr__(self, "rank", positive_int(self.rank, "LowRank: rank"))

    def init(self, hyper, d, dtype):
        v = jnp.asarray(hyper.prior_var, dtype)
        if v.ndim == 2:
            raise ValueError("LowRank: the prior variance must be a scalar or a (d,) diagonal, "
                             "not a (d, d) matrix")
        return LowRankPrecision(1.0 / jnp.broadcast_to(v, (d,)), jnp.zeros((d, self.rank), dtype))

    def inflate(self, cov, t, lam, q, bound):
        ups, w = cov.ups, cov.w
        lam = jnp.asarray(lam, ups.dtype)
        gram, root = None, jnp.ones((), ups.dtype)
        if q is None:  # P/λ: Λ⁻ = λ Λ, and A = υ^{-1/2} W, so G, is unchanged
            if bound is not None:
                gram = _gram(ups, w)
            ups, root = lam * ups, jnp.sqrt(lam)
        else:
            g = _gram(ups, w)
            s2, v = _eigh(0.5 * (g + g.T))
            s2 = jnp.maximum(s2, 0.0)
            z = v / jnp.sqrt(1.0 + s2)[None, :]                                  # V (I + S²)^{-1/2}
            lq = lam * jnp.asarray(q, ups.dtype) * ups
            dinv = lam / (1.0 + lq)                                              # D⁻¹ (d,)
            # U σ^{1/2} = A Z; N = diag(1 − σ) + Zᵀ Aᵀ diag(ε) A Z with ε = 1 − D⁻¹/λ = lq/(1+lq):
            # a sum of positive terms, where I − (…) cancels in float32 once s is large (a
            # well-determined direction) and q υ small. The Gram matrix is of W Z, whose columns
            # Z scales to comparable size: Zᵀ (Wᵀ diag(ε/υ) W) Z, the congruence after the
            # product, lost 10³–10⁴ × the accuracy in float32 where the s spread over 3.5 decades
            # (test_low_rank_prediction_step_with_noise_keeps_float32_accuracy_over_a_wide_spectrum).
            wz = w @ z
            ue = wz * jnp.sqrt(lq / ((1.0 + lq) * ups))[:, None]
            lower = numerics.cholesky(jnp.diag(1.0 / (1.0 + s2)) + ue.T @ ue)
            # W Z L⁻ᵀ through the small L⁻¹: one product over the d rows, not a solve against them
            inv = numerics.solve_lower(lower, jnp.eye(lower.shape[0], dtype=ups.dtype))
            w = dinv[:, None] * (wz @ inv.T) / jnp.sqrt(lam)
            ups, w = _floored(ups * dinv, w)
        # gram and lower with the rows' projections (LowRankPrior), unless the bound reads P⁻
        prior = LowRankPrior(ups, w, root, None, None) if bound is None else _prior(ups, w, gram, root)
        if bound is not None:  # S P⁻ S: υ/s², W/s; A = υ^{-1/2} W, and so G, is unchanged
            f = numerics.variance_bound(prior.variances(), jnp.asarray(bound, ups.dtype))
            prior = prior._replace(ups=ups / (f * f), root=_rows(prior.root, 1.0 / f))
        return prior

    def quad(self, prior, h):
        # G formed first: under vmap over rows (a predictive's) it is then formed once, not with
        # each row's projections
        return prior.filled().projections(h.T)[1]

    def project(self, prior, H):
        ph, hph, b, gg, gram = prior.projections(H.T)
        return hph, (ph, b, gg, gram)

    def gain(self, prior, H, R, e):
        return self.gain_projected(prior, H, R, e, None)

    def gain_projected(self, prior, H, R, e, projection):
        hph, aux = self.project(prior, H) if projection is None else projection
        # δθ = P⁻Hᵀ S⁻¹ e: the small solve first, then one pass over the d rows
        return aux[0] @ numerics.chol_solve(hph + R, e), hph, aux

    def posterior(self, prior, H, R, e, aux, rows):
        # Ã = υ⁻^{-1/2} [W⁻, Ĥ] with Ĥ = Hᵀ L_R⁻ᵀ (d × (k + m)). Its right singular vectors V
        # are the eigenvectors of ÃᵀÃ = [[G, b̂], [b̂ᵀ, ĝᵀĝ]] (b̂ = Aᵀĝ, ĝ = υ⁻^{-1/2} Ĥ: the gain's
        # projections through L_R⁻ᵀ), and υ⁻^{1/2} Ã V = [W⁻, Ĥ] V is one product. eigh sorts
        # the eigenvalues up: the first m columns are the least informative directions.
        _, b, gg, gram = self.project(prior, H)[1] if aux is None else aux
        inv = numerics.solve_lower(numerics.cholesky(R), jnp.eye(R.shape[0], dtype=R.dtype)).T   # L_R⁻ᵀ
        b, gg = b @ inv, inv.T @ gg @ inv
        m = b.shape[1]
        gram = jnp.concatenate([jnp.concatenate([gram, b], axis=1),
                                jnp.concatenate([b.T, gg], axis=1)], axis=0)
        _, v = _eigenspaces(0.5 * (gram + gram.T), m)
        k, hh = self.rank, H.T @ inv
        if m > 1:
            moved = _rows(prior.root, prior.base @ v[:k]) + hh @ v[k:]   # υ⁻^{1/2} Ã V (d, k + m)
            dropped = _row_squares(moved[:, :m])                    # diag of what leaves W
            return _floored(prior.ups + dropped, moved[:, m:])
        w, dropped = _without(prior.base, hh[:, 0], v[:, 0], prior.root)
        return _floored(prior.ups + dropped, w)
