"""Per-group blocks of the covariance: the decoupled EKF (Puskorius & Feldkamp 1991).

θ is cut into consecutive groups (by default the leaves of the params pytree, in
``ravel_pytree``'s order: a layer's weights, its biases, …) and each group keeps a full
covariance of its own, ``P = blockdiag(P_1, …, P_G)``; the cross-covariances between groups are
dropped. Memory O(Σ n_g²) instead of O(d²). The step is the covariance form's on the blocks:
``P⁻ Hᵀ`` is the stacked ``P_g⁻ H_gᵀ``, ``S = Σ_g H_g P_g⁻ H_gᵀ + R`` couples the groups through
the observation, and each block is downdated by its own rows of ``W = P⁻ Hᵀ L⁻ᵀ``:
``P_g = P_g⁻ − W_g W_gᵀ``. With one group it is the EKF exactly; it is the exact filter too
whenever the groups' Fisher information never couples them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kalnat import numerics
from kalnat.representations import moves
from kalnat.representations.base import Representation, group_sizes
from kalnat.representations.full import PriorCovariance, inflate_dense

__all__ = ["BlockCovariance", "Blocks", "leaf_sizes"]


class BlockCovariance(NamedTuple):
    """``blocks``: a tuple of ``(n_g, n_g)`` covariances, one per group, in θ's order (the
    prior's are :class:`~kalnat.representations.full.PriorCovariance` pieces)."""

    blocks: Tuple

    def dense(self):
        return jax.scipy.linalg.block_diag(*[b.dense() if hasattr(b, "dense") else b for b in self.blocks])

    def with_dense(self, P):
        P = jnp.asarray(P)
        out, i = [], 0
        for b in self.blocks:
            n = b.shape[0]
            out.append(jnp.asarray(P[i:i + n, i:i + n], b.dtype))
            i += n
        return BlockCovariance(tuple(out))

    def moved(self, move):
        """After a :class:`~kalnat.representations.moves.LayerMove`: each block ``A_g P_g A_gᵀ``;
        blocks the rows couple (a bias and its weights) moved together, each keeping its own
        block (:func:`~kalnat.representations.moves.moved_groups`)."""
        return BlockCovariance(moves.moved_groups(
            self.blocks, [b.shape[0] for b in self.blocks], move, lambda b, block: jnp.asarray(block, b.dtype)))


def leaf_sizes(params) -> Tuple[int, ...]:
    """The sizes of a params pytree's leaves, in ``ravel_pytree``'s order: one group per leaf."""
    return tuple(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))


@dataclass(frozen=True)
class Blocks(Representation):
    """Block-diagonal P over consecutive groups of ``sizes`` parameters (their sum is d)."""

    sizes: Tuple[int, ...]
    name = "blocks"
    state_type = BlockCovariance

    def __post_init__(self):
        object.__setattr__(self, "sizes", group_sizes(self.sizes, "Blocks"))

    @classmethod
    def per_leaf(cls, params) -> "Blocks":
        """One block per leaf of ``params`` (a model's ``init`` output, or its shapes)."""
        return cls(leaf_sizes(params))

    def _cuts(self):
        return np.cumsum((0,) + tuple(self.sizes))

    def _split(self, v, axis=0):
        c = self._cuts()
        return [jax.lax.slice_in_dim(v, int(a), int(b), axis=axis) for a, b in zip(c[:-1], c[1:])]

    def init(self, hyper, d, dtype):
        if sum(self.sizes) != d:
            raise ValueError(f"blocks of sizes {self.sizes} cover {sum(self.sizes)} parameters, the model has {d}")
        v = jnp.asarray(hyper.prior_var, dtype)
        cuts = self._cuts()
        if v.ndim == 2:  # a full prior: its diagonal blocks
            return BlockCovariance(tuple(v[a:b, a:b] for a, b in zip(cuts[:-1], cuts[1:])))
        return BlockCovariance(tuple(jnp.diag(p) for p in self._split(jnp.broadcast_to(v, (d,)))))

    def inflate(self, cov, t, lam, q, bound):
        qs = [None] * len(self.sizes) if q is None else self._split(jnp.broadcast_to(jnp.asarray(q), (sum(self.sizes),)))
        bs = [None] * len(self.sizes) if bound is None else self._split(
            jnp.broadcast_to(jnp.asarray(bound), (sum(self.sizes),)))
        return BlockCovariance(tuple(inflate_dense(p, lam, qg, bg) for p, qg, bg in zip(cov.blocks, qs, bs)))

    def _times(self, prior, ht):
        return jnp.concatenate([b.times(h) for b, h in zip(prior.blocks, self._split(ht))], axis=0)

    def quad(self, prior, h):
        return h @ self._times(prior, h.T)

    def gain(self, prior, H, R, e):
        ph = self._times(prior, H.T)                     # P⁻ Hᵀ (d, k), block by block
        hph = H @ ph
        w, v = numerics.whiten(hph + R, ph, e)
        return w @ v, hph, w

    def posterior(self, prior, H, R, e, aux, rows):
        return BlockCovariance(tuple(numerics.downdate(b.matrix(), wg)
                                     for b, wg in zip(prior.blocks, self._split(aux))))
