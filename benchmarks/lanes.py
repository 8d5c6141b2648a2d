"""Why the diagonal form pads θ's axis to a multiple of 8 (``kalnat.numerics.LANES``), and why
kalnat keeps XLA's default CPU emitters, side by side on this machine.

  loop       microseconds of one jitted elementwise pass over n float32 numbers and over n
             padded to a multiple of 8 (``numerics.lanes``), alternating, the fastest of
             ``--calls`` calls each: the diagonal step's form, which broadcasts scalars (1/λ, a
             whitening factor), and the same without them. XLA's CPU fusion emitters ran the
             first one element at a time over an odd n, twice as long or more; the second, no
             slower than padded
  emitters   milliseconds per row under XLA's default CPU emitters and its older elemental ones
             (``--xla_cpu_use_fusion_emitters=false``), each setting in a fresh process: the
             full EKF's ``kalnat.fit`` on a linear model at d = 128 and 512 (float64, Gaussian),
             the diagonal form's on benchmarks/networks.py's teacher MLP (d = 120 901, float32)
             and Adam's step on the same stream (optax)

    python benchmarks/lanes.py [--part loop|emitters|both] [--calls 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

ONE_SETTING = """
import json, sys, time
sys.path.insert(0, {here!r})
import jax, jax.numpy as jnp, numpy as np, optax
import kalnat
from networks import teacher, run_optax


def per_row(learner, state, X, y, repeat=3):
    state = kalnat.fit(learner, state, X[:64], y[:64], chunk_size=64).state  # compiles
    best = np.inf
    for _ in range(repeat):  # each pass continues from the last one's state (fit donates it)
        t = time.perf_counter()
        state = jax.block_until_ready(kalnat.fit(learner, state, X, y, chunk_size=64).state)
        best = min(best, (time.perf_counter() - t) / len(X))
    return best * 1e3


out = {{}}
model, X, Y = teacher(1064, np.float32)
params = model.init(jax.random.PRNGKey(5))
diag = kalnat.ekf(model, kalnat.families.Gaussian(0.01), prior_var=0.1,
                  representation=kalnat.representations.Diagonal())
out["diag, d = 120 901"] = per_row(diag, diag.init(params), X[64:], Y[64:])
mse = lambda z, t: jnp.mean((z - t) ** 2)
out["Adam, d = 120 901"] = 1e3 * min(run_optax(model.apply, mse, params, jnp.asarray(X[64:]),
                                               jnp.asarray(Y[64:])[:, None], optax.adam(1e-4))[2][0]
                                     for _ in range(3))
jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
for d in (128, 512):
    lin = kalnat.models.linear(d - 1)
    Xd = rng.normal(size=(1024, d - 1))
    yd = Xd @ rng.normal(size=d - 1) + rng.normal(size=1024)
    ekf = kalnat.ekf(lin, kalnat.families.Gaussian(1.0))
    out[f"full EKF, d = {{d}}"] = per_row(ekf, ekf.init(lin.init(None)), Xd, yd)
print(json.dumps(out))
"""


def loop(calls: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kalnat import numerics

    passes = {  # the step's form, with the scalars it broadcasts (1/λ, a whitening factor), and without
        "1/(1/(p c) + (h a)²)": jax.jit(lambda p, h, a, c: 1.0 / (1.0 / (p * c) + (h * a) * (h * a))),
        "1/(1/p + h²)": jax.jit(lambda p, h, a, c: 1.0 / (1.0 / p + h * h)),
    }
    a, c = jnp.float32(0.5), jnp.float32(1.01)
    print(f"one elementwise pass over n float32 numbers, fastest of {calls} calls (µs)")
    print(f"{'pass':22s} {'n':>8s} {'n':>9s} {'padded':>9s} {'n / padded':>11s}")
    for name, f in passes.items():
        for n in (120_901, 30_001, 4_097):
            times = {}
            for m in (n, numerics.lanes(n)):
                p = jnp.ones(m, jnp.float32)
                h = jnp.asarray(np.random.default_rng(0).normal(size=m), jnp.float32)
                f(p, h, a, c).block_until_ready()
                times[m] = (p, h, [])
            for _ in range(calls):  # alternating, so that other work on the machine weighs on both
                for m, (p, h, ts) in times.items():
                    t = time.perf_counter()
                    f(p, h, a, c).block_until_ready()
                    ts.append(time.perf_counter() - t)
            odd, padded = (min(times[m][2]) * 1e6 for m in (n, numerics.lanes(n)))
            print(f"{name:22s} {n:8d} {odd:9.1f} {padded:9.1f} {odd / padded:11.2f}")


def emitters() -> None:
    settings = {"default emitters": "", "older emitters": "--xla_cpu_use_fusion_emitters=false"}
    rows = {}
    for label, flags in settings.items():
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        run = subprocess.run([sys.executable, "-c", ONE_SETTING.format(here=HERE)], env=env, capture_output=True,
                             text=True, check=True)
        rows[label] = json.loads(run.stdout.strip().splitlines()[-1])
    print("milliseconds per row, each setting in a fresh process")
    print(f"{'':22s} {'default':>9s} {'older':>9s} {'older / default':>16s}")
    for name in rows["default emitters"]:
        a, b = rows["default emitters"][name], rows["older emitters"][name]
        print(f"{name:22s} {a:9.4f} {b:9.4f} {b / a:16.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["loop", "emitters", "both"], default="both")
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    if args.part in ("loop", "both"):
        loop(args.calls)
    if args.part in ("emitters", "both"):
        emitters()


if __name__ == "__main__":
    main()
