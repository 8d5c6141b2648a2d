"""The diagonal representation, one new file on the covariance interface: the exact filter
where the covariance stays diagonal, O(d) state with no d × d array in the step, and it runs
in fit, a bank, RTRL and the iterated and NIG compositions unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kalnat
from kalnat import recurrent
from kalnat.representations import Cholesky, Diagonal

DIAG = Diagonal()


def _one_hot_stream(seed, n=60, p=5):
    """Each row touches one weight (no bias): every observation's Fisher is diagonal."""
    rng = np.random.default_rng(seed)
    X = np.eye(p)[rng.integers(0, p, size=n)] * rng.uniform(0.5, 2.0, size=(n, 1))
    return X, rng


@pytest.mark.parametrize("family", ["gaussian", "bernoulli", "poisson"])
@pytest.mark.parametrize("forgetting,q,cap", [(1.0, None, None), (0.9, 0.01, 0.8)])
def test_diagonal_equals_the_exact_filter_when_the_fisher_is_diagonal(family, forgetting, q, cap):
    X, rng = _one_hot_stream(0)
    model = kalnat.models.linear(5, bias=False)
    w = rng.normal(size=5)
    fam = {"gaussian": kalnat.families.Gaussian(0.5), "bernoulli": kalnat.families.Bernoulli(),
           "poisson": kalnat.families.Poisson()}[family]
    z = X @ w
    y = {"gaussian": z + rng.normal(size=60) * 0.7, "bernoulli": (rng.random(60) < 1 / (1 + np.exp(-z))) * 1,
         "poisson": rng.poisson(np.exp(0.5 * z))}[family]
    opts = dict(prior_var=0.7, forgetting=forgetting, process_noise=q or 0.0, max_variance=cap)
    exact = kalnat.ekf(model, fam, **opts)
    diag = kalnat.ekf(model, fam, representation=DIAG, **opts)
    a = kalnat.fit(exact, exact.init(model.init(None)), X, y)
    b = kalnat.fit(diag, diag.init(model.init(None)), X, y)
    np.testing.assert_allclose(b.state.params["w"], a.state.params["w"], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(kalnat.covariance(b.state), kalnat.covariance(a.state), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(b.log_likelihood, a.log_likelihood, rtol=1e-10)


def test_diagonal_state_and_step_never_hold_a_d_by_d_array():
    d = 301
    model = kalnat.models.linear(d - 1)
    learner = kalnat.ekf(model, kalnat.families.Bernoulli(), representation=DIAG, forgetting=0.99,
                         max_variance=10.0, process_noise=0.01)
    state = learner.init(model.init(None))
    # the variances, then zeros to a multiple of LANES entries (a vectorised pass over them),
    # kept at zero through the forgetting, the noise and the bound
    assert state.cov.d == d and state.cov.p.shape == (304,) and np.all(np.asarray(state.cov.p[d:]) == 0)
    rng = np.random.default_rng(0)
    learned = kalnat.fit(learner, learner.init(model.init(None)), rng.normal(size=(3, d - 1)), np.ones(3)).state
    assert np.all(np.asarray(learned.cov.p[d:]) == 0) and np.all(np.asarray(learned.cov.p[:d]) > 0)
    assert kalnat.covariance(learned).shape == (d, d)
    x, y = jnp.ones((1, d - 1)), jnp.ones((1,))
    jaxpr = jax.make_jaxpr(lambda s: learner.step(learner.hyper, s, x, y))(state)
    shapes = [v.aval.shape for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
    assert not any(len(s) >= 2 and s[-1] >= d and s[-2] >= d for s in shapes)  # padded too
    full = kalnat.ekf(model, kalnat.families.Bernoulli(), forgetting=0.99)
    full_jaxpr = jax.make_jaxpr(lambda s: full.step(full.hyper, s, x, y))(full.init(model.init(None)))
    assert any(len(v.aval.shape) >= 2 and v.aval.shape[-2:] == (d, d)
               for eqn in full_jaxpr.jaxpr.eqns for v in eqn.outvars)  # the check can see one


@pytest.mark.slow
def test_diagonal_stays_positive_in_float32_and_runs_everywhere():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(20_000, 6)).astype(np.float32)
    X[:, 5] = 0.0  # a dead feature: wind-up without the bound
    y = (rng.random(20_000) < 1 / (1 + np.exp(-X @ rng.normal(size=6)))).astype(np.float32)
    model = kalnat.models.linear(6)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), model.init(None))
    learner = kalnat.ekf(model, kalnat.families.Bernoulli(), representation=DIAG, forgetting=0.95,
                         max_variance=5.0)
    s = kalnat.fit(learner, learner.init(params), X, y, return_predictions=False, chunk_size=4096).state
    p, padding = np.asarray(s.cov.p)[:7], np.asarray(s.cov.p)[7:]
    assert p.dtype == np.float32 and np.all(p > 0) and np.all(np.isfinite(p)) and p.max() <= 5.0 * (1 + 1e-6)
    assert padding.shape == (1,) and np.all(padding == 0)  # kept at zero through forgetting and the bound
    # a bank of it, the iterated and normal–inverse-gamma compositions, and RTRL
    b = kalnat.bank.bank(learner, [dict(prior_var=0.1), dict(prior_var=1.0)])
    kalnat.fit(b, b.init(params), X[:200], y[:200])
    it = kalnat.iterated_ekf(model, kalnat.families.Bernoulli(), iterations=2, representation=DIAG)
    kalnat.fit(it, it.init(params), X[:200], y[:200])
    nig = kalnat.nig_filter(model, representation=DIAG)
    kalnat.fit(nig, nig.init(params), X[:200], X[:200, 0] + 0.1)
    cell = recurrent.elman(1, 3)
    rt = recurrent.rtrl(cell, kalnat.families.Gaussian(0.3), representation=DIAG, prior_var=0.5)
    z = np.sin(0.3 * np.arange(101))
    res = recurrent.fit_sequence(rt, rt.init(cell.init(jax.random.PRNGKey(0))), z[:-1, None], z[1:])
    assert np.all(np.isfinite(res.log_likelihood))
    # and the same mean update as the full form when given the same (diagonal) prior: one step
    full = kalnat.ekf(model, kalnat.families.Bernoulli(), representation=Cholesky())
    one_d = kalnat.fit(kalnat.ekf(model, kalnat.families.Bernoulli(), representation=DIAG),
                       kalnat.ekf(model, kalnat.families.Bernoulli(), representation=DIAG).init(params),
                       X[:1], y[:1]).state
    one_f = kalnat.fit(full, full.init(params), X[:1], y[:1]).state
    np.testing.assert_allclose(one_d.params["w"], one_f.params["w"], rtol=1e-5)


@pytest.mark.parametrize("q,cap", [(None, None), (0.01, 0.5), (0.01, np.linspace(0.5, 1.2, 5))])
def test_gradient_of_the_evidence_through_the_diagonal_form_matches_finite_differences(q, cap):
    # d = 5: three entries of padding, through the forgetting (and the noise and the bound: one
    # cap for all, below the first prior's variances 0.8/λ + q, so that it binds on every one,
    # or one a parameter, binding on some)
    rng = np.random.default_rng(4)
    X = jnp.asarray(rng.normal(size=(40, 4)))
    y = jnp.asarray(X @ rng.normal(size=4) + 0.3 * rng.normal(size=40))
    model = kalnat.models.linear(4)
    learner = kalnat.ekf(model, kalnat.families.Gaussian(0.5), representation=DIAG, forgetting=0.95,
                         prior_var=0.8, process_noise=q, max_variance=cap)
    params = model.init(None)

    def evidence(*at):
        names = ("forgetting", "prior_var", "process_noise")[:len(at)]
        return kalnat.log_evidence(learner, learner.hyper._replace(**dict(zip(names, at))), params, X, y)

    at = (0.95, 0.8) if q is None else (0.95, 0.8, q)
    # compiled, the evidence once for every difference (op by op, each operation compiled apiece)
    grads = jax.jit(jax.grad(evidence, argnums=tuple(range(len(at)))))(*at)
    h, evidence = 1e-6, jax.jit(evidence)
    fd = [(evidence(*(a + h * (i == j) for j, a in enumerate(at)))
           - evidence(*(a - h * (i == j) for j, a in enumerate(at)))) / (2 * h) for i in range(len(at))]
    assert np.all(np.isfinite(grads))
    # atol: where the bound binds on every variance the prior variance has no effect, and the
    # differences are rounding (~4e-9)
    np.testing.assert_allclose(grads, fd, rtol=1e-6, atol=1e-7)
