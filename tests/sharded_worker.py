"""Run by tests/test_sharded.py in a subprocess: XLA_FLAGS (8 simulated CPU devices) must be set
before JAX is imported. Prints one JSON line: deviations from one device and the collectives."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.monitoring  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

import kalnat  # noqa: E402
from kalnat import sharded  # noqa: E402
from kalnat.learners.base import device_hyper  # noqa: E402

D, N = 16, 24
RANK = 3


def on_host(tree):
    """``tree``'s arrays gathered to the host: the form's ``dense()`` of them then runs the
    one-device programs its reference already compiled, not one per operation and sharding."""
    return jax.tree_util.tree_map(np.asarray, tree)


_PROGRAMS = [0]  # the programs JAX has loaded, each compiled or read from the persistent cache


def _count_programs(event, seconds, **_):
    if event == "/jax/core/compile/backend_compile_duration":
        _PROGRAMS[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_programs)


def fitted_collectives(learner, mesh, params, X, y, batch):
    """``(collectives, programs)``: the collectives of the chunk program ``sharded.fit`` ran on
    ``X``, ``y`` (every step of the stream: one chunk), read back from JAX's in-process caches
    of lowered and compiled programs, and how many programs that loaded: none where the same
    arguments lowered to what the fit ran (the tests check it: another chunk length or dtype
    would compile, and describe, another program)."""
    before, c = _PROGRAMS[0], X.shape[0] // batch
    run = sharded._jitted(learner, mesh, "scan", learner.init(params).cov)
    lowered = run.lower(device_hyper(learner, None, np.float64), sharded.shard(learner.init(params), mesh),
                        X.reshape((c, batch) + X.shape[1:]), learner.family.check(y).reshape(c, batch),
                        np.ones((c, batch), bool))
    return sharded.collectives(lowered.compile().as_text()), _PROGRAMS[0] - before


def step_collectives(learner, mesh, params, cov, X, y, batch):
    """The collectives of ``sharded.step_fn(learner, mesh, cov)``'s program (a step compiled
    apart, for one minibatch)."""
    hlo = sharded.step_fn(learner, mesh, cov).lower(device_hyper(learner, None, np.float64),
                                                    sharded.shard(learner.init(params), mesh), X[:batch], y[:batch])
    return sharded.collectives(hlo.compile().as_text())


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-300))


def main():
    out = {"devices": len(jax.devices()), "cases": []}
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, D - 1))
    z = X @ rng.normal(size=D - 1)
    model = kalnat.models.linear(D - 1)
    cases = [("bernoulli", kalnat.ekf(model, kalnat.families.Bernoulli(), forgetting=0.99),
              (rng.uniform(size=N) < 1 / (1 + np.exp(-z))).astype(float)),
             ("gaussian", kalnat.ekf(model, kalnat.families.Gaussian(0.5)), z + rng.normal(size=N))]
    for name, learner, y in cases:
        for batch in (1, 2):
            ref = kalnat.fit(learner, learner.init(model.init(None)), X, y, batch_size=batch)
            for n in (2, 8):
                mesh = sharded.mesh(jax.devices()[:n])
                res = sharded.fit(learner, learner.init(model.init(None)), X, y, mesh, batch_size=batch)
                p = res.state.cov.p
                hyper = device_hyper(learner, None, np.float64)
                state = sharded.shard(learner.init(model.init(None)), mesh)
                hlo = sharded.step_fn(learner, mesh).lower(hyper, state, X[:batch], y[:batch]).compile().as_text()
                out["cases"].append({
                    "family": name, "batch": batch, "n": n,
                    "theta": max(rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(ref.state.params),
                                                           jax.tree_util.tree_leaves(res.state.params))),
                    "P": rel(ref.state.cov.p, p),
                    "pred": rel(ref.predictions.mean, res.predictions.mean),
                    "ll": rel(ref.log_likelihood, res.log_likelihood),
                    "row_sharded": p.sharding.spec == jax.sharding.PartitionSpec(sharded.AXIS, None),
                    "shards": len(p.addressable_shards),
                    "shard_shape": list(p.addressable_shards[0].data.shape),
                    "collectives": sharded.collectives(hlo),
                })
    # the structured forms (representations.Diagonal, LowRank): their (d,) and (d, k) leaves
    # split by parameter, on 8 devices
    out["structured"] = []
    y = cases[0][2]
    for rep in (kalnat.representations.Diagonal(), kalnat.representations.LowRank(rank=RANK)):
        learner = kalnat.ekf(model, kalnat.families.Bernoulli(), forgetting=0.99, representation=rep)
        mesh = sharded.mesh(jax.devices())
        for batch in (1, 2):
            ref = kalnat.fit(learner, learner.init(model.init(None)), X, y, batch_size=batch)
            res = sharded.fit(learner, learner.init(model.init(None)), X, y, mesh, batch_size=batch)
            collectives, programs = fitted_collectives(learner, mesh, model.init(None), X, y, batch)
            leaves = jax.tree_util.tree_leaves(res.state.cov)
            out["structured"].append({
                "form": rep.name, "batch": batch,
                "theta": max(rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(ref.state.params),
                                                       jax.tree_util.tree_leaves(res.state.params))),
                # P itself: a low-rank factor W is defined up to a rotation on its right (W Q holds
                # the same W Wᵀ; at the prior a step drops a direction from a null space of
                # repeated eigenvalues, and a program split over devices may take another basis)
                "cov": rel(ref.state.cov.dense(), on_host(res.state.cov).dense()),
                "pred": rel(ref.predictions.mean, res.predictions.mean),
                "ll": rel(ref.log_likelihood, res.log_likelihood),
                "specs": [list(a.sharding.spec) for a in leaves],
                "shard_shapes": [list(a.addressable_shards[0].data.shape) for a in leaves],
                "collectives": collectives, "programs": programs,
            })
            if rep.name == "lowrank" and batch == 2:  # step_fn given the covariance's type
                out["structured"][-1]["step_collectives"] = step_collectives(
                    learner, mesh, model.init(None), type(res.state.cov), X, y, batch)
    # the forms made of parts: blocks per leaf, a low-rank rest with a full last layer, the
    # Kronecker factors per layer (kept whole); an MLP whose blocks of 8, 56 and 8 parameters
    # split over 8 devices and whose output bias (1) and last layer (9) do not
    out["parts"] = []
    mlp = kalnat.models.mlp(7, (8,))
    params = mlp.init(jax.random.PRNGKey(0))
    Xm = X[:, :7]
    reps = {"blocks": kalnat.representations.Blocks.per_leaf(params),
            "last-layer": kalnat.representations.last_layer_full(params, kalnat.representations.LowRank(rank=RANK)),
            "kron": kalnat.representations.kronecker(params)}
    for (form, rep), batches in zip(reps.items(), [(1,), (2,), (1,)]):  # (each compiles its own scans)
        learner = kalnat.ekf(mlp, kalnat.families.Bernoulli(), forgetting=0.99, representation=rep)
        mesh = sharded.mesh(jax.devices())
        for batch in batches:
            ref = kalnat.fit(learner, learner.init(params), Xm, y, batch_size=batch)
            res = sharded.fit(learner, learner.init(params), Xm, y, mesh, batch_size=batch)
            collectives, programs = fitted_collectives(learner, mesh, params, Xm, y, batch)
            leaves = jax.tree_util.tree_leaves(res.state.cov)
            out["parts"].append({
                "form": form, "batch": batch, "d": int(sum(np.size(a) for a in jax.tree_util.tree_leaves(params))),
                "theta": max(rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(ref.state.params),
                                                       jax.tree_util.tree_leaves(res.state.params))),
                "cov": rel(ref.state.cov.dense(), on_host(res.state.cov).dense()),  # P itself, as above
                "pred": rel(ref.predictions.mean, res.predictions.mean),
                "ll": rel(ref.log_likelihood, res.log_likelihood),
                "specs": [list(a.sharding.spec) for a in leaves],
                "shapes": [list(a.shape) for a in leaves],
                "collectives": collectives, "programs": programs,
            })
            if form == "blocks":  # step_fn given the state's covariance, a pytree of parts
                out["parts"][-1]["step_collectives"] = step_collectives(
                    learner, mesh, params, learner.init(params).cov, Xm, y, batch)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
