"""Per-step cost of learning a recurrent model online, measured side by side in one run.

Three learners of the same Elman cell (one output, Gaussian family), on the same stream:

- natural-gradient RTRL with state correction, EKF core (:func:`kalnat.recurrent.rtrl`):
  O(n² d) for ``G_t`` plus O(d²) for the EKF update;
- the joint EKF on (s, θ) (:func:`kalnat.recurrent.joint_ekf`), the same (s_t, θ_t):
  O(n d²) for ``F P Fᵀ`` plus O((n + d)²);
- truncated BPTT over a window of ``k`` steps with Adam (optax): O(k d) per step, first
  order, no covariance.

Two sweeps: the state size n grows with one input (d ≈ n²), and the parameter count d grows
at a fixed n through the input size p. Each learner runs ``--steps`` steps in one jitted,
donated ``lax.scan`` (``fit_sequence``), after a warm-up run that compiles it; the time per
step is the best of ``--repeat`` runs (at least 7 below d = 1000, where a run is short and
noisy).

    python benchmarks/recurrent_cost.py            # about two minutes on 2 CPU cores
    python benchmarks/recurrent_cost.py --quick
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from kalnat import families, recurrent

jax.config.update("jax_enable_x64", True)


def per_step_filter(learner, params, X, Y, repeat):
    run = lambda: recurrent.fit_sequence(learner, learner.init(params), X, Y, chunk_size=len(Y),
                                         return_predictions=False)
    jax.block_until_ready(run().state)  # compile
    best = np.inf
    for _ in range(repeat):
        state = learner.init(params)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        out = recurrent.fit_sequence(learner, state, X, Y, chunk_size=len(Y), return_predictions=False)
        jax.block_until_ready(out.state)
        best = min(best, time.perf_counter() - t0)
    return best / len(Y)


def per_step_tbptt(cell, params, X, Y, repeat, window=16, lr=1e-2):
    opt = optax.adam(lr)
    k = window

    def unroll(p, s, xw):
        def body(s, x):
            s = cell.transition(p, s, x)
            return s, cell.readout(p, s)[0]
        return jax.lax.scan(body, s, xw)[1]

    def loss(p, s, xw, yw):
        return jnp.mean((unroll(p, s, xw) - yw) ** 2)

    def step(carry, inp):
        p, o, s, xw, yw = carry
        x, y = inp
        s = cell.transition(p, s, xw[0])  # the oldest input leaves the window
        xw, yw = jnp.roll(xw, -1, 0).at[-1].set(x), jnp.roll(yw, -1).at[-1].set(y)
        upd, o = opt.update(jax.grad(loss)(p, s, xw, yw), o, p)
        return (optax.apply_updates(p, upd), o, s, xw, yw), None

    run = jax.jit(lambda c, X, Y: jax.lax.scan(step, c, (X, Y))[0], donate_argnums=0)
    fresh = lambda: (params, opt.init(params), jnp.zeros(cell.n_state), jnp.zeros((k,) + X.shape[1:]),
                     jnp.zeros(k))
    Xj, Yj = jnp.asarray(X), jnp.asarray(Y)
    jax.block_until_ready(run(jax.tree_util.tree_map(jnp.copy, fresh()), Xj, Yj))
    best = np.inf
    for _ in range(repeat):
        c = jax.tree_util.tree_map(jnp.copy, fresh())
        jax.block_until_ready(c)
        t0 = time.perf_counter()
        jax.block_until_ready(run(c, Xj, Yj))
        best = min(best, time.perf_counter() - t0)
    return best / len(Y)


def row(n, p, steps, repeat):
    cell = recurrent.elman(n_inputs=p, n_state=n)
    params = cell.init(jax.random.PRNGKey(0))
    params["V"] = jax.random.normal(jax.random.PRNGKey(1), params["V"].shape) / np.sqrt(n)
    d = ravel_pytree(params)[0].shape[0]
    rng = np.random.default_rng(0)
    X = rng.normal(size=(steps, p))
    Y = np.sin(np.cumsum(X[:, 0]) * 0.3) + 0.1 * rng.normal(size=steps)
    fam = families.Gaussian(0.1)
    ng = recurrent.rtrl(cell, fam, prior_var=0.1, forgetting=0.999)
    joint = recurrent.joint_ekf(cell, fam, prior_var=0.1, forgetting=0.999)
    repeat = repeat if d > 1000 else max(repeat, 7)  # small problems: cheap, noisier
    t_ng = per_step_filter(ng, params, X, Y, repeat)
    t_joint = per_step_filter(joint, params, X, Y, repeat)
    t_bptt = per_step_tbptt(cell, params, X, Y, repeat)
    return d, t_ng, t_joint, t_bptt


def main():
    ap = argparse.ArgumentParser(description="per-step cost: NG-RTRL vs joint EKF vs truncated BPTT")
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    grow_n = [(4, 1), (8, 1), (16, 1), (32, 1)] + ([] if args.quick else [(48, 1), (64, 1)])
    grow_d = [(8, 8), (8, 32), (8, 128)] + ([] if args.quick else [(8, 256)])

    print(f"device: {jax.devices()[0].device_kind}, float64, {args.steps} steps, best of {args.repeat}")
    print("Elman cell, one Gaussian output; TBPTT window 16 with Adam")
    header = (f"{'n':>4} {'p':>4} {'d':>6} | {'NG-RTRL':>10} {'joint EKF':>10} {'TBPTT':>10} | "
              f"{'joint/RTRL':>10} {'RTRL/TBPTT':>10}")
    print(header)
    print("-" * len(header))
    for label, sweep in (("state size n grows", grow_n), ("parameter count d grows at n = 8", grow_d)):
        print(f"# {label}")
        for n, p in sweep:
            d, a, b, c = row(n, p, args.steps, args.repeat)
            print(f"{n:>4} {p:>4} {d:>6} | {a * 1e3:>8.3f}ms {b * 1e3:>8.3f}ms {c * 1e3:>8.3f}ms | "
                  f"{b / a:>10.1f} {a / c:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
