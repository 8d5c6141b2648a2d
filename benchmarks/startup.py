"""What a user meets first: the command's start-up, a first run against a second one, and one
row at a time through ``learner.update`` next to river, side by side on this machine.

  --help            ``kalnat --help`` (a fresh process: what typing it costs)
  learn cold        ``kalnat learn`` on breast_cancer with an empty compilation cache
  learn warm        the same again, the cache now filled (JAX's persistent compilation cache)
  update / river    seconds per row of ``learner.update(state, x, y)`` (EKF, Gaussian, a
                    linear model of d parameters, NumPy rows) and of river's
                    ``BayesianLinearRegression.learn_one`` (the same posterior mean) at d

    python benchmarks/startup.py [--dims 8 32 128 512] [--repeat 3]
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


def per_row_update(d, rows=400):
    import jax
    import kalnat

    jax.config.update("jax_enable_x64", True)
    model = kalnat.models.linear(d - 1)
    learner = kalnat.ekf(model, kalnat.families.Gaussian(1.0), prior_var=1.0)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(rows, d - 1)), rng.normal(size=rows)
    state = learner.init(model.init(None))
    for i in range(20):  # compile, warm up
        state, _ = learner.update(state, X[i], y[i])
    jax.block_until_ready(state)
    t = time.perf_counter()
    for i in range(20, rows):
        state, _ = learner.update(state, X[i], y[i])
    jax.block_until_ready(state)
    return (time.perf_counter() - t) / (rows - 20)


def per_row_river(d, rows=400):
    try:
        from river import linear_model
    except ImportError:
        return float("nan")
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(rows, d - 1)), rng.normal(size=rows)
    dicts = [{f"x{j}": float(v) for j, v in enumerate(row)} for row in X]
    model = linear_model.BayesianLinearRegression(alpha=1.0, beta=1.0)
    for i in range(20):
        model.learn_one(dicts[i], float(y[i]))
    t = time.perf_counter()
    for i in range(20, rows):
        model.learn_one(dicts[i], float(y[i]))
    return (time.perf_counter() - t) / (rows - 20)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[8, 32, 128, 512])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    kalnat_cmd = [sys.executable, "-m", "kalnat.cli"]
    cache = tempfile.mkdtemp(prefix="kalnat-cache-")
    out = tempfile.mkdtemp(prefix="kalnat-report-")
    env = dict(os.environ, KALNAT_CACHE_DIR=cache)
    env.pop("KALNAT_NO_CACHE", None)
    try:
        t_help = wall(kalnat_cmd + ["--help"], env, args.repeat)
        learn = kalnat_cmd + ["learn", "breast_cancer", "--quiet", "--out", out]
        colds, warms = [], []
        for _ in range(args.repeat):
            shutil.rmtree(cache, ignore_errors=True)
            colds.append(wall(learn, env))
            warms.append(wall(learn, env))
        with open(os.path.join(out, "metrics.json")) as f:
            log_loss = json.load(f)["final"]["log_loss"]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    t_cold, t_warm = float(np.median(colds)), float(np.median(warms))
    print(f"kalnat --help                 {t_help:6.2f} s   (target 0.3)")
    print(f"kalnat learn, cold cache      {t_cold:6.2f} s   (target 3)    log-loss {log_loss:.4f}")
    print(f"kalnat learn, warm cache      {t_warm:6.2f} s   (target 1.5)  warm/cold {t_warm / t_cold:.2f}")
    print(f"{'d':>5} {'update µs':>10} {'river µs':>9} {'update/river':>13}")
    for d in args.dims:
        a, b = per_row_update(d), per_row_river(d)
        print(f"{d:5d} {a * 1e6:10.1f} {b * 1e6:9.1f} {a / b:13.2f}", flush=True)


if __name__ == "__main__":
    main()
