"""Many streams on one process: rows per second of a keyed learner against the number of keys.

:class:`kalnat.keyed.Keyed` holds one EKF per key and learns a chunk's rows as rounds of one
vmapped, donated step (each key's rows in order). The competitor is the obvious loop: a dict
of states, one ``learner.update`` call per row. Printed side by side in one process (absolute
times on a shared machine mislead; the ratio is the point), for a logistic model with d
parameters and keys drawn uniformly, so each key has a few rows per pass:

  keys        number of keys (states held)
  rows        rows timed (a second pass over the keys: no new key, everything compiled)
  keyed r/s   rows per second of Keyed.learn (predictions kept)
  µs/step     Keyed's cost per filter-step
  loop r/s    rows per second of looping learner.update in Python (measured on 2000 rows)
  ratio       keyed ÷ loop

    nice python benchmarks/streams_scale.py [--dims 8 32] [--max-keys 1000000] [--chunk 16384]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import kalnat  # noqa: E402
from kalnat.keyed import Keyed  # noqa: E402


def data(d, n, n_keys, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d - 1))
    w = rng.normal(size=d - 1)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-X @ w))).astype(np.float64)
    return rng.integers(0, n_keys, size=n), X, y


def loop_rate(learner, model, d, rows=2000, n_keys=100):
    """Rows per second of ``learner.update`` called row by row on a dict of states."""
    keys, X, y = data(d, rows, n_keys, seed=1)
    states = {}
    fresh = lambda: learner.init(model.init(None))  # noqa: E731
    s, _ = learner.update(fresh(), X[0], y[0])  # compile
    jax.block_until_ready(s)
    t = time.perf_counter()
    for k, x, t_ in zip(keys.tolist(), X, y):
        state = states.get(k)
        states[k], _ = learner.update(fresh() if state is None else state, x, t_)
    jax.block_until_ready(list(states.values()))
    return rows / (time.perf_counter() - t)


def keyed_rate(learner, model, d, n_keys, rows_per_key, chunk):
    n = max(n_keys * rows_per_key, 4 * chunk)
    keys, X, y = data(d, n, n_keys)
    keyed = Keyed(learner, model.init(None), capacity=n_keys)
    keyed.learn(keys, X, y, chunk_size=chunk)  # every key appears; the segments compile
    jax.block_until_ready(keyed.stack)
    t = time.perf_counter()
    keyed.learn(keys, X, y, chunk_size=chunk)
    jax.block_until_ready(keyed.stack)
    return n, n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--max-keys", type=int, default=1_000_000)
    ap.add_argument("--rows-per-key", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=16384, help="rows per Keyed.learn chunk")
    ap.add_argument("--max-gib", type=float, default=2.0, help="memory bound on the keys' states")
    args = ap.parse_args()
    fam = kalnat.families.Bernoulli()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float64; logistic EKF per key, "
          f"{args.rows_per_key} rows per key per pass, chunks of {args.chunk} rows")
    print(f"{'d':>3} {'keys':>8} {'rows':>8} {'keyed r/s':>10} {'µs/step':>8} {'loop r/s':>9} {'ratio':>7}")
    for d in args.dims:
        model = kalnat.models.linear(d - 1)
        learner = kalnat.ekf(model, fam)
        loop = loop_rate(learner, model, d)
        n_keys = 100
        while n_keys <= args.max_keys:
            if n_keys * d * d * 8 > args.max_gib * 2**30:  # the keys' covariances alone
                print(f"{d:>3} {n_keys:>8}  skipped: {n_keys} covariances of {d} × {d} exceed {args.max_gib} GiB")
                break
            rows, rate = keyed_rate(learner, model, d, n_keys, args.rows_per_key, args.chunk)
            print(f"{d:>3} {n_keys:>8} {rows:>8} {rate:>10.0f} {1e6 / rate:>8.2f} {loop:>9.0f} "
                  f"{rate / loop:>7.0f}", flush=True)
            n_keys *= 10


if __name__ == "__main__":
    main()
