"""One model across devices: the exact filter with ``P`` row-sharded over a JAX mesh.

The covariance form's step (:mod:`kalnat.representations.full`) reads ``P`` through
``P⁻ Hᵀ`` and writes it back through the rank-m downdate ``P − W Wᵀ``. With ``P``'s rows
split over the devices of a mesh axis (``NamedSharding(mesh, P(axis, None))``) and θ
replicated, XLA's SPMD partitioner keeps every ``d × d`` piece where it lives: each device
computes its rows of ``P⁻ Hᵀ`` (``d/n × m``), the ``m × m`` innovation covariance
``S = H P⁻ Hᵀ + R`` is one all-reduce, and the downdate needs ``W (d × m)`` in full: one
all-gather. Per step the devices exchange ``O(d m + m²)`` numbers, never a ``d × d`` array
(tests/test_sharded.py checks the compiled program's collectives). ``P`` is donated, so each
device updates its rows in place; it is never gathered.

The structured forms shard by parameter too: a diagonal's variances ``p`` (d padded to a
multiple of 8, ``numerics.LANES``), a low-rank
precision's ``υ (d,)`` and ``W (d, k)`` by rows (the low-rank step's sums over parameters are
``k × k``, ``k × m`` and ``m × m`` all-reduces; ``W`` is never gathered, nothing larger than
``d × m`` or ``k × k`` moves). Blocks and groups split each part whose size divides by the
device count in the same way and hold the others whole on every device; Kronecker factors are
held whole (the comment above ``_cov_specs`` says why).

The same code runs on several hosts once ``jax.distributed.initialize()`` has made every
host's devices part of ``jax.devices()`` (``examples/multihost.py``; tests/test_multihost.py
runs two processes on one machine): every process feeds the same rows and holds only its own
rows of ``P``.

    >>> mesh = kalnat.sharded.mesh()                              # doctest: +SKIP
    >>> state = kalnat.sharded.shard(learner.init(params), mesh)  # doctest: +SKIP
    >>> result = kalnat.sharded.fit(learner, state, X, y, mesh)   # doctest: +SKIP
"""

from __future__ import annotations

import re
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as Spec

from kalnat import blas, numerics
from kalnat.filter import State
from kalnat.learners.base import Learner, device_hyper
from kalnat.programs import once
from kalnat.representations.blocks import BlockCovariance
from kalnat.representations.diagonal import DiagonalCovariance
from kalnat.representations.full import Covariance
from kalnat.representations.groups import GroupCovariance
from kalnat.representations.kron import KronCovariance
from kalnat.representations.lowrank import LowRankPrecision
from kalnat.stream import FitResult, check_diverged, scan_rows

__all__ = ["mesh", "shard", "state_sharding", "step_fn", "fit", "collectives"]

AXIS = "rows"


def mesh(devices=None) -> Mesh:
    """A one-axis mesh (named :data:`AXIS`) over ``devices`` (default: all of ``jax.devices()``)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


# Each form's leaves split along θ's axis: the full covariance by rows, the diagonal's variances
# and the low-rank precision's υ (d,) and W (d, k) by parameter. These three must split evenly
# (else nothing of them would). The forms made of parts (blocks, groups) split each part's
# leaves whose first axis divides evenly over the devices and keep the rest whole on every
# device (a 9 × 9 block among 64 × 64 ones). Kronecker factors stay whole: a step factors and
# whitens them (split, it gathered them whole every step: measured on 8 devices).
_WHOLE = (Covariance, DiagonalCovariance, LowRankPrecision)
_PARTS = (BlockCovariance, GroupCovariance, KronCovariance)


def _rows(shape, n: int, even: bool = False) -> Spec:
    """A leaf of ``shape`` split along its first axis over ``n`` devices (replicated where that
    axis does not divide evenly, unless ``even``)."""
    if even or shape[0] % n == 0:
        return Spec(AXIS, *([None] * (len(shape) - 1)))
    return Spec()


def _cov_specs(cov, n: int, top: bool = True):
    """The covariance's ``PartitionSpec`` s, a pytree like ``cov`` (its shapes decide), or for a
    type of :data:`_WHOLE` alone one spec, a prefix splitting each of its leaves along the first
    axis: the evenly split form, as one of them at the ``top`` gives (not splitting evenly is
    then an error when it is placed)."""
    if isinstance(cov, type):
        if cov not in _WHOLE:
            raise ValueError(f"kalnat.sharded: a {cov.__name__} is split by its shapes: pass the covariance "
                             "(state.cov), not its type")
        return Spec(AXIS)  # a prefix of the form's leaves: each split along its first axis
    if isinstance(cov, BlockCovariance):
        if not all(hasattr(b, "shape") for b in cov.blocks):
            raise ValueError("kalnat.sharded: a predicted state's blocks (PriorCovariance) are not placed; "
                             "shard a learned or initial state")
        return BlockCovariance(tuple(_rows(b.shape, n) for b in cov.blocks))
    if isinstance(cov, GroupCovariance):
        return GroupCovariance(tuple(_cov_specs(part, n, top=False) for part in cov.parts))
    if isinstance(cov, KronCovariance):  # whole on every device: the step factors and whitens them
        return type(cov)(Spec(), Spec())   # the layer's layout is its type
    if isinstance(cov, _WHOLE):
        return jax.tree_util.tree_map(lambda a: _rows(a.shape, n, even=top), cov)
    raise ValueError(f"kalnat.sharded: no sharding for a {type(cov).__name__} (the full, diagonal, low-rank, "
                     "block, group and Kronecker forms)")


def _layout(cov):
    """What a compiled step's shardings depend on: the covariance's type and shapes."""
    if isinstance(cov, type):
        return cov
    return jax.tree_util.tree_structure(cov), tuple(np.shape(a) for a in jax.tree_util.tree_leaves(cov))


def _check(learner, state, mesh_):
    cov = getattr(state, "cov", None)
    if not isinstance(learner, Learner) or not isinstance(cov, _WHOLE + _PARTS):
        raise ValueError("kalnat.sharded runs kalnat.ekf (and its variants) with the full covariance or "
                         "representations.Diagonal, LowRank, Blocks, Groups (last_layer_full, kronecker); got "
                         f"{getattr(learner, 'name', type(learner).__name__)} with {type(cov).__name__}")
    rows = jax.tree_util.tree_leaves(cov)[0].shape[0]
    n = mesh_.shape[AXIS]
    if isinstance(cov, _WHOLE) and rows % n:
        held = (f"a diagonal covariance of d = {cov.d} parameters holds {rows} variances (padded to a "
                f"multiple of {numerics.LANES})" if isinstance(cov, DiagonalCovariance) else f"d = {rows} parameters")
        raise ValueError(f"kalnat.sharded: {held}, which do not split evenly over {n} devices; use a "
                         f"device count that divides {rows}")


def state_sharding(mesh_: Mesh, cov=Covariance, *, cov_type=None):
    """The state's shardings (a prefix of any core state's pytree): the covariance's leaves
    split along θ's axis over the mesh (``P``'s rows; a diagonal's variances; a low-rank
    precision's υ and W's rows; each block's and group's rows where they divide evenly;
    Kronecker factors whole), θ and the step count replicated. ``cov``: the state's covariance
    (``state.cov``), or the type of a full, diagonal or low-rank one (``cov_type``, its
    earlier name)."""
    cov = cov if cov_type is None else cov_type
    rep = NamedSharding(mesh_, Spec())
    specs = _cov_specs(cov, mesh_.shape[AXIS])
    return State(rep, jax.tree_util.tree_map(lambda spec: NamedSharding(mesh_, spec), specs,
                                             is_leaf=lambda x: isinstance(x, Spec)), rep)


def shard(state, mesh_: Mesh):
    """``state`` placed on the mesh (:func:`state_sharding`)."""
    s = state_sharding(mesh_, state.cov)
    return State(jax.device_put(state.params, s.params), jax.device_put(state.cov, s.cov),
                 jax.device_put(state.count, s.count))


def _jitted(learner, mesh_, kind, cov=Covariance):
    s = state_sharding(mesh_, cov)  # (the shardings, not cov: the compiled step outlives the state)

    def make():
        rep = NamedSharding(mesh_, Spec())
        if kind == "step":
            return jax.jit(lambda hyper, state, xs, ys: learner.step(hyper, state, xs, ys),
                           in_shardings=(rep, s, rep, rep), out_shardings=(s, rep, rep), donate_argnums=1)
        return jax.jit(lambda hyper, state, xs, ys, ms: scan_rows(learner, hyper, state, xs, ys, ms),
                       in_shardings=(rep, s, rep, rep, rep), out_shardings=(s, rep), donate_argnums=1)

    return once(learner, (kind, mesh_, _layout(cov)), make)


def step_fn(learner, mesh_: Mesh, cov=Covariance, *, cov_type=None):
    """The jitted, donating step ``(hyper, state, xs (b, …), ys (b, …)) -> (state, Predictive,
    log_lik (b,))`` with the state sharded as :func:`state_sharding` says (``cov``: the state's
    covariance, ``state.cov``, or the type of a full, diagonal or low-rank one)."""
    return _jitted(learner, mesh_, "step", cov if cov_type is None else cov_type)


def fit(learner, state, X, Y, mesh_: Mesh, *, batch_size: int = 1, chunk_size: int = 256,
        hyper=None) -> FitResult:
    """:func:`kalnat.fit` (predictions kept) with ``state`` sharded over ``mesh_``: the rows
    ``X (n, …)``, ``Y (n, …)`` in minibatches of ``batch_size``, ``chunk_size`` minibatches per
    compiled scan. ``n`` must be a multiple of ``batch_size``. Returns the final state, still
    sharded, and the progressive predictions."""
    _check(learner, state, mesh_)
    learner._check_state(state)
    xs, single = learner.check_x(state, X)
    if single:
        raise ValueError(f"X must have a leading row axis, got shape {np.shape(X)}")
    ys = learner.family.check(Y)
    n = xs.shape[0]
    if ys.shape[0] != n:
        raise ValueError(f"X has {n} rows but Y has {ys.shape[0]}")
    if n % batch_size:
        raise ValueError(f"kalnat.sharded.fit: {n} rows is not a multiple of batch_size {batch_size}")
    dtype = learner._dtype(state)
    run = _jitted(learner, mesh_, "scan", state.cov)
    hyper = device_hyper(learner, hyper, dtype)
    state = shard(state, mesh_)
    preds = []
    per_chunk = batch_size * chunk_size
    with blas.one_thread():
        for start in range(0, n, per_chunk):
            stop = min(start + per_chunk, n)
            c = (stop - start) // batch_size
            xc = np.asarray(xs[start:stop], dtype).reshape((c, batch_size) + xs.shape[1:])
            yc = ys[start:stop].reshape((c, batch_size) + ys.shape[1:])
            state, out = run(hyper, state, xc, yc, np.ones((c, batch_size), bool))
            # read back here: the chunk's program, the state's update with it, ends within the limit
            out = jax.tree_util.tree_map(lambda a: np.asarray(a).reshape((stop - start,) + a.shape[2:]), out)
            check_diverged(out[1], np.zeros(stop - start, bool), start, "row")
            preds.append(out)
    pred, ll = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *preds)
    return FitResult(state, pred, np.zeros(n, bool), ll)


_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|collective-permute|all-to-all|"
                         r"reduce-scatter)(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo_text: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """The cross-device operations of a compiled program's HLO text: ``[(op, [shapes])]``."""
    out = []
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            shapes = [tuple(int(v) for v in s.split(",") if v) for s in _SHAPE.findall(m.group(1))]
            out.append((m.group(2), shapes))
    return out
