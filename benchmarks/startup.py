"""What a user meets first: the command's start-up, a first run against a second one, and one
row at a time through ``learner.update`` next to river, side by side on this machine.

  --help            ``kalnat --help`` (a fresh process: what typing it costs)
  learn first       ``kalnat learn`` on breast_cancer with an empty cache folder (the data set
                    read from its file, every program compiled)
  learn cold        the same with no compiled or saved program, the data set already kept
  learn warm        the same again, the cache now filled (JAX's persistent compilation cache
                    and the chunk program saved by ``kalnat.saved``), and the same through
                    ``kalnat.cli.main`` ending with Python's exit, not the executable's quick one
  update / river    seconds per row of ``learner.update(state, x, y)`` (EKF, Gaussian, a
                    linear model of d parameters, NumPy rows) and of river's
                    ``BayesianLinearRegression.learn_one`` (the same posterior mean) at d
  checks            the host's checks of one row inside ``update`` (state, x, y)
  floor             JAX's dispatch of a jitted function taking and returning what the update
                    does (hyperparameters, the donated state, the row; the state and a
                    prediction), computing nothing: the least a jitted step costs per call
  fit               seconds per row of the same rows learned by ``kalnat.fit`` (compiled first)

Per-row times are the fastest pass of 40 rows out of 20 passes (after 20 rows to compile and
warm up), over ``--repeat`` rounds with kalnat and river alternating, so that other work on the
machine inflates them less; NumPy's BLAS runs on one thread there (threadpoolctl), which is
river's fastest setting at these sizes.

With ``--inline`` every jitted step runs on the calling thread (``JAX_CPU_ENABLE_ASYNC_DISPATCH=0``
before JAX is imported): by default XLA's CPU client hands a program of more than about 1000
flops (the update from d ≈ 16) to a worker thread and returns at once, which overlaps the next
row's checks with the step on an idle machine and costs a thread switch per row on a busy one.

With ``--phases`` it prints where the seconds of a first and of a warm ``kalnat learn`` go,
timed inside the command's process: imports, learning, the figures' wait; and what importing
scikit-learn's data sets would add to a first run (the bundled files are read without it).

With ``--quick-compile`` it times the first, cold and warm runs with the chunk program compiled
quickly (``KALNAT_QUICK_COMPILE=1``, what breast_cancer's size chooses) and with XLA's defaults
(``=0``), alternating, and prints their ratios; then, with nothing cached, ``kalnat predict``,
``kalnat learn --key`` on a generated file of 2 000 rows and 50 keys, its keyed model's
``predict`` and ``kalnat compare``, each with both settings. What quick compilation costs a long run:
``KALNAT_QUICK_COMPILE=1 python benchmarks/startup.py --digits auto`` against the same with ``=0``.

With ``--digits full diag …`` it times ``kalnat learn digits --covariance X`` instead, each with
an empty compilation cache (what docs/cli.md quotes), and prints its log-loss and accuracy;
``--dtypes auto float64`` runs each with each ``--dtype`` (``auto``: float32 for digits' full
covariance), and ``--batch-sizes 1 2 4`` each with each ``--batch-size`` (docs/benchmarks.md,
Minibatches).

    python benchmarks/startup.py [--dims 8 32 128 512] [--repeat 3] [--per-row | --no-per-row] [--inline]
    python benchmarks/startup.py --digits full diag blocks kron
    python benchmarks/startup.py --digits full --dtypes auto float64 auto float64
    python benchmarks/startup.py --digits auto --batch-sizes 1 2 4
    python benchmarks/startup.py --phases
    python benchmarks/startup.py --quick-compile
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


WARM, PASS, PASSES = 20, 40, 20  # rows to compile and warm up, rows per timed pass, passes
ROWS = WARM + PASS * PASSES


def wall(cmd, env, repeat=1):
    """Median wall seconds of a fresh process running ``cmd``."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
    return float(np.median(times))


PHASES_PROBE = """
import sys, time
start = time.perf_counter()
import kalnat.cli as cli
import kalnat.figure_workers as figure_workers
marks = [("kalnat.cli imported", time.perf_counter())]
take_jax, result = cli._jax, figure_workers._Figure.result


def _jax():
    jax = take_jax()
    marks.append(("data set opened, JAX imported", time.perf_counter()))
    import kalnat.cli_learn as cli_learn
    marks.append(("kalnat's modules, SciPy imported", time.perf_counter()))
    learn_stream = cli_learn.learn_stream

    def timed(*args, **kwargs):
        out = learn_stream(*args, **kwargs)
        marks.append(("learned (program loaded or compiled, rows, re-expressions)", time.perf_counter()))
        return out

    cli_learn.learn_stream = timed
    return jax


def waited(self):
    out = result(self)
    marks.append(("figures drawn", time.perf_counter()))
    return out


cli._jax, figure_workers._Figure.result = _jax, waited
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
marks.append(("report written", time.perf_counter()))
last = start
for name, t in marks:
    if name != "figures drawn" or t == max(m[1] for m in marks if m[0] == name):
        print(f"{t - start:6.2f} s  +{t - last:5.2f} s  {name}")
        last = t
"""


def phases(kalnat_args, env):
    """Where a run's seconds go, from inside one process (``--phases``)."""
    out = subprocess.run([sys.executable, "-c", PHASES_PROBE, *kalnat_args], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    print(out.stdout, end="")


def _learner(d):
    import jax
    import kalnat

    jax.config.update("jax_enable_x64", True)
    model = kalnat.models.linear(d - 1)
    learner = kalnat.ekf(model, kalnat.families.Gaussian(1.0), prior_var=1.0)
    return learner, learner.init(model.init(None))


def _rows(d, rows=ROWS):
    rng = np.random.default_rng(0)
    return rng.normal(size=(rows, d - 1)), rng.normal(size=rows)


def per_row(one, passes, wait=lambda: None):
    """Seconds per row of ``one(i)``: the fastest of ``passes`` passes over PASS rows each, after
    WARM rows. Short passes: on a busy machine some of them run without being preempted."""
    for i in range(WARM):
        one(i)
    wait()
    best = float("inf")
    for p in range(passes):
        rows = range(WARM + p * PASS, WARM + (p + 1) * PASS)
        t = time.perf_counter()
        for i in rows:
            one(i)
        wait()
        best = min(best, (time.perf_counter() - t) / PASS)
    return best


def per_row_update(d, passes):
    import jax

    learner, state = _learner(d)
    X, y = _rows(d)
    box = [state]

    def one(i):
        box[0], _ = learner.update(box[0], X[i], y[i])

    return per_row(one, passes, lambda: jax.block_until_ready(box[0]))


def per_row_fit(d, passes, rows=4096, quick=False, first=None):
    """Seconds per row inside ``kalnat.fit`` (one row per update, the rows scanned in chunks), after
    a first fit of the same shape has compiled it: what the same rows cost learned together.
    ``quick``: the learner compiled quickly (:func:`kalnat.programs.compile_quickly`);
    ``first``: a list that takes the first fit's seconds (its compilation, mostly)."""
    import jax
    import kalnat

    learner, state = _learner(d)
    if quick:
        from kalnat import programs

        programs.compile_quickly(learner)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(rows, d - 1)), rng.normal(size=rows)
    t = time.perf_counter()
    state = jax.block_until_ready(kalnat.fit(learner, state, X, y, return_predictions=False).state)
    if first is not None:
        first.append(time.perf_counter() - t)
    best = float("inf")
    for _ in range(max(1, passes // 10)):
        t = time.perf_counter()
        state = jax.block_until_ready(kalnat.fit(learner, state, X, y, return_predictions=False).state)
        best = min(best, (time.perf_counter() - t) / rows)
    return best


def per_row_checks(d, passes):
    """The host's checks ``update`` makes of one row before its jitted step."""
    from kalnat.learners.base import check_targets

    learner, state = _learner(d)
    X, y = _rows(d)

    def one(i):
        learner._check_state(state)
        xs, _ = learner.check_x(state, X[i])
        check_targets(learner.family, y[i], learner._dtype(state), xs.shape[0], "rows")

    return per_row(one, passes)


def per_row_floor(d, passes):
    """A jitted function with the update's arguments and results (the state donated), computing
    nothing: JAX's dispatch alone."""
    import jax
    from kalnat.filter import Predictive

    learner, state = _learner(d)
    X, y = _rows(d)
    hyper = learner._hyper(None, np.float64)
    nothing = jax.jit(lambda h, s, xs, ys: (s, Predictive(ys, xs[:, :1], xs[:, :1])), donate_argnums=1)
    box = [state]

    def one(i):
        box[0], _ = nothing(hyper, box[0], X[i:i + 1], y[i:i + 1])

    return per_row(one, passes, lambda: jax.block_until_ready(box[0]))


def per_row_river(d, passes):
    try:
        from river import linear_model
    except ImportError:
        return float("nan")
    X, y = _rows(d)
    dicts = [{f"x{j}": float(v) for j, v in enumerate(row)} for row in X]
    ys = [float(v) for v in y]
    model = linear_model.BayesianLinearRegression(alpha=1.0, beta=1.0)
    return per_row(lambda i: model.learn_one(dicts[i], ys[i]), passes)


def per_row_table(dims, repeat, passes=PASSES):
    try:  # NumPy's BLAS on one thread: river's d × d update per row only waits on more of them
        from threadpoolctl import threadpool_limits
        try:
            import river.linear_model  # noqa: F401  (loads SciPy's BLAS too, before the limit)
        except ImportError:
            pass
        with threadpool_limits(1, user_api="blas"):
            return _per_row_table(dims, repeat, passes)
    except ImportError:
        return _per_row_table(dims, repeat, passes)


def _per_row_table(dims, repeat, passes):
    print(f"{'d':>5} {'update µs':>10} {'river µs':>9} {'update/river':>13} {'checks µs':>10} {'floor µs':>9} "
          f"{'fit µs':>7} {'fit/river':>10}")
    for d in dims:
        times = {f: [] for f in (per_row_update, per_row_river, per_row_checks, per_row_floor, per_row_fit)}
        for _ in range(repeat):
            for f in times:
                times[f].append(f(d, passes))
        a, b, c, f, g = (min(v) for v in times.values())
        print(f"{d:5d} {a * 1e6:10.1f} {b * 1e6:9.1f} {a / b:13.2f} {c * 1e6:10.1f} {f * 1e6:9.1f} "
              f"{g * 1e6:7.1f} {g / b:10.2f}", flush=True)


def first_cold_warm(learn, env, cache):
    """Wall seconds of ``learn`` with an empty cache folder, then with the data set kept and no
    compiled or saved program, then warm."""
    shutil.rmtree(cache, ignore_errors=True)
    first = wall(learn, env)
    for entry in os.listdir(cache):  # compiled and saved programs gone, the data set kept
        path = os.path.join(cache, entry)
        if entry != "datasets":
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return first, wall(learn, env), wall(learn, env)


def _log_loss(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)["final"]["log_loss"]


def _score(x, spec):
    """``x`` formatted by ``spec`` (width and precision), or ``null`` as wide: metrics.json
    holds null for a score of no row, or of a run that diverged."""
    return format(x, spec) if x is not None else format("null", ">" + spec.split(".")[0])


def quick_compile_table(learn, env, cache, out, repeat):
    """The first, cold and warm runs of ``learn`` with the chunk program compiled quickly
    (``KALNAT_QUICK_COMPILE=1``, what breast_cancer's size chooses) and with XLA's defaults
    (``=0``), alternating, and their ratios."""
    times = {"1": [], "0": []}
    losses = {}
    for _ in range(repeat):
        for setting in times:
            times[setting].append(first_cold_warm(learn, dict(env, KALNAT_QUICK_COMPILE=setting), cache))
            losses[setting] = _log_loss(out)
    print("kalnat learn breast_cancer     quick compile   XLA's defaults   quick/defaults")
    for i, label in enumerate(("first run", "cold cache", "warm cache")):
        q, d = (float(np.median([t[i] for t in times[s]])) for s in ("1", "0"))
        print(f"  {label:<27} {q:9.2f} s {d:13.2f} s {q / d:13.2f}")
    print(f"  log-loss                    {_score(losses['1'], '11.4f')} {_score(losses['0'], '15.4f')}")
    print("kalnat.fit, one EKF of d parameters: the first fit (compiling) and µs per row after it")
    print("  d     first: quick  defaults   per row: quick  defaults  quick/defaults")
    for d in (4, 32):
        firsts = {True: [], False: []}
        rows = {q: min(per_row_fit(d, PASSES, quick=q, first=firsts[q]) for _ in range(repeat))
                for q in (True, False)}
        print(f"  {d:<4} {min(firsts[True]):11.2f} s {min(firsts[False]):7.2f} s {rows[True] * 1e6:12.2f}"
              f" {rows[False] * 1e6:9.2f} {rows[True] / rows[False]:12.2f}")


def keyed_csv(path, rows=2000, keys=50):
    """A logistic stream of ``rows`` rows for ``keys`` users (column ``user``), 3 features."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        f.write("user,a,b,c,y\n")
        for _ in range(rows):
            u, x = rng.integers(0, keys), rng.normal(size=3)
            y = int(x @ [1.0, -1.0, 0.5] + 0.3 * u / keys + rng.normal() > 0)
            f.write(f"u{u},{x[0]:.4f},{x[1]:.4f},{x[2]:.4f},{y}\n")


def other_commands_table(kalnat_cmd, env, repeat):
    """``kalnat predict``, ``kalnat learn --key``, a keyed model's ``predict`` and ``kalnat
    compare`` with nothing cached (``KALNAT_NO_CACHE=1``: each compiles everything), with
    ``KALNAT_QUICK_COMPILE=1`` and ``=0`` alternately: wall seconds (median) and their ratios."""
    folder = tempfile.mkdtemp(prefix="kalnat-commands-")
    try:
        keyed = os.path.join(folder, "keyed.csv")
        keyed_csv(keyed)
        env = dict(env, KALNAT_NO_CACHE="1")
        model, keyed_model, out = (os.path.join(folder, n) for n in ("model", "keyed_model", "out"))
        wall(kalnat_cmd + ["learn", "breast_cancer", "--quiet", "--out", model], env)
        wall(kalnat_cmd + ["learn", keyed, "--key", "user", "--quiet", "--out", keyed_model], env)
        predictions = os.path.join(folder, "p.csv")
        commands = {
            "kalnat predict breast_cancer": ["predict", "breast_cancer", "--model-dir", model, "--out", predictions],
            "kalnat learn --key (2 000 rows, 50 keys)": ["learn", keyed, "--key", "user", "--quiet", "--out", out],
            "kalnat predict, the keyed model": ["predict", keyed, "--model-dir", keyed_model, "--out", predictions],
            "kalnat compare breast_cancer": ["compare", "breast_cancer", "--out", out],
        }
        times = {name: {"1": [], "0": []} for name in commands}
        for _ in range(repeat):
            for name, cmd in commands.items():
                for setting in ("1", "0"):
                    times[name][setting].append(wall(kalnat_cmd + cmd, dict(env, KALNAT_QUICK_COMPILE=setting)))
        print(f"{'nothing cached':<42}{'quick':>9}{'defaults':>11}{'quick/defaults':>16}")
        for name, t in times.items():
            q, d = float(np.median(t["1"])), float(np.median(t["0"]))
            print(f"  {name:<40}{q:7.2f} s{d:9.2f} s{q / d:14.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def digits_table(kalnat_cmd, covariances, dtypes, batch_sizes, env, cache, out):
    """``kalnat learn digits --covariance X --dtype T --batch-size B``: wall seconds (empty
    cache), log-loss, accuracy, and the dtype ``auto`` chose; for each X the dtypes in turn,
    for each the batch sizes."""
    print(f"{'kalnat learn digits':<56}{'seconds':>8}{'log-loss':>10}{'accuracy':>10}  dtype")
    try:
        for cov in covariances:
            for dtype in dtypes:
                for batch in batch_sizes:
                    shutil.rmtree(cache, ignore_errors=True)
                    options = ["--covariance", cov, "--dtype", dtype, "--batch-size", str(batch)]
                    t = wall(kalnat_cmd + ["learn", "digits", *options, "--quiet", "--out", out], env)
                    with open(os.path.join(out, "metrics.json")) as f:
                        metrics = json.load(f)
                    final = metrics["final"]
                    print(f"{' '.join(options):<56}{t:>8.1f}{_score(final['log_loss'], '10.4f')}"
                          f"{_score(final['accuracy'], '10.3f')}  {metrics['dtype']}", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[8, 32, 128, 512])
    ap.add_argument("--repeat", type=int, default=3)
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--per-row", action="store_true", help="only the per-row table")
    only.add_argument("--no-per-row", action="store_true", help="only the start-up lines")
    ap.add_argument("--inline", action="store_true", help="per-row steps run on the calling thread")
    ap.add_argument("--phases", action="store_true",
                    help="only where the seconds of a first and a warm `kalnat learn` go")
    ap.add_argument("--digits", nargs="+", metavar="COVARIANCE",
                    help="only `kalnat learn digits --covariance X` for each X, cold cache")
    ap.add_argument("--dtypes", nargs="+", default=["auto"], choices=["auto", "float32", "float64"],
                    help="with --digits: each X with each --dtype, in this order (repeat them to alternate)")
    ap.add_argument("--quick-compile", action="store_true",
                    help="breast_cancer's first, cold and warm runs with KALNAT_QUICK_COMPILE=1 and =0")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1],
                    help="with --digits: each X and dtype with each --batch-size")
    args = ap.parse_args()
    if args.inline:  # read when JAX creates its CPU client: before the first import here
        os.environ["JAX_CPU_ENABLE_ASYNC_DISPATCH"] = "0"
    if args.per_row:
        return per_row_table(args.dims, args.repeat)
    kalnat_cmd = [sys.executable, "-m", "kalnat.cli"]
    cache = tempfile.mkdtemp(prefix="kalnat-cache-")
    out = tempfile.mkdtemp(prefix="kalnat-report-")
    env = dict(os.environ, KALNAT_CACHE_DIR=cache)
    env.pop("KALNAT_NO_CACHE", None)
    if args.digits:
        return digits_table(kalnat_cmd, args.digits, args.dtypes, args.batch_sizes, env, cache, out)
    if args.phases:
        try:
            learn = ["learn", "breast_cancer", "--quiet", "--out", out]
            for label in ("first run (empty cache folder)", "warm"):
                print(f"kalnat learn, {label}:")
                phases(learn, env)
            # what a first run would add were breast_cancer read through scikit-learn's loader
            # (kalnat.datasets reads its file without importing the package)
            bare = wall([sys.executable, "-c", "import numpy, scipy.linalg"], env, 3)
            with_sklearn = wall([sys.executable, "-c", "import numpy, scipy.linalg, sklearn.datasets"], env, 3)
            print(f"importing sklearn.datasets (past NumPy and SciPy, which a run imports anyway): "
                  f"{with_sklearn - bare:.2f} s")
        finally:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
        return
    learn = kalnat_cmd + ["learn", "breast_cancer", "--quiet", "--out", out]
    if args.quick_compile:
        try:
            quick_compile_table(learn, env, cache, out, args.repeat)
            return other_commands_table(kalnat_cmd, env, args.repeat)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    try:
        t_help = wall(kalnat_cmd + ["--help"], env, args.repeat)
        # the same warm run through kalnat.cli.main, ending with Python's own exit (its teardown)
        learn_python_exit = [sys.executable, "-c", "import sys; from kalnat.cli import main; main(sys.argv[1:])",
                             *learn[3:]]
        firsts, colds, warms, pythons_exit = [], [], [], []
        for _ in range(args.repeat):
            first, cold, warm = first_cold_warm(learn, env, cache)
            firsts.append(first)
            colds.append(cold)
            warms.append(warm)
            pythons_exit.append(wall(learn_python_exit, env))
        log_loss = _log_loss(out)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    t_first, t_cold, t_warm, t_exit = (float(np.median(t)) for t in (firsts, colds, warms, pythons_exit))
    print(f"kalnat --help                 {t_help:6.2f} s   (target 0.3)")
    print(f"kalnat learn, first run       {t_first:6.2f} s                 (empty cache folder)")
    print(f"kalnat learn, cold cache      {t_cold:6.2f} s   (target 3)    log-loss {_score(log_loss, '.4f')}")
    print(f"kalnat learn, warm cache      {t_warm:6.2f} s   (target 1.5)  warm/cold {t_warm / t_cold:.2f}")
    print(f"  the same, Python's exit     {t_exit:6.2f} s                 quick exit/Python's {t_warm / t_exit:.2f}")
    if not args.no_per_row:
        per_row_table(args.dims, args.repeat)


if __name__ == "__main__":
    main()
