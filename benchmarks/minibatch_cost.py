"""What a row costs inside ``kalnat.fit`` at each ``batch_size``, and what two choices save there.

A minibatch of b rows of an m-output family is one update with ``S`` of b·m outputs: a full
covariance reads and writes ``P`` once per minibatch instead of once per row, so a row should
cost no more at b > 1 than at b = 1. Two things made it cost more (``kalnat learn digits
--batch-size 2`` took 1.9 × as long as the default):

- ``S`` beyond 16 outputs is factored by LAPACK, whose OpenBLAS threads contend with XLA's at
  every step (:mod:`kalnat.blas`: ``fit`` now runs them on one thread);
- ``P − W Wᵀ`` beyond 16 outputs was a product and a mirrored pass (``numerics.downdate``: now
  one fused pass up to ``numerics.FUSED_DOWNDATE`` = 48 outputs).

Printed, side by side in one process (ratios; absolute times on a shared machine mislead), ms
per row of digits (64 features, 10 classes: 9 outputs a row, d = 585) for a linear softmax model, after a
warm-up run that compiles:

  now            this code
  BLAS threads   ``kalnat.blas.THREADS = None``: LAPACK's own threads (÷ now)
  fused to 16    ``numerics.FUSED_DOWNDATE = 16`` (÷ now)

for one full-covariance EKF in float64 and (``--bank``) ``kalnat learn``'s default bank of 40
in float32. Each setting runs ``--repeat`` times, alternating; the fastest is kept.

    python benchmarks/minibatch_cost.py [--batches 1 2 4] [--rows 256] [--bank] [--repeat 2]
"""

from __future__ import annotations

import argparse
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

jax.config.update("jax_enable_x64", True)

import kalnat  # noqa: E402
from kalnat import blas, numerics  # noqa: E402

SETTINGS = {
    "now": {},
    "BLAS threads": {"threads": None},
    "fused to 16": {"fused": 16},
}


def run(setting, bank, X, y, batch):
    """ms per row of one warm ``fit`` under ``setting`` (a fresh learner: its own programs)."""
    threads, fused = blas.THREADS, numerics.FUSED_DOWNDATE
    blas.THREADS = setting.get("threads", threads)
    numerics.FUSED_DOWNDATE = setting.get("fused", fused)
    try:
        dtype = jnp.float32 if bank else jnp.float64
        family = kalnat.families.Categorical(10)
        model = kalnat.models.linear(64, family.m, dtype=dtype)
        learner = kalnat.auto(model, family) if bank else kalnat.ekf(model, family)
        xs, n = np.asarray(X, dtype), X.shape[0]
        best = np.inf
        for _ in range(2):  # the first compiles
            state = learner.init(model.init(None))
            t0 = time.perf_counter()
            jax.block_until_ready(kalnat.fit(learner, state, xs, y, batch_size=batch,
                                             chunk_size=-(-n // batch)).state)
            best = min(best, time.perf_counter() - t0)
        return best / n * 1e3
    finally:
        blas.THREADS, numerics.FUSED_DOWNDATE = threads, fused
        learner = None  # its programs go with it: the next setting traces its own
        gc.collect()
        jax.clear_caches()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--bank", action="store_true", help="the command's default bank (float32) too")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    X, y = load_digits(return_X_y=True)
    X = ((X - X.mean(0)) / (X.std(0) + 1e-9))[:args.rows]
    y = y[:args.rows]
    for bank in ([False, True] if args.bank else [False]):
        print(f"\n{'the default bank of 40, float32' if bank else 'one full EKF, float64'}: "
              f"ms per row of {args.rows} (fastest of {args.repeat})")
        print(f"{'batch':>5} {'now':>8} " + " ".join(f"{k + ' ÷ now':>20}" for k in list(SETTINGS)[1:]))
        for batch in args.batches:
            times = {k: np.inf for k in SETTINGS}
            for _ in range(args.repeat):
                for name, setting in SETTINGS.items():
                    times[name] = min(times[name], run(setting, bank, X, y, batch))
            print(f"{batch:>5} {times['now']:>8.3f} "
                  + " ".join(f"{times[k] / times['now']:>20.2f}" for k in list(SETTINGS)[1:]), flush=True)


if __name__ == "__main__":
    main()
