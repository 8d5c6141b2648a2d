"""The Kronecker form's step at d = 120 901 (benchmarks/networks.py's teacher MLP
100 → 300 → 300 → 1, float32), with ``H`` in its two forms, side by side in one process:

  layer rows  the step as ``kalnat.models.mlp`` gets it: each layer's rows of ``H`` taken from
              the model as their factors ``δ āᵀ`` (``Model.apply_tapped``), no flat ``H``,
              no outer-product check and no ``lax.cond``
  flat H      the same model given as a plain function: ``H`` formed as a matrix and sliced
              into layers, each layer's rows checked for being outer products, and the
              step's paths chosen by a ``lax.cond`` on the check
  Adam        optax's step on the same stream

The variants run in turns, ``--rounds`` times over ``--rows`` rows, and the fastest round of
each is printed with its ratio to Adam's; "flat H − layer rows" is what forming, slicing and
checking ``H`` costs.

    python benchmarks/kron_step.py [--rows 1064] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kalnat  # noqa: E402
from networks import run_optax, teacher  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1064)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    model, X, Y = teacher(args.rows, np.float32)
    params = model.init(jax.random.PRNGKey(5))
    fam = kalnat.families.Gaussian(0.01)
    warm = 64
    learners = {}
    for name, given in (("layer rows", model), ("flat H", model.apply)):  # a plain function: H a matrix
        learner = kalnat.ekf(given, fam, prior_var=0.1, representation=kalnat.representations.kronecker(params),
                             input_shape=model.input_shape)
        assert (learner.apply_tapped is not None) == (name == "layer rows")
        state = kalnat.fit(learner, learner.init(params), X[:warm], Y[:warm], chunk_size=64).state  # compiles
        learners[name] = [learner, jax.block_until_ready(state)]
    mse = lambda z, t: jnp.mean((z - t) ** 2)  # noqa: E731
    Xa, Ya = jnp.asarray(X[warm:]), jnp.asarray(Y[warm:])[:, None]
    times = {name: [] for name in list(learners) + ["Adam"]}
    for _ in range(args.rounds):
        for name, held in learners.items():
            t = time.perf_counter()
            held[1] = jax.block_until_ready(kalnat.fit(held[0], held[1], X[warm:], Y[warm:], chunk_size=64).state)
            times[name].append((time.perf_counter() - t) / (args.rows - warm))
        times["Adam"].append(run_optax(model.apply, mse, params, Xa, Ya, optax.adam(1e-4))[2][0])
    best = {name: min(t) * 1e3 for name, t in times.items()}
    print(f"Kronecker form's step, d = 120 901, {args.rows - warm} rows, fastest of {args.rounds} rounds")
    print(f"{'':<12}{'ms/step':>10}{'÷ Adam':>10}")
    for name, ms in best.items():
        print(f"{name:<12}{ms:>10.3f}{ms / best['Adam']:>10.2f}")
    print(f"forming, slicing and checking H: {best['flat H'] - best['layer rows']:.3f} ms a step")


if __name__ == "__main__":
    main()
