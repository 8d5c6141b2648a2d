"""One exact filter across hosts: P's rows split over every device of every process.

Run one process per host, each with the same arguments but its own index; the first host's
address is the coordinator. On one machine, two processes with two CPU devices each:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python examples/multihost.py 0 2 127.0.0.1:4321 &
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python examples/multihost.py 1 2 127.0.0.1:4321

Every process feeds the same rows and gets the same predictions; each holds only its own rows
of P (tests/test_multihost.py checks both against one device).
"""

import sys

import jax
import numpy as np

import kalnat
from kalnat import sharded


def main(process: int, count: int, coordinator: str):
    jax.config.update("jax_enable_x64", True)
    # CPU devices of different processes talk over gloo (GPUs and TPUs have their own links;
    # the setting only concerns the CPU client). Before anything else touches JAX's backend:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=count, process_id=process)

    d = 64  # parameters: a multiple of the number of devices (P's rows split evenly)
    rng = np.random.default_rng(0)  # the same rows in every process
    X = rng.normal(size=(2000, d - 1))
    y = (rng.uniform(size=2000) < 1 / (1 + np.exp(-X @ rng.normal(size=d - 1) / 4))).astype(float)
    model = kalnat.models.linear(d - 1)
    learner = kalnat.ekf(model, kalnat.families.Bernoulli(), prior_var=0.1)
    mesh = sharded.mesh()  # every device of every process
    res = sharded.fit(learner, learner.init(model.init(None)), X, y, mesh)
    log_loss = -np.mean(res.log_likelihood)  # each row predicted before it was learned
    rows = [(s.index[0].start, s.index[0].stop) for s in res.state.cov.p.addressable_shards]
    print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices: "
          f"progressive log-loss {log_loss:.4f}; P's rows held here: {rows}")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
