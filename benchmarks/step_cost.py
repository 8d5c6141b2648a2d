"""Per-step cost of the covariance-form EKF against the memory-bandwidth floor.

For d parameters and m outputs, one EKF step must read P (for P Hᵀ) and rewrite it
(P − W Wᵀ): its floor is about one read and one write of the d × d matrix, i.e. one plain
copy. Printed, side by side in one run (ratios; absolute times on a shared machine mislead):

  rows          rows per timed ``fit`` call (more at small d, where a call's fixed cost
                would otherwise be counted in every step)
  fit/copy      EKF step inside ``kalnat.fit`` (lax.scan, donated state) ÷ one d × d copy
  update/copy   ``learner.update(state, x, y)`` called from Python with one NumPy row
                (validated, jitted, donated) ÷ one copy: what an interactive stream pays
  nodonate/upd  the jitted step *without* buffer donation ÷ the donated one (device inputs)
  natgrad/ekf   the same update through natural gradient (a d × d Cholesky solve per step)
                ÷ the donated Kalman step: the O(d³) → O(d² m) saving of docs/method.md §2

The model is linear with d parameters and an m-dimensional Gaussian output (``z = X θ`` with
``X`` of shape (m, d)), so the Jacobian is cheap and the covariance update dominates.

    python benchmarks/step_cost.py [--dims 256 1024 2048 4096] [--outputs 1 10]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import kalnat  # noqa: E402
from kalnat import families as F  # noqa: E402
from kalnat import schedules as S  # noqa: E402


def median_time(fn, reps, min_time=0.2):
    """Median seconds of ``fn()`` over ``reps`` runs (at least ``min_time`` in all)."""
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) > 50 * reps:
            break
    return float(np.median(times))


def apply(theta, x):
    return x @ theta


def stream_rows(d):
    """Rows per timed ``fit`` call: ~64 M matrix entries of work, 32 at least. A call's fixed
    cost (validation, the transfer of X, dispatch; ~0.1–0.3 ms) is then a small part of a
    step even at d = 256, where a step is a few microseconds."""
    return int(min(2048, max(32, 2**26 // d**2)))


def case(d, m, dtype, rows=None, natgrad=True):
    rows = stream_rows(d) if rows is None else rows
    rng = np.random.default_rng(0)
    family = F.Gaussian(1.0, dim=m)
    X = (rng.normal(size=(rows, m, d)) / np.sqrt(d)).astype(dtype)
    Y = rng.normal(size=(rows, m) if m > 1 else (rows,)).astype(dtype)
    theta0 = jnp.zeros(d, dtype)
    ekf = kalnat.ekf(apply, family, prior_var=1.0, forgetting=0.999, input_shape=(m, d))

    src = np.asarray(rng.normal(size=(d, d)), dtype)
    dst = np.empty_like(src)
    t_copy = median_time(lambda: np.copyto(dst, src), 9)

    holder = {"s": ekf.init(theta0)}
    kalnat.fit(ekf, ekf.init(theta0), X, Y, chunk_size=rows, return_predictions=False)  # compile

    def run_fit():
        holder["s"] = kalnat.fit(ekf, holder["s"], X, Y, chunk_size=rows, return_predictions=False).state
        holder["s"].cov.p.block_until_ready()

    t_fit = median_time(run_fit, 5) / rows

    xs, ys = jnp.asarray(X), jnp.asarray(Y)
    pure = lambda s, x, y: ekf.step(ekf.hyper, s, x, y)[0]  # noqa: E731
    step_donated = jax.jit(pure, donate_argnums=0)
    step_copying = jax.jit(pure)

    def per_row(step):
        def run():
            s = holder["s"]
            for i in range(8):
                s = step(s, i)
            s.cov.p.block_until_ready()
            holder["s"] = s
        run()  # compile
        return median_time(run, 3) / 8

    # What a user's loop pays: one NumPy row at a time through the validated, donating update.
    t_upd = per_row(lambda s, i: ekf.update(s, X[i], Y[i])[0])
    t_donated = per_row(lambda s, i: step_donated(s, xs[i:i + 1], ys[i:i + 1]))
    t_nodonate = per_row(lambda s, i: step_copying(s, xs[i:i + 1], ys[i:i + 1]))

    t_ng = float("nan")
    if natgrad:
        ng = kalnat.natural_gradient(apply, family, input_shape=(m, d),
                                     **S.kalman_to_natural(1.0, 0.999)._asdict())
        ng_state = {"s": ng.init(theta0)}
        ng_step = jax.jit(lambda s, x, y: ng.step(ng.hyper, s, x, y)[0], donate_argnums=0)

        def run_ng():
            ng_state["s"] = ng_step(ng_state["s"], xs[:1], ys[:1])
            ng_state["s"].cov.fisher.block_until_ready()
        run_ng()
        t_ng = median_time(run_ng, 3)
    return dict(copy=t_copy, fit=t_fit, update=t_upd, donated=t_donated, nodonate=t_nodonate,
                natgrad=t_ng, rows=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    ap.add_argument("--outputs", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--natgrad-max-d", type=int, default=4096,
                    help="skip the O(d³) natural-gradient step above this d")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; ratios of median per-step times")
    print(f"{'dtype':8} {'d':>5} {'m':>3} {'rows':>5} {'copy ms':>8} {'fit/copy':>9} {'update/copy':>12} "
          f"{'nodonate/upd':>13} {'natgrad/ekf':>12}")
    for dtype in args.dtypes:
        for d in args.dims:
            for m in args.outputs:
                r = case(d, m, np.dtype(dtype), natgrad=d <= args.natgrad_max_d)
                print(f"{dtype:8} {d:5d} {m:3d} {r['rows']:5d} {r['copy'] * 1e3:8.3f} {r['fit'] / r['copy']:9.2f} "
                      f"{r['update'] / r['copy']:12.2f} {r['nodonate'] / r['donated']:13.2f} "
                      f"{r['natgrad'] / r['donated']:12.1f}", flush=True)


if __name__ == "__main__":
    main()
