"""The one place for the linear algebra every learner shares.

Solves go through Cholesky factors (every matrix solved against here is symmetric positive
definite: ``S = H P Hᵀ + R``, an information matrix, a Fisher estimate). Diagonal shifts write
the diagonal in place; only :func:`spd_inverse`, for the O(d³) forms that need a whole
inverse, solves against an identity.
"""

from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
from jax import lax
import numpy as np
from jax.scipy.linalg import cho_solve, solve_triangular

__all__ = [
    "symmetrize", "mirror_upper", "add_to_diagonal", "downdate", "cholesky", "chol_solve", "whiten", "block_diag", "diagonal_blocks",
    "joseph_update", "spd_inverse", "variance_bound", "precision_bound", "check_covariance",
    "prior_matrix", "all_within", "LANES", "lanes", "pad_lanes",
]

# Below this size the m × m factorisations of S = H P Hᵀ + R are unrolled into plain array
# operations: LAPACK calls on tiny matrices cost more in dispatch than the whole O(d²) update.
SMALL = 16
UNROLL = 4
# Up to this many outputs a step, downdate's one pass of outer products over P beats the
# product W Wᵀ and the mirror's transposed pass (a minibatch of 2 or 4 of digits' rows, 9 outputs
# each, d = 585: 1.2–2.5 × faster; benchmarks/minibatch_cost.py); beyond, the product.
FUSED_DOWNDATE = 48

# XLA's CPU fusion emitters ran a pass over 120 901 float32 numbers (an odd d) that broadcasts a
# scalar, as the diagonal step's 1/λ and whitening factors, 2.9 × as long as the same pass over
# 120 904 (benchmarks/lanes.py). The diagonal form keeps its variances, and pads its copy of H's
# row, with zeros to a multiple of LANES entries (8 float32 values: one AVX vector): its step
# took 0.23–0.29 ms against 0.32–0.43 ms (benchmarks/networks.py's MLP; docs/structured.md).
# (Padding H's row before the groups form slices it into layers changed nothing: XLA takes the
# slices from the unpadded row.)
LANES = 8


def lanes(d: int) -> int:
    """``d`` rounded up to a multiple of :data:`LANES`."""
    return -(-d // LANES) * LANES


def pad_lanes(a, d: Optional[int] = None, value=0):
    """``a (…, d)`` with ``value`` (zeros) appended along its last axis to :func:`lanes` ``(d)``
    entries."""
    d = a.shape[-1] if d is None else d
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, lanes(d) - d)], constant_values=value)


def cholesky(a):
    """Lower Cholesky factor of a symmetric positive definite ``(n, n)`` matrix.

    Up to :data:`SMALL` (the factor written out here; LAPACK's beyond), each pivot is at least
    ``n ε a_jj``, its own rounding: a matrix positive definite by construction but singular to
    the dtype's precision gets the factor of one within that rounding. ``S = H P⁻ Hᵀ + R`` is
    such a matrix in float32 when a classifier is confident: ``R = diag(p) − p pᵀ`` has
    eigenvalues as small as its least class probability (1e-7 on digits' MLP), below the
    rounding of ``H P⁻ Hᵀ``'s entries (4 × 6e-8); cancellation in earlier columns left the
    last pivot at −8e-8 (its ``n ε a_jj``: 5e-9), the square root was NaN and the learner
    diverged. Pivots at or above the floor are the plain factor's, to the bit; a matrix's own
    small scale (a confident row's entries in a minibatch's ``S``) is no reason to floor, as
    the floor scales with ``a_jj``; a NaN stays NaN; a ``1 × 1`` matrix is its own pivot. A
    matrix that is not positive semidefinite (the filters' are, by construction) would get a
    finite factor all the same. Beyond :data:`SMALL` (``S`` of more than 16 outputs a step) a
    failed factor is NaN."""
    n = a.shape[0]
    if n > SMALL:
        return jnp.linalg.cholesky(a)
    rows = jnp.arange(n)
    # each pivot's rounding (Σ_k L_jk² ≤ a_jj); none for a 1 × 1 matrix, whose program stays as it was
    rounding = n * jnp.finfo(a.dtype).eps * jnp.diagonal(a) if n > 1 else None

    def column(j, chol):  # columns not yet written are zero: L @ L[j] sums the finished ones
        c = a[:, j] - chol @ chol[j]
        if n > 1:
            c = c.at[j].set(jnp.maximum(c[j], rounding[j]))
        return chol.at[:, j].set(jnp.where(rows >= j, c / jnp.sqrt(c[j]), 0.0))

    return lax.fori_loop(0, n, column, jnp.zeros_like(a), unroll=n <= UNROLL)


def solve_lower(chol, b):
    """``L⁻¹ B`` for lower-triangular ``L (n, n)``, ``B (n, …)``."""
    n = chol.shape[0]
    if n > SMALL:
        return solve_triangular(chol, b, lower=True)
    flat = b.reshape(n, -1)

    def row(i, out):  # rows not yet solved are zero, as in cholesky
        return out.at[i].set((flat[i] - chol[i] @ out) / chol[i, i])

    return lax.fori_loop(0, n, row, jnp.zeros_like(flat), unroll=n <= UNROLL).reshape(b.shape)


def symmetrize(a):
    """``(A + Aᵀ) / 2``."""
    return 0.5 * (a + a.T)


def mirror_upper(a):
    """``A``'s upper triangle (with the diagonal) mirrored below: bitwise symmetric however ``A``
    was computed. (Averaging with ``Aᵀ`` is not, once XLA fuses it into a product that made
    ``A``: ``(x s + y s)`` may become a fused multiply-add, rounded differently for an entry and
    its mirror.)"""
    i = jnp.arange(a.shape[0])
    return jnp.where(i[:, None] <= i[None, :], a, a.T)


def add_to_diagonal(a, v):
    """``A + v I`` (``v`` scalar or ``(d,)``) without forming ``I``."""
    idx = jnp.arange(a.shape[0])
    return a.at[idx, idx].add(v)


def chol_solve(a, b):
    """``A⁻¹ B`` for symmetric positive definite ``A (n, n)``, ``B (n, k)`` or ``(n,)``."""
    if a.shape[0] <= SMALL:
        chol = cholesky(a)
        return solve_lower(chol.T[::-1, ::-1], solve_lower(chol, b)[::-1])[::-1]
    return cho_solve((jnp.linalg.cholesky(a), True), b)


def whiten(s, b, e):
    """With ``S = L Lᵀ``: ``W = B L⁻ᵀ`` and ``v = L⁻¹ e``, so ``W Wᵀ = B S⁻¹ Bᵀ``, ``W v = B S⁻¹ e``.

    Shapes: ``S (m, m)``, ``B (d, m)``, ``e (m,)`` → ``W (d, m)``, ``v (m,)``. This is how the
    EKF update ``K e``, ``K H P⁻`` becomes ``W v`` and the symmetric rank-m product ``W Wᵀ``.
    """
    chol = cholesky(s)
    return solve_lower(chol, b.T).T, solve_lower(chol, e)


def downdate(p, w):
    """``P − W Wᵀ`` for ``P (d, d)``, ``W (d, m)``: the covariance update of every EKF form.

    For ``m ≤ FUSED_DOWNDATE`` it is written as ``m`` outer products in one expression, which
    XLA fuses into a single pass over ``P`` (``W Wᵀ`` as a product is a ``d × d`` temporary: one
    more pass); each entry then subtracts the same products in the same order as its mirror, so
    a symmetric ``P`` stays bitwise symmetric. Beyond, the product ``W Wᵀ`` is not bitwise
    symmetric (compiled on a CPU, float64), and an asymmetry left in ``P`` grows as ``λ^−t``
    under forgetting until the filter fails: the upper triangle is mirrored
    (:func:`mirror_upper`), so a symmetric ``P`` stays bitwise symmetric at any ``m``.
    """
    m = w.shape[1]
    if m > FUSED_DOWNDATE:
        return mirror_upper(p - w @ w.T)
    out = p
    for k in range(m):
        out = out - w[:, k, None] * w[None, :, k]
    return out


def diagonal_blocks(a, b: int, m: int):
    """The ``b`` diagonal ``(m, m)`` blocks of a ``(b·m, b·m)`` matrix, as ``(b, m, m)``."""
    a4 = a.reshape(b, m, b, m)
    idx = jnp.arange(b)
    return a4[idx, :, idx, :]


def block_diag(blocks):
    """Block-diagonal ``(b·m, b·m)`` matrix from ``(b, m, m)`` blocks (batched ``R``)."""
    b, m, _ = blocks.shape
    eye = jnp.eye(b, dtype=blocks.dtype)
    return (eye[:, None, :, None] * blocks[:, :, None, :]).reshape(b * m, b * m)


def joseph_update(p_prior, gain, h_p, s):
    """Joseph-form covariance ``(I − KH) P⁻ (I − KH)ᵀ + K R Kᵀ``, in O(d² m).

    Expanded so that no ``d × d`` identity is formed:
    ``P⁻ − K (H P⁻) − (H P⁻)ᵀ Kᵀ + K S Kᵀ`` with ``S = H P⁻ Hᵀ + R``.
    Shapes: ``P⁻ (d, d)``, ``K (d, m)``, ``H P⁻ (m, d)``, ``S (m, m)``.
    """
    k_hp = gain @ h_p
    return symmetrize(p_prior - k_hp - k_hp.T + gain @ s @ gain.T)


def variance_bound(variances, cap):
    """Factors ``s ∈ (0, 1]`` with ``s_i² v_i ≤ cap_i`` for the variances ``v (d,)`` of a ``P``.

    The congruence ``D P D`` (``D = diag s``) caps every variance at ``cap`` (scalar or
    ``(d,)``), keeps ``P`` positive definite and every correlation as it was, and leaves the
    coordinates already within the bound untouched (``s_i = 1`` exactly). Since
    ``λ_max(P) ≤ tr(P) ≤ Σ cap``, no direction of ``P`` can grow without limit.
    """
    over = variances > cap
    # The ratio is formed only where the bound binds, so that an infinite or untouched cap
    # gives a zero gradient rather than 0 · inf (jax.grad of the evidence goes through here).
    ratio = jnp.where(over, cap / jnp.where(over, variances, 1.0), 1.0)
    return jnp.where(over, jnp.sqrt(ratio), jnp.ones_like(variances))


def spd_inverse(a):
    """``A⁻¹`` of a symmetric positive definite ``(d, d)`` matrix, through its Cholesky factor."""
    chol = jnp.linalg.cholesky(a)
    return cho_solve((chol, True), jnp.eye(a.shape[0], dtype=a.dtype))


def precision_bound(info, cap):
    """:func:`variance_bound` for a precision matrix: ``D⁻¹ Λ D⁻¹``, the inverse of ``D Λ⁻¹ D``.

    The variances are the diagonal of ``Λ⁻¹`` (an O(d³) inverse, the price of the forms that
    hold ``Λ = P⁻¹``). Returns the bounded ``Λ``; coordinates within the bound keep their rows
    and columns exactly.
    """
    s = variance_bound(jnp.diagonal(spd_inverse(info)), cap)
    return info / (s[:, None] * s[None, :])


def prior_matrix(v, d: int, dtype):
    """``P_0 (d, d)`` from a prior variance: scalar ``v·I``, ``(d,)`` diagonal or ``(d, d)``.

    Traceable (a bank builds its members' priors from stacked hyperparameters inside ``vmap``);
    :func:`check_covariance` validates a concrete one on the host.
    """
    v = jnp.asarray(v, dtype)
    if v.ndim == 2:
        return v
    return jnp.diag(jnp.broadcast_to(v, (d,)))


def check_covariance(a, name: str, d: Optional[int], dense: bool = True) -> np.ndarray:
    """Validates a prior on the host: scalar, ``(d,)`` diagonal or ``(d, d)``; returns ``(d, d)``
    (with ``d = None``: any size, returned as given; with ``dense=False`` a scalar or diagonal
    is returned as given, never as a ``d × d`` matrix, which a structured learner cannot hold).

    Raises ``ValueError`` when it is not finite, not symmetric or not positive definite.
    """
    a = np.asarray(a, dtype=np.float64)
    if not dense and a.ndim < 2:
        if a.ndim == 1 and a.shape != (d,):
            raise ValueError(f"{name}: expected a scalar, ({d},) or ({d}, {d}), got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf")
        if np.any(a <= 0):
            raise ValueError(f"{name} must be positive definite (found a diagonal entry {a.min():g} <= 0)")
        return a
    if d is None:
        if a.ndim > 2 or (a.ndim == 2 and a.shape[0] != a.shape[1]):
            raise ValueError(f"{name}: expected a scalar, a vector or a square matrix, got shape {a.shape}")
        check_covariance(a, name, 1 if a.ndim == 0 else a.shape[0])
        return a
    if a.ndim == 0:
        a = np.full(d, float(a))
    if a.ndim == 1:
        if a.shape != (d,):
            raise ValueError(f"{name}: expected a scalar, ({d},) or ({d}, {d}), got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf")
        if np.any(a <= 0):
            raise ValueError(f"{name} must be positive definite (found a diagonal entry {a.min():g} <= 0)")
        return np.diag(a)
    if a.shape != (d, d):
        raise ValueError(f"{name}: expected a scalar, ({d},) or ({d}, {d}), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    if not np.allclose(a, a.T, rtol=1e-10, atol=1e-12 * np.abs(a).max()):
        raise ValueError(f"{name} must be symmetric")
    try:
        np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        raise ValueError(f"{name} must be positive definite (Cholesky factorisation failed)") from None
    return a


def all_within(a: np.ndarray, top: float = math.inf) -> bool:
    """Whether every value of the float array ``a`` is finite (and, for a finite ``top``, at most
    ``top`` in magnitude), tested in one BLAS call: a sum of squares is finite, and at most
    ``top²``, only if every value is (NaN and inf propagate; squares cannot cancel).

    A sufficient test, for the host's checks of every row: ``True`` is exact, ``False`` may be
    an overflow of the sum (values near the top of the range) and sends the caller to its
    elementwise check, which then names the problem or passes. Half of ``top²`` is the bound, so
    that rounding in the sum cannot let a value just past ``top`` through.
    """
    if a.ndim == 0:  # one target: a float compare (strict, so a long double rounded to top is not let through)
        v = float(a)
        return math.isfinite(v) and abs(v) < top
    # (Where top² is beyond float64 the bound is inf: a finite sum of squares then bounds every
    # value by 1.3e154, below any such top; a long double's sum beyond it converts to inf.)
    return float(np.vdot(a, a)) < 0.5 * top * top
