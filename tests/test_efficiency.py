"""docs/method.md §5: with 1/t rates the filter is asymptotically Fisher-efficient:
t · E[(θ_t − θ*)ᵀ I(θ*) (θ_t − θ*)] → d, the Cramér–Rao bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import kalnat
from kalnat import families as F

D_FEATURES = 9  # d = 10 with the intercept
T = 5000
RUNS = 96


@pytest.mark.slow
def test_fisher_efficiency_logistic_regression():
    family = F.Bernoulli()
    model = kalnat.models.linear(D_FEATURES)
    learner = kalnat.ekf(model, family, prior_var=1.0)
    rng = np.random.default_rng(0)
    theta_star = rng.normal(size=D_FEATURES + 1) * 0.5

    # I(θ*) = E_x[Hᵀ R⁻¹ H] = E_x[p(1−p) x̃ x̃ᵀ], x̃ = (1, x), by a large Monte Carlo sample
    xs = rng.normal(size=(400_000, D_FEATURES))
    xt = np.hstack([np.ones((len(xs), 1)), xs])
    p = 1 / (1 + np.exp(-xt @ theta_star))
    info = (xt * (p * (1 - p))[:, None]).T @ xt / len(xs)

    state0 = learner.init(model.init(None))

    def one_run(key):
        kx, ky = jax.random.split(key)
        X = jax.random.normal(kx, (T, D_FEATURES))
        probs = jax.nn.sigmoid(X @ theta_star[1:] + theta_star[0])
        y = jax.random.bernoulli(ky, probs).astype(jnp.float64)
        state, _ = jax.lax.scan(lambda s, xy: (learner.step(learner.hyper, s, xy[0][None], xy[1][None])[0], None),
                                state0, (X, y))
        return ravel_pytree(state.params)[0]

    thetas = np.asarray(jax.jit(jax.vmap(one_run))(jax.random.split(jax.random.PRNGKey(1), RUNS)))
    err = thetas - theta_star
    scaled = T * np.einsum("ri,ij,rj->r", err, info, err)
    d = D_FEATURES + 1
    assert np.all(np.isfinite(scaled))
    assert abs(scaled.mean() - d) < 0.15 * d, scaled.mean()
