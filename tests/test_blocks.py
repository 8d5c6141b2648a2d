"""Per-group blocks (the decoupled EKF), one new file on the covariance interface: one block is
the EKF; blocks whose Fisher never couples them are the exact filter; any grouping runs in a
bank and under RTRL."""

import jax
import numpy as np
import pytest

import kalnat
from kalnat import recurrent
from kalnat.representations import Blocks


def _rows(seed, n=40):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = (rng.random(n) < 1 / (1 + np.exp(-X @ rng.normal(size=4)))).astype(int)
    return X, y


@pytest.mark.parametrize("forgetting,q,cap", [(1.0, 0.0, None), (0.9, 0.01, 0.8)])
def test_one_block_is_the_ekf(forgetting, q, cap):
    X, y = _rows(0)
    model = kalnat.models.mlp(4, (3,), 1)
    params = model.init(jax.random.PRNGKey(0))
    opts = dict(prior_var=0.5, forgetting=forgetting, process_noise=q, max_variance=cap)
    d = sum(np.size(a) for a in jax.tree_util.tree_leaves(params))
    a = kalnat.ekf(model, kalnat.families.Bernoulli(), **opts)
    b = kalnat.ekf(model, kalnat.families.Bernoulli(), representation=Blocks((d,)), **opts)
    ra, rb = (kalnat.fit(l, l.init(params), X, y) for l in (a, b))
    np.testing.assert_allclose(kalnat.covariance(rb.state), kalnat.covariance(ra.state), rtol=1e-8, atol=1e-13)
    np.testing.assert_allclose(rb.log_likelihood, ra.log_likelihood, rtol=1e-8)


def test_blocks_that_the_fisher_never_couples_are_exact():
    """Two outputs of a Gaussian with diagonal noise, each from its own weights: the exact
    covariance stays block-diagonal over (b, w) rows of each output... grouped per output."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 3))
    Y = X @ rng.normal(size=(3, 2)) + 0.3 * rng.normal(size=(50, 2))

    def apply(theta, x):  # output k uses θ[4k:4k+4] only
        return jax.numpy.stack([theta[0:3] @ x + theta[3], theta[4:7] @ x + theta[7]])

    fam = kalnat.families.Gaussian(np.array([0.2, 0.5]))
    exact = kalnat.ekf(apply, fam, prior_var=0.7, forgetting=0.95, input_shape=(3,))
    blocks = kalnat.ekf(apply, fam, prior_var=0.7, forgetting=0.95, input_shape=(3,), representation=Blocks((4, 4)))
    theta0 = jax.numpy.zeros(8)
    ra, rb = (kalnat.fit(l, l.init(theta0), X, Y) for l in (exact, blocks))
    np.testing.assert_allclose(rb.state.params, ra.state.params, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(kalnat.covariance(rb.state), kalnat.covariance(ra.state), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(rb.log_likelihood, ra.log_likelihood, rtol=1e-10)


def test_per_leaf_blocks_run_in_a_bank_and_under_rtrl():
    X, y = _rows(2, n=30)
    model = kalnat.models.mlp(4, (3,), 1)
    params = model.init(jax.random.PRNGKey(1))
    learner = kalnat.ekf(model, kalnat.families.Bernoulli(), representation=Blocks.per_leaf(params))
    state = learner.init(params)
    assert [b.shape for b in state.cov.blocks] == [(np.size(a), np.size(a)) for a in jax.tree_util.tree_leaves(params)]
    b = kalnat.bank.bank(learner, [dict(prior_var=0.3), dict(prior_var=3.0)])
    assert np.isfinite(kalnat.fit(b, b.init(params), X, y).state.log_marginal)
    cell = recurrent.elman(1, 3)
    cp = cell.init(jax.random.PRNGKey(0))
    rt = recurrent.rtrl(cell, kalnat.families.Gaussian(0.3), representation=Blocks.per_leaf(cp), prior_var=0.5)
    z = np.sin(0.3 * np.arange(61))
    assert np.all(np.isfinite(recurrent.fit_sequence(rt, rt.init(cp), z[:-1, None], z[1:]).log_likelihood))
    with pytest.raises(ValueError, match="cover"):
        kalnat.ekf(model, kalnat.families.Bernoulli(), representation=Blocks((3,))).init(params)
