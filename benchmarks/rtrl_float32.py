"""Float32 RTRL with forgetting on a noisy sine, under two XLA compile settings.

Elman(4) learns ``y_t = sin(0.3 t) + 0.1 ε_t`` one step ahead (``--steps`` steps, λ = 0.995,
prior variance 1, noise variance 0.1) with the square-root core in float32 and in float64, and
with the covariance-form core in float32, without and with ``max_variance=1``. For each it
prints the forecast RMSE over windows of ``--window`` steps (the noise level is 0.10), the
step where a run diverged (its one-step log-likelihood NaN), and the largest predictive
variance of the mean (the network's sensitivities burst on this series).

Each setting runs in a fresh process (XLA reads its options once): XLA's defaults, and the
test suite's (``tests/conftest.py``: LLVM's optimisation passes skipped, XLA's older elemental
emitters). What docs/reliability.md says of RTRL in float32 is this script's output.

    python benchmarks/rtrl_float32.py [--steps 10000] [--window 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

SETTINGS = {
    "XLA's default options": "",
    "the test suite's XLA options": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
}

RUN = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
from kalnat import families, recurrent
from kalnat.stream import Diverged
steps, window = int(sys.argv[1]), int(sys.argv[2])
cell = recurrent.elman(n_inputs=1, n_state=4)
rng = np.random.default_rng(0)
series = np.sin(0.3 * np.arange(steps + 1)) + 0.1 * rng.normal(size=steps + 1)
out = {}
for name, core, dtype, bound in (("sqrt_ekf float32", "sqrt_ekf", np.float32, 1.0),
                                 ("sqrt_ekf float64", "sqrt_ekf", np.float64, 1.0),
                                 ("ekf float32", "ekf", np.float32, None),
                                 ("ekf float32, max_variance 1", "ekf", np.float32, 1.0)):
    x, y = series[:-1, None].astype(dtype), series[1:].astype(dtype)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), cell.init(jax.random.PRNGKey(0)))
    learner = recurrent.rtrl(cell, families.Gaussian(0.1), learner=core, prior_var=1.0, forgetting=0.995,
                             max_variance=bound)
    try:
        res = recurrent.fit_sequence(learner, learner.init(params), x, y, chunk_size=1000)
    except Diverged as err:
        out[name] = {"diverged": str(err)}
        continue
    m = np.asarray(res.predictions.mean, np.float64).ravel()
    v = np.asarray(res.predictions.mean_cov, np.float64).reshape(len(m), -1)[:, 0]
    e = m - y.astype(np.float64)
    out[name] = {"rmse": [float(np.sqrt(np.mean(e[i:i + window] ** 2))) for i in range(0, steps, window)],
                 "max_mean_var": float(v.max())}
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--window", type=int, default=1000)
    args = ap.parse_args()
    for label, flags in SETTINGS.items():
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        run = subprocess.run([sys.executable, "-c", RUN, str(args.steps), str(args.window)], env=env,
                             capture_output=True, text=True, check=True)
        print(f"{label}: forecast RMSE per {args.window} steps (noise 0.10)")
        for name, r in json.loads(run.stdout.strip().splitlines()[-1]).items():
            if "diverged" in r:
                step = re.search(r"step (\d+)", r["diverged"])
                print(f"  {name:30s} diverged at step {step.group(1) if step else '?'}")
            else:
                print(f"  {name:30s} " + " ".join(f"{v:.3f}" for v in r["rmse"])
                      + f"   max Var(mean) {r['max_mean_var']:.1e}")


if __name__ == "__main__":
    main()
