"""The command's re-expression on the host with NumPy's and SciPy's BLAS on one thread (what
``kalnat.scaling`` does) against two, idle and beside busy processes, in one process.

One boundary of ``kalnat learn digits``'s default bank (40 full 585 × 585 covariances, the
prior set afresh: two inverses a member, ``scaling.reexpress_members``), timed with the
BLAS limit of :mod:`kalnat.blas` (``THREADS``) at 1 and at 2 threads, and one inverse
(``scaling._spd_inverse``) the same way. ``--busy N`` starts N processes that spin
while the timings run (another job on a shared machine).

    python benchmarks/blas_threads.py [--busy 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import jax
import numpy as np
from threadpoolctl import threadpool_limits

jax.config.update("jax_enable_x64", True)

import kalnat  # noqa: E402
from kalnat import blas, scaling  # noqa: E402


def _spin():
    while True:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    fam = kalnat.families.Categorical(10)
    model = kalnat.models.linear(64, fam.m)
    bank = kalnat.auto(model, fam)
    state = bank.init(model.init(None))
    rng = np.random.default_rng(0)
    old = (rng.normal(size=64), np.abs(rng.normal(size=64)) + 1)
    new = (old[0] + 0.1, old[1] * 1.1)
    priors = (np.array([c["prior_var"] for c in bank.configs]), np.ones(bank.size))
    a = rng.normal(size=(585, 585))
    spd = a @ a.T / 585 + np.eye(585)
    scaling.reexpress_members(state, old, new, bank=True, priors=priors)  # compile the device parts
    own = blas.THREADS
    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    try:
        print(f"{args.busy} busy processes; fastest of {args.repeat}")
        res = {}
        for threads in (1, 2):
            blas.THREADS = threads
            boundary, inverse = [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                jax.block_until_ready(scaling.reexpress_members(state, old, new, bank=True, priors=priors))
                boundary.append(time.perf_counter() - t0)
                with threadpool_limits(limits=threads, user_api="blas"):
                    t0 = time.perf_counter()
                    scaling._spd_inverse(spd)
                    inverse.append(time.perf_counter() - t0)
            res[threads] = (min(boundary), min(inverse))
            print(f"BLAS threads {threads}: one boundary of the 40-member bank {res[threads][0]:.2f} s, "
                  f"one 585² inverse {res[threads][1]:.3f} s", flush=True)
        print(f"one thread / two: boundary {res[1][0] / res[2][0]:.2f}, inverse {res[1][1] / res[2][1]:.2f}")
    finally:
        blas.THREADS = own
        for p in busy:
            p.terminate()


if __name__ == "__main__":
    main()
