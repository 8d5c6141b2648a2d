"""Structured covariances on networks, side by side in one run (docs/structured.md).

Part 1, scikit-learn's digits (1 797 rows, 64 features, 10 classes) with an MLP 64 → 72 → 10
(5 410 parameters), one pass in the given order and shuffled (seed 0), every row predicted
before it is learned: progressive log-loss and accuracy, time per row (compilation excluded)
and memory (the state, and the compiled step's temporaries) for the exact EKF and each
structure, against optax SGD and Adam over a small learning-rate grid, the best chosen in
hindsight on the same stream (marked ``*``). The filters use prior variance 0.1 and each
forgetting factor of ``--forgetting`` (default 1 and 0.999: none, and the small forgetting
with which a network's filter keeps learning as its Jacobian moves); with several, each row is
printed and the ratios to Adam* take each structure's best in hindsight (marked ``*`` too).

Part 2, a synthetic stream from a teacher MLP 100 → 300 → 300 → 1 (120 901 parameters, tanh,
gaussian noise 0.1): time per step, memory and the progressive squared error of each structure
and of Adam (a grid of 3 rates, best in hindsight), and the ratio of time per step to Adam's.
With ``lowrank:10`` it also times ``G`` formed with the gain's ``Aᵀg`` in one product and as
two (``LowRankPrior.projections`` forms the one), and the one product every low-rank step forms anew, the
weighted Gram matrix ``Wᵀ Υ⁻¹ W`` of a ``d × 10`` ``W`` (the step's O(d k²) floor,
docs/structured.md), alone in a scan as a step is, and prints it as a ratio to Adam's step.

Times are wall-clock and CPU (the process's, all its threads: on a machine shared with other
work the CPU time is the steadier of the two). The factorisations of the structured forms run
in LAPACK (OpenBLAS, through JAX's CPU kernels), whose own threads contend with XLA's: on a
loaded 2-core machine a 300 × 300 factorisation ran 10–100 × slower with OpenBLAS's default
threads than with one. ``--blas-threads`` sets them (default 1, as :func:`kalnat.fit` does, through
``kalnat.blas.THREADS``; 0 leaves the library's default).

``--max-variance V`` gives every filter the variance bound (each variance of ``P⁻`` at most
``V``), as the members of :func:`kalnat.auto` have it (100 × their prior variance: 10 here);
the bound's cost per step is the structure's, so this measures what ``auto`` pays.

    python benchmarks/networks.py [--part 1 2] [--rows 2000] [--structures diag …] [--forgetting 1 0.999] [--float64] [--blas-threads 1] [--max-variance 10]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import kalnat
from kalnat import blas
from kalnat.stream import Diverged
from kalnat.representations import Blocks, Diagonal, LowRank, kronecker, last_layer_full
from kalnat.representations.lowrank import _gram


def structures(params, exact: bool):
    out = {"diag": Diagonal(), "blocks": Blocks.per_leaf(params), "lowrank:10": LowRank(10),
           "last-layer:10": last_layer_full(params, LowRank(10)), "kron": kronecker(params)}
    return ({"full": None} if exact else {}) | out


def memory(learner, state, x, y):
    """Bytes of the state and of the compiled step's temporaries."""
    step = jax.jit(lambda s, xs, ys: learner.step(learner.hyper, s, xs, ys)[0])
    analysis = step.lower(state, x[None], y[None]).compile().memory_analysis()
    held = sum(a.nbytes for a in jax.tree_util.tree_leaves(state.cov))
    return held, int(getattr(analysis, "temp_size_in_bytes", 0))


#: settings every filter shares beyond the prior variance and forgetting (``--max-variance``)
FILTER_OPTIONS = {}
#: the forgetting factors part 1 runs each filter with (``--forgetting``; part 2: the first)
FORGETTING = [1.0, 0.999]


def run_filter(model, family, rep, params, X, Y, warm=64, forgetting=1.0):
    learner = kalnat.ekf(model, family, prior_var=0.1, forgetting=forgetting, **FILTER_OPTIONS,
                         **({} if rep is None else dict(representation=rep)))
    state = learner.init(params)
    held, temp = memory(learner, state, X[0], Y[0])
    first = kalnat.fit(learner, state, X[:warm], Y[:warm], chunk_size=warm)  # compiles
    jax.block_until_ready(first.state)
    t, c = time.perf_counter(), time.process_time()
    rest = kalnat.fit(learner, first.state, X[warm:], Y[warm:], chunk_size=warm)
    jax.block_until_ready(rest.state)
    per_row = (time.perf_counter() - t) / (len(X) - warm), (time.process_time() - c) / (len(X) - warm)
    ll = np.concatenate([first.log_likelihood, rest.log_likelihood])
    preds = [first.predictions, rest.predictions]
    return ll, preds, per_row, held, temp


def run_optax(apply, loss_fn, params, X, Y, opt):
    """One pass, each row scored before its gradient step; returns per-row losses and outputs."""
    state = opt.init(params)

    def body(carry, xy):
        p, s = carry
        x, y = xy
        loss, g = jax.value_and_grad(lambda q: loss_fn(apply(q, x), y))(p)
        out = apply(p, x)
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), (loss, out)

    run = jax.jit(lambda p, s, X, Y: jax.lax.scan(body, (p, s), (X, Y)))
    jax.block_until_ready(run(params, state, X, Y))  # compiles; the second call is timed
    t, c = time.perf_counter(), time.process_time()
    (_, _), (losses, outs) = jax.block_until_ready(run(params, state, X, Y))
    return np.asarray(losses), np.asarray(outs), ((time.perf_counter() - t) / len(X), (time.process_time() - c) / len(X))


def digits(order, dtype, only=None):
    data = load_digits()
    X, y = data.data / 16.0, data.target
    if order == "shuffled":
        perm = np.random.default_rng(0).permutation(len(y))
        X, y = X[perm], y[perm]
    X = X.astype(dtype)
    model = kalnat.models.mlp(64, (72,), 10, dtype=dtype)
    params = model.init(jax.random.PRNGKey(0))
    d = sum(np.size(a) for a in jax.tree_util.tree_leaves(params))
    fam = kalnat.families.Categorical(10)
    print(f"\ndigits, {order} order: MLP 64 → 72 → 10, d = {d}; {len(y)} rows")
    print(f"{'learner':<22}{'log-loss':>10}{'accuracy':>10}{'µs/row':>10}{'CPU µs':>10}{'state MB':>10}{'temp MB':>10}")
    rows = {}
    for name, rep in structures(params, exact=True).items():
        if only is not None and name not in only:
            continue
        for lam in FORGETTING:
            label = name if len(FORGETTING) == 1 else f"{name} λ={lam:g}"
            try:
                ll, preds, per_row, held, temp = run_filter(model, fam, rep, params, X, y, forgetting=lam)
            except Diverged as err:  # scored as infinite, the other settings still run
                print(f"{label:<22}{'diverged':>10}   ({str(err).split(':')[1].strip()[:60]}…)")
                rows.setdefault(name if len(FORGETTING) == 1 else name + "*", (np.inf, np.nan, (np.nan, np.nan), lam))
                continue
            probs = np.concatenate([np.asarray(p.probs) for p in preds])
            row = (-ll.mean(), (probs.argmax(1) == y).mean(), per_row, lam)
            score = row[0] if np.isfinite(row[0]) else np.inf  # a NaN is never the best
            print(f"{label:<22}{row[0]:>10.4f}{row[1]:>10.3f}{per_row[0] * 1e6:>10.0f}{per_row[1] * 1e6:>10.0f}"
                  f"{held / 2**20:>10.2f}{temp / 2**20:>10.2f}")
            key = name if len(FORGETTING) == 1 else name + "*"
            if key not in rows or score < rows[key][0]:
                rows[key] = (score,) + row[1:]
    logits = lambda p, x: model.apply(p, x)
    xent = lambda z, t: optax.softmax_cross_entropy_with_integer_labels(z, t)
    yi = jnp.asarray(y)
    for opt_name, make in (("sgd", optax.sgd), ("adam", optax.adam)):
        best = None
        for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1):
            losses, outs, per_row = run_optax(logits, xent, params, jnp.asarray(X), yi, make(lr))
            score = losses.mean() if np.all(np.isfinite(losses)) else np.inf
            if best is None or score < best[0]:
                best = (score, (outs.argmax(1) == y).mean(), per_row, lr)
        rows[opt_name + "*"] = best[:3]
        print(f"{opt_name + '*':<22}{best[0]:>10.4f}{best[1]:>10.3f}{best[2][0] * 1e6:>10.0f}{best[2][1] * 1e6:>10.0f}"
              f"{'':>10}{'':>10}   (lr {best[3]:g}, best of 6 in hindsight)")
    adam = rows["adam*"][0]
    print("log-loss ÷ Adam*'s: " + ", ".join(f"{k} {v[0] / adam:.3f}" + (f" (λ {v[3]:g})" if len(v) > 3 else "")
                                             for k, v in rows.items()))


def gram_floor(d, k, rows, dtype):
    """Seconds per step (wall, CPU) of the low-rank step's ``Wᵀ Υ⁻¹ W (k, k)`` alone, for
    ``W (d, k)``, over ``rows`` steps of a scan. Each step's ``υ`` is new (as a step's is: the
    dropped diagonal and the floor change every coordinate), so nothing can be hoisted out of
    the loop; the sum of the products is what the scan returns."""
    w = jax.random.normal(jax.random.PRNGKey(6), (d, k), dtype)
    ups = 1.0 + jax.random.uniform(jax.random.PRNGKey(7), (d,), dtype)
    shifts = jnp.linspace(0.0, 1.0, rows, dtype=dtype)
    run = jax.jit(lambda w, ups, shifts: jax.lax.scan(
        lambda acc, c: (acc + _gram(ups + c, w), None), jnp.zeros((k, k), dtype), shifts)[0])
    jax.block_until_ready(run(w, ups, shifts))  # compiles; the second call is timed
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(run(w, ups, shifts))
    return (time.perf_counter() - t) / rows, (time.process_time() - c) / rows


def gram_with_projection(d, k, rows, dtype):
    """Seconds per step (wall) of the low-rank step's ``G = Wᵀ Υ⁻¹ W`` and the gain's ``Aᵀg``
    (one row's ``xᵀ Υ⁻¹ W``), formed as one product ``[Υ⁻¹ W, Υ⁻¹ x]ᵀ W`` (as
    ``LowRankPrior.projections`` forms them) and as two, each over ``rows`` steps of a scan with
    a new ``υ`` and ``x`` a step: ``(one, two)``."""
    w = jax.random.normal(jax.random.PRNGKey(6), (d, k), dtype)
    ups = 1.0 + jax.random.uniform(jax.random.PRNGKey(7), (d,), dtype)
    xs = jax.random.normal(jax.random.PRNGKey(8), (rows, d), dtype)

    def one(u, x):
        both = (jnp.concatenate([w, x[:, None]], axis=1) / u[:, None]).T @ w
        return both[:k], both[k:]

    def two(u, x):
        return _gram(u, w), ((x / u)[:, None].T @ w)

    out = []
    for form in (one, two):
        run = jax.jit(lambda xs, form=form: jax.lax.scan(
            lambda acc, x: (jax.tree_util.tree_map(jnp.add, acc, form(ups + x[0] ** 2, x)), None),
            (jnp.zeros((k, k), dtype), jnp.zeros((1, k), dtype)), xs)[0])
        jax.block_until_ready(run(xs))  # compiles; the second call is timed
        t = time.perf_counter()
        jax.block_until_ready(run(xs))
        out.append((time.perf_counter() - t) / rows)
    return tuple(out)


def teacher(rows, dtype):
    model = kalnat.models.mlp(100, (300, 300), 1, dtype=dtype)
    key = jax.random.PRNGKey(1)
    true = jax.tree_util.tree_map(lambda a: a, model.init(key))
    true[-1]["w"] = jax.random.normal(jax.random.PRNGKey(2), true[-1]["w"].shape, dtype) / np.sqrt(300)
    X = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (rows, 100), dtype))
    z = np.asarray(jax.vmap(lambda x: model.apply(true, x))(X))[:, 0]
    Y = (z + 0.1 * np.random.default_rng(4).normal(size=rows)).astype(dtype)
    return model, X, Y


def tenths(err):
    """The mean of ``err`` over each tenth of the stream: the loss curve, in ten points."""
    return " ".join(f"{w.mean():.4f}" for w in np.array_split(err, 10))


def synthetic(rows, dtype, only=None):
    model, X, Y = teacher(rows, dtype)
    params = model.init(jax.random.PRNGKey(5))
    d = sum(np.size(a) for a in jax.tree_util.tree_leaves(params))
    fam = kalnat.families.Gaussian(0.01)
    print(f"\nsynthetic teacher stream: MLP 100 → 300 → 300 → 1, d = {d}; {rows} rows")
    print(f"{'learner':<16}{'MSE all':>10}{'MSE last ¼':>12}{'ms/step':>10}{'CPU ms':>10}{'state MB':>10}{'temp MB':>10}")
    out, curves = {}, {}
    for name, rep in structures(params, exact=False).items():
        if name == "blocks" or (only is not None and name not in only):
            continue  # blocks: its 300·100 weight block alone is a 30 000² matrix
        _, preds, per_row, held, temp = run_filter(model, fam, rep, params, X, Y, forgetting=FORGETTING[0])
        mean = np.concatenate([np.asarray(p.mean)[:, 0] for p in preds])
        err = (mean - Y) ** 2
        out[name], curves[name] = per_row, tenths(err)
        print(f"{name:<16}{err.mean():>10.4f}{err[-rows // 4:].mean():>12.4f}{per_row[0] * 1e3:>10.2f}"
              f"{per_row[1] * 1e3:>10.2f}{held / 2**20:>10.2f}{temp / 2**20:>10.2f}")
    mse = lambda z, t: jnp.mean((z - t) ** 2)
    best = None
    for lr in (1e-4, 1e-3, 1e-2):
        losses, _, per_row = run_optax(model.apply, mse, params, jnp.asarray(X), jnp.asarray(Y)[:, None],
                                       optax.adam(lr))
        if best is None or losses.mean() < best[0]:
            best = (losses.mean(), losses[-rows // 4:].mean(), per_row, lr, tenths(losses))
    out["adam"], curves["adam*"] = best[2], best[4]
    print(f"{'adam*':<16}{best[0]:>10.4f}{best[1]:>12.4f}{best[2][0] * 1e3:>10.2f}{best[2][1] * 1e3:>10.2f}"
          f"   (lr {best[3]:g}, best of 3)")
    if "lowrank:10" in out:
        floor = gram_floor(d, 10, rows, dtype)
        print(f"{'Wᵀ Υ⁻¹ W alone':<16}{'':>10}{'':>12}{floor[0] * 1e3:>10.2f}{floor[1] * 1e3:>10.2f}"
              f"   (lowrank:10's floor: {floor[0] / best[2][0]:.1f} × Adam's step, CPU {floor[1] / best[2][1]:.1f} ×)")
        one, two = gram_with_projection(d, 10, rows, dtype)
        print(f"{'G with Aᵀg':<16}{'':>10}{'':>12}{one * 1e3:>10.2f}{'':>10}"
              f"   (one product; as two: {two * 1e3:.2f} ms, {one / two:.2f} × their time)")
    print("time per step ÷ Adam's: " + ", ".join(f"{k} {v[0] / best[2][0]:.1f}" for k, v in out.items()))
    print("CPU time per step ÷ Adam's: " + ", ".join(f"{k} {v[1] / best[2][1]:.1f}" for k, v in out.items()))
    print("squared error by tenth of the stream (the loss curve):")
    for name, curve in curves.items():
        print(f"  {name:<14}{curve}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, default=2000, help="rows of the synthetic stream")
    ap.add_argument("--structures", nargs="+", default=None,
                    choices=["full", "diag", "blocks", "lowrank:10", "last-layer:10", "kron"],
                    help="only these filters, and the optax baselines (part 2 never runs full or blocks)")
    ap.add_argument("--float64", action="store_true")
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="threads of the LAPACK/BLAS library JAX's CPU factorisations call (0: its default)")
    ap.add_argument("--max-variance", type=float, default=None,
                    help="every filter's bound on each variance of P⁻ (kalnat.auto's members: 100 × the prior variance)")
    ap.add_argument("--forgetting", type=float, nargs="+", default=FORGETTING,
                    help="forgetting factors each filter runs with in part 1 (part 2: the first)")
    args = ap.parse_args()
    FORGETTING[:] = args.forgetting
    if args.max_variance is not None:
        FILTER_OPTIONS["max_variance"] = args.max_variance
    # kalnat.fit runs them on kalnat.blas.THREADS (one) whatever the process's setting
    blas.THREADS = args.blas_threads or None
    if args.blas_threads:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
        threadpool_limits(args.blas_threads, user_api="blas")
    print(f"BLAS threads: {args.blas_threads or 'default'}; variance bound: {args.max_variance}; "
          f"forgetting: {' '.join(f'{lam:g}' for lam in FORGETTING)}")
    if args.float64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.float64 else jnp.float32
    if 1 in args.part:
        for order in ("given", "shuffled"):
            digits(order, dtype, args.structures)
    if 2 in args.part:
        synthetic(args.rows, dtype, args.structures)


if __name__ == "__main__":
    main()
