"""Long float32 stream through the exact filter in each of its forms, against float64.

A linear-Gaussian model (``y = xᵀθ* + ε``, ``d`` ill-scaled features: standard deviations
from 10^-spread to 10^spread, so ``P_t`` has a condition number of ~10^(4·spread)) learned
one row at a time over ``n`` rows. The same float32 data go through each form twice, in
float32 and in float64, with ``--pieces`` checkpoints along the stream, and the script
prints, per form:

- ``PD``: whether the float32 ``P`` (in float64) was positive definite at every checkpoint;
- ``max_rel_theta``: ``max_t ‖θ32 − θ64‖ / ‖θ64‖`` over the checkpoints (``final``: at the end);
- ``max_rel_P``: ``max_t ‖P32 − P64‖ / ‖P64‖`` (Frobenius) over the checkpoints;
- ``eig_ratio``: the smallest eigenvalue of the float32 ``P`` relative to the float64 run's,
  minimised over the checkpoints (``< 0``: not positive definite; ``nan``: the run broke down);
- ``seconds``: float32 wall time (compilation included).

Usage: ``python benchmarks/long_stream_float32.py [--rows 1000000] [--dim 8] [--spread 1]``.
Takes ~2 minutes on a 2-core CPU for the defaults. Not a test.
"""

from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import kalnat  # noqa: E402
from kalnat import families as F  # noqa: E402
from kalnat import covariance  # noqa: E402

FORMS = {
    "ekf": lambda m, f: kalnat.ekf(m, f, prior_var=1.0),
    "ekf joseph": lambda m, f: kalnat.ekf(m, f, prior_var=1.0, joseph=True),
    "sqrt_ekf": lambda m, f: kalnat.sqrt_ekf(m, f, prior_var=1.0),
    "information": lambda m, f: kalnat.information_filter(m, f, prior_var=1.0),
}


def make_stream(n, d, spread, seed=0):
    rng = np.random.default_rng(seed)
    scales = 10.0 ** np.linspace(-spread, spread, d)
    X = (rng.normal(size=(n, d)) * scales).astype(np.float32)
    theta = rng.normal(size=d) / scales
    y = (X.astype(np.float64) @ theta + 0.5 * rng.normal(size=n)).astype(np.float32)
    return X, y


def run(form, X, y, dtype, pieces):
    d = X.shape[1]
    model = kalnat.models.linear(d, bias=False)
    learner = FORMS[form](model, F.Gaussian(0.25))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.init(None))
    state = learner.init(params)
    snaps = []
    assert int(state.count) == 0
    bounds = np.linspace(0, len(X), pieces + 1).astype(int)
    t0 = time.perf_counter()
    for a, b in zip(bounds[:-1], bounds[1:]):
        state = kalnat.fit(learner, state, X[a:b], y[a:b], chunk_size=8192, return_predictions=False).state
        jax.block_until_ready(state)
        snaps.append((np.asarray(ravel_pytree(state.params)[0], np.float64), covariance(state)))
    assert int(state.count) == len(X)
    return snaps, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--spread", type=float, default=1.0)
    ap.add_argument("--pieces", type=int, default=50)
    ap.add_argument("--forms", default=",".join(FORMS))
    args = ap.parse_args()
    X, y = make_stream(args.rows, args.dim, args.spread)
    print(f"linear-Gaussian stream: {args.rows} rows, d = {args.dim}, feature scales 10^±{args.spread}, "
          f"{args.pieces} checkpoints")
    print(f"{'form':<12} {'PD':>4} {'max_rel_theta':>14} {'final':>9} {'max_rel_P':>10} {'final':>9} "
          f"{'eig_ratio':>10} {'seconds':>8}")
    for form in args.forms.split(","):
        s64, _ = run(form, X, y, jnp.float64, args.pieces)
        s32, secs = run(form, X, y, jnp.float32, args.pieces)
        rel_t = [np.linalg.norm(a[0] - b[0]) / np.linalg.norm(b[0]) for a, b in zip(s32, s64)]
        rel_p = [np.linalg.norm(a[1] - b[1]) / np.linalg.norm(b[1]) for a, b in zip(s32, s64)]
        eig = [np.linalg.eigvalsh(a[1]).min() / np.linalg.eigvalsh(b[1]).min() for a, b in zip(s32, s64)]
        pd = all(np.all(np.isfinite(a[1])) and _is_pd(a[1]) for a in s32)
        print(f"{form:<12} {'yes' if pd else 'NO':>4} {max(rel_t):>14.2e} {rel_t[-1]:>9.2e} "
              f"{max(rel_p):>10.2e} {rel_p[-1]:>9.2e} {min(eig):>10.3g} {secs:>8.1f}")


def _is_pd(p):
    try:
        np.linalg.cholesky(0.5 * (p + p.T))
    except np.linalg.LinAlgError:
        return False
    return bool(np.linalg.eigvalsh(p).min() > 0)

if __name__ == "__main__":
    main()
