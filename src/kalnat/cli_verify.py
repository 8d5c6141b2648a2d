"""``kalnat verify``: the method's equivalences (docs/method.md), measured on random problems.

For each problem the EKF (covariance form, §2a), the information filter (§2b) and online
natural gradient configured by the Kalman translation (§3: ``γ_t = η_t``,
``1/η_t = λ/η_{t−1} + 1``, ``J_0 = η_0 P_0⁻¹``) learn the same stream; after every update
θ and the covariance (information filter: ``Λ⁻¹``; natural gradient: ``η_t J_t⁻¹``) are
compared with the EKF's. The reported number is the largest relative deviation over all
steps: ``max |a − b| / max |b|``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import kalnat
from kalnat import families, models, schedules

__all__ = ["problems", "run_all"]


def problems(quick: bool = False, full: bool = False):
    """``(family, model kind, λ, batch)`` of the random problems checked.

    Every family gets both models and both forgetting factors; the batch sizes 1 and 4
    alternate between the models (half of the full design, every level still covered) unless
    ``full``. ``quick``: bernoulli and the linear model only.
    """
    fams = ("bernoulli",) if quick else ("gaussian", "bernoulli", "categorical", "poisson")
    kinds = ("linear",) if quick else ("linear", "mlp")
    out = []
    for i, f in enumerate(fams):
        for j, k in enumerate(kinds):
            batches = (1, 4) if (full or quick) else ((1,) if (i + j) % 2 == 0 else (4,))
            out += [(f, k, lam, b) for b in batches for lam in (1.0, 0.95)]
    return out


def _data(family: str, kind: str, rows: int, seed: int):
    """Features, targets drawn from a random model of the family, and the model to learn."""
    rng = np.random.default_rng(seed)
    p = 3
    fam = families.Categorical(3) if family == "categorical" else families.from_name(family)
    model = models.linear(p, fam.n_outputs) if kind == "linear" else models.mlp(p, (4,), fam.n_outputs)
    X = rng.normal(size=(rows, p))
    true = models.linear(p, fam.n_outputs)
    w = {"w": jnp.asarray(rng.normal(size=(fam.n_outputs, p)) * 0.7), "b": jnp.zeros(fam.n_outputs)}
    yhat = jax.vmap(lambda x: fam.mean(true.apply(w, x)))(jnp.asarray(X))
    keys = jax.random.split(jax.random.PRNGKey(seed), rows)
    Y = np.asarray(jax.vmap(lambda k, m: fam.sample(k, m))(keys, yhat))
    return fam, model, X, Y


def _group(family: str, kind: str, batch: int, lams, rows: int, seed: int, prior_var: float):
    """θ and covariance trajectories of the three learners, for every λ in ``lams``.

    One jitted, λ-vmapped ``scan`` per (family, model, batch): the learners' pure ``step`` s
    with a traced forgetting factor, so a whole group compiles once.
    """
    fam, model, X, Y = _data(family, kind, rows, seed)
    params = model.init(jax.random.PRNGKey(seed + 1))
    n = (rows // batch) * batch
    xs = jnp.asarray(X[:n]).reshape((n // batch, batch) + X.shape[1:])
    ys = jnp.asarray(Y[:n]).reshape((n // batch, batch) + Y.shape[1:])

    learners = (
        kalnat.ekf(model, fam, prior_var=prior_var),
        kalnat.information_filter(model, fam, prior_var=prior_var),
        kalnat.natural_gradient(model, fam, **schedules.kalman_to_natural(prior_var=prior_var)._asdict()),
    )

    def run(lam):  # λ is data (the hyperparameters' forgetting): one vmap over the λ's
        out = []
        for learner in learners:
            hyper = learner.hyper._replace(forgetting=lam)

            def body(state, inp, learner=learner, hyper=hyper):
                state = learner.step(hyper, state, *inp)[0]
                return state, (ravel_pytree(state.params)[0], state.cov.dense())
            out.append(jax.lax.scan(body, kalnat.filter.init(learner, hyper, params), (xs, ys))[1])
        return out

    traj = jax.jit(jax.vmap(run))(jnp.asarray(lams, jnp.float64))
    d = int(ravel_pytree(params)[0].shape[0])
    return [[(np.asarray(th[k]), np.asarray(P[k])) for th, P in traj] for k in range(len(lams))], d


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def run_all(rows: int = 40, seed: int = 0, quick: bool = False, full: bool = False,
            prior_var: float = 0.5) -> list[dict]:
    """Largest relative deviations from the EKF of the information filter and natural
    gradient, for every problem of :func:`problems` (each group on its own seeded data)."""
    lams = (1.0, 0.95)
    out = []
    groups = list(dict.fromkeys((f, k, b) for f, k, _, b in problems(quick, full)))
    for i, (f, k, b) in enumerate(groups):
        res, d = _group(f, k, b, lams, rows, seed + i, prior_var)
        for lam, ((th_e, P_e), (th_i, P_i), (th_n, P_n)) in zip(lams, res):
            out.append({"family": f, "model": k, "forgetting": lam, "batch": b, "d": d,
                        "theta_info": _rel(th_i, th_e), "cov_info": _rel(P_i, P_e),
                        "theta_ng": _rel(th_n, th_e), "cov_ng": _rel(P_n, P_e)})
    return out
