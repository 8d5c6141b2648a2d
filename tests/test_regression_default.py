"""`kalnat learn FILE --target y` with no settings on a gaussian target (issue 15): trending
series, the weight on forgetting members on a stream with no drift, and after an abrupt change.
Each runs the command's own runner (cli_runner.OnlineRunner) with the command's defaults."""

import numpy as np
import pytest

import kalnat
from kalnat import cli, cli_runner


def _default_cfg(**over):
    ctx = cli.learn.make_context("learn", ["data.csv"])
    kw = dict(ctx.params)
    kw.pop("data")
    return dict(cli._config(kw), **over)


def _learn(X, y, **over):
    runner = cli_runner.OnlineRunner(_default_cfg(**over), "gaussian", None, X.shape[1])
    return runner, runner.step(X, y)


def _forgetting_weight(runner):
    """``(n,)`` the weight of the members with λ < 1 when each row was predicted."""
    lam = np.asarray(runner.bank.hyper.forgetting)
    return runner.weights[:, lam < 1].sum(axis=1)


@pytest.mark.slow
def test_a_trending_series_is_forecast_after_its_lags_leave_the_early_range():
    """Flat for 256 rows, then rising 0.05 a row: in rows 257–511 the lags reach 12 deviations
    of the first 256 rows, the statistics the features and the target are expressed in until
    row 512. Clipped at ±5, a filter fitted to the clipped lags was re-expressed at row 512
    as if it had seen them whole: row 513 missed by 10, and later ones by up to 27 (noise sd
    1). Bounded by √(n − 1) (cli_runner.clip_bound: 16 here) and re-expressed exactly, every
    forecast from row 301 on stays within 5."""
    rng = np.random.default_rng(0)
    n = 1040
    level = np.where(np.arange(n + 2) < 258, 0.0, 0.05 * (np.arange(n + 2) - 258))
    s = level + rng.normal(size=n + 2)
    X = np.column_stack([s[1:-1], s[:-2]])  # lag 1, lag 2
    y = s[2:]
    _, pred = _learn(X, y)
    err = np.abs(y - pred.mean)
    z = (X[256:512, 0] - X[:256, 0].mean()) / X[:256, 0].std()
    assert z.max() > 10  # the lags did leave the early range
    assert err[300:].max() < 5.0 and np.sqrt(np.mean(err[300:] ** 2)) < 1.4
    assert np.all(np.isfinite(pred.var)) and np.all(pred.var[2:] > 0)


def _linear_stream(rng, n, w, noise=0.5):
    X = rng.normal(size=(n, len(w)))
    return X, X @ w + noise * rng.normal(size=n)


W_TRUE = np.array([1.0, -2.0, 0.5])


@pytest.mark.slow
def test_on_a_stationary_stream_the_weight_stays_on_members_that_do_not_forget():
    """No drift: after 1000 rows the members with λ < 1 hold under 0.2 of the weight (before:
    0.99, with λ = 0.99 on top, because the target's units moved under the filter)."""
    X, y = _linear_stream(np.random.default_rng(1), 1000, W_TRUE)
    runner, pred = _learn(X, y)
    w = _forgetting_weight(runner)
    lam = np.asarray(runner.bank.hyper.forgetting)
    final = kalnat.bank.weights(runner.state)[lam < 1].sum()
    assert final < 0.2 and w[-1] < 0.2 and w[500:].max() < 0.2
    assert np.sqrt(np.mean((y[100:] - pred.mean[100:]) ** 2)) < 0.6  # noise sd 0.5


@pytest.mark.slow
def test_after_an_abrupt_change_the_weight_moves_to_forgetting_within_50_rows():
    """The weights flip sign at row 601: the forgetting members (under 0.2 before) hold most of
    the weight within 50 rows, and the forecasts recover."""
    rng = np.random.default_rng(2)
    X, _ = _linear_stream(rng, 720, W_TRUE)
    y = np.where(np.arange(720) < 600, X @ W_TRUE, -X @ W_TRUE) + 0.5 * rng.normal(size=720)
    runner, pred = _learn(X, y)
    w = _forgetting_weight(runner)
    assert w[520:600].max() < 0.2
    assert w[600:650].max() > 0.5 and w[649] > 0.5
    assert np.sqrt(np.mean((y[680:] - pred.mean[680:]) ** 2)) < 1.0


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_target_reexpression_keeps_every_prediction(covariance):
    """Moving a normal–inverse-gamma filter (and a bank of them) to new target coordinates
    changes no prediction in the target's units: float64, relative 1e-10."""
    rng = np.random.default_rng(3)
    X, y = _linear_stream(rng, 40, W_TRUE)
    y = 50.0 + 10.0 * y
    for cfg in (dict(), dict(method="nig", prior_var=1.0, forgetting=0.99)):
        runner = cli_runner.OnlineRunner(_default_cfg(covariance=covariance, **cfg), "gaussian", None, 3)
        runner.step(X[:20], y[:20])
        Z = (X[20:] - runner.coords[0]) / runner.coords[1]
        old = runner.target_coords
        new = (old[0] + 7.0, old[1] * 1.7)
        before = runner.learner.predict(runner.state, Z)
        moved = cli_runner._target_moved(runner, runner.state, old, new)
        after = runner.learner.predict(moved, Z)
        a = old[1] / new[1]
        m0 = old[0] + old[1] * np.asarray(before.mean)[:, 0]
        m1 = new[0] + new[1] * np.asarray(after.mean)[:, 0]
        np.testing.assert_allclose(m1, m0, rtol=1e-10)
        # the predictive scale (noise included) in the target's units
        np.testing.assert_allclose(new[1] ** 2 * np.asarray(after.obs_cov)[:, 0, 0],
                                   old[1] ** 2 * np.asarray(before.obs_cov)[:, 0, 0], rtol=1e-10)
        assert a != 1.0


def test_bank_prior_weights_are_the_posterior_over_members():
    """With prior weights π and no fixed share, the weights after t rows are π_k·evidence_k,
    normalised (float64, 1e-10); a uniform π, with a fixed share mixing it back in, gives the
    uniform bank's weights to rounding."""
    rng = np.random.default_rng(4)
    model = kalnat.models.linear(3)
    X, y = _linear_stream(rng, 60, W_TRUE)
    fam = kalnat.families.Gaussian(0.3)
    prior = np.array([0.5, 0.1, 0.3, 0.1])
    configs = [dict(prior_var=v, forgetting=f) for v in (0.1, 1.0) for f in (1.0, 0.95)]
    weighted = kalnat.bank.bank(kalnat.ekf(model, fam), configs, prior=prior)
    state = kalnat.fit(weighted, weighted.init(model.init(None)), X, y).state
    post = np.log(prior) + np.asarray(state.log_evidence)
    post = np.exp(post - post.max())
    np.testing.assert_allclose(kalnat.bank.weights(state), post / post.sum(), rtol=1e-10)
    uniform = kalnat.bank.bank(kalnat.ekf(model, fam), configs, share=0.05)
    flat = kalnat.bank.bank(kalnat.ekf(model, fam), configs, prior=np.ones(4), share=0.05)
    a = kalnat.fit(uniform, uniform.init(model.init(None)), X, y).state
    b = kalnat.fit(flat, flat.init(model.init(None)), X, y).state
    np.testing.assert_allclose(kalnat.bank.weights(b), kalnat.bank.weights(a), rtol=1e-12)
    with pytest.raises(ValueError, match="prior must hold 4 positive weights"):
        kalnat.bank.bank(kalnat.ekf(model, fam), configs, prior=[1.0, 0.0, 1.0, 1.0])
    # the default for a gaussian target: GAUSSIAN_FORGETTING_MASS on the members with λ < 1
    auto = kalnat.auto(model, kalnat.families.Gaussian(1.0))
    lam = np.asarray(auto.hyper.forgetting)
    np.testing.assert_allclose(np.exp(auto.log_prior)[lam < 1].sum(), kalnat.bank.GAUSSIAN_FORGETTING_MASS,
                               rtol=1e-12)
