"""Moderated predictive probabilities against numerical integration over the Gaussian posterior."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import scipy.integrate
import scipy.stats
from scipy.special import expit, gammaln

import kalnat
from kalnat import predictive

BERN = kalnat.families.Bernoulli()
CAT3 = kalnat.families.Categorical(3)
CAT2 = kalnat.families.Categorical(2)
POIS = kalnat.families.Poisson()
GH_X, GH_W = np.polynomial.hermite_e.hermegauss(120)
GH_W = GH_W / np.sqrt(2 * np.pi)   # E f(z), z ~ N(0, 1)  ≈  Σ w f(x)


def _state(family, seed, scale=0.6):
    """A linear model's filter state with a random (non-diagonal) covariance."""
    model = kalnat.models.linear(3, family.n_outputs)
    learner = kalnat.ekf(model, family, prior_var=1.0)
    rng = np.random.default_rng(seed)
    s = learner.init(jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)),
                                            model.init(None)))
    d = kalnat.covariance(s).shape[0]
    L = rng.normal(size=(d, d)) * scale / np.sqrt(d)
    return model, learner, kalnat.with_covariance(s, s.params, L @ L.T + 1e-3 * np.eye(d))


def _logit_moments(model, s, x):
    """Exact mean and covariance of the raw output z = f(θ, x) under N(θ, P) (z is linear in θ)."""
    theta, unravel = jax.flatten_util.ravel_pytree(s.params)
    f = lambda th: jnp.atleast_1d(model.apply(unravel(th), x))
    J = np.asarray(jax.jacobian(f)(theta))
    return np.asarray(f(theta)), J @ kalnat.covariance(s) @ J.T


@pytest.mark.parametrize("family", [BERN, CAT3, POIS], ids=lambda f: f.name)
def test_logit_covariance_is_exact(family):
    model, learner, s = _state(family, 0)
    x = np.array([0.5, -1.0, 2.0])
    pred = learner.predict(s, x)
    _, cz = _logit_moments(model, s, x)
    got = np.asarray(predictive.logit_cov(family, pred.mean, pred.mean_cov))
    np.testing.assert_allclose(got, cz, rtol=1e-9, atol=1e-12 * np.abs(cz).max())


def test_bernoulli_probit_against_integration():
    # the probit approximation's error is at most ~0.013 over these means and deviations
    worst = 0.0
    for mu in np.linspace(-6, 6, 25):
        for sd in np.linspace(0, 5, 21):
            p = expit(mu)
            mean_cov = jnp.asarray([[(p * (1 - p) * sd) ** 2]])
            q = float(predictive.moderated_probs(BERN, jnp.asarray([p]), mean_cov)[1])
            exact = GH_W @ expit(mu + sd * GH_X)
            worst = max(worst, abs(q - exact))
            if sd == 0:
                assert abs(q - p) < 1e-12
            else:  # moderated toward ½, never past it
                assert abs(q - 0.5) <= abs(p - 0.5) + 1e-15 and (q - 0.5) * (p - 0.5) >= 0
    assert worst < 0.015


def test_bernoulli_from_a_learner_state():
    model, learner, s = _state(BERN, 1)
    for x in np.random.default_rng(2).normal(size=(5, 3)):
        pred = learner.predict(s, x)
        m, cz = _logit_moments(model, s, x)
        q = float(predictive.moderated_probs(BERN, pred.mean, pred.mean_cov)[1])
        exact = GH_W @ expit(m[0] + np.sqrt(cz[0, 0]) * GH_X)
        assert abs(q - exact) < 0.015
        assert abs(q - float(expit(m[0] / np.sqrt(1 + np.pi * cz[0, 0] / 8)))) < 1e-12


def test_categorical_analogue():
    model, learner, s = _state(CAT3, 3, scale=0.5)
    for x in np.random.default_rng(4).normal(size=(6, 3)):
        pred = learner.predict(s, x)
        m, cz = _logit_moments(model, s, x)
        q = np.asarray(predictive.moderated_probs(CAT3, pred.mean, pred.mean_cov))
        assert abs(q.sum() - 1) < 1e-12 and np.all(q > 0)
        # E softmax(z) by a tensor Gauss–Hermite rule over the K − 1 free logits
        Lc = np.linalg.cholesky(cz)
        Z = m + np.stack(np.meshgrid(GH_X, GH_X, indexing="ij"), -1) @ Lc.T
        logits = np.concatenate([Z, np.zeros(Z.shape[:2] + (1,))], -1)
        P = np.exp(logits - logits.max(-1, keepdims=True))
        exact = np.einsum("i,j,ijk->k", GH_W, GH_W, P / P.sum(-1, keepdims=True))
        assert np.max(np.abs(q - exact)) < 0.03
        # closer to the truth than the plug-in softmax, which ignores the uncertainty
        assert np.max(np.abs(q - exact)) < np.max(np.abs(np.asarray(pred.probs) - exact))
    # no uncertainty: the plug-in probabilities
    q0 = predictive.moderated_probs(CAT3, pred.mean, jnp.zeros((2, 2)))
    np.testing.assert_allclose(q0, pred.probs, rtol=1e-12)


def test_two_class_categorical_is_the_bernoulli_probit():
    for p, var in [(0.3, 0.02), (0.9, 0.004), (0.6, 0.1)]:
        yhat, c = jnp.asarray([p]), jnp.asarray([[var]])
        # categorical's free logit is class 0's, Bernoulli's is class 1's (−z, same variance)
        qc = predictive.moderated_probs(CAT2, yhat, c)
        qb = predictive.moderated_probs(BERN, jnp.asarray([1 - p]), c)
        np.testing.assert_allclose(qc, qb, rtol=1e-12)
        assert abs(float(qc[0]) - p) > 1e-4


def test_poisson_moderated_log_predictive_against_quad():
    for lam, sd, y in [(3.0, 0.3, 5), (0.5, 0.8, 0), (20.0, 0.1, 17), (1.0, 0.0, 2)]:
        got = float(predictive.log_predictive(POIS, jnp.asarray([lam]), jnp.asarray([[(lam * sd) ** 2]]),
                                              None, jnp.asarray(y), moderated=True))
        if sd == 0:
            exact = y * np.log(lam) - lam - gammaln(y + 1)
        else:
            f = lambda z: np.exp(y * z - np.exp(z) - gammaln(y + 1)) * scipy.stats.norm.pdf(z, np.log(lam), sd)
            exact = np.log(scipy.integrate.quad(f, np.log(lam) - 12 * sd, np.log(lam) + 12 * sd,
                                                epsabs=0, epsrel=1e-13)[0])
        # the 20-node Gauss–Hermite rule: ~1e-9 at a log-rate deviation of 0.8
        assert abs(got - exact) < 1e-8 * max(1, abs(exact)), (lam, sd, y)
        plug = float(predictive.log_predictive(POIS, jnp.asarray([lam]), jnp.zeros((1, 1)), None,
                                               jnp.asarray(y)))
        assert abs(plug - (y * np.log(lam) - lam - gammaln(y + 1))) < 1e-12


def test_gaussian_log_predictive_and_student_t():
    rng = np.random.default_rng(5)
    L = rng.normal(size=(2, 2))
    cov = L @ L.T + np.eye(2)
    y, m = rng.normal(size=2), rng.normal(size=2)
    fam = kalnat.families.Gaussian(1.0, dim=2)
    got = predictive.log_predictive(fam, jnp.asarray(m), None, jnp.asarray(cov), jnp.asarray(y))
    assert abs(float(got) - scipy.stats.multivariate_normal.logpdf(y, m, cov)) < 1e-12
    t = predictive.student_t_log_prob(jnp.asarray(y), jnp.asarray(m), jnp.asarray(cov), 3.5)
    assert abs(float(t) - scipy.stats.multivariate_t.logpdf(y, m, cov, df=3.5)) < 1e-12


def test_moderated_probs_refuses_other_families():
    with pytest.raises(ValueError, match="classifiers"):
        predictive.moderated_probs(POIS, jnp.asarray([1.0]), jnp.zeros((1, 1)))
