"""Where a step of the Kronecker form goes at d = 120 901 (benchmarks/networks.py's teacher MLP
100 → 300 → 300 → 1, float32), by elimination, side by side in one process:

  layer rows  the step as ``kalnat.models.mlp`` gets it: each layer's rows of ``H`` taken from
              the model as their factors ``δ āᵀ`` (``Model.apply_tapped``), no flat ``H``,
              no check and no ``lax.cond``
  flat H      the same model given as a plain function: ``H`` formed as a matrix, each layer's
              rows checked for being outer products, a ``lax.cond`` on the check
  cond only   flat ``H`` with the check replaced by a test of one number (``δ_0`` finite): the
              conds kept, without the check's pass over each layer's rows
  no check    flat ``H`` on the outer-product path unconditionally (no check, no cond). Valid
              on this stream only because a dense network's rows are outer products
  Adam        optax's step on the same stream

The flat variants are subclasses of ``KronLayer`` (programs of its own); all run in turns,
``--rounds`` times over ``--rows`` rows, and the fastest round of each is printed with its
ratio to Adam's. "flat H − cond only" is what the check costs, "cond only − no check" what the
conds cost beyond it, "no check − layer rows" what forming and slicing the flat ``H`` costs.

    python benchmarks/kron_step.py [--rows 1064] [--rounds 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kalnat  # noqa: E402
from kalnat.representations.kron import KronLayer  # noqa: E402
from networks import run_optax, teacher  # noqa: E402


class CondOnly(KronLayer):
    def _outer(self, H):  # the factors without the check's pass; the cond kept
        delta, abar = self._factors(H)
        return jnp.isfinite(delta[0, 0]), delta, abar


class NoCheck(KronLayer):
    def _outer(self, H):
        delta, abar = self._factors(H)
        return jnp.bool_(True), delta, abar


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1064)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    model, X, Y = teacher(args.rows, np.float32)
    params = model.init(jax.random.PRNGKey(5))
    fam = kalnat.families.Gaussian(0.01)
    warm = 64
    learners = {}
    for name, cls in (("layer rows", KronLayer), ("flat H", KronLayer), ("cond only", CondOnly),
                      ("no check", NoCheck)):
        rep = kalnat.representations.kronecker(params)
        rep = dataclasses.replace(rep, parts=tuple(cls(p.n_out, p.n_in) if isinstance(p, KronLayer) else p
                                                   for p in rep.parts))
        given = model if name == "layer rows" else model.apply  # a plain function: a flat H
        learner = kalnat.ekf(given, fam, prior_var=0.1, representation=rep, input_shape=model.input_shape)
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
    print(f"the check: {best['flat H'] - best['cond only']:.3f} ms; the conds beyond it: "
          f"{best['cond only'] - best['no check']:.3f} ms; the flat H beyond them: "
          f"{best['no check'] - best['layer rows']:.3f} ms")


if __name__ == "__main__":
    main()
