"""Groups of parameters, each in a representation of its own, cross-covariances dropped.

``P = blockdiag(P_1, …, P_G)`` over consecutive groups of θ, with group ``g`` stored by any
representation (full, low rank, diagonal, …). This is the decoupled EKF (Puskorius & Feldkamp
1991) with a free choice per group, e.g. a full covariance for a network's last layer and a low
rank plus diagonal precision for the rest (Duran-Martin et al. 2025): :func:`last_layer_full`.

The observation couples the groups through ``S = Σ_g H_g P_g⁻ H_gᵀ + R``. Group ``g`` is
conditioned exactly as a filter of its own whose observation noise also carries the other
groups' uncertainty, ``R_g = R + Σ_{o≠g} H_o P_o⁻ H_oᵀ``: then ``H_g P_g⁻ H_gᵀ + R_g = S``, so
its gain ``P_g⁻ H_gᵀ S⁻¹`` and covariance update ``P_g⁻ − P_g⁻ H_gᵀ S⁻¹ H_g P_g⁻`` are the
block-diagonal filter's, in its own representation. With one group it is that representation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from kalnat.linearization import LayerRows
from kalnat.representations import moves
from kalnat.representations.base import Representation, group_sizes
from kalnat.representations.blocks import leaf_sizes
from kalnat.representations.full import Full
from kalnat.representations.kron import KronLayer

__all__ = ["Groups", "GroupCovariance", "last_layer_full", "kronecker", "dense_layers", "part_size"]


class GroupCovariance(NamedTuple):
    """``parts``: one covariance (or prior) per group, each in its group's representation."""

    parts: Tuple

    def dense(self):
        return jax.scipy.linalg.block_diag(*[p.dense() for p in self.parts])

    def with_dense(self, P):
        P = jnp.asarray(P)
        out, i = [], 0
        for part in self.parts:
            n = part_size(part)
            out.append(part.with_dense(P[i:i + n, i:i + n]))
            i += n
        return GroupCovariance(tuple(out))

    def moved(self, move):
        """After a :class:`~kalnat.representations.moves.LayerMove`: each group in its own form
        (:func:`~kalnat.representations.moves.moved_groups`)."""
        return GroupCovariance(moves.moved_groups(self.parts, [part_size(p) for p in self.parts], move,
                                                  lambda part, block: part.with_dense(block)))

    def _containing(self, move):
        """``(group, start, local move)`` of the group ``move``'s rows lie in; ``None`` where
        they straddle groups."""
        touched = move.located([part_size(part) for part in self.parts])
        if len(touched) != 1 or touched[0][3] is None:
            return None
        g, start, _, local = touched[0]
        return g, start, local

    def prior_movable(self, move):
        """Whether :meth:`moved_with_prior` applies: the rows lie in one group, whose form has it."""
        where = self._containing(move)
        return where is not None and moves.prior_movable(self.parts[where[0]], where[2])

    def moved_with_prior(self, move, theta, c):
        """The group the move lies in, by its own form (the prior's change ``I − A⁻ᵀA⁻¹`` is
        zero elsewhere, and so is the move), where :meth:`prior_movable`."""
        g, start, local = self._containing(move)
        n = part_size(self.parts[g])
        parts = list(self.parts)
        piece, parts[g] = parts[g].moved_with_prior(local, theta[start:start + n], c)
        theta = theta.at[start:start + n].set(piece)
        return theta, GroupCovariance(tuple(parts))


def part_size(part) -> int:
    """How many parameters a group's covariance covers, read from its shapes."""
    if hasattr(part, "ups"):            # LowRankPrecision
        return int(part.ups.shape[0])
    if hasattr(part, "g") and hasattr(part, "a"):   # KronCovariance
        return int(part.g.shape[0] * part.a.shape[0])
    if hasattr(part, "blocks"):         # BlockCovariance
        return sum(int(b.shape[0]) for b in part.blocks)
    if hasattr(part, "d"):              # DiagonalCovariance: its variances are padded
        return int(part.d)
    return int(jax.tree_util.tree_leaves(part)[0].shape[0])


@dataclass(frozen=True)
class Groups(Representation):
    """Consecutive groups of ``sizes`` parameters, group ``g`` in representation ``parts[g]``."""

    sizes: Tuple[int, ...]
    parts: Tuple[Representation, ...]
    name = "groups"
    state_type = GroupCovariance

    def __post_init__(self):
        object.__setattr__(self, "sizes", group_sizes(self.sizes, "Groups"))
        object.__setattr__(self, "parts", tuple(self.parts))
        if len(self.sizes) != len(self.parts):
            raise ValueError(f"Groups: {len(self.sizes)} sizes for {len(self.parts)} representations")
        for rep in self.parts:
            if rep.noise_prior or not rep.uses_forgetting:
                raise ValueError(f"Groups: a group cannot be in the {rep.name} representation "
                                 "(it needs the whole of θ)")

    @property
    def branches(self):
        return any(rep.branches for rep in self.parts)

    @property
    def process_noise(self):
        return all(rep.process_noise for rep in self.parts)

    @property
    def layer_rows(self):
        return all(rep.layer_rows for rep in self.parts)

    @property
    def dense_layers(self):
        return tuple(layer for rep in self.parts for layer in rep.dense_layers)

    def _cuts(self):
        return np.cumsum((0,) + tuple(self.sizes))

    def _split(self, v, axis=0):
        if isinstance(v, LayerRows):  # one dense layer per group
            return [v.layer(i) for i in range(len(self.parts))]
        c = self._cuts()
        return [jax.lax.slice_in_dim(v, int(a), int(b), axis=axis) for a, b in zip(c[:-1], c[1:])]

    def _split_option(self, v):
        if v is None:
            return [None] * len(self.sizes)
        v = jnp.asarray(v)
        return [v] * len(self.sizes) if v.ndim == 0 else self._split(v)

    def init(self, hyper, d, dtype):
        if sum(self.sizes) != d:
            raise ValueError(f"groups of sizes {self.sizes} cover {sum(self.sizes)} parameters, the model has {d}")
        v = jnp.asarray(hyper.prior_var, dtype)
        if v.ndim == 2:
            c = self._cuts()
            priors = [v[a:b, a:b] for a, b in zip(c[:-1], c[1:])]
        else:
            priors = self._split_option(v)
        return GroupCovariance(tuple(rep.init(hyper._replace(prior_var=pv), n, dtype)
                                     for rep, n, pv in zip(self.parts, self.sizes, priors)))

    def inflate(self, cov, t, lam, q, bound):
        return GroupCovariance(tuple(
            rep.inflate(c, t, lam, qg, bg) for rep, c, qg, bg in
            zip(self.parts, cov.parts, self._split_option(q), self._split_option(bound))))

    def quad(self, prior, h):
        return sum(rep.quad(p, hg) for rep, p, hg in zip(self.parts, prior.parts, self._split(h, axis=1)))

    def gain(self, prior, H, R, e):
        hs = self._split(H, axis=1)
        projections = [rep.project(p, hg) for rep, p, hg in zip(self.parts, prior.parts, hs)]
        quads = [hph for hph, _ in projections]
        total = sum(quads)
        deltas, auxes, noises = [], [], []
        for g, (rep, p, hg) in enumerate(zip(self.parts, prior.parts, hs)):
            # the other groups' uncertainty joins the noise (summed, not total − own: that
            # difference cancels in float32 when one group carries most of it)
            rg = R + sum(q for j, q in enumerate(quads) if j != g)
            dg, _, aux = rep.gain_projected(p, hg, rg, e, projections[g])
            deltas.append(dg)
            auxes.append(aux)
            noises.append(rg)
        return jnp.concatenate(deltas), total, (tuple(auxes), tuple(noises))

    def posterior(self, prior, H, R, e, aux, rows):
        auxes, noises = aux
        return GroupCovariance(tuple(
            rep.posterior(p, hg, rg, e, a, rows) for rep, p, hg, rg, a in
            zip(self.parts, prior.parts, self._split(H, axis=1), noises, auxes)))


def last_layer_full(params, rest: Representation) -> Groups:
    """The preset "full last layer, ``rest`` for the others": the params pytree's last two
    leaves in ``ravel_pytree`` order (for :func:`kalnat.models.mlp`, the output layer's bias and
    weights) in one full covariance, every other parameter in ``rest`` (e.g. ``LowRank(10)``)."""
    sizes = leaf_sizes(params)
    if len(sizes) < 3:
        raise ValueError("last_layer_full: the model has no layer before its last; use Full()")
    last = int(sum(sizes[-2:]))
    return Groups((int(sum(sizes[:-2])), last), (rest, Full()))


def kronecker(params) -> Representation:
    """Kronecker factors for every dense layer (:class:`~kalnat.representations.kron.KronLayer`):
    a bias leaf ``(n,)`` next to a weight leaf in ``ravel_pytree``'s order is one layer of
    ``n`` outputs, in any of the layouts networks use: the bias first and the weights
    ``(n_out, n_in)`` (:func:`kalnat.models.linear` and :func:`kalnat.models.mlp`), or stored
    ``(n_in, n_out)`` (flax's ``{"bias", "kernel"}``, haiku's ``{"b", "w"}``), or the weights
    first (equinox's ``Linear``); the layouts other than kalnat's are read in a container of
    the two leaves alone (a layer's dict, module or tuple). A square weight reads as
    ``(n_out, n_in)`` unless its leaf is named ``kernel`` (flax's): a haiku layer of as many
    inputs as outputs is read on the wrong axes (still a covariance, not K-FAC's form; give it
    ``KronLayer(n, n, transposed=True)`` in :class:`Groups` yourself). Any other leaf keeps a
    full covariance of its own, and one of two or more axes among them (a recurrent cell's
    matrices, a convolution's kernel) is named in a ``UserWarning`` with its block's size."""
    pieces = _layer_pieces(params)
    _warn_unread_matrices(pieces)
    sizes = tuple(size for _, size, _ in pieces)
    parts = tuple(Full() if layer is None else KronLayer(*layer) for layer, _, _ in pieces)
    return parts[0] if len(parts) == 1 else Groups(sizes, parts)


def _warn_unread_matrices(pieces):
    """Warn of the leaves of two or more axes that :func:`kronecker` keeps in full covariances
    (``pieces`` of :func:`_layer_pieces`): a layout it does not read as a layer, whose full
    block may be far larger than meant."""
    names = [f"{jax.tree_util.keystr(path) or 'params'} {shape} ({int(np.prod(shape)) ** 2} numbers)"
             for layer, _, (path, shape) in pieces if layer is None and len(shape) >= 2]
    if names:
        warnings.warn("kronecker: not read as a dense layer, so kept in a full covariance each: "
                      + ", ".join(names) + ". A dense layer is read as a bias (n,) next to its "
                      "weights (n, m) or (m, n) in ravel_pytree's order", UserWarning, stacklevel=3)


def dense_layers(params):
    """``((n_out, n_in), …)`` when every leaf of ``params`` is part of a dense layer, a bias
    ``(n,)`` followed by its weights ``(n, m)`` in ``ravel_pytree``'s order (as
    :func:`kalnat.models.linear` and :func:`kalnat.models.mlp` lay them out); else ``None``."""
    pieces = _layer_pieces(params)
    layers = tuple(layer for layer, _, _ in pieces)
    if not layers or None in layers or any(layer[2:] != (True, False) for layer in layers):
        return None
    return tuple(layer[:2] for layer in layers)


def _layer_pieces(params):
    """θ in consecutive pieces ``(layer, size, (path, shape))``, the last of the piece's first
    leaf: a bias leaf ``(n,)`` next to a weight leaf ``(n, m)`` or ``(m, n)`` in the same
    container is the dense layer ``(n_out, n_in, bias_first, transposed)`` of ``n (m + 1)``
    parameters (:func:`kronecker`); any other leaf is a piece of its own, ``(None, its size,
    …)``."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = [tuple(np.shape(a)) for _, a in flat]
    kernel = [bool(path) and getattr(path[-1], "key", getattr(path[-1], "name", None)) == "kernel"
              for path, _ in flat]
    parents = [path[:-1] for path, _ in flat]
    counts = {}
    for parent in parents:
        counts[parent] = counts.get(parent, 0) + 1
    pieces, i = [], 0
    while i < len(leaves):
        # a layer's bias and weights are siblings (one dict, module or tuple): leaves of two
        # containers are never paired. kalnat's layout (the bias, then W (n_out, n_in)) is read
        # in any container; the others only in a container of those two leaves alone (a flax or
        # haiku layer's dict, an equinox Linear, a tuple), so that in a dict of several matrices
        # and biases (a recurrent cell's) a matrix never takes a bias that is not its own
        siblings = i + 1 < len(leaves) and parents[i] == parents[i + 1]
        alone = siblings and counts[parents[i]] == 2
        a, b = leaves[i], leaves[i + 1] if siblings else None
        layer = None
        for bias, w, bias_first, named in ((a, b, True, i + 1 < len(kernel) and kernel[i + 1]),
                                           (b, a, False, kernel[i])):
            if layer is None and None not in (bias, w) and len(bias) == 1 and len(w) == 2 and bias[0] in w:
                n = bias[0]
                transposed = w[0] != n or (w[1] == n and named)   # (m, n), or a square flax kernel
                if alone or (bias_first and not transposed):
                    layer = (int(n), int(w[0] if transposed else w[1]), bias_first, bool(transposed))
        first = (flat[i][0], a)
        if layer is not None:
            pieces.append((layer, layer[0] * (layer[1] + 1), first))
            i += 2
        else:
            pieces.append((None, int(np.prod(a)), first))
            i += 1
    return pieces
