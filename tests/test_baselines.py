"""Baselines: progressive (predict-then-learn) behaviour, scores, the online noise estimate."""

import numpy as np
import pytest

from kalnat import baselines as B
from kalnat import families


@pytest.fixture(scope="module")
def logistic():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3))
    y = (X @ [2.0, -1.0, 0.5] + rng.logistic(size=200) * 0.3 > 0).astype(int)
    return X, y


def test_scores_by_hand():
    y = np.array([1, 0])
    s = B.scores("bernoulli", y, B.Predictions(probs=np.array([[0.5, 0.5], [0.8, 0.2]])))
    assert np.isclose(s["log_loss"], (np.log(2) - np.log(0.8)) / 2) and s["accuracy"] == 0.5
    s = B.scores("gaussian", np.array([1.0, 3.0]),
                 B.Predictions(mean=np.array([0.0, 3.0]), var=np.array([1.0, 4.0])), start=1)
    assert s["rows"] == 1 and np.isclose(s["log_loss"], 0.5 * np.log(2 * np.pi * 4.0))
    s = B.scores("poisson", np.array([2]), B.Predictions(mean=np.array([2.0])))
    assert np.isclose(s["log_loss"], 2 - 2 * np.log(2) + np.log(2))


def test_online_noise_uses_earlier_rows_only_and_is_chunk_invariant():
    rng = np.random.default_rng(1)
    r = rng.normal(0, 3.0, size=500)
    v = B.OnlineNoise()(r)
    assert v[0] == 1.0 and np.isclose(v[1], (1.0 + r[0] ** 2) / 2)
    noise = B.OnlineNoise()
    np.testing.assert_allclose(np.concatenate([noise(r[:17]), noise(r[17:])]), v)
    assert abs(v[-1] - 9.0) < 1.5
    w = B.OnlineNoise(decay=0.9)(np.r_[np.full(100, 10.0), np.full(100, 1.0)])
    assert w[0] == 1.0 and abs(w[99] - 100.0) < 1 and abs(w[-1] - 1.0) < 0.01


def test_optax_grid_is_progressive_and_learns(logistic):
    X, y = logistic
    preds = B.optax_grid("adam", X, y, "bernoulli", lrs=(0.0, 0.05))
    np.testing.assert_allclose(preds[0].probs, 0.5)        # lr 0: never moves from p = ½
    np.testing.assert_allclose(preds[1].probs[0], 0.5)     # row 1 is predicted before learning
    assert B.scores("bernoulli", y, preds[1])["log_loss"] < 0.45


@pytest.mark.parametrize("name", ["sgd", "sklearn_sgd", "offline", "offline_cv"])
def test_each_baseline_beats_the_uniform_prediction(logistic, name):
    X, y = logistic
    p = B.run_baseline(name, X, y, "bernoulli", lr=0.1)
    s = B.scores("bernoulli", y, p)
    assert s["accuracy"] > 0.8
    if name != "sklearn_sgd":  # its default "optimal" step size is accurate but overconfident
        assert s["log_loss"] < 0.6 * np.log(2)


def test_offline_in_sample_beats_held_out(logistic):
    X, y = logistic
    ins = B.scores("bernoulli", y, B.offline_fit(X, y, "bernoulli"))["log_loss"]
    cv = B.scores("bernoulli", y, B.offline_fit(X, y, "bernoulli", folds=5))["log_loss"]
    assert ins < cv


def test_an_offline_fit_that_cannot_be_had_says_why_in_its_own_words(logistic):
    """One class among the rows it learns from, or fewer rows than folds: a ValueError saying
    so (scikit-learn's said "... only one class: np.int64(1)" and "n_splits=10 greater than the
    number of samples"), which kalnat compare turns into a skipped reference line."""
    X, y = logistic
    with pytest.raises(ValueError, match="^every row it learns from has the same class: a classifier needs two$"):
        B.offline_fit(X, np.ones_like(y), "bernoulli")
    with pytest.raises(ValueError, match=r"^every row it learns from \(a fold's other rows\) has the same class"):
        B.offline_fit(X[:20], np.r_[0, np.ones(19, int)], "bernoulli", folds=10)   # the fold holding row 0
    with pytest.raises(ValueError, match="^5 rows, fewer than the 10 folds of its cross-validation$"):
        B.offline_fit(X[:5], y[:5], "bernoulli", folds=10)


def test_gaussian_baselines_get_an_online_variance():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(150, 2))
    y = X @ [1.0, -2.0] + rng.normal(0, 0.5, 150)
    p = B.run_baseline("sgd", X, y, families.Gaussian(), lr=0.05)
    # its residuals include its own learning error: more than the noise 0.25, far below var(y)
    assert p.var is not None and p.var[0] == 1.0 and 0.2 < p.var[-1] < 1.0 < np.var(y)
    off = B.offline_fit(X, y, "gaussian")
    assert abs(off.var[0] - 0.25) < 0.1


def test_categorical_and_river():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(90, 2))
    y = np.digitize(X[:, 0], [-0.4, 0.4])
    p = B.run_baseline("sklearn_sgd", X, y, "categorical")
    assert p.probs.shape == (90, 3)
    np.testing.assert_allclose(p.probs.sum(1), 1.0)
    pytest.importorskip("river")
    p = B.run_baseline("river", X, y, "categorical")
    assert B.scores("categorical", y, p)["accuracy"] > 0.6


def test_unknown_baseline_and_missing_lr(logistic):
    X, y = logistic
    with pytest.raises(ValueError, match="unknown baseline"):
        B.run_baseline("lbfgs", X, y, "bernoulli")
    with pytest.raises(ValueError, match="learning rate"):
        B.run_baseline("adam", X, y, "bernoulli")
