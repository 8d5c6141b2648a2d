"""Online feature standardisation: each row is scaled by statistics of the rows before it.

No row is scaled with statistics that include itself or later rows, so progressive
validation stays honest. The statistics are merged per chunk with the parallel form of
Welford's update (Chan et al.), so a stream is processed chunk by chunk with the same result
as row by row.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
import scipy.sparse

from kalnat import blas

__all__ = [
    "RunningStats", "init", "transform_and_update", "FrozenStats", "init_frozen", "transform_frozen",
    "standardizer", "layer_move", "reexpression_matrix", "Reexpression", "reexpression", "reexpress", "reexpress_state",
    "reexpress_with_prior", "reexpress_members",
]


class RunningStats(NamedTuple):
    """``count`` rows seen, their per-feature ``mean (p,)`` and sum of squared deviations
    ``m2 (p,)``."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @property
    def std(self):
        var = self.m2 / np.maximum(self.count, 1)
        return np.sqrt(var)


def init(n_features: int) -> RunningStats:
    return RunningStats(np.zeros((), np.int64), np.zeros(n_features), np.zeros(n_features))


def transform_and_update(stats: RunningStats, X, min_std: float = 1e-8):
    """Scales each row of ``X (n, p)`` by the statistics of all rows before it.

    The first row (nothing seen yet) is left unscaled; a feature whose running deviation is
    below ``min_std`` (e.g. constant so far) is centred but not divided.

    Returns:
      ``(Z (n, p), stats')`` with ``stats'`` including the rows of ``X``.
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if n == 0:
        return X.copy(), stats
    c0 = int(stats.count)
    counts = c0 + np.arange(1, n + 1)[:, None]
    # running mean / M2 after each row, continuing from the stored statistics
    csum = np.cumsum(X - stats.mean, axis=0)
    means = stats.mean + csum / counts
    # M2 after k rows: m2_0 + Σ (x_i − mean_{i−1})(x_i − mean_i)
    prev_means = np.vstack([stats.mean[None], means[:-1]])
    m2s = stats.m2 + np.cumsum((X - prev_means) * (X - means), axis=0)
    prev_counts = counts - 1
    prev_m2 = np.vstack([stats.m2[None], m2s[:-1]])
    prev_std = np.sqrt(prev_m2 / np.maximum(prev_counts, 1))
    center = np.where(prev_counts > 0, prev_means, 0.0)
    scale = np.where((prev_counts > 1) & (prev_std > min_std), prev_std, 1.0)
    Z = (X - center) / scale
    return Z, RunningStats(np.asarray(c0 + n), means[-1].copy(), m2s[-1].copy())


# ---- statistics that stop moving, and the exact re-expression of a filter ---------------

class FrozenStats(NamedTuple):
    """Running statistics until ``warmup`` rows have been seen, then fixed."""

    stats: RunningStats
    warmup: int


def init_frozen(n_features: int, warmup: int = 50) -> FrozenStats:
    """Statistics that follow the stream for ``warmup`` rows and are then frozen."""
    if int(warmup) != warmup or warmup < 2:
        raise ValueError(f"warmup must be an integer ≥ 2, got {warmup}")
    return FrozenStats(init(n_features), int(warmup))


def transform_frozen(fs: FrozenStats, X, min_std: float = 1e-8):
    """Like :func:`transform_and_update` for the first ``warmup`` rows, then the frozen
    statistics of those rows. Returns ``(Z (n, p), fs')``."""
    X = np.asarray(X, dtype=np.float64)
    c0 = int(fs.stats.count)
    k = max(0, min(fs.warmup - c0, X.shape[0]))
    Z1, stats = transform_and_update(fs.stats, X[:k], min_std)
    if k == X.shape[0]:
        return Z1, FrozenStats(stats, fs.warmup)
    center, scale = standardizer(stats, min_std)
    return np.concatenate([Z1, (X[k:] - center) / scale]), FrozenStats(stats, fs.warmup)


def standardizer(stats: RunningStats, min_std: float = 1e-8):
    """``(center (p,), scale (p,))`` that :func:`transform_and_update` would use for the next
    row: ``z = (x − center) / scale``."""
    c = int(stats.count)
    center = stats.mean if c > 0 else np.zeros_like(stats.mean)
    scale = np.where((c > 1) & (stats.std > min_std), stats.std, 1.0)
    return np.asarray(center, np.float64), np.asarray(scale, np.float64)


def _first_layer(params):
    if isinstance(params, dict) and "w" in params:
        return params, lambda layer: layer
    if isinstance(params, (list, tuple)) and params and isinstance(params[0], dict) and "w" in params[0]:
        return params[0], lambda layer: type(params)([layer, *params[1:]])
    raise ValueError("reexpress: params must be {'w', 'b'} (kalnat.models.linear) or a list of "
                     "such layers (kalnat.models.mlp)")


def reexpression_matrix(params, old, new) -> np.ndarray:
    """The ``(d, d)`` matrix A of the change of coordinates ``θ' = A θ`` (see :func:`reexpress`),
    in float64.

    A depends on the structure of ``params`` and on the coordinates only, so one A serves
    every filter over the same model (the members of a bank).
    """
    return _sparse_reexpression(params, old, new).toarray()


def _first_layer_positions(params):
    """``(w (o, p), b (o,) or None, d)``: where the first layer's weights and biases sit in the
    flat θ (``ravel_pytree``'s order: the leaves in ``tree_flatten``'s order, each in C order)."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(params)
    sizes = [int(np.prod(np.shape(leaf))) for leaf in leaves]  # (arrays or their shapes)
    starts = np.cumsum([0] + sizes[:-1])
    where = jax.tree_util.tree_unflatten(treedef, [
        start + np.arange(n).reshape(np.shape(leaf)) for start, n, leaf in zip(starts, sizes, leaves)])
    layer, _ = _first_layer(where)
    return np.asarray(layer["w"]), (np.asarray(layer["b"]) if "b" in layer else None), sum(sizes)


def layer_move(params, old, new):
    """The change of coordinates of :func:`reexpress` as a
    :class:`~kalnat.representations.moves.LayerMove`: each first-layer output row
    ``[W_j, b_j]`` moves by ``Tᵀ`` with ``T = [[diag(s'/s), (c' − c)/s], [0, 1]]``, what every
    covariance form applies in its own storage."""
    from kalnat.representations.moves import LayerMove

    c0, s0 = (np.asarray(a, np.float64) for a in old)
    c1, s1 = (np.asarray(a, np.float64) for a in new)
    w, b, _ = _first_layer_positions(params)
    if b is None:
        if np.any(c0 != c1):
            raise ValueError("reexpress: a change of centre needs a bias in the first layer")
        return LayerMove(w, np.diag(s1 / s0))
    p = w.shape[1]
    t = np.eye(p + 1)
    t[:p, :p] = np.diag(s1 / s0)
    t[:p, p] = (c1 - c0) / s0
    return LayerMove(np.concatenate([w, b[:, None]], axis=1), t)


def _sparse_reexpression(params, old, new) -> scipy.sparse.csr_matrix:
    """:func:`reexpression_matrix` as a sparse matrix, built on the host from :func:`layer_move`:
    A is the identity but for the first layer's rows, ``W' = W diag(s'/s)`` and
    ``b' = b + W (c' − c)/s``, each row's block ``Tᵀ``."""
    move = layer_move(params, old, new)
    d = _first_layer_positions(params)[2]
    tt = move.t.T
    a, b = np.nonzero(tt)
    moved = np.zeros(d, bool)
    moved[move.rows] = True
    rest = np.flatnonzero(~moved)
    return scipy.sparse.csr_matrix(
        (np.concatenate([np.tile(tt[a, b], move.rows.shape[0]), np.ones(rest.size)]),
         (np.concatenate([move.rows[:, a].ravel(), rest]), np.concatenate([move.rows[:, b].ravel(), rest]))),
        shape=(d, d))


def reexpress(params, cov, old, new, A=None):
    """θ and P of a filter in new feature coordinates, with every prediction unchanged.

    The first layer sees ``z = (x − c)/s``. With new statistics ``(c', s')`` the same function
    of x is ``W' z' + b'`` with ``W' = W diag(s'/s)`` and ``b' = b + W (c' − c)/s``: a linear map
    ``θ' = A θ``. The EKF is equivariant under it (``H' = H A⁻¹``), so ``P' = A P Aᵀ`` keeps
    ``H P Hᵀ`` and every later update the same: the filter is exactly the one that had seen
    the new coordinates all along.

    Args:
      params: a params pytree whose first layer is ``{"w" (o, p), "b" (o,)}``.
      cov: ``(d, d)`` covariance of the flat θ (P, or V of the normal–inverse-gamma filter).
      old: ``(center (p,), scale (p,))`` before.
      new: ``(center (p,), scale (p,))`` after.
      A: :func:`reexpression_matrix` of these, if already computed.

    Returns:
      ``(params', cov')`` in the dtype of ``params``.
    """
    from jax.flatten_util import ravel_pytree
    import jax.numpy as jnp

    theta, unravel = ravel_pytree(params)
    A = _sparse_reexpression(params, old, new) if A is None else scipy.sparse.csr_matrix(A)
    t, P = _moved(np.asarray(theta, np.float64), cov, A)
    return unravel(jnp.asarray(t, theta.dtype)), jnp.asarray(P, theta.dtype)


def _moved(theta, cov, A):
    """:func:`reexpress` of a flat float64 θ: ``(A θ, A P Aᵀ)``."""
    return A @ theta, _sandwich(A, cov)


def _sandwich(A, M):
    """``A M Aᵀ`` for a sparse A (diagonal but for the first layer's bias rows) and a
    symmetric M: two sparse products, O(nnz(A)·d) instead of O(d³)."""
    return np.asarray(A @ np.asarray(A @ np.asarray(M, np.float64)).T)


def _spd_inverse(M):
    """Inverse of a symmetric positive-definite matrix (Cholesky, then its inverse: d³ in
    all); ``LinAlgError`` when M is not positive definite."""
    c, info = scipy.linalg.lapack.dpotrf(np.asarray(M, np.float64), lower=1)
    if info != 0:
        raise np.linalg.LinAlgError("not positive definite")
    inv, info = scipy.linalg.lapack.dpotri(c, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError("singular")
    # LAPACK wrote the lower triangle; one pass mirrors it (at d = 585 this copy was a fifth
    # of the factorisation's time when written as two triangles and a sum)
    return np.where(_lower_mask(inv.shape[0]), inv, inv.T)


_MASKS: dict = {}


def _lower_mask(d: int) -> np.ndarray:
    mask = _MASKS.get(d)
    if mask is None:  # one size kept (a run re-expresses one model); a local, so threads are safe
        mask = np.tri(d, dtype=bool)
        _MASKS.clear()
        _MASKS[d] = mask
    return mask


class Reexpression(NamedTuple):
    """A change of coordinates ``θ' = A θ`` in the pieces :func:`reexpress_with_prior` needs,
    computed once for every filter over the same model (a bank's members).

    Attributes:
      A: ``(d, d)`` sparse, :func:`reexpression_matrix` of ``(params, old, new)``.
      Bt: ``(d, d)`` sparse, ``A⁻ᵀ`` (the transposed change back).
      prior_change: ``(d, d)`` dense, ``I − A⁻ᵀ A⁻¹``: a unit prior information's change.
    """

    A: scipy.sparse.csr_matrix
    Bt: scipy.sparse.csr_matrix
    prior_change: np.ndarray


def reexpression(params, old, new) -> Reexpression:
    """The :class:`Reexpression` from coordinates ``old`` to ``new`` for ``params``' structure."""
    return _from_pair(_sparse_reexpression(params, old, new), _sparse_reexpression(params, new, old))


def _from_pair(A, B):
    """The :class:`Reexpression` of ``θ' = A θ`` and its inverse ``B = A⁻¹`` (dense or sparse)."""
    A, B = (scipy.sparse.csr_matrix(a) for a in (A, B))
    Bt = B.T.tocsr()
    return Reexpression(A, Bt, np.eye(A.shape[0]) - (Bt @ Bt.T).toarray())


def reexpress_state(state, old, new, A=None):
    """A core learner's state re-expressed by :func:`reexpress`, in its own representation."""
    from kalnat.filter import covariance, with_covariance

    params, cov = reexpress(state.params, covariance(state), old, new, A)
    return with_covariance(state, params, cov)


def reexpress_with_prior(params, cov, old, new, prior_var: float, prior_weight: float = 1.0,
                         maps=None):
    """Like :func:`reexpress`, but the prior ``N(0, prior_var·I)`` is set in the new
    coordinates instead of carried over from the old ones.

    :func:`reexpress` keeps the filter's prior as it was stated: ``v·I`` in coordinates whose
    scale came from the first few rows. When a feature's early deviation was far too small
    (rows sorted by class, a feature constant at first), that prior is very broad in the
    better-scaled coordinates that follow and the filter turns overconfident. Here the
    information ``P⁻¹ = ρ Λ₀ + D`` (prior, weighted by what forgetting has left of it, plus
    data) keeps its data part ``D`` re-expressed exactly and gets ``ρ Λ₀ = ρ I / v`` afresh:
    ``P'⁻¹ = A⁻ᵀ D A⁻¹ + ρ I/v``, and the information vector ``P⁻¹ θ`` (all data: the prior
    mean is 0) is re-expressed exactly. For a linear-Gaussian model without forgetting this
    is the batch posterior of all rows seen in the new coordinates under the prior ``v·I``
    there. Valid for a zero prior mean (:func:`kalnat.models.linear`'s initial parameters).

    Args:
      params: as :func:`reexpress`.
      cov: as :func:`reexpress`.
      old: as :func:`reexpress`.
      new: as :func:`reexpress`.
      prior_var: ``v``, the prior variance of every parameter.
      prior_weight: ``ρ``, the prior's remaining weight (``Π λ_t`` under forgetting, else 1).
      maps: :func:`reexpression` of ``(params, old, new)`` (or the pair ``(A, A⁻¹)`` of
        :func:`reexpression_matrix`), if already computed.

    Returns:
      ``(params', cov')``; when the corrected information is not positive definite (it is, up
      to rounding) the exact :func:`reexpress` result.
    """
    from jax.flatten_util import ravel_pytree

    if maps is None:
        maps = reexpression(params, old, new)
    elif not isinstance(maps, Reexpression):  # the pair (A, A⁻¹) of reexpression_matrix
        maps = _from_pair(*maps)
    theta, unravel = ravel_pytree(params)
    with blas.one_thread():
        t, P = _moved_with_prior(np.asarray(theta, np.float64), cov, maps, prior_var, prior_weight)
    return unravel(np.asarray(t, theta.dtype)), np.asarray(P, theta.dtype)


def _moved_with_prior(theta, cov, maps: Reexpression, prior_var, prior_weight):
    """:func:`reexpress_with_prior` of a flat float64 θ: ``(θ', P')``."""
    P = np.asarray(cov, np.float64)
    if np.all(np.isfinite(P)):
        try:
            P_inv = _spd_inverse(P)
            # P'⁻¹ = A⁻ᵀ P⁻¹ A⁻¹, then the prior swapped: − ρ A⁻ᵀA⁻¹/v + ρ I/v
            info = _sandwich(maps.Bt, P_inv) + float(prior_weight) / float(prior_var) * maps.prior_change
            cov_new = _spd_inverse(0.5 * (info + info.T))
        except np.linalg.LinAlgError:
            pass
        else:
            # the information vector P⁻¹θ re-expressed: A⁻ᵀ P⁻¹ θ
            return cov_new @ (maps.Bt @ (P_inv @ theta)), cov_new
    return _moved(theta, P, maps.A)


def fresh_priors(hyper, state, *, bank: bool):
    """The ``priors`` of :func:`reexpress_members` for a learner's state (a bank's, ``bank``):
    each member's prior variance ``v`` and the weight forgetting has left of its prior,
    ``ρ = λ^t`` after ``t`` updates; ``None`` (move exactly) where a prior variance is not one
    number (a per-parameter prior is not restated)."""
    counts = np.atleast_1d(np.asarray((state.members if bank else state).count, np.float64))
    v = np.asarray(hyper.prior_var, np.float64)
    if v.ndim > (1 if bank else 0):
        return None
    return (np.broadcast_to(v, counts.shape).copy(),
            np.broadcast_to(np.asarray(hyper.forgetting, np.float64), counts.shape) ** counts)


def reexpress_members(state, old, new, *, bank: bool, priors=None):
    """A core learner's state, or a bank's (every member), moved from feature coordinates
    ``old`` to ``new``: exactly (:func:`reexpress`), or with the prior set afresh in the new
    coordinates (:func:`reexpress_with_prior`) when ``priors = (prior_vars (K,),
    prior_weights (K,))`` gives each member's ``v`` and ``ρ``.

    Each member moves in its own covariance form, all members in one ``vmap``: exactly by
    :func:`~kalnat.representations.moves.moved` (a diagonal, low-rank or Kronecker state
    without a ``d × d`` array), and with the prior set afresh by the form's
    ``moved_with_prior`` (diagonal, Kronecker, low-rank, and groups and normal–inverse-gamma
    filters of them). Other forms (the full covariance, blocks) set the prior afresh through
    the information matrix, on the host in float64, the members moving between host and device
    once, all together (one ``vmap`` of their representation's ``dense`` and ``with_dense``),
    sharing one :class:`Reexpression`. A member whose state is not finite (it diverged, and is
    out of the bank's mixture already) is left as it is."""
    import jax
    import jax.numpy as jnp
    from kalnat.bank import member_shapes
    from kalnat.filter import with_covariance
    from kalnat.representations.moves import prior_movable

    members = state.members if bank else state
    leaves, treedef = jax.tree_util.tree_flatten(members.params)

    def one(tree):  # one member's shapes: the move and the form's choice read nothing else
        return member_shapes(tree) if bank else tree
    first = one(members.params)
    move = layer_move(first, old, new)
    if priors is None:
        return _moved_members(state, members, move, bank)
    if prior_movable(one(members.cov), move):
        return _moved_members(state, members, move, bank,
                              np.asarray(priors[1], np.float64) / np.asarray(priors[0], np.float64))
    covs = np.asarray(jax.vmap(lambda c: c.dense())(members.cov) if bank else members.cov.dense()[None],
                      np.float64)                                                      # (K, d, d)
    # the members' flat θ (K, d) on the host, in ravel_pytree's order (the leaves in
    # tree_flatten's order, each in C order): no device work per member
    leaves = [np.asarray(a, np.float64) if bank else np.asarray(a, np.float64)[None] for a in leaves]
    K = covs.shape[0]
    thetas = np.concatenate([a.reshape(K, -1) for a in leaves], axis=1)
    maps = reexpression(first, old, new)
    moved_thetas, moved_covs = thetas.copy(), covs.copy()
    with blas.one_thread():
        for k in range(K):
            if np.all(np.isfinite(covs[k])) and np.all(np.isfinite(thetas[k])):
                moved_thetas[k], moved_covs[k] = _moved_with_prior(thetas[k], covs[k], maps, priors[0][k],
                                                                   priors[1][k])
    dtype = jax.tree_util.tree_leaves(members.params)[0].dtype
    ends = np.cumsum([a[0].size for a in leaves])
    new_params = jax.tree_util.tree_unflatten(treedef, [
        jnp.asarray(part.reshape(a.shape), dtype) for part, a in zip(np.split(moved_thetas, ends[:-1], axis=1), leaves)])
    new_covs = jnp.asarray(moved_covs, dtype)
    if not bank:
        return with_covariance(state, jax.tree_util.tree_map(lambda a: a[0], new_params), new_covs[0])
    cov = jax.vmap(lambda c, p: c.with_dense(p))(members.cov, new_covs)
    return state._replace(members=members._replace(params=new_params, cov=cov))


def _moved_members(state, members, move, bank: bool, prior=None):
    """:func:`reexpress_members` in each member's own form: θ and the covariance moved by
    ``move``, or with the prior set afresh where ``prior`` gives each member's ``c = ρ/v``
    (``(K,)``; the form's ``moved_with_prior``); a member that is not finite kept as it was.
    One compiled program per model layout (:func:`_move_program`), ``T`` and ``T⁻¹`` its
    arguments: run op by op, the move of a bank's members took ~0.4 s a call."""
    import jax

    dtype = jax.tree_util.tree_leaves(members.params)[0].dtype
    # (NumPy arguments: jnp.asarray would compile a copy program for each new shape)
    c = None if prior is None else np.asarray(prior if bank else prior[0], dtype)
    rows = np.asarray(move.rows)
    program = _move_program(rows.shape, rows.tobytes(), rows.dtype.str, bank)
    params, cov = program(members.params, members.cov, np.asarray(move.t, np.float64),
                          np.asarray(move.inverse_t(), np.float64), c)
    members = members._replace(params=params, cov=cov)
    return state._replace(members=members) if bank else members


@functools.lru_cache(maxsize=32)
def _move_program(shape, rows, rows_dtype, bank: bool):
    """The jitted move of :func:`_moved_members` for a layer move's ``rows`` (given by their
    shape, bytes and dtype: a program's constants), ``(params, cov, t, t_inv, c) -> (params',
    cov')``."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree
    from kalnat.representations.moves import LayerMove, moved

    # the rows are constants of the program, not an argument: the forms read their values on
    # the host (which parts of θ they lie in, whether a Kronecker layer's order is theirs)
    rows = np.frombuffer(rows, np.dtype(rows_dtype)).reshape(shape)

    def one(params, cov, t, t_inv, c):
        move = LayerMove(rows, t, t_inv)
        theta, unravel = ravel_pytree(params)
        finite = jnp.all(jnp.isfinite(theta)) & jnp.all(jnp.array(
            [jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(cov)]))
        if c is None:
            new = (unravel(move.apply(theta)), moved(cov, move))
        else:
            theta, cov_new = cov.moved_with_prior(move, theta, c)
            new = (unravel(theta), cov_new)
        return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, (params, cov))

    # (c: each member's, or None, an empty pytree, for an exact move)
    return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, 0)) if bank else one)
