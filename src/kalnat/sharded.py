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

The structured forms shard by parameter too: a diagonal's variances ``p (d,)``, a low-rank
precision's ``υ (d,)`` and ``W (d, k)`` by rows (the low-rank step's sums over parameters are
``k × k``, ``k × m`` and ``m × m`` all-reduces; ``W`` is never gathered, nothing larger than
``d × m`` or ``k × k`` moves).

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

from kalnat.filter import State
from kalnat.learners.base import Learner, device_hyper
from kalnat.programs import once
from kalnat.representations.diagonal import DiagonalCovariance
from kalnat.representations.full import Covariance
from kalnat.representations.lowrank import LowRankPrecision
from kalnat.stream import FitResult, check_diverged, scan_rows

__all__ = ["mesh", "shard", "state_sharding", "step_fn", "fit", "collectives"]

AXIS = "rows"


def mesh(devices=None) -> Mesh:
    """A one-axis mesh (named :data:`AXIS`) over ``devices`` (default: all of ``jax.devices()``)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


# Each form's leaves split along θ's axis: the full covariance by rows, the diagonal's variances
# and the low-rank precision's υ (d,) and W (d, k) by parameter.
_SPECS = {
    Covariance: lambda: Covariance(Spec(AXIS, None)),
    DiagonalCovariance: lambda: DiagonalCovariance(Spec(AXIS)),
    LowRankPrecision: lambda: LowRankPrecision(Spec(AXIS), Spec(AXIS, None)),
}


def _check(learner, state, mesh_):
    if not isinstance(learner, Learner) or type(getattr(state, "cov", None)) not in _SPECS:
        raise ValueError("kalnat.sharded runs kalnat.ekf (and its variants) with the full covariance, "
                         "representations.Diagonal or representations.LowRank; got "
                         f"{getattr(learner, 'name', type(learner).__name__)} with "
                         f"{type(getattr(state, 'cov', None)).__name__}")
    d = jax.tree_util.tree_leaves(state.cov)[0].shape[0]
    n = mesh_.shape[AXIS]
    if d % n:
        raise ValueError(f"kalnat.sharded: d = {d} parameters do not split evenly over {n} devices; "
                         f"use a device count that divides {d}")


def state_sharding(mesh_: Mesh, cov_type=Covariance):
    """The state's shardings (a prefix of any core state's pytree): the covariance's leaves
    split along θ's axis over the mesh (``P``'s rows; a diagonal's variances; a low-rank
    precision's υ and W's rows), θ and the step count replicated."""
    rep = NamedSharding(mesh_, Spec())
    if cov_type not in _SPECS:
        raise ValueError(f"kalnat.sharded: no sharding for a {cov_type.__name__} "
                         f"(one of {', '.join(t.__name__ for t in _SPECS)})")
    cov = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh_, spec), _SPECS[cov_type](),
                                 is_leaf=lambda x: isinstance(x, Spec))
    return State(rep, cov, rep)


def shard(state, mesh_: Mesh):
    """``state`` placed on the mesh (:func:`state_sharding`)."""
    s = state_sharding(mesh_, type(state.cov))
    return State(jax.device_put(state.params, s.params), jax.device_put(state.cov, s.cov),
                 jax.device_put(state.count, s.count))


def _jitted(learner, mesh_, kind, cov_type=Covariance):
    def make():
        rep, s = NamedSharding(mesh_, Spec()), state_sharding(mesh_, cov_type)
        if kind == "step":
            return jax.jit(lambda hyper, state, xs, ys: learner.step(hyper, state, xs, ys),
                           in_shardings=(rep, s, rep, rep), out_shardings=(s, rep, rep), donate_argnums=1)
        return jax.jit(lambda hyper, state, xs, ys, ms: scan_rows(learner, hyper, state, xs, ys, ms),
                       in_shardings=(rep, s, rep, rep, rep), out_shardings=(s, rep), donate_argnums=1)

    return once(learner, (kind, mesh_, cov_type), make)


def step_fn(learner, mesh_: Mesh, cov_type=Covariance):
    """The jitted, donating step ``(hyper, state, xs (b, …), ys (b, …)) -> (state, Predictive,
    log_lik (b,))`` with the state sharded as :func:`state_sharding` says (``cov_type``: the
    state's covariance type, ``type(state.cov)``)."""
    return _jitted(learner, mesh_, "step", cov_type)


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
    run = _jitted(learner, mesh_, "scan", type(state.cov))
    hyper = device_hyper(learner, hyper, dtype)
    state = shard(state, mesh_)
    preds = []
    per_chunk = batch_size * chunk_size
    for start in range(0, n, per_chunk):
        stop = min(start + per_chunk, n)
        c = (stop - start) // batch_size
        xc = np.asarray(xs[start:stop], dtype).reshape((c, batch_size) + xs.shape[1:])
        yc = ys[start:stop].reshape((c, batch_size) + ys.shape[1:])
        state, out = run(hyper, state, xc, yc, np.ones((c, batch_size), bool))
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
