"""Representations by name: the ``--covariance`` names of the command (``auto``, ``full``,
``diag``, ``blocks``, ``lowrank:K``, ``last-layer:K``, ``kron``), also taken by the scikit-learn
and river estimators. The grammar lives in :mod:`kalnat.cli_choices` (importable without JAX)."""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from kalnat.cli_choices import parse_covariance, resolve_covariance
from kalnat.representations.base import Representation
from kalnat.representations.blocks import Blocks
from kalnat.representations.diagonal import Diagonal
from kalnat.representations.groups import Groups, kronecker, last_layer_full
from kalnat.representations.kron import KronLayer
from kalnat.representations.lowrank import LowRank

__all__ = ["from_name", "stored_floats"]


def from_name(name: Optional[str], params) -> Optional[Representation]:
    """The representation ``name`` stands for on a model with parameters ``params`` (a pytree
    or its shapes); ``None`` for the full covariance (every learner's own form). ``auto``: full
    up to :data:`kalnat.cli_choices.AUTO_FULL_MAX` parameters, ``lowrank:10`` beyond."""
    d = int(sum(np.prod(np.shape(a)) for a in jax.tree_util.tree_leaves(params)))
    kind, rank = parse_covariance(resolve_covariance(name, d))
    if kind == "full":
        return None
    if kind == "diag":
        return Diagonal()
    if kind == "blocks":
        return Blocks.per_leaf(params)
    if kind == "lowrank":
        return LowRank(rank)
    if kind == "kron":
        return kronecker(params)
    return last_layer_full(params, LowRank(rank))


def stored_floats(rep: Optional[Representation], d: int) -> int:
    """How many numbers one filter of ``d`` parameters keeps in ``rep`` (``None``: full)."""
    if rep is None:
        return d * d
    if isinstance(rep, Diagonal):
        return d
    if isinstance(rep, Blocks):
        return sum(n * n for n in rep.sizes)
    if isinstance(rep, LowRank):
        return d * (rep.rank + 1)
    if isinstance(rep, KronLayer):
        return rep.n_out ** 2 + (rep.n_in + 1) ** 2
    if isinstance(rep, Groups):
        return sum(stored_floats(r if r.name != "full" else None, n) for r, n in zip(rep.parts, rep.sizes))
    return d * d
