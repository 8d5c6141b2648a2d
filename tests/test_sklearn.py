"""kalnat.sklearn: scikit-learn's own estimator checks, and the estimators against the filters."""

import contextlib
import os
import re

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

import kalnat
from kalnat.sklearn import KalmanClassifier, KalmanRegressor, _alive, _reexpress

# One core filter keeps the checks' many small compilations cheap; the bank ("auto") runs the
# same code paths and is exercised below.
CHECKED = [KalmanClassifier(method="ekf"), KalmanRegressor(method="ekf")]


def _expected_failures(estimator):
    return {}  # every check applies and passes


@parametrize_with_checks(CHECKED, expected_failed_checks=_expected_failures)
def test_sklearn_checks(estimator, check):
    check(estimator)


def _data(n=60, p=3, seed=0, scale=None):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) * (1.0 if scale is None else scale)
    w = rng.normal(size=p)
    z = (X / (1.0 if scale is None else scale)) @ w
    return X, z + 0.3 * rng.normal(size=n), (z + 0.5 * rng.normal(size=n) > 0).astype(int)


def test_regressor_is_the_filter_with_its_predictive():
    """Unstandardised, the regressor is kalnat.ekf on the rows, and return_std is the
    predictive's sqrt(h P⁻ hᵀ + R)."""
    X, y, _ = _data()
    reg = KalmanRegressor(method="ekf", prior_var=0.5, noise_var=0.2, standardize=False).fit(X[:40], y[:40])
    model = kalnat.models.linear(3)
    learner = kalnat.ekf(model, kalnat.families.Gaussian(0.2), prior_var=0.5)
    state = kalnat.fit(learner, learner.init(model.init(None)), X[:40], y[:40]).state
    pred = learner.predict(state, X[40:])
    mean, sd = reg.predict(X[40:], return_std=True)
    np.testing.assert_allclose(mean, np.asarray(pred.mean)[:, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sd, np.sqrt(np.asarray(pred.obs_cov)[:, 0, 0]), rtol=1e-10)


def test_partial_fit_in_chunks_is_fit():
    X, y, _ = _data()
    whole = KalmanRegressor(method="ekf", standardize=False).fit(X, y)
    parts = KalmanRegressor(method="ekf", standardize=False)
    for i in range(0, 60, 7):
        parts.partial_fit(X[i:i + 7], y[i:i + 7])
    np.testing.assert_allclose(parts.predict(X), whole.predict(X), rtol=1e-10)


@pytest.mark.parametrize("method", ["ekf", "auto"])
def test_reexpression_keeps_every_prediction(method):
    """Moving the filter (a core learner's state or a bank's) to new feature coordinates
    changes no prediction: neither the mean (θ) nor its standard deviation (P)."""
    X, y, _ = _data(p=2)
    reg = KalmanRegressor(method=method).fit(X[:30], y[:30])
    before = reg.predict(X[30:], return_std=True)
    new = type(reg.coords_)(reg.coords_.center + np.array([0.7, -0.2]), reg.coords_.scale * np.array([3.0, 0.5]))
    reg.state_ = _reexpress(reg.learner_, reg.state_, reg.coords_, new, linear=False)   # exactly
    reg.coords_ = new
    after = reg.predict(X[30:], return_std=True)
    np.testing.assert_allclose(after[0], before[0], rtol=1e-9)
    np.testing.assert_allclose(after[1], before[1], rtol=1e-9)


@pytest.mark.parametrize("first,hidden,lam", [(20, None, 1.0), (1, None, 1.0), (1, (), 1.0),  # (): no hidden layer
                                               (20, None, 0.97)])
def test_partial_fit_with_moving_statistics_is_the_filter_in_the_last_coordinates(first, hidden, lam):
    """Two partial_fit calls, the statistics moving between them, equal kalnat.ekf run on all
    rows in the last call's coordinates from the prior 0.8·I stated there: the first rows'
    information moved exactly (a linear-Gaussian model's does not depend on θ), the prior set
    afresh. Moved exactly, the prior would be the first one carried there, A P₀ Aᵀ (w' =
    w·s₂/s₁, b' = b + w·(c₂ − c₁)/s₁): after a first call of one row (s₁ = 1, no deviation
    yet), a prior in the features' raw units. Under forgetting the prior restated carries the
    weight forgetting has left of it, λ^t."""
    X, y, _ = _data(p=3)
    X = X * np.array([30.0, 1.0, 0.01])
    reg = KalmanRegressor(method="ekf", prior_var=0.8, noise_var=0.5, hidden=hidden, forgetting=lam)
    with pytest.warns(UserWarning, match="no deviation") if first == 1 else contextlib.nullcontext():
        reg.partial_fit(X[:first], y[:first])
    reg.partial_fit(X[first:], y[first:])
    c2, s2 = X.mean(0), X.std(0)
    cy, sy = reg.target_coords_
    model = kalnat.models.linear(3)
    learner = kalnat.ekf(model, kalnat.families.Gaussian(0.5), prior_var=0.8, forgetting=lam)
    state = kalnat.fit(learner, learner.init(model.init(None)), (X - c2) / s2, (y - cy) / sy).state
    pred = learner.predict(state, (X - c2) / s2)
    mean, sd = reg.predict(X, return_std=True)
    np.testing.assert_allclose(mean, cy + sy * np.asarray(pred.mean)[:, 0], rtol=1e-9)
    np.testing.assert_allclose(sd, sy * np.sqrt(np.asarray(pred.obs_cov)[:, 0, 0]), rtol=1e-9)


def test_a_first_call_without_a_target_deviation_warns_a_core_regressor():
    """One row gives the target no scale: a core method's noise_var is then in the target's own
    units, and a warning says so; the bank learns its noise scale, and several rows give one."""
    import warnings

    X, y, _ = _data()
    with pytest.warns(UserWarning, match="noise_var is in the target's own units"):
        KalmanRegressor(method="ekf").partial_fit(X[:1], y[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KalmanRegressor(method="ekf").partial_fit(X[:2], y[:2])
        KalmanRegressor(method="auto").partial_fit(X[:1], y[:1])
        KalmanRegressor(method="ekf", standardize=False).partial_fit(X[:1], y[:1])


def test_standardised_features_make_units_irrelevant():
    """Features in wildly different units give the same classifier as unit-scale ones, also
    learned in several partial_fit calls (statistics moving, the filter re-expressed)."""
    scale = np.array([1e-3, 1.0, 1e3])
    X, _, c = _data(scale=scale)
    a = KalmanClassifier(method="ekf")
    b = KalmanClassifier(method="ekf")
    for i in range(0, 60, 20):
        a.partial_fit(X[i:i + 20], c[i:i + 20], classes=[0, 1])
        b.partial_fit(X[i:i + 20] / scale, c[i:i + 20], classes=[0, 1])
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X / scale), rtol=1e-8)
    # On the raw features the same prior is far too tight for the feature in 1e-3 units.
    raw = KalmanClassifier(method="ekf", standardize=False).fit(X, c)
    loss = lambda clf: -np.mean(np.log(clf.predict_proba(X)[np.arange(60), c]))  # noqa: E731
    assert loss(a) < loss(raw)  # 0.259 against 0.294


def _in_chunks(clf, X, c, size=7):
    for i in range(0, len(c), size):
        clf.partial_fit(X[i:i + size], c[i:i + size], classes=[0, 1])
    return clf


def test_equivalent_methods_agree():
    """ekf, sqrt_ekf, information_filter and natural_gradient are one filter (docs/method.md §3),
    also learned in chunks, each re-expression restating the prior in its own form."""
    X, _, c = _data(n=40, scale=np.array([1.0, 10.0, 0.1]))
    ref = KalmanClassifier(method="ekf", prior_var=2.0, forgetting=0.99).fit(X, c).predict_proba(X)
    chunked = _in_chunks(KalmanClassifier(method="ekf", prior_var=2.0, forgetting=0.99), X, c).predict_proba(X)
    for method in ("sqrt_ekf", "information_filter", "natural_gradient"):
        got = KalmanClassifier(method=method, prior_var=2.0, forgetting=0.99).fit(X, c).predict_proba(X)
        np.testing.assert_allclose(got, ref, rtol=1e-8, err_msg=method)
        got = _in_chunks(KalmanClassifier(method=method, prior_var=2.0, forgetting=0.99), X, c).predict_proba(X)
        np.testing.assert_allclose(got, chunked, rtol=1e-8, err_msg=method)


def test_multiclass_mlp_structured_covariances():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(90, 2))
    y = np.array(["a", "b", "c"])[np.argmax(X @ rng.normal(size=(2, 3)), axis=1)]
    for cov in ("blocks", "diag", "lowrank:3", "kron", "last-layer:2"):
        clf = KalmanClassifier(hidden=(4,), method="ekf", covariance=cov, prior_var=0.5).fit(X, y)
        proba = clf.predict_proba(X)
        assert proba.shape == (90, 3) and np.allclose(proba.sum(axis=1), 1.0)
        assert clf.score(X, y) > 0.6


def test_bad_settings_and_input_are_reported():
    X, _, c = _data(n=10)
    with pytest.raises(ValueError, match="classes must be given"):
        KalmanClassifier().partial_fit(X, c)
    with pytest.raises(ValueError, match="method must be one of"):
        KalmanClassifier(method="sgd").fit(X, c)
    with pytest.raises(ValueError, match="method='auto' chooses"):
        KalmanClassifier(prior_var=1.0).fit(X, c)
    with pytest.raises(ValueError, match="covariance='diag' is an option"):
        KalmanClassifier(method="sqrt_ekf", covariance="diag").fit(X, c)
    with pytest.raises(ValueError, match="covariance must be one of"):
        KalmanClassifier(covariance="lowrank:0").fit(X, c)
    with pytest.raises(ValueError, match=r"prior_var must be a positive number, got -1"):
        KalmanClassifier(method="ekf", prior_var=-1).fit(X, c)
    with pytest.raises(ValueError, match=r"forgetting must be a number in \(0, 1\], got 2"):
        KalmanClassifier(method="ekf", forgetting=2).fit(X, c)
    with pytest.raises(ValueError, match="noise_var must be a positive number, got 0"):
        KalmanRegressor(method="ekf", noise_var=0).fit(X, X[:, 0])
    # beyond ±1e150 a running variance overflows: at 1e160 the classifier learned nothing (a
    # score of 0.525) and the regressor predicted NaN, with no error
    for fit, at in ((lambda: KalmanClassifier(method="ekf").fit(X * 1e160, c), "X[0, 0]"),
                    (lambda: KalmanRegressor(method="ekf").fit(X, X[:, 0] * 1e160), "y[0]"),
                    (lambda: KalmanRegressor(method="ekf").partial_fit(X * 1e160, X[:, 0]), "X[0, 0]"),
                    (lambda: KalmanClassifier(method="ekf").fit(X, c).predict(X * 1e160), "X[0, 0]")):
        with pytest.raises(ValueError, match=re.escape(at) + r": value '\S+' is too large \(beyond ±1e\+150"):
            fit()
    # (NumPy's "ufunc 'absolute' did not contain a loop", or "could not convert string to float")
    for y in (np.full(len(c), "a"), ["a"] * len(c), np.array([1.0] * (len(c) - 1) + ["a"], object)):
        with pytest.raises(ValueError, match=re.escape("y must be numbers (a regression target), got values such as 'a'")):
            KalmanRegressor(method="ekf").fit(X, y)
    for one, shown in ((np.full(len(c), 3), "(3)"), (np.full(len(c), "a"), "('a')")):   # not (np.int64(3))
        with pytest.raises(ValueError, match=re.escape(f"needs samples of at least 2 classes; got 1 class {shown}")):
            KalmanClassifier(method="ekf").fit(X, one)
    clf = KalmanClassifier(method="ekf").partial_fit(X, c, classes=[0, 1])
    with pytest.raises(ValueError, match=r"label [56] is not one of the classes \[0, 1\]"):   # not np.int64(5)
        clf.partial_fit(X, c + 5)
    with pytest.raises(ValueError, match=r"classes \[0, 2\] differ from those of the first call \[0, 1\]"):
        clf.partial_fit(X, c, classes=[0, 2])
    np.testing.assert_allclose(clf.predict_log_proba(X), np.log(clf.predict_proba(X)), rtol=1e-12)
    # scikit-learn's conventions: hidden=4 is (4,); random_state a RandomState or a Generator,
    # a seed drawn from a copy (the same network each time); a float or a string is refused
    mlp = KalmanClassifier(hidden=4, method="ekf").fit(X, c)
    assert mlp.learner_key_[2] == (4,)
    for rng in (np.random.RandomState(0), np.random.default_rng(0)):
        keys = {KalmanClassifier(hidden=(3,), method="ekf", random_state=rng).fit(X, c).learner_key_ for _ in range(2)}
        assert len(keys) == 1
    for bad, message in ((1.5, "random_state must be an int"), ("0", "random_state must be an int")):
        with pytest.raises(ValueError, match=message):
            KalmanClassifier(method="ekf", random_state=bad).fit(X, c)
    with pytest.raises(ValueError, match=r"hidden\[1\] must be a positive integer, got 2.5"):
        KalmanClassifier(hidden=(3, 2.5), method="ekf").fit(X, c)


def test_settings_changed_between_partial_fits_are_taken_or_refused():
    """set_params between partial_fit calls: the regressor's noise_var applies from the next row,
    the filter that had it from there; a change the state learned so far holds (method, model,
    covariance, its prior and forgetting, which each re-expression restates) is a ValueError
    (it was ignored). A RandomState that moved between the calls is no change."""
    X, y, _ = _data()
    a = KalmanRegressor(method="ekf", standardize=False, forgetting=0.9).partial_fit(X[:30], y[:30])
    a.set_params(noise_var=0.5).partial_fit(X[30:], y[30:])
    model = kalnat.models.linear(3)
    first = kalnat.ekf(model, kalnat.families.Gaussian(1.0), forgetting=0.9)
    state = kalnat.fit(first, first.init(model.init(None)), X[:30], y[:30]).state
    then = kalnat.ekf(model, kalnat.families.Gaussian(0.5), forgetting=0.9)
    state = kalnat.fit(then, state, X[30:], y[30:]).state
    np.testing.assert_allclose(a.predict(X), np.asarray(then.predict(state, X).mean)[:, 0], rtol=1e-10)
    for change in (dict(method="auto", forgetting=None), dict(hidden=(3,)), dict(covariance="diag"),
                   dict(forgetting=0.9), dict(prior_var=0.5)):
        b = KalmanRegressor(method="ekf").partial_fit(X[:30], y[:30])
        with pytest.raises(ValueError, match=f"{next(iter(change))} changed"):
            b.set_params(**change).partial_fit(X[30:], y[30:])
    rng = np.random.RandomState(0)
    c = KalmanRegressor(method="ekf", hidden=(2,), random_state=rng).partial_fit(X[:30], y[:30])
    rng.rand()
    c.partial_fit(X[30:], y[30:])


def test_a_bank_goes_on_without_a_diverged_member():
    """A bank member whose parameters are not finite is out of the mixture (kalnat.bank); the
    estimator reports divergence only when no member is left."""
    X, y, _ = _data(p=2)
    reg = KalmanRegressor().fit(X[:30], y[:30])
    state, learner = reg.state_, reg.learner_
    members = state.members
    broken = state._replace(members=members._replace(
        params=dict(members.params, w=members.params["w"].at[0].set(np.nan))))
    assert _alive(learner, broken)
    assert not _alive(learner, broken._replace(log_weights=state.log_weights.at[1:].set(-np.inf)))
    assert _alive(learner, state)


def test_a_divergence_is_told_in_the_estimators_terms(monkeypatch):
    """kalnat.fit's Diverged (raised with or without predictions) reaches the user as the
    estimator's error, the row counted over the whole stream, with what to try."""
    X, y, _ = _data()
    reg = KalmanRegressor(method="ekf").partial_fit(X[:20], y[:20])

    def diverging(*args, **kwargs):
        raise kalnat.Diverged("the learner diverged", 3)
    monkeypatch.setattr(kalnat, "fit", diverging)
    with pytest.raises(ValueError, match=r"KalmanRegressor: the filter diverged \(a NaN prediction at row 23 "
                                         r"of the stream, from 0\), and the estimator is unfitted again; "
                                         r"try a smaller prior_var$"):
        reg.partial_fit(X[20:], y[20:])
    # its state was consumed: unfitted, as scikit-learn says it (not a consumed state's error)
    with pytest.raises(NotFittedError):
        reg.predict(X)


def test_a_search_over_hyperparameters_compiles_once():
    """Estimators that differ only in prior_var or forgetting run one learner's compiled
    programs (kalnat.estimators keeps one model per architecture; kalnat.programs shares the
    programs of learners that differ only in their hyperparameters), each with its own
    hyperparameters."""
    from kalnat import estimators

    X, _, y = _data(seed=3)
    fits = [KalmanClassifier(method="ekf", prior_var=v, forgetting=lam).fit(X, y)
            for v, lam in ((0.5, None), (2.0, None), (2.0, 0.99))]
    programs = [estimators.learner(c.learner_key_)[0].__dict__["_programs"][("chunk", False)] for c in fits]
    assert programs[1] is programs[0] and programs[2] is programs[0]
    # each runs its own filter (bitwise as it would alone: tests/test_startup.py)
    probs = [c.predict_proba(X) for c in fits]
    assert not np.allclose(probs[0], probs[1]) and not np.allclose(probs[1], probs[2])


_FLOAT32_DIGITS = """
import jax.numpy as jnp
from sklearn.datasets import load_digits
from kalnat.sklearn import KalmanClassifier
X, y = load_digits(return_X_y=True)
clf = KalmanClassifier(method="ekf").fit(X[:640], y[:640])
print(jnp.zeros(()).dtype, clf.score(X[640:1280], y[640:1280]))  # JAX's default float: the filter's
"""


@pytest.mark.slow
def test_a_float32_softmax_classifier_learns_digits():
    """``KalmanClassifier(method="ekf")`` in JAX's default float32 (a process of its own: this
    suite runs in float64) on digits' ten classes, 640 rows learned, the next 640 scored. Its
    family takes the command's floor on R (``kalnat.families.R_FLOOR``); with ``r_floor=0`` a
    confident softmax's R fell below float32's resolution and the accuracy was 0.12 (0.78 with
    the floor)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run([sys.executable, "-c", _FLOAT32_DIGITS], env=dict(env, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    dtype, accuracy = out.stdout.split()
    assert dtype == "float32" and float(accuracy) > 0.7, out.stdout
