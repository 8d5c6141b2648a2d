"""The normal–inverse-gamma filter is the batch conjugate posterior of a linear-Gaussian model."""

import numpy as np
import jax
import pytest
import scipy.stats

import kalnat

P_FEAT, N_ROWS = 3, 30
R0 = 0.5          # the family's covariance: the noise is σ² R0 with σ² unknown
V0, A0, B0 = 2.0, 1.5, 0.8
MODEL = kalnat.models.linear(P_FEAT)
GAUSS = kalnat.families.Gaussian(R0)
NIG = kalnat.nig_filter(MODEL, GAUSS, prior_var=V0, noise_shape=A0, noise_scale=B0)
# one member, no share: the bank's row log-probabilities are the filter's own predictive
NIG_ONE = kalnat.bank.bank(NIG, [dict(prior_var=V0)])


def _data(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N_ROWS, P_FEAT))
    y = X @ np.array([1.0, -0.5, 2.0]) + 0.7 + rng.normal(size=N_ROWS) * 0.9
    # θ is ravelled as (b, w): the design's first column is the intercept
    return X, y, np.hstack([np.ones((N_ROWS, 1)), X])


def _posterior(A, y):
    """Conjugate posterior (mean, V, a, b) of θ, σ² after the rows of A, y (prior mean 0)."""
    n, d = A.shape
    prec = np.eye(d) / V0 + A.T @ A / R0
    V = np.linalg.inv(prec)
    mean = V @ (A.T @ y / R0)
    a = A0 + n / 2
    b = B0 + 0.5 * (y @ y / R0 - mean @ prec @ mean)
    return mean, V, a, b


def _rel(a, b):
    return np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("batch_size", [1, 4, 30])
def test_filter_equals_batch_conjugate_posterior(batch_size):
    X, y, A = _data()
    res = kalnat.fit(NIG, NIG.init(MODEL.init(None)), X, y, batch_size=batch_size)
    s = res.state
    mean, V, a, b = _posterior(A, y)
    theta = np.asarray(jax.flatten_util.ravel_pytree(s.params)[0])
    assert _rel(theta, mean) < 1e-9
    assert _rel(kalnat.covariance(s), V) < 1e-9
    # batch 4 leaves a last minibatch of 2 real rows and 2 masked ones: they add nothing
    assert abs(float(s.cov.shape) / a - 1) < 1e-12
    assert abs(float(s.cov.scale) / b - 1) < 1e-9


def test_student_t_predictive_is_the_exact_posterior_predictive():
    X, y, A = _data(1)
    res = kalnat.fit(NIG_ONE, NIG_ONE.init(MODEL.init(None)), X, y)
    row_ll = np.asarray(res.predictions.log_prob)
    for t in (0, 1, 7, N_ROWS - 1):
        if t == 0:
            mean, V, a, b = np.zeros(P_FEAT + 1), V0 * np.eye(P_FEAT + 1), A0, B0
        else:
            mean, V, a, b = _posterior(A[:t], y[:t])
        scale = np.sqrt(b / a * (R0 + A[t] @ V @ A[t]))
        exact = scipy.stats.t.logpdf(y[t], df=2 * a, loc=A[t] @ mean, scale=scale)
        assert abs(row_ll[t] - exact) < 1e-10 * max(1.0, abs(exact))
    # their sum is the evidence: the n-dimensional Student-t marginal of y under the prior
    cov = B0 / A0 * (R0 * np.eye(N_ROWS) + V0 * A @ A.T)
    log_ml = scipy.stats.multivariate_t.logpdf(y, loc=np.zeros(N_ROWS), shape=cov, df=2 * A0)
    assert abs(float(res.state.log_evidence[0]) / log_ml - 1) < 1e-10
    assert abs(row_ll.sum() / log_ml - 1) < 1e-10


def test_predictive_scale_and_noise_estimate():
    X, y, A = _data(2)
    s = kalnat.fit(NIG, NIG.init(MODEL.init(None)), X[:-1], y[:-1]).state
    mean, V, a, b = _posterior(A[:-1], y[:-1])
    pred = NIG.predict(s, X[-1])
    assert abs(float(pred.mean[0]) - A[-1] @ mean) < 1e-10
    np.testing.assert_allclose(pred.obs_cov[0, 0], b / a * (R0 + A[-1] @ V @ A[-1]), rtol=1e-9)
    np.testing.assert_allclose(pred.mean_cov[0, 0], b / a * (A[-1] @ V @ A[-1]), rtol=1e-9)
    np.testing.assert_allclose(kalnat.learners.nig.noise_var(s), b / (a - 1), rtol=1e-9)


def test_needs_a_gaussian_family_and_positive_noise_prior():
    with pytest.raises(ValueError, match="Gaussian"):
        kalnat.nig_filter(MODEL, kalnat.families.Bernoulli())
    with pytest.raises(ValueError, match="positive"):
        kalnat.nig_filter(MODEL, GAUSS, noise_shape=0.0)


def test_nig_filter_needs_no_family():
    """The gaussian-target learner of the README's table: Gaussian(1) by default (σ² is the
    noise variance itself); another family is refused by name."""
    model = kalnat.models.linear(2)
    learner = kalnat.nig_filter(model, prior_var=1.0)
    state, pred = learner.update(learner.init(model.init(None)), np.array([0.5, -1.0]), 0.3)
    assert learner.family.name == "gaussian" and np.isfinite(np.asarray(pred.obs_cov)).all()
    with pytest.raises(ValueError, match="Gaussian family"):
        kalnat.nig_filter(model, kalnat.families.Bernoulli())
