"""The one-step predictive comes from the prior: each row's log-likelihood is the exact
one-step marginal under forgetting, additive noise and the variance bound; a bank's weights
are the exact posterior over its configurations; the evidence is differentiable in λ and the
prior scale; the normal–inverse-gamma filter's predictive is its exact conjugate one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings, strategies as st

import kalnat
from kalnat import bank as kbank

P_FEAT, N_ROWS, R_NOISE = 3, 30, 0.4
MODEL = kalnat.models.linear(P_FEAT)
GAUSS = kalnat.families.Gaussian(R_NOISE)
EKF = kalnat.ekf(MODEL, GAUSS, prior_var=1.0, forgetting=0.9, process_noise=0.02, max_variance=1.5)
SQRT = kalnat.sqrt_ekf(MODEL, GAUSS, prior_var=1.0, forgetting=0.9, process_noise=0.02, max_variance=1.5)
INFO = kalnat.information_filter(MODEL, GAUSS, prior_var=1.0, forgetting=0.9, process_noise=0.02,
                                 max_variance=1.5)


# The tests' streams have N_ROWS rows (a shorter one is fitted in chunks of N_ROWS,
# fixed_chunk): their learners, equal but for their hyperparameters, run one compiled program.
def _stream(seed):
    rng, n = np.random.default_rng(seed), N_ROWS
    X = rng.normal(size=(n, P_FEAT)) * np.array([1.0, 0.3, 0.0])  # the last feature stays 0: the bound binds
    X[n // 2:, 1] *= 4.0
    y = X @ rng.normal(size=P_FEAT) + 0.5 + rng.normal(size=n) * np.sqrt(R_NOISE)
    return X, y


def textbook_kalman(X, y, *, prior_var, lam, q, cap, r=R_NOISE):
    """NumPy Kalman filter on θ = (b, w) (ravel_pytree's order) for y = a·θ + ε: predict P⁻ = D (P/λ + q I) D with D
    the variance bound's diagonal, update, and the log of each row's N(y; a·θ, a P⁻ aᵀ + r)."""
    d = X.shape[1] + 1
    theta, P = np.zeros(d), prior_var * np.eye(d)
    lls = []
    for x, yt in zip(X, y):
        a = np.concatenate([[1.0], x])
        Pm = P / lam + q * np.eye(d)
        if cap is not None:
            v = np.diag(Pm)
            s = np.where(v > cap, np.sqrt(cap / v), 1.0)
            Pm = Pm * np.outer(s, s)
        S = a @ Pm @ a + r
        e = yt - a @ theta
        lls.append(-0.5 * (e * e / S + np.log(2 * np.pi * S)))
        k = Pm @ a / S
        theta, P = theta + k * e, Pm - np.outer(k, k) * S
    return np.array(lls), theta, P


def _flat(params):
    return np.asarray(jax.flatten_util.ravel_pytree(params)[0])


@pytest.mark.parametrize("learner", [EKF, SQRT, INFO], ids=lambda l: l.name)
def test_log_likelihood_is_the_exact_marginal_under_forgetting_noise_and_bound(learner):
    X, y = _stream(0)
    res = kalnat.fit(learner, learner.init(MODEL.init(None)), X, y)
    lls, theta, P = textbook_kalman(X, y, prior_var=1.0, lam=0.9, q=0.02, cap=1.5)
    np.testing.assert_allclose(res.log_likelihood, lls, rtol=1e-10)
    np.testing.assert_allclose(_flat(res.state.params), theta, rtol=1e-10)
    np.testing.assert_allclose(kalnat.covariance(res.state), P, rtol=1e-10, atol=1e-14)
    # the bound binds: the constant feature's weight (last coordinate) sits at the cap
    assert kalnat.covariance(res.state)[-1, -1] == pytest.approx(1.5, rel=1e-12)
    # and the rows' sum is the evidence, also as a pure function of the hyperparameters
    total = kalnat.log_evidence(learner, learner.hyper, MODEL.init(None), jnp.asarray(X), jnp.asarray(y))
    assert abs(float(total) - lls.sum()) < 1e-10 * abs(lls.sum())


def test_random_walk_evidence_equals_the_batch_marginal_likelihood():
    """Without forgetting, y is jointly Gaussian: Cov(y_t, y_s) = a_t (P0 + min(t, s) q I) a_s + r δ_ts."""
    X, y = _stream(1)
    q, v = 0.05, 0.7
    learner = kalnat.ekf(MODEL, GAUSS, prior_var=v, process_noise=q)
    res = kalnat.fit(learner, learner.init(MODEL.init(None)), X, y)
    A = np.hstack([np.ones((N_ROWS, 1)), X])
    t = np.arange(1, N_ROWS + 1)
    C = (A @ A.T) * (v + q * np.minimum.outer(t, t)) + R_NOISE * np.eye(N_ROWS)
    _, logdet = np.linalg.slogdet(C)
    exact = -0.5 * (y @ np.linalg.solve(C, y) + logdet + N_ROWS * np.log(2 * np.pi))
    assert abs(res.log_likelihood.sum() - exact) < 1e-10 * abs(exact)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), lam=st.sampled_from([0.8, 0.95, 1.0]), q=st.sampled_from([0.0, 0.01, 0.3]),
       cap=st.sampled_from([None, 0.5, 5.0]))
def test_evidence_matches_the_textbook_filter_on_random_problems(seed, lam, q, cap):
    X, y = _stream(seed)
    hyper = EKF.hyper._replace(forgetting=lam, process_noise=q, max_variance=cap)
    res = kalnat.fit(EKF, EKF.init(MODEL.init(None), hyper), X, y, hyper=hyper)
    lls, _, _ = textbook_kalman(X, y, prior_var=1.0, lam=lam, q=q, cap=cap)
    np.testing.assert_allclose(res.log_likelihood, lls, rtol=1e-10)


G_PRIORS, G_FORGETS = (0.1, 1.0, 10.0), (1.0, 0.9)


def test_bank_weights_are_the_exact_posterior_over_prior_and_forgetting():
    X, y = _stream(2)
    base = kalnat.ekf(MODEL, GAUSS, process_noise=0.01)
    configs = [dict(prior_var=v, forgetting=f, max_variance=2.0 * v) for v in G_PRIORS for f in G_FORGETS]
    b = kbank.bank(base, configs)
    res = kalnat.fit(b, b.init(MODEL.init(None)), X, y)
    logml = np.array([textbook_kalman(X, y, prior_var=c["prior_var"], lam=c["forgetting"], q=0.01,
                                      cap=c["max_variance"])[0].sum() for c in configs])
    np.testing.assert_allclose(res.state.log_evidence, logml, rtol=1e-10)
    post = np.exp(logml - scipy.special.logsumexp(logml))
    np.testing.assert_allclose(kbank.weights(res.state), post, rtol=1e-9, atol=1e-14)
    # the bank's own evidence is the uniform mixture's
    assert abs(float(res.state.log_marginal) - (scipy.special.logsumexp(logml) - np.log(len(configs)))) < 1e-9


def test_gradient_of_the_evidence_matches_finite_differences():
    X, y = map(jnp.asarray, _stream(3))
    learner = kalnat.ekf(MODEL, GAUSS, forgetting=0.95, prior_var=0.8)
    params = MODEL.init(None)

    # compiled: the evidence once for every difference (op by op, each operation compiled apiece)
    @jax.jit
    def evidence(lam, v):
        return kalnat.log_evidence(learner, learner.hyper._replace(forgetting=lam, prior_var=v), params, X, y)

    g_lam, g_v = jax.jit(jax.grad(evidence, argnums=(0, 1)))(0.95, 0.8)
    h = 1e-6
    fd_lam = (evidence(0.95 + h, 0.8) - evidence(0.95 - h, 0.8)) / (2 * h)
    fd_v = (evidence(0.95, 0.8 + h) - evidence(0.95, 0.8 - h)) / (2 * h)
    np.testing.assert_allclose([g_lam, g_v], [fd_lam, fd_v], rtol=1e-6)
    assert abs(float(g_lam)) > 1e-3 and abs(float(g_v)) > 1e-3  # not a trivially flat evidence
    # the same with the variance bound in the prediction step (the gradient passes through it):
    # a bound below the first prior's variances 0.8/λ, so that it binds (the evidence changes)
    bounded = learner.hyper._replace(max_variance=0.5)
    bounded_evidence = jax.jit(lambda lam: kalnat.log_evidence(learner, bounded._replace(forgetting=lam), params, X, y))
    assert abs(float(bounded_evidence(0.95)) - float(evidence(0.95, 0.8))) > 1e-3
    grad_b = jax.jit(jax.grad(bounded_evidence))(0.95)
    fd_b = (bounded_evidence(0.95 + h) - bounded_evidence(0.95 - h)) / (2 * h)
    np.testing.assert_allclose(grad_b, fd_b, rtol=1e-6)


# ---- normal–inverse-gamma --------------------------------------------------------------


def textbook_nig(X, y, *, v0, a0, b0, lam):
    """NumPy normal–inverse-gamma filter with discounting: V⁻ = V/λ, a⁻ = λa, b⁻ = λb; the
    predictive is Student-t(2a⁻, ŷ, (b⁻/a⁻)(a V⁻ aᵀ + 1))."""
    d = X.shape[1] + 1
    theta, V, a, b = np.zeros(d), v0 * np.eye(d), a0, b0
    lls = []
    for x, yt in zip(X, y):
        h = np.concatenate([[1.0], x])
        V, a, b = V / lam, lam * a, lam * b
        S = h @ V @ h + 1.0
        e = yt - h @ theta
        nu, scale = 2 * a, b / a * S
        lls.append(scipy.special.gammaln((nu + 1) / 2) - scipy.special.gammaln(nu / 2)
                   - 0.5 * np.log(nu * np.pi * scale) - (nu + 1) / 2 * np.log1p(e * e / (nu * scale)))
        k = V @ h / S
        theta, V = theta + k * e, V - np.outer(k, k) * S
        a, b = a + 0.5, b + 0.5 * e * e / S
    return np.array(lls), theta, V, a, b


@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_nig_predictive_is_the_exact_student_t_from_the_prior(lam):
    X, y = _stream(4)
    nig = kalnat.nig_filter(MODEL, prior_var=0.5, noise_shape=2.0, noise_scale=0.3, forgetting=lam)
    res = kalnat.fit(nig, nig.init(MODEL.init(None)), X, y)
    lls, theta, V, a, b = textbook_nig(X, y, v0=0.5, a0=2.0, b0=0.3, lam=lam)
    np.testing.assert_allclose(res.log_likelihood, lls, rtol=1e-10)
    np.testing.assert_allclose(_flat(res.state.params), theta, rtol=1e-10)
    np.testing.assert_allclose(kalnat.covariance(res.state), V, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose([res.state.cov.shape, res.state.cov.scale], [a, b], rtol=1e-10)


def test_nig_counts_rows_whose_jacobian_is_zero():
    """A row with H = 0 (no bias, x = 0) still observes the noise: a grows by ½ for every row."""
    model = kalnat.models.linear(2, bias=False)
    rng = np.random.default_rng(5)
    X = rng.normal(size=(25, 2))
    X[::3] = 0.0  # 9 rows where ŷ = 0 whatever θ is
    y = X @ np.array([1.0, -1.0]) + rng.normal(size=25) * 0.5
    nig = kalnat.nig_filter(model, prior_var=1.0, noise_shape=1.0, noise_scale=1.0)
    s = kalnat.fit(nig, nig.init(model.init(None)), X, y).state
    assert float(s.cov.shape) == 1.0 + 25 / 2
    # the exact conjugate posterior: b = b0 + ½ (yᵀy − μᵀ V⁻¹ μ) with V⁻¹ = V0⁻¹ + XᵀX, μ = V Xᵀy
    Vinv = np.eye(2) + X.T @ X
    mu = np.linalg.solve(Vinv, X.T @ y)
    assert abs(float(s.cov.scale) - (1.0 + 0.5 * (y @ y - mu @ Vinv @ mu))) < 1e-10


# ---- minibatches, masked rows, the public predict ----------------------------------------


@pytest.mark.parametrize("batch_size", [3, 4])
def test_minibatch_log_likelihoods_sum_to_the_exact_evidence(batch_size):
    """Rows of one minibatch share θ: each row's log-likelihood is conditioned on the rows before
    it, so a stream's sum is its exact marginal likelihood at any batch size (λ = 1, q = 0: a
    minibatch is then the same filter as rows one by one)."""
    X, y = _stream(6)
    learner = kalnat.ekf(MODEL, GAUSS, prior_var=0.7)
    one = kalnat.fit(learner, learner.init(MODEL.init(None)), X, y)
    many = kalnat.fit(learner, learner.init(MODEL.init(None)), X, y, batch_size=batch_size)
    np.testing.assert_allclose(many.log_likelihood, one.log_likelihood, rtol=1e-10)
    A = np.hstack([np.ones((N_ROWS, 1)), X])
    C = 0.7 * A @ A.T + R_NOISE * np.eye(N_ROWS)
    _, logdet = np.linalg.slogdet(C)
    exact = -0.5 * (y @ np.linalg.solve(C, y) + logdet + N_ROWS * np.log(2 * np.pi))
    assert abs(many.log_likelihood.sum() - exact) < 1e-10 * abs(exact)
    # the normal–inverse-gamma filter's Student-t chain rule: the same with unknown noise
    nig = kalnat.nig_filter(MODEL, prior_var=0.5, noise_shape=2.0, noise_scale=0.3)
    a = kalnat.fit(nig, nig.init(MODEL.init(None)), X, y)
    b = kalnat.fit(nig, nig.init(MODEL.init(None)), X, y, batch_size=batch_size)
    np.testing.assert_allclose(b.log_likelihood, a.log_likelihood, rtol=1e-10)


def test_skipped_rows_inside_minibatches_add_nothing_to_the_evidence():
    X, y = _stream(7)
    keep = np.ones(N_ROWS, bool)
    keep[[2, 5, 6, 13]] = False
    y_bad = y.copy()
    y_bad[~keep] = np.nan
    learner = kalnat.ekf(MODEL, GAUSS, prior_var=0.7)
    res = kalnat.fit(learner, learner.init(MODEL.init(None)), X, y_bad, batch_size=4, skip_bad_rows=True)
    alone = kalnat.fit(learner, learner.init(MODEL.init(None)), X[keep], y[keep], chunk_size=N_ROWS, fixed_chunk=True)
    assert np.all(np.isnan(res.log_likelihood[~keep]))
    np.testing.assert_allclose(np.nansum(res.log_likelihood), alone.log_likelihood.sum(), rtol=1e-10)
    # and a bank's evidence sees the same
    b = kbank.bank(learner, [dict(prior_var=0.7), dict(prior_var=2.0)])
    bs = kalnat.fit(b, b.init(MODEL.init(None)), X, y_bad, batch_size=4, skip_bad_rows=True).state
    np.testing.assert_allclose(bs.log_evidence[0], alone.log_likelihood.sum(), rtol=1e-10)


@pytest.mark.parametrize("learner", [EKF, SQRT, INFO], ids=lambda l: l.name)
def test_public_predict_is_the_predictive_of_the_next_prior(learner):
    """learner.predict(state, x) after t rows is N(ŷ, h P⁻ hᵀ + R) with P⁻ the prediction step
    of row t + 1 (forgetting, noise and bound applied), not the posterior P_t."""
    X, y = _stream(8)
    state = kalnat.fit(learner, learner.init(MODEL.init(None)), X[:-1], y[:-1], chunk_size=N_ROWS, fixed_chunk=True).state
    P = kalnat.covariance(state)
    pred = learner.predict(state, X[-1])
    lls, _, _ = textbook_kalman(X, y, prior_var=1.0, lam=0.9, q=0.02, cap=1.5)
    a = np.concatenate([[1.0], X[-1]])
    Pm = P / 0.9 + 0.02 * np.eye(4)
    s = np.where(np.diag(Pm) > 1.5, np.sqrt(1.5 / np.diag(Pm)), 1.0)
    Pm = Pm * np.outer(s, s)
    np.testing.assert_allclose(np.asarray(pred.obs_cov)[0, 0], a @ Pm @ a + R_NOISE, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(pred.mean_cov)[0, 0], a @ Pm @ a, rtol=1e-10)
    # the same number fit predicted for the last row
    last = kalnat.fit(learner, learner.init(MODEL.init(None)), X, y).predictions
    np.testing.assert_allclose(np.asarray(pred.obs_cov)[0, 0], np.asarray(last.obs_cov)[-1, 0, 0], rtol=1e-10)
    assert np.isfinite(lls).all()
