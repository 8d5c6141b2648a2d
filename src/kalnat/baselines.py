"""One-pass baselines scored exactly like kalnat's learners, and the progressive scores.

Every baseline sees the rows in the given order, predicts each row *before* learning it
(progressive validation) and returns :class:`Predictions`: class probabilities for a
classifier, a predictive mean and variance for a regression or count model. The offline
fit (all rows at once) is the reference line, not a competitor.

    >>> preds = run_baseline("adam", Z, y, "bernoulli", lr=0.01)        # doctest: +SKIP
    >>> scores("bernoulli", y, preds)["log_loss"]                       # doctest: +SKIP

Baselines:
  ``sgd``, ``adam``: optax over the same flattened model (linear or MLP) and the family's
  negative log-likelihood, one row per step; :func:`optax_grid` runs a learning-rate grid in
  one vmapped scan.
  ``sklearn_sgd``: scikit-learn's ``SGDClassifier(loss="log_loss")`` / ``SGDRegressor`` with
  ``partial_fit`` one row at a time, default settings.
  ``river``: river's ``LogisticRegression`` / ``SoftmaxRegression`` / ``LinearRegression``
  (only when river is installed).
  ``offline``: scikit-learn's batch maximum-likelihood GLM on all rows (in-sample), and
  ``offline_cv``: the same fit scored on held-out folds.

Targets: class indices ``0..K−1`` (bernoulli, categorical), counts (poisson), reals
(gaussian; online baselines are given the target already standardised online by the
caller, and their predictive variance is a running mean, forgetting over ~100 rows, of their
own earlier squared residuals, :class:`OnlineNoise`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kalnat import datasets as _datasets
from kalnat import families as _families
from kalnat import models as _models

__all__ = [
    "Predictions", "OnlineNoise", "BASELINES", "LR_GRID", "available_baselines", "run_baseline",
    "optax_grid", "sklearn_sgd", "river_linear", "offline_fit", "row_losses", "scores",
]

# A point predictor's noise estimate forgets with an effective window of ~100 rows.
POINT_NOISE_DECAY = 0.99
LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
BASELINES = ("sgd", "adam", "sklearn_sgd", "river", "offline", "offline_cv")


class Predictions(NamedTuple):
    """Progressive predictions of ``n`` rows.

    Attributes:
      probs: ``(n, K)`` class probabilities (classifiers), else ``None``.
      mean: ``(n,)`` predictive mean (regression and counts), else ``None``.
      var: ``(n,)`` predictive variance of y (gaussian), else ``None``.
      log_loss: ``(n,)`` counts only: each row's −log predictive probability, for a predictor
        whose predictive is not the Poisson at ``mean`` (a bank's mixture of Poisson members,
        whose mean one member far off can dominate while the mixture's probability of y stays
        close to its good members'); ``None``: scored at ``mean``. Other families are scored
        from ``probs``, or ``mean`` and ``var``.
    """

    probs: Optional[np.ndarray] = None
    mean: Optional[np.ndarray] = None
    var: Optional[np.ndarray] = None
    log_loss: Optional[np.ndarray] = None


def _family(family, n_classes=None):
    if isinstance(family, _families.Family):
        return family
    return _families.from_name(family, n_classes)


def _n_classes(fam):
    return getattr(fam, "num_classes", 2 if fam.name == "bernoulli" else None)


# ---- scoring ------------------------------------------------------------------------------

class OnlineNoise:
    """Running estimate of a Gaussian noise variance from earlier residuals only.

    Row t's variance is ``s²_t · u_t``, where ``s²_t`` is the (weighted) mean of ``r_i² / u_i``
    over the rows before t, plus ``prior_var`` counted as ``prior_weight`` pseudo-rows, and
    ``u_t`` the row's variance factor in units of the noise (``1 + h V hᵀ`` for a filter whose
    noise variance is 1; 1 for a point predictor). For a linear-Gaussian model with noise
    variance σ² and prior σ²·V₀, ``r_t / √u_t`` has variance σ², so with ``decay = 1`` ``s²_t``
    is an unbiased running estimate of it. A point predictor's early residuals also carry its
    early learning error, which nothing rescales: ``decay < 1`` (weights ``decay^age``) lets
    its estimate forget them.
    """

    def __init__(self, prior_var: float = 1.0, prior_weight: float = 1.0, decay: float = 1.0):
        self.total = float(prior_var) * prior_weight
        self.weight = float(prior_weight)
        self.decay = float(decay)

    def __call__(self, resid, unit=None):
        """Predictive variances of a block of rows, then absorbs their residuals."""
        resid = np.asarray(resid, np.float64)
        unit = np.ones_like(resid) if unit is None else np.asarray(unit, np.float64)
        z2 = resid**2 / unit
        if self.decay == 1.0:
            before = self.total + np.concatenate([[0.0], np.cumsum(z2)[:-1]])
            counts = self.weight + np.arange(len(z2))
            self.total += float(z2.sum())
            self.weight += len(z2)
            return before / counts * unit
        out = np.empty(len(z2))
        for k, v in enumerate(z2):
            out[k] = self.total / self.weight
            self.total = self.decay * self.total + v
            self.weight = self.decay * self.weight + 1.0
        return out * unit


def row_losses(family, y, pred: Predictions) -> dict:
    """Per-row progressive scores: ``log_loss`` and ``correct`` (classifiers) or ``sq_err``."""
    fam = _family(family, None if pred.probs is None else np.shape(pred.probs)[1])
    y = np.asarray(y)
    if fam.name == "poisson" and pred.log_loss is not None:
        return {"log_loss": np.asarray(pred.log_loss, np.float64),
                "sq_err": (y.astype(np.float64) - np.asarray(pred.mean, np.float64)) ** 2}
    if fam.is_classifier:
        p = np.clip(np.asarray(pred.probs, np.float64), 1e-15, 1.0)
        idx = y.astype(np.int64)
        picked = p[np.arange(len(idx)), idx]
        return {"log_loss": -np.log(picked), "correct": (np.argmax(p, axis=1) == idx).astype(float)}
    mean = np.asarray(pred.mean, np.float64)
    y = y.astype(np.float64)
    if fam.name == "poisson":
        lam = np.maximum(mean, 1e-15)
        from scipy.special import gammaln

        ll = lam - y * np.log(lam) + gammaln(y + 1.0)
    else:
        var = np.maximum(np.asarray(pred.var, np.float64), 1e-300)
        ll = 0.5 * (np.log(2 * np.pi * var) + (y - mean) ** 2 / var)
    return {"log_loss": ll, "sq_err": (y - mean) ** 2}


def scores(family, y, pred: Predictions, start: int = 0, n_points: int = 200) -> dict:
    """Progressive log-loss and accuracy (classifiers) or RMSE over rows ``start..n``, and
    a learning curve of the running means (at most ``n_points`` points); ``None`` for a score
    of no rows (``start ≥ n``)."""
    fam = _family(family, None if pred.probs is None else np.shape(pred.probs)[1])
    losses = {k: v[start:] for k, v in row_losses(fam, y, pred).items()}
    n = len(losses["log_loss"])
    out = {"rows": n, "log_loss": float(np.mean(losses["log_loss"])) if n else None}
    key = "correct" if fam.is_classifier else "sq_err"
    cum = np.cumsum(losses["log_loss"]) / np.arange(1, n + 1)
    cum2 = np.cumsum(losses[key]) / np.arange(1, n + 1)
    if fam.is_classifier:
        out["accuracy"] = float(cum2[-1]) if n else None
    else:
        out["rmse"] = float(np.sqrt(cum2[-1])) if n else None
        cum2 = np.sqrt(cum2)
    at = np.unique(np.linspace(0, n - 1, min(n, n_points)).astype(int)) if n else np.array([], int)
    out["curve"] = {"row": (at + start + 1).tolist(), "log_loss": cum[at].tolist(),
                    ("accuracy" if fam.is_classifier else "rmse"): cum2[at].tolist()}
    return out


# ---- optax: SGD and Adam over the same model ----------------------------------------------

def _optimizer(name, lr):
    import optax  # here, not at the top: a command that runs no baseline skips its import (0.1 s)

    if name == "sgd":
        return optax.sgd(lr)
    if name == "adam":
        return optax.adam(lr)
    raise ValueError(f"unknown optax baseline {name!r}; expected sgd or adam")


def optax_grid(name: str, X, y, family, *, model=None, lrs: Sequence[float] = LR_GRID,
               seed: int = 0) -> list[Predictions]:
    """Progressive one-pass ``sgd`` or ``adam`` at every learning rate of ``lrs``.

    One row per step, loss ``−log p(y | model(x))``. All rates run in one vmapped
    ``lax.scan``. ``model`` defaults to a linear model of the family's output size.
    Returns one :class:`Predictions` per rate (gaussian: mean only; the caller adds the
    variance with :class:`OnlineNoise`, see :func:`run_baseline`).
    """
    import optax

    fam = _family(family, _n_classes_from(family, y))
    X = np.asarray(X)
    model = model or _models.linear(X.shape[1], fam.n_outputs)
    dtype = jax.dtypes.canonicalize_dtype(float)
    params0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.init(jax.random.PRNGKey(seed)))
    ys = jnp.asarray(y if fam.is_classifier or fam.name == "poisson" else np.asarray(y, np.float64))
    if fam.is_classifier:
        ys = ys.astype(jnp.int32)

    def loss(params, x, yy):
        return -fam.log_prob(model.apply(params, x), yy)

    def run(lr):
        opt = _optimizer(name, lr)

        def body(carry, inp):
            params, st = carry
            x, yy = inp
            z = model.apply(params, x)
            yhat = fam.mean(z)
            g = jax.grad(loss)(params, x, yy)
            upd, st = opt.update(g, st, params)
            return (optax.apply_updates(params, upd), st), yhat

        _, yhats = jax.lax.scan(body, (params0, opt.init(params0)), (jnp.asarray(X, dtype), ys))
        return yhats

    yhats = np.asarray(jax.jit(jax.vmap(run))(jnp.asarray(lrs, dtype)))
    return [_from_yhat(fam, yh) for yh in yhats]


def _from_yhat(fam, yhat):
    yhat = np.asarray(yhat, np.float64)
    if fam.is_classifier:
        probs = np.asarray(fam.probs(jnp.asarray(yhat)))
        return Predictions(probs=_finite_probs(probs))
    return Predictions(mean=np.where(np.isfinite(yhat[:, 0]), yhat[:, 0], 0.0))


def _finite_probs(p):
    """A diverged run (NaN) predicts uniformly rather than poisoning the scores."""
    bad = ~np.all(np.isfinite(p), axis=1)
    p = p.copy()
    p[bad] = 1.0 / p.shape[1]
    return p


def _n_classes_from(family, y):
    if isinstance(family, _families.Family):
        return None
    if family == "categorical":
        return int(np.max(y)) + 1
    return None


# ---- scikit-learn and river one-pass learners -------------------------------------------

def sklearn_sgd(X, y, family, *, n_classes: Optional[int] = None, seed: int = 0,
                **options) -> Predictions:
    """scikit-learn's ``SGDClassifier(loss="log_loss")`` or ``SGDRegressor`` learning one row
    at a time with ``partial_fit``, default settings unless ``options`` (the estimator's own
    keywords: ``alpha``, ``learning_rate``, ``eta0``, …) say otherwise; each row predicted
    before it is learned.

    Counts (poisson) have no scikit-learn online learner: ``ValueError``.
    """
    from sklearn.linear_model import SGDClassifier, SGDRegressor

    fam = _family(family, n_classes or _n_classes_from(family, y))
    X = np.asarray(X, np.float64)
    n = len(X)
    if fam.is_classifier:
        K = _n_classes(fam)
        clf = SGDClassifier(loss="log_loss", random_state=seed, **options)
        probs = np.full((n, K), 1.0 / K)
        classes = np.arange(K)
        for t in range(n):
            if t:
                p = clf.predict_proba(X[t:t + 1])[0]
                probs[t, clf.classes_] = p
            clf.partial_fit(X[t:t + 1], np.asarray(y[t:t + 1], np.int64), classes=classes)
        return Predictions(probs=_finite_probs(probs))
    if fam.name == "poisson":
        raise ValueError("scikit-learn has no online Poisson learner")
    reg = SGDRegressor(random_state=seed, **options)
    mean = np.zeros(n)
    for t in range(n):
        if t:
            mean[t] = reg.predict(X[t:t + 1])[0]
        reg.partial_fit(X[t:t + 1], np.asarray(y[t:t + 1], np.float64))
    return Predictions(mean=np.where(np.isfinite(mean), mean, 0.0))


def river_linear(X, y, family, *, n_classes: Optional[int] = None,
                 lr: Optional[float] = None) -> Predictions:
    """river's ``LogisticRegression`` (binary), ``SoftmaxRegression`` (classes) or
    ``LinearRegression`` (gaussian), ``learn_one`` row by row; default settings, or plain SGD
    at learning rate ``lr`` (weights and intercept) when it is given.

    Raises ``ImportError`` without river and ``ValueError`` for counts (no river learner).
    """
    from river import linear_model, optim

    fam = _family(family, n_classes or _n_classes_from(family, y))
    X = np.asarray(X, np.float64)
    n, p = X.shape
    rate = {} if lr is None else {"optimizer": optim.SGD(lr), "intercept_lr": lr}
    rows = [dict(enumerate(r.tolist())) for r in X]
    if fam.name == "bernoulli":
        m = linear_model.LogisticRegression(**rate)
        probs = np.empty((n, 2))
        for t in range(n):
            p1 = m.predict_proba_one(rows[t]).get(True, 0.5)
            probs[t] = (1.0 - p1, p1)
            m.learn_one(rows[t], bool(y[t]))
        return Predictions(probs=_finite_probs(probs))
    if fam.name == "categorical":
        K = _n_classes(fam)
        m = linear_model.SoftmaxRegression(**{k: v for k, v in rate.items() if k == "optimizer"})
        probs = np.full((n, K), 1.0 / K)
        for t in range(n):
            d = m.predict_proba_one(rows[t])
            if d:
                row = np.array([d.get(k, 0.0) for k in range(K)])
                probs[t] = row / row.sum() if row.sum() > 0 else 1.0 / K
            m.learn_one(rows[t], int(y[t]))
        return Predictions(probs=_finite_probs(probs))
    if fam.name == "poisson":
        raise ValueError("river has no Poisson linear model")
    m = linear_model.LinearRegression(**rate)
    mean = np.empty(n)
    for t in range(n):
        mean[t] = m.predict_one(rows[t])
        m.learn_one(rows[t], float(y[t]))
    return Predictions(mean=np.where(np.isfinite(mean), mean, 0.0))


# ---- offline reference -------------------------------------------------------------------

def _glm(fam, C):
    from sklearn.linear_model import LinearRegression, LogisticRegression, PoissonRegressor

    if fam.is_classifier:
        return LogisticRegression(C=C, max_iter=5000)
    if fam.name == "poisson":
        return PoissonRegressor(alpha=1.0 / C, max_iter=1000)
    return LinearRegression()


def offline_fit(X, y, family, *, folds: int = 0, C: float = 1.0, n_classes: Optional[int] = None,
                seed: int = 0) -> Predictions:
    """Batch maximum-likelihood GLM on all rows, globally standardised (it sees everything).

    ``folds = 0``: in-sample predictions of the fit on all rows (optimistic); ``folds ≥ 2``:
    each row predicted by the fit on the other folds (seeded shuffle). Logistic and Poisson
    fits carry a weak L2 penalty ``1/C`` (on standardised features) so that separable classes
    keep a finite fit; linear regression is plain least squares, and its noise variance is
    the residual variance of the fit.
    """
    from sklearn.model_selection import KFold

    fam = _family(family, n_classes or _n_classes_from(family, y))
    X = np.asarray(X, np.float64)
    y = np.asarray(y)
    n = len(X)

    if folds and folds > n:  # (scikit-learn's KFold says it with its own names)
        raise ValueError(f"{n} row{'s' if n != 1 else ''}, fewer than the {folds} folds of its cross-validation")

    def fit_predict(tr, te):
        if fam.is_classifier and np.unique(y[tr]).size < 2:
            raise ValueError("every row it learns from" + (" (a fold's other rows)" if folds else "")
                             + " has the same class: a classifier needs two")
        mu, sd = X[tr].mean(0), X[tr].std(0)
        sd = np.where(sd > 1e-12, sd, 1.0)
        m = _glm(fam, C).fit((X[tr] - mu) / sd, y[tr])
        Zte = (X[te] - mu) / sd
        if fam.is_classifier:
            K = _n_classes(fam)
            p = np.full((len(te), K), 1e-15)
            p[:, m.classes_.astype(int)] = m.predict_proba(Zte)
            return p / p.sum(1, keepdims=True), None
        pred = m.predict(Zte)
        resid = y[tr] - m.predict((X[tr] - mu) / sd)
        return pred, np.full(len(te), max(np.mean(resid**2), 1e-12))

    if folds and folds >= 2:
        parts = KFold(folds, shuffle=True, random_state=seed).split(X)
    else:
        parts = [(np.arange(n), np.arange(n))]
    out = np.zeros((n, _n_classes(fam))) if fam.is_classifier else np.zeros(n)
    var = np.zeros(n)
    for tr, te in parts:
        pred, v = fit_predict(tr, te)
        out[te] = pred
        if v is not None:
            var[te] = v
    if fam.is_classifier:
        return Predictions(probs=out)
    return Predictions(mean=out, var=var if fam.name == "gaussian" else None)


# ---- one entry point ---------------------------------------------------------------------

def available_baselines() -> list[str]:
    """Baseline names usable here (``river`` only when river is installed)."""
    have_river = _datasets.river_installed()
    return [b for b in BASELINES if b != "river" or have_river]


def run_baseline(name: str, X, y, family, *, lr: Optional[float] = None, model=None,
                 n_classes: Optional[int] = None, seed: int = 0, folds: int = 10) -> Predictions:
    """Progressive predictions of one baseline over rows ``X (n, p)``, targets ``y (n,)``.

    ``family`` is a :class:`kalnat.families.Family` or its name. ``lr`` is required for
    ``sgd`` / ``adam``. For a gaussian family the online baselines' ``var`` is filled in by
    :class:`OnlineNoise` on their own residuals (in the units of ``y``).
    """
    fam = _family(family, n_classes or _n_classes_from(family, y))
    if name in ("sgd", "adam"):
        if lr is None:
            raise ValueError(f"{name}: a learning rate is required")
        pred = optax_grid(name, X, y, fam, model=model, lrs=(lr,), seed=seed)[0]
    elif name == "sklearn_sgd":
        pred = sklearn_sgd(X, y, fam, seed=seed)
    elif name == "river":
        pred = river_linear(X, y, fam)
    elif name == "offline":
        return offline_fit(X, y, fam)
    elif name == "offline_cv":
        return offline_fit(X, y, fam, folds=folds, seed=seed)
    else:
        raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
    return with_noise(fam, y, pred)


def with_noise(family, y, pred: Predictions) -> Predictions:
    """Adds the online noise variance to a gaussian point predictor's predictions."""
    fam = _family(family)
    if fam.name != "gaussian" or pred.var is not None:
        return pred
    resid = np.asarray(y, np.float64) - pred.mean
    return pred._replace(var=OnlineNoise(decay=POINT_NOISE_DECAY)(resid))
