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

``--bank`` times instead a pass of :func:`kalnat.ekf_bank` (40 members) and of
:func:`kalnat.auto` (40 members, one or two linearisations each) with the Kronecker form over
scikit-learn's digits with a linear softmax (d = 585, nine outputs a row), the two ways: on
layer rows the members run in vmapped groups (one example's rows branch nowhere), on ``H`` as
a matrix one at a time.

    python benchmarks/kron_step.py [--rows 1064] [--rounds 6] [--bank]
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


def bank(rounds):
    from sklearn.datasets import load_digits
    data = load_digits()
    X, y = (data.data / 16.0).astype(np.float32), data.target
    fam = kalnat.families.Categorical(10)
    model = kalnat.models.linear(64, fam.n_outputs, dtype=np.float32)
    params = model.init(None)
    plain = kalnat.models.Model(model.init, model.apply, model.input_shape, model.n_outputs)
    kron = kalnat.representations.kronecker(params)
    banks = {f"{kind} {name}": make(given, fam, representation=kron)
             for kind, make in (("ekf_bank", kalnat.ekf_bank), ("auto", kalnat.auto))
             for name, given in (("layer rows", model), ("flat H", plain))}
    times, losses = {name: [] for name in banks}, {}
    for name, b in banks.items():
        kalnat.fit(b, b.init(params), X, y)  # compiles
    for _ in range(rounds):
        for name, b in banks.items():
            t = time.perf_counter()
            res = kalnat.fit(b, b.init(params), X, y)
            times[name].append(time.perf_counter() - t)
            losses[name] = -float(np.mean(res.log_likelihood))
    print(f"banks of 40 members, Kronecker form, digits, linear softmax: a pass of {len(y)} rows, "
          f"fastest of {rounds}")
    print(f"{'':<20}{'seconds':>10}{'log-loss':>10}")
    for name in banks:
        print(f"{name:<20}{min(times[name]):>10.3f}{losses[name]:>10.4f}")
    for kind in ("ekf_bank", "auto"):
        print(f"{kind}: layer rows ÷ flat H: "
              f"{min(times[f'{kind} layer rows']) / min(times[f'{kind} flat H']):.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1064)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--bank", action="store_true", help="time a bank's pass over digits instead")
    args = ap.parse_args()
    if args.bank:
        return bank(min(args.rounds, 3))
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
