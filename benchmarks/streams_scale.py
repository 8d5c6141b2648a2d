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

Every key once per round (10⁴ keys at d = 16, 16 rounds): Keyed's µs per filter-step next to
the step alone, one jitted scan of the vmapped step over 2 048 states (nothing gathered,
grouped or read back): what Keyed adds to the step's own cost.

One model across devices (:mod:`kalnat.sharded`), in a subprocess on 8 simulated CPU devices
(``--xla_force_host_platform_device_count=8``; they share this machine's cores, so the times
show the partitioned program's overhead, not a speed-up):

  form        full (P row-sharded), diagonal (p split), lowrank:8 (υ and W's rows split)
  devices     devices the covariance is split over
  ms/step     per-step time of the sharded filter inside a scan (one row per step)
  moved kB    bytes the compiled step moves between devices (its collectives' arrays)
  state kB    the bytes of the covariance (what gathering it once would move)

Across Dask workers (:mod:`kalnat.dask_keyed`, when ``dask[distributed]`` is installed): a
LocalCluster of 1 and 2 worker processes, keys hashed to one shard per worker, rows per second
of ``DaskKeyed.learn`` over batches of 16 384 rows (``--chunk`` when given; d = 8, 10⁴ keys; a second pass over
the same batches, everything compiled), checkpoints every 4 batches included.

    nice python benchmarks/streams_scale.py [--dims 8 32] [--max-keys 1000000] [--chunk N]
    nice python benchmarks/streams_scale.py --sharded-only [--sharded-dims 256 1024]
    nice python benchmarks/streams_scale.py --minibatch-only
    nice python benchmarks/streams_scale.py --dask-only

Rows per update (``Keyed(…, batch_size=B)``, ``kalnat learn --key K --batch-size B``): rows
per second for B = 1, 4, 16 at d = 8, 10³ keys with 64 rows each per pass.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
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


def keyed_rate(learner, model, d, n_keys, rows_per_key, chunk, rounds=False):
    """``(rows, rows per second)`` of a second :meth:`Keyed.learn` over the same rows: keys
    drawn uniformly, or with ``rounds`` every key once per round (in a shuffled order)."""
    n = max(n_keys * rows_per_key, 65536)
    keys, X, y = data(d, n, n_keys)
    if rounds:
        n = n_keys * rows_per_key
        keys = np.tile(np.random.default_rng(4).permutation(n_keys), rows_per_key)
        X, y = X[:n], y[:n]
    keyed = Keyed(learner, model.init(None), capacity=n_keys)
    keyed.learn(keys, X, y, chunk_size=chunk)  # every key appears; the segments compile
    jax.block_until_ready(keyed.stack)
    t = time.perf_counter()
    keyed.learn(keys, X, y, chunk_size=chunk)
    jax.block_until_ready(keyed.stack)
    return n, n / (time.perf_counter() - t)


def step_alone(learner, model, d, width, rounds):
    """µs per filter-step of one jitted scan of ``vmap(learner.step)`` over ``width`` states
    for ``rounds`` rounds (best of 5): the step's own cost, without Keyed's gathering,
    writing back, grouping and outputs."""
    from kalnat.learners.base import device_hyper

    hyper = device_hyper(learner, None, np.float64)
    fresh = learner.init(model.init(None))
    states = jax.tree_util.tree_map(lambda a: jax.numpy.broadcast_to(a, (width,) + a.shape).copy(), fresh)
    _, X, y = data(d, width * rounds, 1, seed=5)
    xs, ys = X.reshape(rounds, width, d - 1), y.reshape(rounds, width)
    one = jax.vmap(lambda s, x, t: learner.step(hyper, s, x[None], t[None]))

    @jax.jit
    def scan(states, xs, ys):
        return jax.lax.scan(lambda s, inp: (one(s, *inp)[0], None), states, (xs, ys))[0]

    jax.block_until_ready(scan(states, xs, ys))
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(scan(states, xs, ys))
        best = min(best, time.perf_counter() - t)
    return 1e6 * best / (width * rounds)


def sharded_table(dims, rows=64):
    """Per-step time and bytes moved of the sharded filter against the device count: the full
    covariance (P row-sharded), the diagonal and the low-rank precision (split by parameter)."""
    from kalnat import representations, sharded
    from kalnat.learners.base import device_hyper

    print(f"\none model over {len(jax.devices())} simulated devices: logistic EKF, covariance split by "
          f"parameter, {rows} rows in one scan; state kB: the covariance's bytes")
    print(f"{'form':>10} {'d':>5} {'devices':>7} {'ms/step':>8} {'moved kB':>9} {'state kB':>8}")
    fam = kalnat.families.Bernoulli()
    forms = [("full", None), ("diagonal", representations.Diagonal()), ("lowrank:8", representations.LowRank(8))]
    for (form, rep), d in ((f, d) for f in forms for d in dims):
        model = kalnat.models.linear(d - 1)
        learner = kalnat.ekf(model, fam, representation=rep)
        state_kb = sum(8 * a.size for a in jax.tree_util.tree_leaves(learner.init(model.init(None)).cov)) / 1e3
        _, X, y = data(d, rows, 1)
        for n in (1, 2, 4, 8):
            if n > len(jax.devices()) or d % n:
                continue
            mesh = sharded.mesh(jax.devices()[:n])
            sharded.fit(learner, learner.init(model.init(None)), X, y, mesh, chunk_size=rows)  # compile
            times = []
            for _ in range(3):
                state = sharded.shard(learner.init(model.init(None)), mesh)
                jax.block_until_ready(state)
                t = time.perf_counter()
                res = sharded.fit(learner, state, X, y, mesh, chunk_size=rows)
                jax.block_until_ready(res.state)
                times.append(time.perf_counter() - t)
            hyper = device_hyper(learner, None, np.float64)
            state = sharded.shard(learner.init(model.init(None)), mesh)
            hlo = sharded.step_fn(learner, mesh, type(state.cov)).lower(hyper, state, X[:1], y[:1]).compile().as_text()
            moved = sum(8 * math.prod(shape) for _, shapes in sharded.collectives(hlo) for shape in shapes)
            print(f"{form:>10} {d:>5} {n:>7} {1e3 * min(times) / rows:>8.3f} {moved / 1e3:>9.2f} {state_kb:>8.0f}",
                  flush=True)


def minibatch_table(d, n_keys, rows_per_key, chunk, sizes=(1, 4, 16)):
    """Rows per second of Keyed with ``batch_size`` B (each key's rows B per update)."""
    model = kalnat.models.linear(d - 1)
    learner = kalnat.ekf(model, kalnat.families.Bernoulli())
    n = n_keys * rows_per_key
    keys, X, y = data(d, n, n_keys, seed=2)
    print(f"\nrows per update of each key: d = {d}, {n_keys} keys, {rows_per_key} rows per key per pass, "
          f"chunk_size {chunk or 'default'}, second pass (flush included)")
    print(f"{'B':>3} {'keyed r/s':>10} {'ratio to B=1':>12}")
    first = None
    for b in sizes:
        keyed = Keyed(learner, model.init(None), capacity=n_keys, batch_size=b)
        for timed in (False, True):
            jax.block_until_ready(keyed.stack)
            t = time.perf_counter()
            keyed.learn(keys, X, y, chunk_size=chunk)
            keyed.flush()
            jax.block_until_ready(keyed.stack)
        rate = n / (time.perf_counter() - t)
        first = first or rate
        print(f"{b:>3} {rate:>10.0f} {rate / first:>12.2f}", flush=True)


def dask_factory(d=8):
    model = kalnat.models.linear(d - 1)
    return kalnat.ekf(model, kalnat.families.Bernoulli()), model.init(None)


def dask_table(chunk, n_keys=10_000, batches=12):
    try:
        import distributed
    except ImportError:
        print("\n(dask[distributed] not installed: no table against workers)")
        return
    from kalnat.dask_keyed import DaskKeyed

    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, here)
    import streams_scale as module  # the factory by an importable name, for the workers

    print(f"\nDask LocalCluster: d = 8, {n_keys} keys, {batches} batches of {chunk} rows, second pass")
    print(f"{'workers':>7} {'rows/s':>9} {'ratio to 1':>10}")
    keys, X, y = data(8, chunk * batches, n_keys, seed=3)
    first = None
    for workers in (1, 2):
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                      dashboard_address=None, silence_logs=50) as cluster, \
                distributed.Client(cluster) as client:
            dk = DaskKeyed(client, module.dask_factory)
            for timed in (False, True):  # a first pass compiles every shape in every worker
                t = time.perf_counter()
                for b in range(batches):
                    s = slice(b * chunk, (b + 1) * chunk)
                    dk.learn(keys[s], X[s], y[s])
            rate = chunk * batches / (time.perf_counter() - t)
        first = first or rate
        print(f"{workers:>7} {rate:>9.0f} {rate / first:>10.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--max-keys", type=int, default=1_000_000)
    ap.add_argument("--rows-per-key", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=None,
                    help="Keyed.learn's chunk_size (default: its own, all the call's rows)")
    ap.add_argument("--max-gib", type=float, default=2.0, help="memory bound on the keys' states")
    ap.add_argument("--sharded-only", action="store_true", help="only the sharded table (needs the devices)")
    ap.add_argument("--sharded-dims", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--no-sharded", action="store_true")
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--minibatch-only", action="store_true", help="only the table against --batch-size")
    ap.add_argument("--dask-only", action="store_true", help="only the table against Dask workers")
    args = ap.parse_args()
    if args.sharded_only:
        return sharded_table(args.sharded_dims)
    if args.minibatch_only:
        return minibatch_table(8, 1000, 64, args.chunk)
    if args.dask_only:
        return dask_table(args.chunk or 16384)
    fam = kalnat.families.Bernoulli()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float64; logistic EKF per key, "
          f"{args.rows_per_key} rows per key per pass (65 536 rows at least), "
          f"chunk_size {args.chunk or 'default (the whole call)'}")
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
    # 10⁴ filters at d = 16, each stepped once per round; next to it the step alone: one scan
    # of the vmapped step over 2 048 keys' states, nothing gathered, grouped or read back
    d, n_keys, rounds = 16, 10_000, 16
    model = kalnat.models.linear(d - 1)
    learner = kalnat.ekf(model, fam)
    rows, rate = keyed_rate(learner, model, d, n_keys, rounds, args.chunk, rounds=True)
    alone = step_alone(learner, model, d, 2048, rounds)
    print(f"\nevery key once per round: d = {d}, {n_keys} keys, {rounds} rounds ({rows} rows), second pass; "
          f"the step alone: one scan over 2048 keys × {rounds} rounds")
    print(f"{'keyed µs/step':>13} {'step alone µs/step':>18} {'ratio':>6}\n"
          f"{1e6 / rate:>13.2f} {alone:>18.2f} {1e6 / rate / alone:>6.1f}", flush=True)
    minibatch_table(8, 1000, 64, args.chunk)
    if not args.no_dask:
        dask_table(args.chunk or 16384)
    if not args.no_sharded:  # XLA_FLAGS must be set before JAX starts: a fresh process
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                          + " --xla_force_host_platform_device_count=8").strip())
        subprocess.run([sys.executable, __file__, "--sharded-only", "--sharded-dims",
                        *map(str, args.sharded_dims)], env=env, check=True)


if __name__ == "__main__":
    main()
