"""Run by tests/test_multihost.py: process ``i`` of ``n`` on this machine, joined by
``jax.distributed`` (JAX's CPU collectives over gloo) into one mesh of ``n × 2`` devices, runs
kalnat.sharded.fit and, on its own first device, kalnat.fit. Prints one JSON line: the largest
relative deviations of what this process holds (its rows of P, θ, the predictions)."""

import json
import os
import sys

process, count, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=count, process_id=process)

import numpy as np  # noqa: E402

import kalnat  # noqa: E402
from kalnat import sharded  # noqa: E402

D, N = 16, 24


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-300))


def held(ref, arr):
    """The deviation of this process's shards of a global array from the same slices of ``ref``."""
    return max(rel(np.asarray(ref)[s.index], s.data) for s in arr.addressable_shards)


def main():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, D - 1))
    z = X @ rng.normal(size=D - 1)
    y = (rng.uniform(size=N) < 1 / (1 + np.exp(-z))).astype(float)
    model = kalnat.models.linear(D - 1)
    out = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
           "local": jax.local_device_count(), "cases": []}
    mesh = sharded.mesh()
    for form, rep, batches in (("full", None, (1, 2)), ("diagonal", kalnat.representations.Diagonal(), (1,)),
                               ("lowrank", kalnat.representations.LowRank(rank=3), (1,))):
        learner = kalnat.ekf(model, kalnat.families.Bernoulli(), forgetting=0.99, representation=rep)
        for batch in batches:
            ref = kalnat.fit(learner, learner.init(model.init(None)), X, y, batch_size=batch)
            res = sharded.fit(learner, learner.init(model.init(None)), X, y, mesh, batch_size=batch)
            leaves = jax.tree_util.tree_leaves(res.state.cov)
            out["cases"].append({
                "form": form, "batch": batch,
                "theta": max(held(a, b) for a, b in zip(jax.tree_util.tree_leaves(ref.state.params),
                                                        jax.tree_util.tree_leaves(res.state.params))),
                "cov": max(held(a, b) for a, b in zip(jax.tree_util.tree_leaves(ref.state.cov), leaves)),
                "pred": rel(ref.predictions.mean, res.predictions.mean),
                "ll": rel(ref.log_likelihood, res.log_likelihood),
                "cov_rows_here": sorted({s.index[0].start for a in leaves for s in a.addressable_shards}),
                "cov_rows_per_shard": [a.addressable_shards[0].data.shape[0] for a in leaves],
            })
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
