"""A change of coordinates of one dense layer's inputs, applied to a covariance in its own form.

When a model's inputs are re-standardised (:mod:`kalnat.scaling`), its first layer's weight
matrix ``M = [W | b]`` becomes ``M' = M T``: every output row ``m̄_j = [W_j, b_j]`` moves by the
same ``Tᵀ`` (``(p + 1) × (p + 1)``, or ``p × p`` without a bias), and θ elsewhere stays. So
``θ' = A θ`` with ``A`` the identity but for these blocks, and the filter's covariance becomes
``P' = A P Aᵀ``. :class:`LayerMove` carries ``T`` and where the rows sit in θ; each covariance
form applies it in its own storage (its ``moved`` method), so a structured form is moved
without a ``d × d`` array:

- the full covariance (and the other dense forms): ``A P Aᵀ`` on its own ``d × d`` matrix,
  touching the moved rows and columns only;
- the diagonal: ``diag(A P Aᵀ)``, what its ``with_dense`` keeps of the moved matrix;
- Kronecker factors of the layer: ``G ⊗ Tᵀ A T``, exactly (the layer's rows all move by ``Tᵀ``);
- diagonal plus low-rank precision ``Λ = diag(υ) + W Wᵀ``: ``Λ' = A⁻ᵀ Λ A⁻¹``, whose low-rank
  part ``A⁻ᵀ W`` is kept exactly and whose diagonal part keeps the diagonal of
  ``A⁻ᵀ diag(υ) A⁻¹`` (the coupling of a row's bias and weights it gains is dropped, as the
  update drops what leaves the rank); with ``k ≥ d``, where the form is the exact filter,
  through its dense matrix (``d`` is then at most ``k``);
- groups and blocks: each group moved in its own form; groups that the rows couple (a bias and
  its weights in separate blocks) are moved together as one dense matrix of their own size and
  each keeps its block, as ``with_dense`` would.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

__all__ = ["LayerMove", "moved", "or_exact", "prior_movable", "moved_groups"]


class LayerMove(NamedTuple):
    """``θ'[rows[j]] = Tᵀ θ[rows[j]]`` for every output row ``j``; θ elsewhere unchanged.

    Attributes:
      rows: ``(n_out, q)`` integer positions in θ of each output's weights, then its bias
        (``q = p + 1``; ``p`` without a bias).
      t: ``(q, q)`` float64, ``T``.
      t_inv: ``T⁻¹`` where it is given (computed on the host, for a move whose ``t`` is an
        argument of a compiled program: :func:`kalnat.scaling.reexpress_members`), else
        ``None``: :meth:`inverse_t` computes it.
    """

    rows: np.ndarray
    t: np.ndarray
    t_inv: Optional[np.ndarray] = None

    def located(self, sizes):
        """``[(g, start, n, local)]`` for each of θ's consecutive slices of ``sizes`` that holds
        some of the rows: ``local`` this move in the slice's coordinates when every row lies
        there, ``None`` when the rows straddle the slice's edge (the slices are then moved
        together)."""
        out, start = [], 0
        for g, n in enumerate(sizes):
            inside = (self.rows >= start) & (self.rows < start + n)
            if inside.any():
                out.append((g, start, n, self._replace(rows=self.rows - start) if inside.all() else None))
            start += n
        return out

    def apply(self, x, t=None):
        """``A x`` for ``x (d, …)`` (θ or a matrix's rows), or with ``t`` in place of ``T``."""
        t = self.t if t is None else t
        x = jnp.asarray(x)
        block = x[self.rows]                                            # (n_out, q, …)
        return x.at[self.rows].set(jnp.einsum("kq,jk...->jq...", jnp.asarray(t, x.dtype), block))

    def congruence(self, P):
        """``A P Aᵀ`` for a dense ``P (d, d)``."""
        return self.apply(self.apply(P).T).T

    def inverse_t(self):
        """``T⁻¹``: float64 on the host, or the program's argument :attr:`t_inv` where given
        (a move made with ``_replace(t=…)`` must give its ``t_inv`` too)."""
        return np.linalg.inv(self.t) if self.t_inv is None else self.t_inv

    def prior_change(self, c, dtype):
        """``c (I − T⁻¹ T⁻ᵀ)`` (``q × q``): a moved row's block of ``c (I − A⁻ᵀ A⁻¹)``, what
        setting a prior ``c I`` afresh in the new coordinates adds to the moved information."""
        inv = jnp.asarray(self.inverse_t(), dtype)
        change = jnp.eye(inv.shape[0], dtype=dtype) - inv @ inv.T
        return jnp.asarray(c, dtype) * 0.5 * (change + change.T)

    def information_blocks(self, diag_rows, c):
        """``(blocks (n_out, q, q), lower, ok)``: each moved row's block
        ``T⁻¹ diag(x_j) T⁻ᵀ + c (I − T⁻¹ T⁻ᵀ)`` of the new information, for a diagonal
        information ``x`` (``diag_rows = x[rows]``), with the blocks' lower Cholesky factors and
        whether every block is positive definite."""
        dt = diag_rows.dtype
        inv = jnp.asarray(self.inverse_t(), dt)
        blocks = jnp.einsum("qk,jk,rk->jqr", inv, diag_rows, inv) + self.prior_change(c, dt)[None]
        lower = jnp.linalg.cholesky(0.5 * (blocks + jnp.swapaxes(blocks, 1, 2)))
        return blocks, lower, jnp.all(jnp.isfinite(lower))


def moved(cov, move: LayerMove):
    """``cov`` (a covariance state, one member's, or a block's ``(n, n)`` array) after ``move``:
    its own ``moved`` where the form has one, else its ``with_dense`` of the moved dense matrix
    (the full covariance, the Cholesky and precision forms: their own ``d × d`` arrays)."""
    own = getattr(cov, "moved", None)
    if own is not None:
        return own(move)
    if hasattr(cov, "with_dense"):
        return cov.with_dense(move.congruence(cov.dense()))
    return move.congruence(cov)  # a block of :class:`~kalnat.representations.BlockCovariance`: (n, n)


def or_exact(ok, new, cov, move: LayerMove, theta):
    """``new = (θ', cov')`` where ``ok``, else the exact move of ``(θ, cov)``: what setting the
    prior afresh falls back to where the new information is not positive definite (as
    :func:`kalnat.scaling.reexpress_with_prior` does)."""
    exact = (move.apply(theta), moved(cov, move))
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, exact)


def prior_movable(cov, move: LayerMove) -> bool:
    """Whether ``cov`` (one member's) sets the prior afresh in its own storage for ``move``
    (its ``moved_with_prior``), decided from shapes alone."""
    check = getattr(cov, "prior_movable", None)
    return check is not None and bool(check(move))


def moved_groups(parts, sizes, move: LayerMove, rebuild):
    """Each of ``parts`` (covering θ's consecutive slices of ``sizes``) after ``move``: a part
    the rows lie in is moved in its form; the parts the rows straddle are formed densely
    together, moved, and each rebuilt from its diagonal block by ``rebuild(part, block)``."""
    out, coupled = list(parts), []
    for g, start, n, local in move.located(sizes):
        if local is None:
            coupled.append((g, start, n))
        else:
            out[g] = moved(parts[g], local)
    if coupled:
        index = np.concatenate([np.arange(s, s + n) for _, s, n in coupled])
        where = np.full(sum(sizes), -1)
        where[index] = np.arange(index.size)
        if (where[move.rows] < 0).any():
            raise ValueError("a layer move's rows lie in groups that are not consecutive")
        dense = jax.scipy.linalg.block_diag(*[_dense(parts[g]) for g, _, _ in coupled])
        dense = move._replace(rows=where[move.rows]).congruence(dense)
        i = 0
        for g, _, n in coupled:
            out[g] = rebuild(parts[g], dense[i:i + n, i:i + n])
            i += n
    return tuple(out)


def _dense(part):
    return part.dense() if hasattr(part, "dense") else part

